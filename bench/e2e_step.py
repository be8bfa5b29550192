"""End-to-end training step of a DLRM-like embedding layer: dense vs sparse, fused vs unfused.

Usage::

    python -m bench.e2e_step --device cuda --quick   # < 4 min on an H100 (unfused and stale
                                                     # variants at density 0.1 only)
    python -m bench.e2e_step --device cuda           # more runs per variant
    python -m bench.e2e_step --device cpu            # the CPU-sized workload (runs here)

Workload (GPU): 8 tables of 1e6 rows x D=64 and one table of 1e7 rows x D=128, mode sum,
pooling 20 (every bag has 20 entries), 65,536 bags per table per step, indices Zipf(1.05) with
the ranks mapped to rows through a fixed random permutation (hot rows scattered over the table),
fp32 values, int64 indices. CPU: 8 tables of 2e5 x 64, 4,096 bags. A few batches are generated
up front and cycled, so index generation is never timed.

A step is ``forward -> loss -> backward -> optimizer``; the loss is a cheap function of the
pooled outputs (the embedding layer is what is measured). Variants, all in the same run:

* ``dense+Adam``              ``nn.EmbeddingBag`` (dense gradient) + ``torch.optim.Adam``
                               (``fused=True`` on CUDA: the dense baseline at its best)
* ``sparse+SparseAdam``       ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam``
* ``compiled dense+Adam``     ``torch.compile`` of the dense model (skipped with a note when
                               compilation fails or ``--no-compile``)
* ``dsl d=<density>``         ``SparseEmbeddingBagCollection`` (one slot pool, block_size 8) +
                               ``torch.optim.Adam`` on ``values`` (unfused: ``values.grad``)
* ``dsl fused d=<density>``   the same with ``dsl_kernels.fused.fuse_optimizer(.., "adam")``
                               (lazy Adam in the backward, no ``values.grad``, no ``opt.step``)
* ``dsl fused+stale d=..``    fused, with stale-embedding skipping: ``frozen`` set on the slots
                               of the hottest rows until ~20 % of the batch's lookups hit frozen
                               rows (the share Slipstream's ``target_skip=0.2`` aims at; the
                               selection is emulated here, the kernels skip exactly as in
                               training)

Timing: CUDA events, L2 flushed before every timed step, warm-up steps, median
(``bench.common.time_cuda``); on CPU the median of wall-clock runs. Memory: parameters
(``values`` + ``coord`` + index for dsl), optimizer state, and the peak allocated during the
timed steps (CUDA). "mem vs dense" is (params + optimizer state) over dense params + Adam
state. The mask update (prune/regrow + index rebuild, ``DSLScheduler.step`` at an update step)
is timed when ``dsl_kernels.sparsity`` is importable.

Outputs ``bench/results/e2e_<device>.md`` and ``.csv`` (and the plots of ``bench.plots``).
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

ZIPF_S = 1.05
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

try:  # shared helpers of bench/ (timing with L2 flush, env header)
    from bench.common import env_header, time_cpu, time_cuda
except Exception:  # pragma: no cover - minimal local fallbacks
    def time_cuda(fn, warmup=5, iters=20, flush_l2=True):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)

    def time_cpu(fn, warmup=1, iters=5):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    def env_header(device=None):
        return f"torch {torch.__version__}"


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    dim: int


@dataclass
class Workload:
    tables: List[Table]
    batch: int
    pooling: int
    densities: List[float]
    block_size: int = 8
    lr: float = 1e-3

    @property
    def dense_params(self) -> int:
        return sum(t.rows * t.dim for t in self.tables)


def gpu_workload(quick: bool) -> Workload:
    tables = [Table(f"t{i}", 1_000_000, 64) for i in range(8)] + [Table("big", 10_000_000, 128)]
    return Workload(tables, 65_536, 20, [0.05, 0.1, 0.25])


def cpu_workload(quick: bool) -> Workload:
    tables = [Table(f"t{i}", 200_000, 64) for i in range(8)]
    return Workload(tables, 4_096, 20, [0.05, 0.1, 0.25])


# ------------------------------------------------------------------------------ data


def zipf_batches(w: Workload, device: str, n: int, seed: int = 0):
    """``n`` batches ``{table: (indices int64[batch*pooling], offsets int64[batch])}``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = [dict() for _ in range(n)]
    L = w.batch * w.pooling
    offsets = torch.arange(w.batch, device=device, dtype=torch.int64) * w.pooling
    for t in w.tables:
        p = torch.arange(1, t.rows + 1, dtype=torch.float64, device=device).pow_(-ZIPF_S)
        cdf = torch.cumsum(p, 0)
        cdf /= cdf[-1].clone()
        perm = torch.randperm(t.rows, device=device, generator=gen)
        for b in batches:
            u = torch.rand(L, dtype=torch.float64, device=device, generator=gen)
            b[t.name] = (perm[torch.searchsorted(cdf, u).clamp_(max=t.rows - 1)], offsets)
        del p, cdf, perm
    return batches


# ---------------------------------------------------------------------------- models


class DenseLayer(nn.Module):
    def __init__(self, w: Workload, sparse: bool, device: str):
        super().__init__()
        self.names = [t.name for t in w.tables]
        self.bags = nn.ModuleDict({t.name: nn.EmbeddingBag(t.rows, t.dim, mode="sum",
                                                           sparse=sparse, device=device)
                                   for t in w.tables})

    def forward(self, batch):
        return [self.bags[n](*batch[n]) for n in self.names]


def loss_of(outs) -> torch.Tensor:
    # Cheap, nonlinear in the outputs: the top of the model is not what is measured.
    return sum(o.square().mean() for o in outs)


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def optimizer_state_bytes(opt: Optional[torch.optim.Optimizer]) -> int:
    if opt is None:
        return 0
    return sum(tensor_bytes(v for v in st.values() if torch.is_tensor(v))
               for st in opt.state.values())


# --------------------------------------------------------------------------- variants


class Variant:
    """A model + its step; built lazily so only one variant lives in memory at a time."""

    def __init__(self, name: str, kind: str, density: Optional[float] = None):
        self.name, self.kind, self.density = name, kind, density


def build(v: Variant, w: Workload, device: str):
    """Returns ``(step(batch) -> None, params_bytes(), state_bytes(), extra)``."""
    cuda = device == "cuda"
    if v.kind in ("dense", "compiled"):
        model = DenseLayer(w, sparse=False, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=w.lr, **({"fused": True} if cuda else {}))
        fwd = torch.compile(model) if v.kind == "compiled" else model

        def step(batch):
            opt.zero_grad(set_to_none=True)
            loss_of(fwd(batch)).backward()
            opt.step()

        return step, lambda: tensor_bytes(model.parameters()), lambda: optimizer_state_bytes(opt), {}
    if v.kind == "sparse":
        model = DenseLayer(w, sparse=True, device=device)
        opt = torch.optim.SparseAdam(list(model.parameters()), lr=w.lr)

        def step(batch):
            opt.zero_grad(set_to_none=True)
            loss_of(model(batch)).backward()
            opt.step()

        return step, lambda: tensor_bytes(model.parameters()), lambda: optimizer_state_bytes(opt), {}

    import dsl_kernels
    from dsl_kernels.fused import fuse_optimizer

    cfgs = [dsl_kernels.TableConfig(t.name, t.rows, t.dim, mode="sum") for t in w.tables]
    ebc = dsl_kernels.SparseEmbeddingBagCollection(cfgs, density=v.density,
                                                   block_size=w.block_size, device=device,
                                                   validate=False)
    extra = {"backend": ebc.backend_for()}
    names = [t.name for t in w.tables]
    if v.kind == "dsl":
        opt = torch.optim.Adam([ebc.values], lr=w.lr, **({"fused": True} if cuda else {}))

        def step(batch):
            opt.zero_grad(set_to_none=True)
            out = ebc(batch)
            loss_of([out[n] for n in names]).backward()
            opt.step()

        extra["module"], extra["opt"] = ebc, opt
        return step, ebc.memory_bytes, lambda: optimizer_state_bytes(opt), extra
    fo = fuse_optimizer(ebc, "adam", lr=w.lr, nan_policy="ignore")
    extra["module"] = ebc

    def step(batch):
        out = ebc(batch)
        loss_of([out[n] for n in names]).backward()

    return step, ebc.memory_bytes, fo.state_bytes, extra


@torch.no_grad()
def freeze_hottest(ebc, batches, share: float = 0.2) -> float:
    """Freeze the slots of the hottest rows until ``share`` of the lookups hit frozen rows
    (emulates Slipstream's choice of hot, saturated embeddings). Returns the share reached."""
    frozen = torch.zeros(ebc.budget, dtype=torch.bool, device=ebc.values.device)
    total = hit = 0
    for t in ebc.tables:
        idx = torch.cat([b[t.name][0] for b in batches]) + t.row_start
        rows, counts = torch.unique(idx, return_counts=True)
        order = torch.argsort(counts, descending=True)
        csum = torch.cumsum(counts[order], 0)
        k = int(torch.searchsorted(csum, share * idx.numel())) + 1
        hot = rows[order[:k]]
        # Slots whose block lies in a hot row: coord // NB is the global row.
        act = ebc.coord >= 0
        slot_rows = torch.div(ebc.coord, ebc.num_blocks, rounding_mode="floor")
        frozen |= act & torch.isin(slot_rows, hot)
        total += idx.numel()
        hit += int(csum[min(k, csum.numel()) - 1])
    ebc.frozen = frozen
    return hit / max(1, total)


def time_mask_update(ebc, opt, step, batches, device: str) -> Optional[float]:
    """Milliseconds of one DSLScheduler mask update (prune/regrow + rebuild) on the pool, or
    None when the sparsity engine is not available."""
    try:
        from dsl_kernels.sparsity import DSLScheduler
    except Exception:
        return None
    sched = DSLScheduler(ebc, opt, update_every=1, prune_fraction=0.1, stop_at=10 ** 9,
                         grow="gradient", score_window=1, keep_rows=False)  # as measured
    times = []
    for i in range(4):
        step(batches[i % len(batches)])  # fills the growth scores of this window
        if device == "cuda":
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            sched.step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            sched.step()
            times.append((time.perf_counter() - t0) * 1e3)
    sched.close()
    return statistics.median(times[1:])


def profile_fused(w: Workload, device: str, batches, density: float) -> str:
    """torch.profiler table of 3 fused steps (where the time of a dsl step goes)."""
    from torch.profiler import ProfilerActivity, profile

    step, _, _, _ = build(Variant("profile", "fused", density), w, device)
    for i in range(3):
        step(batches[i % len(batches)])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for i in range(3):
            step(batches[i % len(batches)])
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=25)
    except Exception:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    step = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return f"dsl fused step, density {density}, 3 steps:\n{table}"


def run_variant(v: Variant, w: Workload, device: str, batches, warmup: int, iters: int,
                mask_update: bool) -> Dict:
    row = {"variant": v.name, "kind": v.kind, "density": v.density if v.density else 1.0}
    cuda = device == "cuda"
    try:
        step, pbytes, sbytes, extra = build(v, w, device)
        it = [0]

        def one():
            step(batches[it[0] % len(batches)])
            it[0] += 1

        if v.kind == "fused_stale":
            row["frozen_lookup_share"] = round(freeze_hottest(extra["module"], batches), 3)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = time_cuda(one, warmup=warmup, iters=iters)
            row["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
        else:
            ms = time_cpu(one, warmup=warmup, iters=iters)
        row["step_ms"] = ms
        row["params_GB"] = pbytes() / 1e9
        row["opt_state_GB"] = sbytes() / 1e9
        row["backend"] = extra.get("backend", "torch")
        if mask_update and v.kind == "dsl":
            mu = time_mask_update(extra["module"], extra["opt"], step, batches, device)
            if mu is not None:
                row["mask_update_ms"] = mu
    except Exception as e:  # one failing variant (OOM, compile error) must not end the run
        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        traceback.print_exc(file=sys.stderr)
    finally:
        step = pbytes = sbytes = extra = None
        if v.kind == "compiled":
            try:  # compiled graphs may hold the dense parameters: release them
                torch._dynamo.reset()
            except Exception:
                pass
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- report


def git_commit() -> str:
    if os.environ.get("DSL_BENCH_COMMIT"):  # runs from a copy of the tree
        return os.environ["DSL_BENCH_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        c = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c + ("+dirty" if dirty else "") if c else "unknown"
    except Exception:
        return "unknown"


def add_ratios(rows: List[Dict], w: Workload) -> None:
    by = {r["variant"]: r for r in rows}
    dense = by.get("dense+Adam", {}).get("step_ms")
    sparse = by.get("sparse+SparseAdam", {}).get("step_ms")
    dense_mem = w.dense_params * 4 * 3  # fp32 params + Adam's two moments
    for r in rows:
        ms = r.get("step_ms")
        if ms:
            if dense:
                r["x_vs_dense"] = dense / ms
            if sparse:
                r["x_vs_sparseadam"] = sparse / ms
        if r.get("params_GB") is not None:
            r["mem_vs_dense"] = (r["params_GB"] + r.get("opt_state_GB", 0.0)) * 1e9 / dense_mem


COLUMNS = ["variant", "backend", "density", "step_ms", "x_vs_dense", "x_vs_sparseadam",
           "params_GB", "opt_state_GB", "peak_GB", "mem_vs_dense", "mask_update_ms",
           "frozen_lookup_share", "note"]


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def targets(rows: List[Dict], device: str) -> List[str]:
    """One honest line per target of the issue that this run can check."""
    by = {r["variant"]: r for r in rows}
    f = by.get("dsl fused d=0.1", {})
    u = by.get("dsl d=0.1", {})
    out = []
    xd, xs = f.get("x_vs_dense"), f.get("x_vs_sparseadam")
    if device == "cuda":
        out.append(f"- step >= 5x faster than dense+Adam at density 0.1 (fused): "
                   f"{fmt(xd)}x -> {'MET' if xd and xd >= 5 else 'MISSED'}")
        out.append(f"- step >= 2x faster than sparse+SparseAdam at density 0.1 (fused): "
                   f"{fmt(xs)}x -> {'MET' if xs and xs >= 2 else 'MISSED'}")
    else:
        out.append(f"- CPU: step >= 2x faster than dense at density 0.1 (fused): {fmt(xd)}x -> "
                   f"{'MET' if xd and xd >= 2 else 'MISSED'}")
    mem = f.get("mem_vs_dense")
    if mem is not None:
        out.append(f"- training memory (params + optimizer state) <= 1.3 x 0.1 = 0.13 of dense "
                   f"(params + Adam): {fmt(mem)} -> {'MET' if mem <= 0.13 else 'MISSED'}")
    mu, st = u.get("mask_update_ms"), f.get("step_ms")
    dense = by.get("dense+Adam", {}).get("step_ms")
    if mu is not None and st:
        out.append(f"- one mask update (density 0.1) costs less than one step: {fmt(mu)} ms vs "
                   f"{fmt(st)} ms for the dsl fused step -> {'MET' if mu < st else 'MISSED'}"
                   + (f"; vs {fmt(dense)} ms for the dense step -> "
                      f"{'MET' if mu < dense else 'MISSED'}" if dense else "")
                   + " (a mask update runs once every update_every steps)")
    elif mu is None:
        out.append("- mask update cost: not measured (sparsity engine unavailable or failed)")
    return out


def write_results(rows: List[Dict], w: Workload, device: str, header: str, args) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    tag = device
    csv_path = os.path.join(RESULTS, f"e2e_{tag}.csv")
    with open(csv_path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=COLUMNS + ["kind"], extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)
    tables = ", ".join(f"{t.rows:.0e}x{t.dim}" for t in w.tables)
    lines = [f"# End-to-end training step ({device})", "",
             f"{header} | commit {git_commit()}", "",
             f"Workload: tables {tables}; batch {w.batch}, pooling {w.pooling}, Zipf({ZIPF_S}), "
             f"mode sum, fp32, block_size {w.block_size}, Adam lr {w.lr}. "
             f"Warm-up {args.warmup}, median of {args.iters} steps"
             + (", L2 flushed before each." if device == "cuda" else " (wall clock)."), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    lines += ["", "Targets:", *targets(rows, device), "",
              "x_vs_dense / x_vs_sparseadam: speed-up over the dense+Adam / sparse+SparseAdam "
              "step (> 1 is faster). mem_vs_dense: (params + optimizer state) / (dense params + "
              "Adam moments). peak_GB: peak allocated during the timed steps (CUDA only)."]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, f"e2e_{tag}.md"), "w") as fh:
        fh.write(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps (< 4 min on H100)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--densities", type=str, default=None, help="comma list, e.g. 0.1,0.25")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every table's rows (smoke runs: e.g. 0.01)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the torch.profiler breakdown of the fused step at density 0.1")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU; 1 on a shared machine, where OpenMP "
                         "barriers of descheduled threads dominate)")
    args = ap.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu", file=sys.stderr)
        return 2
    w = gpu_workload(args.quick) if device == "cuda" else cpu_workload(args.quick)
    if args.scale != 1.0:
        w.tables = [Table(t.name, max(100, int(t.rows * args.scale)), t.dim) for t in w.tables]
    if args.densities:
        w.densities = [float(x) for x in args.densities.split(",")]
    if args.warmup is None:
        args.warmup = (2 if args.quick else 5) if device == "cuda" else 1
    if args.iters is None:
        args.iters = (5 if args.quick else 20) if device == "cuda" else (3 if args.quick else 5)
    header = env_header(device)
    if device == "cpu":
        header += f" | {torch.get_num_threads()} threads | load avg {os.getloadavg()[0]:.1f}"
    print(header, flush=True)
    t0 = time.time()
    batches = zipf_batches(w, device, n=4)
    variants = [Variant("dense+Adam", "dense"), Variant("sparse+SparseAdam", "sparse")]
    if not args.no_compile:
        variants.append(Variant("compiled dense+Adam", "compiled"))
    for d in w.densities:
        if args.quick and d != 0.1 and len(w.densities) > 1:  # quick: the full set at 0.1 only
            variants.append(Variant(f"dsl fused d={d}", "fused", d))
            continue
        variants += [Variant(f"dsl d={d}", "dsl", d), Variant(f"dsl fused d={d}", "fused", d),
                     Variant(f"dsl fused+stale d={d}", "fused_stale", d)]
    rows = []
    for v in variants:
        t1 = time.time()
        r = run_variant(v, w, device, batches, args.warmup, args.iters,
                        mask_update=(v.density == 0.1 or len(w.densities) == 1))
        rows.append(r)
        print(f"{v.name:28s} {fmt(r.get('step_ms')):>10s} ms   ({time.time() - t1:.0f} s)"
              + (f"   {r['note']}" if r.get("note") else ""), flush=True)
    if args.no_compile:
        rows.insert(2, {"variant": "compiled dense+Adam", "kind": "compiled",
                        "note": "skipped (--no-compile)"})
    add_ratios(rows, w)
    md = write_results(rows, w, device, header, args)
    print(md)
    if not args.no_profile:
        try:
            prof = profile_fused(w, device, batches, 0.1 if 0.1 in w.densities else w.densities[0])
            path = os.path.join(RESULTS, f"e2e_{device}_profile.txt")
            with open(path, "w") as fh:
                fh.write(header + "\n\n" + prof + "\n")
            print(prof)
            print("wrote", path)
        except Exception as e:  # the breakdown is a diagnostic: never fail the run on it
            print(f"(no profile: {type(e).__name__}: {e})")
    try:
        from bench.plots import plot_e2e

        for p in plot_e2e(os.path.join(RESULTS, f"e2e_{device}.csv")):
            print("wrote", p)
    except Exception as e:  # plots are a convenience: never fail the benchmark on them
        print(f"(no plots: {type(e).__name__}: {e})")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
