"""``dsl::lookup`` in pure PyTorch: the oracle of every backend."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...format import MODE_MAX
from .bags import bag_layout, entry_scale, gather_rows
from ..registry import register_impl


@register_impl("reference", "lookup")
def lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
           indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
           num_blocks: int, mode: int, padding_idx: int) -> Tuple[Tensor, Tensor]:
    """Embedding-bag forward over the block pool. Returns ``(out, max_idx)``."""
    num_bags = offsets.numel() - 1
    D = num_blocks * values.shape[1]
    idx, bag, keep, counts = bag_layout(indices, offsets, padding_idx)
    rows, _ = gather_rows(values, row_ptr, row_slots, row_mask, idx, num_blocks)
    dev = values.device
    if mode == MODE_MAX:
        L = idx.numel()
        src = torch.where(keep.unsqueeze(1), rows, torch.full_like(rows, float("-inf")))
        best = torch.full((num_bags, D), float("-inf"), device=dev)
        best.scatter_reduce_(0, bag.unsqueeze(1).expand(L, D), src, "amax", include_self=True)
        # First entry reaching the maximum wins, as in torch.
        pos = torch.arange(L, device=dev).unsqueeze(1).expand(L, D)
        is_best = (src == best[bag]) & keep.unsqueeze(1)
        cand = torch.where(is_best, pos, torch.full_like(pos, L))
        max_idx = torch.full((num_bags, D), L, dtype=torch.int64, device=dev)
        max_idx.scatter_reduce_(0, bag.unsqueeze(1).expand(L, D), cand, "amin", include_self=True)
        empty = counts == 0
        max_idx[empty] = -1
        max_idx[max_idx == L] = -1  # only reachable with NaN rows: no winner
        out = torch.where(empty.unsqueeze(1), torch.zeros_like(best), best)
        return out.to(values.dtype), max_idx
    scale = entry_scale(per_sample_weights, keep, bag, counts, mode)
    out = torch.zeros(num_bags, D, device=dev)
    out.index_add_(0, bag, rows * scale.unsqueeze(1))
    return out.to(values.dtype), torch.empty(0, dtype=torch.int64, device=dev)
