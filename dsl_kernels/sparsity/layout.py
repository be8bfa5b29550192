"""Initial masks that give the sparsity engine a good start.

A random mask puts each row's few blocks in random columns: at density 0.1 with 8 blocks per row a
user and an item rarely share an active column, so most of their dot products are exactly 0 and
stay there until the mask moves. Two layouts fix that:

* :func:`align_` keeps every row's block count and moves its blocks to the first columns (row r
  with k blocks holds columns 0..k-1): the table starts as a ragged "narrow dense" one.
* :func:`allocate_by_frequency_` also sets the per-row block counts from how often each row is
  used (mixed-dimension embeddings, Ginart et al. 2019): frequent rows get more columns, rows
  that never occur get none, within the same budget.

Both rewrite ``coord`` in place (same slots, same budget), zero nothing else, and rebuild the
index. Call them before training (the optimizer state of moved slots is not touched).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..pool import BlockSparseBase


def _write_prefix_layout(pool: BlockSparseBase, counts: Tensor) -> None:
    """``coord`` := for each row r, blocks (r, 0..counts[r]-1); free slots after them."""
    counts = counts.to(torch.int64)
    n = int(counts.sum())
    if n > pool.budget:
        raise ValueError(f"the layout holds {n} blocks, more than the budget {pool.budget}")
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    cols = torch.arange(n, device=counts.device) - first[rows]
    c = pool.coord
    c.fill_(-1)
    c[:n] = (rows * pool.num_blocks + cols).to(c.device)
    pool.rebuild_index()


def _row_limits(pool: BlockSparseBase) -> Tensor:
    """Blocks each global row may hold: its table's block count (0 for padding rows)."""
    lim = torch.zeros(pool.num_rows, dtype=torch.int64)
    for t in pool.tables:
        lim[t.row_start:t.row_start + t.num_rows] = t.num_blocks
        if t.padding_idx is not None:
            lim[t.row_start + t.padding_idx] = 0
    return lim


@torch.no_grad()
def align_(pool: BlockSparseBase) -> None:
    """Move every row's active blocks to its first columns, keeping the per-row counts.

    >>> import torch, dsl_kernels
    >>> from dsl_kernels.sparsity import align_
    >>> e = dsl_kernels.SparseEmbedding(6, 16, density=0.5, block_size=4)
    >>> before = (e.to_dense() != 0).view(6, 4, 4).any(2).sum(1)
    >>> align_(e)
    >>> m = (e.to_dense() != 0).view(6, 4, 4).any(2)
    >>> bool((m.sum(1) == before).all()), bool((m.cummin(1).values == m).all())
    (True, True)
    """
    c = pool.coord
    active = c[c >= 0]
    counts = torch.bincount(torch.div(active, pool.num_blocks, rounding_mode="floor").cpu(),
                            minlength=pool.num_rows)
    values = pool.values.data
    # A row's blocks keep their values in column order (the slot order of an ascending coord).
    order = torch.argsort(torch.where(c >= 0, c, torch.iinfo(c.dtype).max))
    values.copy_(values[order])
    _write_prefix_layout(pool, counts)


def _water_fill(w: Tensor, lim: Tensor, target: float, tie: Optional[Tensor] = None) -> Tensor:
    """Integer x <= lim with sum(x) = target and x ~ c * w (bisection on c, then the rounding
    remainder to the largest fractional parts; equal parts go to the largest ``tie`` first,
    then to the lowest index, so the result does not depend on how topk breaks ties)."""
    if target <= 0:
        return torch.zeros_like(lim)
    lo, hi = 0.0, 1.0
    while float(torch.minimum(w * hi, lim).sum()) < target:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(torch.minimum(w * mid, lim).sum()) < target:
            lo = mid
        else:
            hi = mid
    x = torch.minimum(w * hi, lim)
    base = torch.floor(x)
    rest = int(round(target - float(base.sum())))
    tie = torch.zeros_like(x) if tie is None else tie.to(x.dtype)
    if rest > 0:
        base[_first(x - base, tie, base < lim, rest)] += 1
    elif rest < 0:  # take back from the smallest fractional parts, the least frequent first
        base[_first(base - x, -tie, base > 0, -rest)] -= 1
    return base


def _first(key: Tensor, tie: Tensor, ok: Tensor, n: int) -> Tensor:
    """The first ``n`` rows with ``ok`` by key descending, then tie descending, then index
    (two stable sorts: topk would break ties in an unspecified order)."""
    by_tie = torch.argsort(tie, descending=True, stable=True)
    order = by_tie[torch.argsort(key[by_tie], descending=True, stable=True)]
    return order[ok[order]][:n]


def frequency_counts(row_counts: Tensor, budget: int, limits: Tensor,
                     power: float = 0.5, min_blocks: int = 1) -> Tensor:
    """Blocks per row: first ``min_blocks`` for every row that occurs (``row_counts > 0``; the
    most frequent first when the budget cannot cover them all), then the rest of the budget
    ``∝ row_counts ** power``, capped by ``limits``. Rows that never occur get none.

    >>> lim = torch.tensor([4, 4, 4, 4])
    >>> frequency_counts(torch.tensor([100, 25, 0, 1]), 6, lim, 0.5, min_blocks=0).tolist()
    [4, 2, 0, 0]
    >>> frequency_counts(torch.tensor([100, 25, 0, 1]), 6, lim, 0.5).tolist()
    [3, 2, 0, 1]
    """
    seen = row_counts > 0
    lim = (limits.double() * seen).clamp(min=0)
    budget = int(min(budget, lim.sum()))
    floor = torch.minimum(torch.full_like(lim, float(min_blocks)), lim)
    if float(floor.sum()) > budget:
        # Not enough for everyone: one block at a time to the most frequent rows.
        floor = torch.zeros_like(lim)
        order = torch.argsort(row_counts.double(), descending=True, stable=True)
        for _ in range(min_blocks):
            room = order[(floor[order] < lim[order])]
            take = room[:budget - int(floor.sum())]
            floor[take] += 1
            if int(floor.sum()) >= budget:
                break
        return floor.to(torch.int64)
    w = row_counts.double().clamp(min=0) ** power
    w[~seen] = 0.0
    extra = _water_fill(w, lim - floor, float(budget) - float(floor.sum()),
                        tie=row_counts.double())
    return (floor + extra).to(torch.int64)


@torch.no_grad()
def allocate_by_frequency_(pool: BlockSparseBase, row_counts: Tensor, power: float = 0.5,
                           min_blocks: int = 1, init_std: Optional[float] = None,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """Give every row that occurs ``min_blocks`` blocks, and the rest of the budget ``∝
    row_counts[r] ** power``, in its first columns (:func:`frequency_counts`). ``row_counts``
    is ``[num_rows]`` (global rows of the pool, e.g. interaction counts of users then items).
    Values are redrawn from ``normal(0, init_std)`` when ``init_std`` is given, else kept slot
    by slot. Returns the per-row block counts.

    >>> import torch, dsl_kernels
    >>> from dsl_kernels.sparsity import allocate_by_frequency_
    >>> e = dsl_kernels.SparseEmbedding(4, 16, density=0.25, block_size=4)   # 4 blocks
    >>> allocate_by_frequency_(e, torch.tensor([100, 1, 0, 9])).tolist()
    [2, 1, 0, 1]
    """
    if min_blocks < 0:
        raise ValueError(f"min_blocks must be >= 0, got {min_blocks}")
    if row_counts.numel() != pool.num_rows:
        raise ValueError(f"row_counts has {row_counts.numel()} entries, the pool has "
                         f"{pool.num_rows} rows")
    if not power >= 0:
        raise ValueError(f"power must be >= 0, got {power}")
    counts = frequency_counts(row_counts.cpu(), pool.budget, _row_limits(pool), power,
                              min_blocks)
    _write_prefix_layout(pool, counts)
    if init_std is not None:
        v = torch.randn(pool.values.shape, generator=generator) * init_std
        pool.values.data.copy_(v.to(pool.values.dtype))
    return counts
