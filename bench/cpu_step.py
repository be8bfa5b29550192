"""CPU training step of one embedding table: dsl's fused step against FBGEMM's fused TBE step
(and torch's sparse and dense paths), same indices, same run, ratios in the table.

Usage::

    python -m bench.cpu_step                  # issue 14: threads 1, 2 x bags 4,096, 16,384
    python -m bench.cpu_step --quick          # N = 1e5, fewer steps (smoke test)
    python -m bench.cpu_step --threads 2 --bags 4096 --with-dense

Workload: one table N = 1e6 rows x D = 64, fp32, mode sum, ``--bags`` bags of 20 int64 indices
drawn Zipf(1.05), ranks mapped to rows by a fixed random permutation. A step is forward + loss
(``mean(out ** 2)``) + backward + optimizer.

Variants (FBGEMM rows only when ``fbgemm_gpu`` imports, ``pip install fbgemm-gpu-cpu``):

* ``FBGEMM TBE <opt>``        ``SplitTableBatchedEmbeddingBagsCodegen`` (HOST / CPU), dense table,
                              ``EXACT_ROWWISE_ADAGRAD`` / ``EXACT_SGD`` fused into ``backward()``
* ``dsl fused <opt>``         ``SparseEmbeddingBag(density=0.1, block_size=8, backend="cpu")`` +
                              ``fuse_optimizer(<opt>)`` (rowwise_adagrad, sgd, adam)
* ``dsl + torch Adam``        the same module, ``values.grad`` + ``torch.optim.Adam(fused=True)``
* ``EmbeddingBag(sparse) + SparseAdam``  ``nn.EmbeddingBag(sparse=True)``
* ``dense + Adam``            ``nn.EmbeddingBag`` + ``Adam(fused=True)`` (``--with-dense``; slow)

Timing: for each (threads, bags) the variants run round-robin, one step each per round, so load
from other jobs hits all of them alike; every variant gets 2 warm-up steps; the figure is the
median wall-clock of ``--iters`` rounds. ``x FBGEMM`` = FBGEMM's step time with the same optimizer
/ this one (> 1: faster than FBGEMM); ``x FBGEMM rw`` = against FBGEMM's row-wise Adagrad (the
issue's yardstick for Adam, which FBGEMM's CPU mode lacks).
Writes ``bench/results/cpu_step.md`` and prints it.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from bench.common import env_header, markdown_table
from bench.peers import fbgemm_tbe, fbgemm_version, to_fbgemm_inputs
from dsl_kernels import SparseEmbeddingBag
from dsl_kernels.fused import fuse_optimizer

ZIPF_S = 1.05
POOLING = 20
LR = 0.01
RESULTS = os.path.join(os.path.dirname(__file__), "results", "cpu_step.md")
# The goals: (variant, FBGEMM variant it is measured against, minimum speed-up).
GOALS = [("dsl fused rowwise_adagrad", "FBGEMM TBE rowwise_adagrad", 1.5),
         ("dsl fused sgd", "FBGEMM TBE sgd", 1.5),
         ("dsl fused adam", "FBGEMM TBE rowwise_adagrad", 1.5)]


def zipf_batches(N: int, bags: int, pooling: int, n: int, seed: int = 0):
    """``n`` batches ``(indices int64[bags * pooling], offsets int64[bags])``."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.arange(1, N + 1, dtype=torch.float64).pow_(-ZIPF_S)
    cdf = torch.cumsum(p, 0)
    cdf /= cdf[-1].clone()
    perm = torch.randperm(N, generator=gen)
    offsets = torch.arange(bags, dtype=torch.int64) * pooling
    out = []
    for _ in range(n):
        u = torch.rand(bags * pooling, dtype=torch.float64, generator=gen)
        out.append((perm[torch.searchsorted(cdf, u).clamp_(max=N - 1)], offsets))
    return out


Step = Callable[[torch.Tensor, torch.Tensor], None]


def _fbgemm_builder(N: int, D: int, opt: str) -> Callable[[], Step]:
    def build():
        tbe = fbgemm_tbe(N, D, opt, lr=LR)

        def step(idx, off):
            tbe(*to_fbgemm_inputs(idx, off)).square().mean().backward()
        return step
    return build


def _dsl_builder(N: int, D: int, density: float, opt: str) -> Callable[[], Step]:
    def build():
        emb = SparseEmbeddingBag(N, D, mode="sum", density=density, block_size=8, backend="cpu")
        if opt == "torch_adam":
            return _torch_step(emb, torch.optim.Adam([emb.values], lr=LR, fused=True))
        fuse_optimizer(emb, opt, lr=LR)

        def step(idx, off):
            emb(idx, off).square().mean().backward()
        return step
    return build


def _bag_builder(N: int, D: int, sparse: bool) -> Callable[[], Step]:
    def build():
        bag = nn.EmbeddingBag(N, D, mode="sum", sparse=sparse)
        opt = (torch.optim.SparseAdam(bag.parameters(), lr=LR) if sparse
               else torch.optim.Adam(bag.parameters(), lr=LR, fused=True))
        return _torch_step(bag, opt)
    return build


def variant_builders(N: int, D: int, density: float, with_dense: bool
                     ) -> List[Tuple[str, Callable[[], Step]]]:
    """``(name, build)`` of every variant that runs here; ``build()`` allocates the table and
    returns ``step(indices, offsets)`` (also used by bench/test_microbench.py)."""
    out = []
    if fbgemm_version() is not None:
        out += [(f"FBGEMM TBE {opt}", _fbgemm_builder(N, D, opt))
                for opt in ("rowwise_adagrad", "sgd")]
    out += [(f"dsl fused {opt}", _dsl_builder(N, D, density, opt))
            for opt in ("rowwise_adagrad", "sgd", "adam")]
    out.append(("dsl + torch Adam", _dsl_builder(N, D, density, "torch_adam")))
    out.append(("EmbeddingBag(sparse) + SparseAdam", _bag_builder(N, D, sparse=True)))
    if with_dense:
        out.append(("dense + Adam", _bag_builder(N, D, sparse=False)))
    return out


def _torch_step(module: nn.Module, opt: torch.optim.Optimizer) -> Step:
    def step(idx, off):
        opt.zero_grad(set_to_none=True)
        module(idx, off).square().mean().backward()
        opt.step()
    return step


def time_round_robin(steps: List[Tuple[str, Step]], batches, iters: int,
                     warmup: int = 2) -> Dict[str, float]:
    """Median ms per variant, one step of each variant per round."""
    times: Dict[str, List[float]] = {name: [] for name, _ in steps}
    for r in range(warmup + iters):
        idx, off = batches[r % len(batches)]
        for name, step in steps:
            t0 = time.perf_counter()
            step(idx, off)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run(N: int, D: int, density: float, threads: List[int], bag_counts: List[int], iters: int,
        with_dense: bool) -> List[dict]:
    steps = [(name, build()) for name, build in variant_builders(N, D, density, with_dense)]
    rows = []
    for bags in bag_counts:
        batches = zipf_batches(N, bags, POOLING, n=4)
        for t in threads:
            torch.set_num_threads(t)
            ms = time_round_robin(steps, batches, iters)
            for name, m in ms.items():
                peer = "FBGEMM TBE " + name.split()[-1] if name.startswith("dsl fused") else None
                row = {"variant": name, "threads": t, "bags": bags, "step ms": m,
                       "x FBGEMM": ms[peer] / m if peer in ms else None,
                       "x FBGEMM rw": (ms["FBGEMM TBE rowwise_adagrad"] / m
                                       if "FBGEMM TBE rowwise_adagrad" in ms else None)}
                rows.append(row)
                print(f"  {t} thr {bags:>6} bags  {name:<36} {m:8.2f} ms", flush=True)
    del steps
    gc.collect()
    return rows


def goal_lines(rows: List[dict]) -> List[str]:
    """One line per goal and (threads, bags): met / missed and by how much."""
    by = {(r["variant"], r["threads"], r["bags"]): r["step ms"] for r in rows}
    out = []
    for name, peer, want in GOALS:
        for (v, t, b), ms in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
            if v != name or (peer, t, b) not in by:
                continue
            x = by[(peer, t, b)] / ms
            verdict = "met" if x >= want else f"missed by {want / x:.2f}x"
            out.append(f"- {name} vs {peer}, {t} thread(s), {b} bags: {ms:.2f} vs "
                       f"{by[(peer, t, b)]:.2f} ms = **{x:.2f}x** (goal >= {want}x: {verdict})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=1e5, fewer steps (smoke test)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bags", type=int, nargs="+", default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--with-dense", action="store_true", help="add dense nn.EmbeddingBag + Adam")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    N = args.rows or (10 ** 5 if args.quick else 10 ** 6)
    bag_counts = args.bags or ([1024] if args.quick else [4096, 16384])
    iters = args.iters or (3 if args.quick else 10)
    D = 64
    fb = fbgemm_version()
    head = (f"{env_header('cpu')} | fbgemm_gpu {fb or 'not installed (no FBGEMM rows)'}")
    print(head)
    rows = run(N, D, args.density, args.threads, bag_counts, iters, args.with_dense)
    table = markdown_table(rows, ["variant", "threads", "bags", "step ms", "x FBGEMM",
                                  "x FBGEMM rw"])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"## CPU training step: dsl vs FBGEMM (forward + backward + optimizer)\n\n{head}  \n"
            f"load average at the end (1/5/15 min): {load} on {os.cpu_count()} cores, shared "
            f"with other jobs (times are noisy; the variants ran round-robin so they share the "
            f"noise)  \nN={N:,}, D={D}, fp32, sum pooling, bags x {POOLING} Zipf({ZIPF_S}) int64 "
            f"indices; dsl: density {args.density}, block_size 8; lr {LR}; median of {iters} "
            f"round-robin rounds after 2 warm-up rounds. `x FBGEMM` = FBGEMM step with the "
            f"same optimizer / this step; `x FBGEMM rw` = FBGEMM row-wise Adagrad step / this "
            f"step.\n\n{table}\n\nGoals (issue 14):\n\n" + "\n".join(goal_lines(rows)) + "\n")
    print()
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
