"""Kernel microbenchmark: block-sparse lookup forward / backward / forward+backward per backend,
against dense ``nn.EmbeddingBag`` on the same indices, in the same run.

Usage (GPU)::

    python -m bench.kernels --quick     # representative subset, < 4 min on an H100
    python -m bench.kernels             # the full grid of issue 4 (long: hours at N = 1e7)
    python -m bench.kernels --smoke     # tiny sizes; runs on CPU under TRITON_INTERPRET=1

Grid (full): N in {1e6, 1e7} x D in {64, 128} x block_size in {1, 4, 8, D} x density in
{0.05, 0.1, 0.25, 1.0} x bag size in {1, 20, 100} x indices Zipf(1.05) / uniform, 65,536 bags,
mode sum, fp32 values, int64 indices. Every bag has exactly ``bag`` entries. Zipf ranks are
mapped to rows through a fixed random permutation (hot rows are scattered over the table). The
pool is laid out in (row, column) order, as a freshly initialised module is.

Timing: CUDA events per run, L2 flushed before each run (``bench.common.time_cuda``), median of
``--iters`` (>= 20) runs after ``--warmup`` runs. Copy bandwidth is measured in the same run.

Bytes model (what the format must move, no credit for cache reuse of repeated rows; ``L``
entries, ``A`` = sum over entries of the active blocks of the entry's row, ``W`` mask words per
row, ``s_i``/``s_v`` index/value element bytes, ``C`` slots)::

    per entry       E = L * (s_i + 8 W + 4)          index, the row's mask words, row_ptr[r]
    offsets         O = (num_bags + 1) * s_i
    forward         E + O + A * (4 + B s_v) + num_bags * D * s_v
                    (row_slots entry + the block's values per active block; output written)
    backward        E + O + num_bags * D * s_v + A * (4 + 2 * 4 B) + 4 C B
                    (grad_out read; per active block its slot and an fp32 read-modify-write;
                     the fp32 gradient zeroed once; + (4 + s_v) C B for the final cast when
                     values are not fp32)
    forward+backward  the sum of both

GB/s = bytes / median time; "%copy" = GB/s / measured device-to-device copy GB/s (read + write).
"x dense" = dense ``nn.EmbeddingBag`` time / this time (> 1: the sparse op is faster). Dense
backward is the ``sparse=False`` weight gradient (``[N, D]``, as ``nn.EmbeddingBag`` defaults).
Peers on the same indices, in the same run: ``dense_sparse`` (``nn.EmbeddingBag(sparse=True)``,
a COO gradient of the batch's rows; column "x sparse") and ``fbgemm_sgd`` (FBGEMM's TBE with
``EXACT_SGD`` at lr 0 fused into its backward, when ``fbgemm_gpu`` imports; "x fbgemm").

Outputs ``bench/results/kernels_<device>.csv`` / ``.md`` / ``.png`` (GB/s vs density) and prints
the markdown table. A failing configuration (out of memory, compile error) is reported in the
table and the run goes on.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.common import (device_tag, env_header, markdown_table, measure_copy_bandwidth,
                          time_cpu, time_cuda)

BATCH = 65536
ZIPF_S = 1.05
COLUMNS = ["op", "N", "D", "B", "density", "bag", "dist", "backend", "ms", "GB/s", "%copy",
           "dense_ms", "x dense", "x sparse", "x fbgemm", "note"]


@dataclass(frozen=True)
class Config:
    N: int
    D: int
    B: int
    density: float
    bag: int
    dist: str  # "zipf" | "uniform"
    batch: int = BATCH


def full_grid() -> List[Config]:
    out = []
    for N, D, bag, dist in itertools.product((10 ** 6, 10 ** 7), (64, 128), (1, 20, 100),
                                             ("zipf", "uniform")):
        for B in sorted({1, 4, 8, D}):
            for density in (0.05, 0.1, 0.25, 1.0):
                out.append(Config(N, D, B, density, bag, dist))
    return out


def quick_grid() -> List[Config]:
    """About 25 configurations: every block size x density at N=1e6, D=128, bag 20, Zipf, plus
    one-at-a-time variations (uniform, bag 1/100, D=64, N=1e7)."""
    out = [Config(10 ** 6, 128, B, d, 20, "zipf") for B in (1, 4, 8, 128)
           for d in (0.05, 0.1, 0.25, 1.0)]
    out += [Config(10 ** 6, 128, 8, d, 20, "uniform") for d in (0.1, 1.0)]
    out += [Config(10 ** 6, 128, 8, 0.1, bag, "zipf") for bag in (1, 100)]
    out += [Config(10 ** 6, 64, 8, 0.1, 20, "zipf"), Config(10 ** 6, 64, 64, 0.1, 20, "zipf")]
    out += [Config(10 ** 7, 128, 8, 0.1, 20, "zipf"), Config(10 ** 7, 128, 128, 0.1, 20, "zipf")]
    return out


def smoke_grid() -> List[Config]:
    return [Config(2000, 16, 4, 0.25, 4, "zipf", batch=64),
            Config(2000, 16, 4, 1.0, 4, "zipf", batch=64),
            Config(2000, 16, 16, 0.5, 2, "uniform", batch=64)]


# ----------------------------------------------------------------------------- workload

_ZIPF_CACHE: Dict[tuple, tuple] = {}


def make_indices(cfg: Config, device: str, gen: torch.Generator):
    """``(indices int64[L], offsets int64[batch + 1])`` with ``bag`` entries per bag."""
    L = cfg.batch * cfg.bag
    if cfg.dist == "uniform":
        idx = torch.randint(0, cfg.N, (L,), device=device, generator=gen)
    else:
        key = (cfg.N, device)
        if key not in _ZIPF_CACHE:
            _ZIPF_CACHE.clear()
            p = torch.arange(1, cfg.N + 1, dtype=torch.float64, device=device).pow_(-ZIPF_S)
            cdf = torch.cumsum(p, 0)
            cdf /= cdf[-1].clone()
            perm = torch.randperm(cfg.N, device=device, generator=gen)
            _ZIPF_CACHE[key] = (cdf, perm)
        cdf, perm = _ZIPF_CACHE[key]
        u = torch.rand(L, dtype=torch.float64, device=device, generator=gen)
        rank = torch.searchsorted(cdf, u).clamp_(max=cfg.N - 1)
        idx = perm[rank]
    offsets = torch.arange(cfg.batch + 1, device=device, dtype=torch.int64) * cfg.bag
    return idx, offsets


def make_pool(cfg: Config, device: str, dtype: torch.dtype, gen: torch.Generator,
              shuffle: bool = False):
    """Random active blocks (each block active with probability ``density``);
    ``(values, row_ptr, row_slots, row_mask)``. Slots are in (row, col) order, as a freshly
    initialised module has them, or randomly permuted with ``shuffle`` (a pool after many
    prune/regrow steps). Built in row chunks so no ``[N, NB]`` tensor exists for large N."""
    from dsl_kernels.backends.triton.rebuild_index import index_from_sorted_keys

    NB = cfg.D // cfg.B
    chunk = max(1, (1 << 26) // NB)
    keys = []
    for r0 in range(0, cfg.N, chunk):
        n = min(chunk, cfg.N - r0)
        if cfg.density >= 1.0:
            keys.append(torch.arange(r0 * NB, (r0 + n) * NB, device=device))
        else:
            m = torch.rand(n * NB, device=device, generator=gen) < cfg.density
            keys.append(torch.nonzero(m).squeeze(1) + r0 * NB)
    keys = torch.cat(keys)
    C = keys.numel()
    if shuffle:
        order = torch.randperm(C, device=device, generator=gen)
    else:
        order = torch.arange(C, device=device,
                             dtype=torch.int32 if C < 2 ** 31 else torch.int64)
    row_ptr, row_slots, row_mask = index_from_sorted_keys(keys, order, cfg.N, NB)
    del keys, order
    values = torch.randn(C, cfg.B, device=device, dtype=dtype, generator=gen)
    return values, row_ptr, row_slots, row_mask


def bytes_model(op: str, cfg: Config, L: int, A: int, C: int, s_i: int = 8, s_v: int = 4) -> int:
    """Bytes the format must move (see the module docstring)."""
    NB = cfg.D // cfg.B
    W = (NB + 63) // 64
    base = L * (s_i + 8 * W + 4) + (cfg.batch + 1) * s_i
    fwd = base + A * (4 + cfg.B * s_v) + cfg.batch * cfg.D * s_v
    bwd = base + cfg.batch * cfg.D * s_v + A * (4 + 8 * cfg.B) + 4 * C * cfg.B
    if s_v != 4:
        bwd += (4 + s_v) * C * cfg.B
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[op]


# ----------------------------------------------------------------------------- backends


def sparse_backends(include_reference: bool, include_det: bool) -> Dict[str, Dict[str, Callable]]:
    """``{name: {"lookup": fn, "lookup_backward": fn, "deterministic": bool}}`` runnable here."""
    from dsl_kernels import backends

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    if backends.why_not("triton", dev) is None:
        tb = backends.get("triton")
        out["triton"] = dict(lookup=tb["lookup"], lookup_backward=tb["lookup_backward"],
                             det=False)
        if include_det:
            out["triton_det"] = dict(lookup=tb["lookup"], lookup_backward=tb["lookup_backward"],
                                     det=True)
    if dev == "cuda" and backends.has_impl("cuda", "lookup") and \
            backends.has_impl("cuda", "lookup_backward"):
        impl = backends.get("cuda")
        out["cuda"] = dict(lookup=impl["lookup"], lookup_backward=impl["lookup_backward"],
                           det=False)
    if include_reference:
        ref = backends.get("reference")
        out["reference"] = dict(lookup=ref["lookup"],
                                lookup_backward=ref["lookup_backward"], det=False)
    return out


# ----------------------------------------------------------------------------- runner


def run_config(cfg: Config, backends, device: str, timer, copy_gbs: float, ops: List[str],
               dtype=torch.float32, shuffle: bool = False) -> List[dict]:
    rows: List[dict] = []
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(repr(cfg).encode()))
    base = dict(N=cfg.N, D=cfg.D, B=cfg.B, density=cfg.density, bag=cfg.bag, dist=cfg.dist)
    idx, offsets = make_indices(cfg, device, gen)
    values, row_ptr, row_slots, row_mask = make_pool(cfg, device, dtype, gen, shuffle)
    NB = cfg.D // cfg.B
    L, C = idx.numel(), values.shape[0]
    A = int((row_ptr[idx + 1] - row_ptr[idx]).sum())
    g = torch.randn(cfg.batch, cfg.D, device=device, dtype=dtype, generator=gen)
    no_max = torch.empty(0, dtype=torch.int64, device=device)

    # Dense nn.EmbeddingBag on the same indices (weight [N, D], sparse=False gradient), and the
    # peers: the same table with sparse=True, FBGEMM's TBE when it imports.
    dense_ms: Dict[str, Optional[float]] = {}
    peer_ms: Dict[str, Dict[str, float]] = {}
    try:
        weight = torch.randn(cfg.N, cfg.D, device=device, dtype=dtype, generator=gen,
                             requires_grad=True)

        def dense_fwd():
            return F.embedding_bag(idx, weight, offsets, mode="sum", include_last_offset=True)

        with torch.no_grad():
            t_f = timer(dense_fwd)
        out_d = dense_fwd()
        t_b = timer(lambda: torch.autograd.grad(out_d, weight, g, retain_graph=True))
        t_fb = timer(lambda: torch.autograd.grad(dense_fwd(), weight, g))
        dense_ms = {"fwd": t_f, "bwd": t_b, "fwdbwd": t_fb}
        # The same table with nn.EmbeddingBag(sparse=True)'s gradient (COO rows of the batch).
        out_s = F.embedding_bag(idx, weight, offsets, mode="sum", include_last_offset=True,
                                sparse=True)
        t_sb = timer(lambda: torch.autograd.grad(out_s, weight, g, retain_graph=True))
        t_sfb = timer(lambda: torch.autograd.grad(
            F.embedding_bag(idx, weight, offsets, mode="sum", include_last_offset=True,
                            sparse=True), weight, g))
        peer_ms["dense_sparse"] = {"fwd": t_f, "bwd": t_sb, "fwdbwd": t_sfb}
        del out_d, out_s, weight
    except Exception as e:  # e.g. out of memory at N = 1e7: report, keep going
        note = f"dense failed: {type(e).__name__}: {str(e)[:80]}"
        rows.append(dict(base, op="-", backend="dense", note=note))
        dense_ms = {}
    peer_ms.update(_fbgemm_ms(cfg, idx, offsets, g, device, timer))
    for op in ops:
        if op in dense_ms:
            rows.append(dict(base, op=op, backend="dense", ms=dense_ms[op]))
        for peer, ms in peer_ms.items():
            if op in ms:
                rows.append(dict(base, op=op, backend=peer, ms=ms[op],
                                 **({"x dense": dense_ms[op] / ms[op]} if op in dense_ms
                                    else {})))
    if device == "cuda":
        torch.cuda.empty_cache()

    for name, be in backends.items():
        look, bwd, det = be["lookup"], be["lookup_backward"], be["det"]

        def f_fwd():
            return look(values, row_ptr, row_slots, row_mask, idx, offsets, None, NB, 0, -1)

        def f_bwd():
            return bwd(g, values, row_ptr, row_slots, row_mask, idx, offsets, None, no_max,
                       None, NB, 0, -1, det)

        def f_fwdbwd():
            f_fwd()
            return f_bwd()

        fns = {"fwd": f_fwd, "bwd": f_bwd, "fwdbwd": f_fwdbwd}
        for op in ops:
            if det and op == "fwd":
                continue  # deterministic mode only changes the backward
            row = dict(base, op=op, backend=name)
            try:
                ms = timer(fns[op])
                gbs = bytes_model(op, cfg, L, A, C) / (ms * 1e-3) / 1e9
                row.update(ms=ms, **{"GB/s": gbs, "%copy": 100 * gbs / copy_gbs})
                if dense_ms.get(op):
                    row["dense_ms"] = dense_ms[op]
                    row["x dense"] = dense_ms[op] / ms
                for peer, col in (("dense_sparse", "x sparse"), ("fbgemm_sgd", "x fbgemm")):
                    if op in peer_ms.get(peer, {}):
                        row[col] = peer_ms[peer][op] / ms
            except Exception as e:
                row["note"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
                traceback.print_exc(limit=2, file=sys.stderr)
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    del values, row_ptr, row_slots, row_mask, idx, offsets, g
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fbgemm_ms(cfg: Config, idx, offsets, g, device: str, timer) -> Dict[str, Dict[str, float]]:
    """FBGEMM TBE (dense table, EXACT_SGD fused into its backward) on the same indices:
    ``{"fbgemm_sgd": {"fwd": ms, "fwdbwd": ms}}``, or {} when fbgemm_gpu does not import. Its
    backward always applies the optimizer, so there is no separate "bwd" figure."""
    from bench.peers import fbgemm_tbe

    try:
        tbe = fbgemm_tbe(cfg.N, cfg.D, "sgd", lr=0.0, device=device)
        if tbe is None:
            return {}
        with torch.no_grad():
            t_f = timer(lambda: tbe(idx, offsets))
        t_fb = timer(lambda: tbe(idx, offsets).backward(g))
        del tbe
    except Exception as e:  # a peer failing must not stop the benchmark
        print(f"fbgemm failed: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
        return {}
    return {"fbgemm_sgd": {"fwd": t_f, "fwdbwd": t_fb}}


def summarize(rows: List[dict]) -> str:
    """Targets of issue 4 for the Triton backend (fwd >= 80 % copy, bwd >= 60 %, fwd+bwd faster
    than dense at density 0.1): best and median of what was measured."""
    lines = []
    for op, target in (("fwd", 80.0), ("bwd", 60.0)):
        got = [r["%copy"] for r in rows if r.get("backend") == "triton" and r.get("op") == op
               and r.get("%copy") is not None]
        if got:
            got.sort()
            lines.append(f"- triton {op}: %copy median {got[len(got) // 2]:.0f} %, best "
                         f"{got[-1]:.0f} % (target >= {target:.0f} %) over {len(got)} configs")
    sp = [r["x dense"] for r in rows if r.get("backend") == "triton" and r.get("op") == "fwdbwd"
          and r.get("density") == 0.1 and r.get("x dense") is not None]
    if sp:
        sp.sort()
        lines.append(f"- triton fwd+bwd at density 0.1: x dense median {sp[len(sp) // 2]:.2f}, "
                     f"min {sp[0]:.2f}, max {sp[-1]:.2f} (target > 1) over {len(sp)} configs")
    return "\n".join(lines)


def plot(rows: List[dict], path: str, copy_gbs: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [o for o in ("fwd", "bwd", "fwdbwd") if any(r.get("op") == o for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        series: Dict[tuple, list] = {}
        for r in rows:
            if r.get("op") != op or r.get("GB/s") is None:
                continue
            key = (r["backend"], r["N"], r["D"], r["B"], r["bag"], r["dist"])
            series.setdefault(key, []).append((r["density"], r["GB/s"]))
        multi = {k: v for k, v in series.items() if len(v) > 1}
        # Single-density variations would clutter the plot (they are in the table).
        for key, pts in sorted((multi or series).items()):
            pts.sort()
            be, N, D, B, bag, dist = key
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{be} N={N:.0e} D={D} B={B} bag={bag} {dist}")
        ax.axhline(copy_gbs, color="k", ls="--", lw=1, label="copy bandwidth")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density")
        ax.set_ylabel("GB/s (format bytes)")
        ax.set_title(op)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="representative subset (< 4 min, H100)")
    g.add_argument("--full", action="store_true", help="the full grid of issue 4 (default)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny sizes, also on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ops", default="fwd,bwd,fwdbwd")
    ap.add_argument("--reference", action="store_true", help="also time the reference backend")
    ap.add_argument("--shuffle-slots", action="store_true",
                    help="random slot order (a pool after many prune/regrow steps) instead of "
                         "the (row, col) order of a fresh module")
    ap.add_argument("--no-det", action="store_true", help="skip the deterministic backward")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop starting new configs after this many seconds "
                         "(default 200 with --quick)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; a "
                                                "temporary folder for --smoke)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench.kernels needs a CUDA device (use --smoke for a tiny CPU run under "
              "TRITON_INTERPRET=1)")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if cuda else "cpu"
    iters = max(args.iters, 20) if not args.smoke else min(args.iters, 3)
    warmup = args.warmup if not args.smoke else 1
    if cuda:
        def timer(fn):
            return time_cuda(fn, warmup=warmup, iters=iters, flush_l2=True)
    else:
        def timer(fn):
            return time_cpu(fn, warmup=warmup, iters=iters)
    configs = smoke_grid() if args.smoke else quick_grid() if args.quick else full_grid()
    limit = args.time_limit if args.time_limit is not None else (200.0 if args.quick else None)
    ops = [o for o in args.ops.split(",") if o]

    header = env_header(device)
    copy_gbs = measure_copy_bandwidth(device=device)
    print(header)
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    backends = sparse_backends(args.reference, not args.no_det)
    print(f"backends: {', '.join(backends)} + dense nn.EmbeddingBag; {len(configs)} configs")
    if not backends:
        print("no sparse backend can run here")

    rows: List[dict] = []
    t0 = time.time()
    skipped = 0
    for i, cfg in enumerate(configs):
        if limit is not None and time.time() - t0 > limit:
            skipped = len(configs) - i
            print(f"time limit {limit:.0f}s reached: {skipped} configs not run")
            break
        tc = time.time()
        try:
            new = run_config(cfg, backends, device, timer, copy_gbs, ops,
                             shuffle=args.shuffle_slots)
        except Exception as e:  # setup failed (e.g. out of memory): report and go on
            new = [dict(N=cfg.N, D=cfg.D, B=cfg.B, density=cfg.density, bag=cfg.bag,
                        dist=cfg.dist, op="-", backend="-",
                        note=f"setup failed: {type(e).__name__}: {str(e)[:100]}")]
            traceback.print_exc(limit=2, file=sys.stderr)
            if cuda:
                torch.cuda.empty_cache()
        rows.extend(new)
        best = [f"{r['backend']}/{r['op']} {r['ms']:.3f}ms" for r in new if r.get("ms")]
        print(f"[{i + 1}/{len(configs)}] {cfg} ({time.time() - tc:.1f}s): {'; '.join(best)}",
              flush=True)

    out_dir = args.out or (tempfile.mkdtemp(prefix="bench_kernels_") if args.smoke
                           else os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    # --quick and the full grid write the same files (the markdown title says which ran).
    tag = device_tag(device) + ("_smoke" if args.smoke else "")
    base = os.path.join(out_dir, f"kernels_{tag}")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    table = markdown_table(rows, COLUMNS)
    summary = summarize(rows)
    md = [f"# Kernel benchmark ({'smoke' if args.smoke else 'quick' if args.quick else 'full'})",
          "", header, "", f"Copy bandwidth (device-to-device, read + write): {copy_gbs:.0f} GB/s",
          f"Timing: median of {iters} runs, L2 flushed before each; batch "
          f"{configs[0].batch if configs else BATCH} bags, mode sum, fp32 values, int64 indices, "
          f"slots {'shuffled' if args.shuffle_slots else 'in (row, col) order'}. "
          "Bytes model: see bench/kernels.py docstring.", "",
          "Targets (issue 4): fwd >= 80 % copy, bwd >= 60 %, fwd+bwd faster than dense at "
          "density 0.1.", summary, ""]
    if skipped:
        md.append(f"{skipped} configs not run (time limit).\n")
    md.append(table)
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    try:
        plot(rows, base + ".png", copy_gbs)
    except Exception as e:  # plotting must never lose the numbers
        print(f"plot failed: {type(e).__name__}: {e}")
    print("\n".join(md))
    print(f"\nwrote {base}.csv, .md, .png ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
