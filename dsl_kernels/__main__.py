"""``python -m dsl_kernels``: a 30-second demo on synthetic bags.

Trains a dense ``nn.EmbeddingBag`` and a 90 %-sparse ``SparseEmbeddingBag`` on the same
regression task (predict a per-bag target from the pooled embedding) and prints loss,
parameter + optimizer-state bytes and step time side by side.
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch
from torch import nn

from . import SparseEmbeddingBag


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _zipf_bags(num_rows: int, batch: int, bag: int, gen: torch.Generator) -> torch.Tensor:
    # Zipf-like popularity: index = floor(N * u^3) puts most lookups on few rows.
    u = torch.rand(batch, bag, generator=gen)
    return (u.pow(3) * num_rows).long().clamp_(max=num_rows - 1)


def run(num_rows: int = 100_000, dim: int = 64, density: float = 0.1, steps: int = 200,
        batch: int = 512, bag: int = 20, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = torch.randn(dim, generator=gen) / dim ** 0.5
    truth = torch.randn(num_rows, generator=gen)  # target = mean of per-row truth over the bag
    models = {
        "dense nn.EmbeddingBag": nn.EmbeddingBag(num_rows, dim, mode="mean"),
        f"SparseEmbeddingBag d={density}": SparseEmbeddingBag(num_rows, dim, mode="mean",
                                                               density=density, block_size=8),
    }
    results = {}
    for name, emb in models.items():
        nn.init.normal_(next(emb.parameters()), std=0.1)
        opt = torch.optim.Adam(emb.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(seed + 1)
        times, losses = [], []
        for _ in range(steps):
            idx = _zipf_bags(num_rows, batch, bag, g)
            y = truth[idx].mean(1)
            t0 = time.perf_counter()
            pred = emb(idx) @ head
            loss = nn.functional.mse_loss(pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        p_bytes = sum(p.numel() * p.element_size() for p in emb.parameters())
        idx_bytes = emb.memory_bytes() - p_bytes if hasattr(emb, "memory_bytes") else 0
        results[name] = dict(loss_first=sum(losses[:10]) / 10, loss_last=sum(losses[-10:]) / 10,
                             param_bytes=p_bytes, index_bytes=idx_bytes,
                             optim_bytes=_state_bytes(opt),
                             step_ms=1e3 * sorted(times)[len(times) // 2])
    return results


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsl_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    res = run(args.rows, args.dim, args.density, args.steps)
    mb = 1 / 2 ** 20
    print(f"{'model':32s} {'loss start':>10s} {'loss end':>9s} {'params MB':>10s} "
          f"{'index MB':>9s} {'Adam MB':>8s} {'step ms':>8s}")
    for name, r in res.items():
        print(f"{name:32s} {r['loss_first']:10.4f} {r['loss_last']:9.4f} "
              f"{r['param_bytes'] * mb:10.2f} {r['index_bytes'] * mb:9.2f} "
              f"{r['optim_bytes'] * mb:8.2f} {r['step_ms']:8.2f}")
    dense, sparse = list(res.values())
    total_d = dense["param_bytes"] + dense["optim_bytes"]
    total_s = sparse["param_bytes"] + sparse["index_bytes"] + sparse["optim_bytes"]
    print(f"sparse table + Adam state = {100 * total_s / total_d:.1f}% of dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
