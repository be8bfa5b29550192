"""How many embedding columns a user and an item *share* under a sparse layout.

Matrix factorisation scores a (user, item) pair with the columns both rows hold, so a sparse
table is only as expressive, for that pair, as the columns the two rows have in common. With
the prefix layouts of :func:`dsl_kernels.sparsity.allocate_by_frequency_` (every row holds its
first ``k`` blocks) that is ``min(k_user, k_item) * block_size``. This module computes it for
the test pairs of a data set, averaged per user (as Recall@20 is) and per pair, so a layout can
be compared with a dense table of ``dim`` columns (which shares all of them) before anything is
trained. It explains why dense-small wins on Gowalla (docs/RESULTS.md, section 0): skewing the
blocks towards frequent rows raises the value count of few rows and lowers the shared count of
most pairs, because the minimum of two widths is largest when the widths are equal.

Run::

    python -m dsl_train.layout_report --data ../shared/data/gowalla --densities 0.1639,0.1935
"""
from __future__ import annotations

import argparse
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

from dsl_kernels.sparsity.layout import frequency_counts

__all__ = ["shared_columns", "layout_rows", "main"]


def shared_columns(block_counts: Tensor, num_users: int, users: Tensor, items: Tensor,
                   block_size: int) -> Dict[str, float]:
    """Columns a prefix layout lets each pair share: ``min(k_u, k_i) * block_size``.

    ``block_counts`` holds the blocks of every global row (users first, then items, as the MF
    table of ``dsl-train`` lays them out). Returns the mean over users of each user's mean over
    its pairs (``per_user``), the mean over pairs (``per_pair``) and the mean values per row.

    >>> import torch
    >>> k = torch.tensor([1, 3, 2, 2])                 # 2 users, then 2 items
    >>> r = shared_columns(k, 2, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 8)
    >>> r["per_pair"], r["per_user"], r["values_per_row"]
    (13.333333333333334, 12.0, 16.0)
    """
    if users.shape != items.shape:
        raise ValueError(f"users and items must have the same shape, got {tuple(users.shape)} "
                         f"and {tuple(items.shape)}")
    k = block_counts.long()
    shared = torch.minimum(k[users.long()], k[num_users + items.long()]).double() * block_size
    n_per_user = torch.bincount(users.long(), minlength=num_users).double()
    per_user = torch.zeros(num_users, dtype=torch.float64).index_add_(0, users.long(), shared)
    seen = n_per_user > 0
    return {"per_user": float((per_user[seen] / n_per_user[seen]).mean()),
            "per_pair": float(shared.mean()),
            "values_per_row": float(k.double().mean() * block_size)}


def layout_rows(row_counts: Tensor, num_users: int, users: Tensor, items: Tensor, dim: int,
                block_sizes: Sequence[int], densities: Sequence[float],
                powers: Sequence[float], min_blocks: int = 1) -> List[Dict[str, float]]:
    """One row per (block size, density, frequency power): the shared columns of the layout
    ``allocate_by_frequency_`` would build from ``row_counts`` (the trainer's own rule)."""
    out = []
    n = row_counts.numel()
    for b in block_sizes:
        if dim % b:
            raise ValueError(f"block size {b} does not divide dim {dim}")
        nb = dim // b
        limits = torch.full((n,), nb, dtype=torch.int64)
        for d in densities:
            budget = int(round(d * n * nb))
            for p in powers:
                k = frequency_counts(row_counts, budget, limits, p, min_blocks)
                r = shared_columns(k, num_users, users, items, b)
                r.update(block_size=b, density=d, power=p,
                         one_block_users=float((k[:num_users] <= 1).double().mean()),
                         one_block_items=float((k[num_users:] <= 1).double().mean()))
                out.append(r)
    return out


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: Optional[Iterable[str]] = None) -> None:
    from .data import load_lightgcn

    ap = argparse.ArgumentParser(prog="python -m dsl_train.layout_report",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="LightGCN train.txt/test.txt folder")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block-sizes", default="8,4")
    ap.add_argument("--densities", default="0.1639,0.1935")
    ap.add_argument("--powers", default="0,0.5")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="carve the trainer's validation split first (its counts are used)")
    a = ap.parse_args(argv)
    data = load_lightgcn(a.data)
    if a.val_fraction > 0:
        data = data.with_validation(a.val_fraction)
    counts = torch.cat([torch.bincount(data.train_users, minlength=data.num_users),
                        torch.bincount(data.train_items, minlength=data.num_items)])
    rows = layout_rows(counts, data.num_users, data.test_users, data.test_items, a.dim,
                       [int(x) for x in a.block_sizes.split(",")], _floats(a.densities),
                       _floats(a.powers))
    print(f"{data.summary()}; test pairs; a dense table of dim d shares d columns per pair")
    print("| B | density | power | values/row | shared cols (user mean) | shared cols (pair mean)"
          " | users at <= 1 block | items at <= 1 block |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_size']} | {r['density']:.4f} | {r['power']:g} | "
              f"{r['values_per_row']:.1f} | {r['per_user']:.1f} | {r['per_pair']:.1f} | "
              f"{r['one_block_users']:.0%} | {r['one_block_items']:.0%} |")


if __name__ == "__main__":
    main()
