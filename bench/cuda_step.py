"""GPU training step of one embedding table (issue 14, points 4 and 5): the forward against copy
bandwidth, the fused step against dense + Adam, host syncs per step, CUDA-graph replay.

Usage (needs a GPU; FBGEMM rows only where the CUDA ``fbgemm_gpu`` imports)::

    python -m bench.cuda_step                 # N = 1e6, D = 64, batch 65,536 x 20 Zipf(1.05)
    python -m bench.cuda_step --quick         # N = 1e5, batch 8,192 (smoke)

Workload: one table N x 64 fp32, mode sum, ``--batch`` bags of 20 int64 indices drawn
Zipf(1.05); dsl at density 0.1, block size 8. A step is forward + loss (``mean(out ** 2)``) +
backward + optimizer; four batches are cycled.

* **forward**: ``bench.kernels.run_config`` on the same workload for B = 8, 32, 64 (the lookup
  alone; GB/s on the bytes the block format moves, % of the copy bandwidth measured here).
* **step**: GPU time per step by CUDA events with the L2 flushed before each step (median of
  ``--iters``) and wall time per step of ``--iters`` back-to-back steps (which also pays for the
  host: launches and synchronisations). Variants: dense ``nn.EmbeddingBag`` + ``torch.optim.Adam``
  (torch's default, foreach) and + ``Adam(fused=True)``; ``nn.EmbeddingBag(sparse=True)`` +
  ``SparseAdam``; dsl fused adam / rowwise_adagrad / sgd on the ``cuda`` backend with the
  bounds-check mode ``raise`` (default) and ``off`` (:mod:`dsl_kernels.bounds`, with
  ``validate=False``); the same on ``triton``; a CUDA graph of the whole dsl step (rowwise_adagrad,
  sgd) replayed.
* **syncs**: host synchronisations in one step, counted with
  ``torch.cuda.set_sync_debug_mode("warn")``.

Writes ``bench/results/cuda_step_<device>.md`` and prints it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import dsl_kernels
from bench.common import (device_tag, env_header, markdown_table, measure_copy_bandwidth,
                          time_cuda_all, write_report)
from bench.kernels import Config, make_indices, run_config, sparse_backends
from dsl_kernels import SparseEmbeddingBag
from dsl_kernels.fused import fuse_optimizer

LR = 0.01
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def batches(cfg: Config, n: int) -> List[tuple]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(n):
        idx, off = make_indices(cfg, "cuda", gen)
        out.append((idx, off[:-1].contiguous()))  # nn.EmbeddingBag convention
    return out


def step_fn(module: nn.Module, opt: Optional[torch.optim.Optimizer]) -> Callable:
    def step(idx, off):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        module(idx, off).pow(2).mean().backward()
        if opt is not None:
            opt.step()
    return step


def count_syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations torch reports while ``fn`` runs (sync debug mode ``warn``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def measure(name: str, step: Callable, data: List[tuple], iters: int, extra: Dict) -> Dict:
    it = iter(range(10 ** 9))

    def one():
        idx, off = data[next(it) % len(data)]
        step(idx, off)

    gpu = statistics.median(time_cuda_all(one, warmup=3, iters=iters))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        one()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / iters
    syncs = count_syncs(one)
    row = dict(variant=name, gpu_ms=gpu, wall_ms=wall, syncs=syncs,
               peak_GB=torch.cuda.max_memory_allocated() / 1e9)
    row.update(extra)
    print(f"  {name:<52} gpu {gpu:8.3f} ms  wall {wall:8.3f} ms  syncs {syncs}", flush=True)
    return row


def graphed_step(module: nn.Module, data: List[tuple]) -> Callable:
    """The whole step captured once in a CUDA graph; the returned callable copies a batch into
    the static inputs and replays it."""
    s_idx, s_off = (t.clone() for t in data[0])
    step = step_fn(module, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(s_idx, s_off)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(s_idx, s_off)

    def replay(idx, off):
        s_idx.copy_(idx)
        s_off.copy_(off)
        graph.replay()
    replay.graph = graph  # keep it alive
    return replay


def run_steps(cfg: Config, iters: int, with_sparse: bool) -> List[Dict]:
    data = batches(cfg, 4)
    rows: List[Dict] = []
    mem_dense = cfg.N * cfg.D * 4
    # Dense references.
    for name, kw in (("dense + Adam (foreach)", {}), ("dense + Adam(fused=True)",
                                                      {"fused": True})):
        torch.cuda.reset_peak_memory_stats()
        emb = nn.EmbeddingBag(cfg.N, cfg.D, mode="sum").cuda()
        opt = torch.optim.Adam(emb.parameters(), lr=LR, **kw)
        rows.append(measure(name, step_fn(emb, opt), data, iters,
                            dict(backend="torch", mem_vs_dense=1.0)))
        del emb, opt
        torch.cuda.empty_cache()
    if with_sparse:
        torch.cuda.reset_peak_memory_stats()
        emb = nn.EmbeddingBag(cfg.N, cfg.D, mode="sum", sparse=True).cuda()
        opt = torch.optim.SparseAdam(emb.parameters(), lr=LR)
        rows.append(measure("EmbeddingBag(sparse) + SparseAdam", step_fn(emb, opt), data, iters,
                            dict(backend="torch", mem_vs_dense=1.0)))
        del emb, opt
        torch.cuda.empty_cache()
    backends = ["cuda"] + (["triton"] if dsl_kernels.backends.why_not("triton", "cuda") is None
                           else [])
    for backend in backends:
        for optimizer in ("adam", "rowwise_adagrad", "sgd"):
            for mode in ("raise", "off"):
                if backend == "triton" and (mode == "off" or optimizer != "adam"):
                    continue
                torch.cuda.reset_peak_memory_stats()
                emb = SparseEmbeddingBag(cfg.N, cfg.D, mode="sum", density=cfg.density,
                                         block_size=cfg.B, device="cuda", backend=backend,
                                         validate=mode == "raise")
                fo = fuse_optimizer(emb, optimizer, lr=LR)
                mem = (emb.values.numel() * 4 + fo.state_bytes()) / (mem_dense * 3)
                with dsl_kernels.bounds_check_mode(mode):
                    rows.append(measure(f"dsl fused {optimizer}, {backend}, bounds {mode}",
                                        step_fn(emb, None), data, iters,
                                        dict(backend=backend, mem_vs_dense=mem)))
                    if mode == "off" and optimizer != "adam":
                        try:
                            replay = graphed_step(emb, data)
                            rows.append(measure(f"dsl fused {optimizer}, {backend}, CUDA graph",
                                                replay, data, iters,
                                                dict(backend=backend, mem_vs_dense=mem)))
                        except Exception as e:  # report, keep going
                            print(f"  graph capture failed: {type(e).__name__}: {e}")
                            rows.append(dict(variant=f"dsl fused {optimizer}, CUDA graph",
                                             backend=backend,
                                             note=f"capture failed: {str(e)[:80]}"))
                del emb, fo
                torch.cuda.empty_cache()
    return rows


def profile_step(cfg: Config, backend: str = "cuda", optimizer: str = "adam",
                 steps: int = 5) -> str:
    """Kernel time of the fused dsl step (bounds off), torch profiler, top 20 by GPU time."""
    data = batches(cfg, 4)
    emb = SparseEmbeddingBag(cfg.N, cfg.D, mode="sum", density=cfg.density, block_size=cfg.B,
                             device="cuda", backend=backend, validate=False)
    fuse_optimizer(emb, optimizer, lr=LR)
    step = step_fn(emb, None)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with dsl_kernels.bounds_check_mode("off"):
        for i in range(3):
            step(*data[i % 4])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(steps):
                step(*data[i % 4])
            torch.cuda.synchronize()
    ka = prof.key_averages()
    for key in ("device_time_total", "cuda_time_total"):
        try:
            return (f"{steps} steps of dsl fused {optimizer} ({backend}, bounds off):\n"
                    + ka.table(sort_by=key, row_limit=20, max_name_column_width=60))
        except Exception:  # the sort key's name differs between torch versions
            continue
    return ka.table(row_limit=20)


def goals(rows: List[Dict], fwd_rows: List[Dict]) -> List[str]:
    out = []
    by = {r["variant"]: r for r in rows if "gpu_ms" in r}
    dense = by.get("dense + Adam (foreach)")
    for name in ("dsl fused adam, cuda, bounds off", "dsl fused adam, cuda, bounds raise",
                 "dsl fused adam, triton, bounds raise"):
        if dense and name in by:
            for col in ("gpu_ms", "wall_ms"):
                x = dense[col] / by[name][col]
                out.append(f"- {name} vs dense + Adam ({col}): {by[name][col]:.3f} vs "
                           f"{dense[col]:.3f} ms = **{x:.2f}x** (goal >= 6x: "
                           f"{'met' if x >= 6 else f'missed by {6 / x:.2f}x'})")
    for r in fwd_rows:
        if r.get("op") == "fwd" and r.get("backend") in ("cuda", "triton") and "%copy" in r:
            goal = 85 if r["B"] >= 32 else 60
            ok = r["%copy"] >= goal
            out.append(f"- forward, {r['backend']}, B = {r['B']}: {r['ms']:.3f} ms, "
                       f"{r['GB/s']:.0f} GB/s = **{r['%copy']:.1f} %** of copy bandwidth "
                       f"(goal >= {goal} %: {'met' if ok else 'missed'})")
    for r in rows:
        if r.get("variant", "").endswith("bounds off") and "syncs" in r:
            out.append(f"- host syncs per step, {r['variant']}: **{r['syncs']}** (goal 0: "
                       f"{'met' if r['syncs'] == 0 else 'missed'})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 1e5, batch 8,192 (smoke)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-forward", action="store_true", help="skip the forward section")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.cuda_step needs a CUDA device")
    N, batch = (10 ** 5, 8192) if args.quick else (10 ** 6, 65536)
    cfg = Config(N, 64, 8, 0.1, 20, "zipf", batch=batch)
    header = env_header("cuda")
    print(header, flush=True)
    copy = measure_copy_bandwidth(1 << 30, "cuda")
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    fwd_rows: List[Dict] = []
    if not args.no_forward:
        be = sparse_backends(False, False)
        for B in (8, 32, 64):
            c = Config(N, 64, B, 0.1, 20, "zipf", batch=batch)
            fwd_rows += run_config(c, be, "cuda", lambda f: statistics.median(
                time_cuda_all(f, warmup=3, iters=args.iters)), copy, ["fwd", "fwdbwd"])
        print(markdown_table(fwd_rows, ["op", "B", "backend", "ms", "GB/s", "%copy",
                                        "x dense", "x fbgemm", "note"]), flush=True)
    rows = run_steps(cfg, args.iters, with_sparse=True)
    try:
        prof = profile_step(cfg)
    except Exception as e:  # the profiler must not cost the tables
        prof = f"profiler failed: {type(e).__name__}: {e}"
    print(prof, flush=True)
    g = goals(rows, fwd_rows)
    text = "\n".join([
        "## CUDA training step: dsl vs dense + Adam (forward + backward + optimizer)", "",
        header + "  ",
        f"copy bandwidth {copy:.0f} GB/s (read + write, 1 GiB device copy)  ",
        f"N={N:,}, D=64, fp32, sum, batch {batch:,} x 20 Zipf(1.05) int64; dsl density 0.1, "
        f"B = 8; lr {LR}; gpu ms = CUDA events, L2 flushed, median of {args.iters}; wall ms = "
        f"{args.iters} back-to-back steps / {args.iters}; syncs = host synchronisations torch "
        "reports in one step.", "",
        "### Forward and forward + backward (lookup kernels alone)", "",
        markdown_table(fwd_rows, ["op", "B", "backend", "ms", "GB/s", "%copy", "x dense",
                                  "x fbgemm", "note"]) if fwd_rows else "(skipped)", "",
        "### Training step", "",
        markdown_table(rows, ["variant", "gpu_ms", "wall_ms", "syncs", "peak_GB",
                              "mem_vs_dense", "note"]), "",
        "`mem_vs_dense`: dsl values + fused optimizer state / dense values + Adam state.", "",
        "### Goals (issue 14)", "", *g, "",
        "### Profile of the fused step", "", "```", prof, "```", ""])
    write_report(args.out, f"cuda_step_{device_tag('cuda')}{'_quick' if args.quick else ''}.md",
                 text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
