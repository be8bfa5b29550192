"""CPU training step of one embedding table: the C++ ``cpu`` backend vs dense and sparse torch.

Usage::

    python -m bench.cpu_step              # N=1e6, D=64, densities 0.1 and 0.25 (a few minutes)
    python -m bench.cpu_step --quick      # N=1e5, fewer runs (smoke test)

Workload: one table of N = 1e6 rows x D = 64, fp32, mode sum, 4,096 bags of 20 indices (int64),
indices Zipf(1.05) with the ranks mapped to rows by a fixed random permutation. A step is
``zero_grad -> forward -> loss -> backward -> optimizer.step``; the loss is ``mean(out ** 2)``.

Variants:

* ``dense+Adam``            ``nn.EmbeddingBag`` (dense [N, D] gradient) + ``torch.optim.Adam``
                            (``fused=True``: torch's fastest CPU Adam, for the baseline too)
* ``sparse+SparseAdam``     ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam``
* ``dsl cpu d=<density>``   ``SparseEmbeddingBag(block_size=8, backend="cpu")`` + ``Adam``
                            (``fused=True``) on the ``[C, 8]`` values pool
* ``dsl reference d=0.1``   the same on the pure-PyTorch reference backend (what the C++ kernels
                            replace)

Timing: median wall-clock of ``--iters`` steps after warm-up (``bench.common.time_cpu``), with
``torch.get_num_threads()`` threads. Results: a markdown table on stdout and in
``bench/results/cpu_step.md``.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
from torch import nn

from bench.common import env_header, markdown_table, time_cpu
from dsl_kernels import SparseEmbeddingBag, dispatch

ZIPF_S = 1.05
RESULTS = os.path.join(os.path.dirname(__file__), "results", "cpu_step.md")


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


def step_fn(module: nn.Module, opt: torch.optim.Optimizer, batches):
    it = iter(range(1 << 62))

    def step():
        idx, off = batches[next(it) % len(batches)]
        opt.zero_grad(set_to_none=True)
        out = module(idx, off)
        out.square().mean().backward()
        opt.step()

    return step


def bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run(N: int, D: int, densities, bags: int, pooling: int, iters: int, warmup: int,
        with_reference: bool):
    batches = zipf_batches(N, bags, pooling, n=4)
    rows = []
    dense_ms = None

    def record(name, density, ms, params, state):
        rows.append({"variant": name, "density": density, "step ms": ms,
                     "vs dense": None if dense_ms is None else dense_ms / ms,
                     "params MB": params / 2 ** 20, "opt state MB": state / 2 ** 20})
        print(f"  {name:<22} {ms:9.1f} ms", flush=True)

    torch.manual_seed(0)
    for sparse in (False, True):
        emb = nn.EmbeddingBag(N, D, mode="sum", sparse=sparse)
        opt = (torch.optim.SparseAdam(emb.parameters(), lr=1e-3) if sparse
               else torch.optim.Adam(emb.parameters(), lr=1e-3, fused=True))
        step = step_fn(emb, opt, batches)
        ms = time_cpu(step, warmup=warmup, iters=iters)
        state = bytes_of(v for s in opt.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor))
        name = "sparse+SparseAdam" if sparse else "dense+Adam"
        if not sparse:
            dense_ms = ms
        record(name, 1.0, ms, bytes_of([emb.weight]), state)
        del emb, opt, step
        gc.collect()

    variants = [("cpu", d) for d in densities]
    if with_reference:
        variants.append(("reference", densities[0]))
    for backend, density in variants:
        emb = SparseEmbeddingBag(N, D, mode="sum", density=density, block_size=8,
                                 backend=backend)
        opt = torch.optim.Adam([emb.values], lr=1e-3, fused=True)
        step = step_fn(emb, opt, batches)
        ms = time_cpu(step, warmup=warmup, iters=iters if backend == "cpu" else max(2, iters // 2))
        state = bytes_of(v for s in opt.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor))
        record(f"dsl {backend}", density, ms, emb.memory_bytes(), state)
        del emb, opt, step
        gc.collect()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=1e5 and fewer runs (smoke test)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the (slow) reference-backend row")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if dispatch.resolve("cpu", "cpu") != "cpu":  # raises with the reason when not built
        raise SystemExit("the cpu backend is not available")
    N = args.rows or (10 ** 5 if args.quick else 10 ** 6)
    iters = args.iters or (3 if args.quick else 7)
    D, bags, pooling, densities = 64, 4096, 20, (0.1, 0.25)
    print(env_header("cpu"))
    print(f"N={N:,} D={D} bags={bags} pooling={pooling} Zipf({ZIPF_S}) fp32 int64, "
          f"{torch.get_num_threads()} threads")
    rows = run(N, D, densities, bags, pooling, iters, warmup=2,
               with_reference=not args.no_reference)
    table = markdown_table(rows, ["variant", "density", "step ms", "vs dense", "params MB",
                                  "opt state MB"])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"## CPU training step (forward + backward + optimizer)\n\n{env_header('cpu')}  \n"
            f"load average at the end of the run (1/5/15 min): {load} on "
            f"{os.cpu_count()} cores (other jobs on the machine inflate and scatter the times)  \n"
            f"N={N:,}, D={D}, block_size=8, {bags} bags x {pooling} Zipf({ZIPF_S}) indices, fp32, "
            f"{torch.get_num_threads()} threads; median of {iters} steps. `vs dense` = dense "
            f"step time / this step time.\n\n{table}\n")
    print()
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
