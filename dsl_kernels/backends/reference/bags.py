"""Bag helpers of the reference backend: per-entry bag ids, weights and gradients
(batch-sized temporaries only, never ``[N, D]``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ...format import MODE_MAX, MODE_MEAN, resolve_slots


def bag_layout(indices: Tensor, offsets: Tensor, padding_idx: int):
    """Per-entry bag id, the entries that count (not padding), and per-bag entry counts."""
    idx = indices.long()
    off = offsets.long()
    num_bags = off.numel() - 1
    L = int(off[-1]) if num_bags >= 0 and off.numel() else 0
    idx = idx[:L]
    lengths = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(num_bags, device=idx.device), lengths)
    keep = idx != padding_idx if padding_idx >= 0 else torch.ones_like(idx, dtype=torch.bool)
    counts = torch.zeros(num_bags, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, bag, keep.long())
    return idx, bag, keep, counts


def gather_rows(values: Tensor, row_ptr, row_slots, row_mask, idx: Tensor, num_blocks: int):
    """``[L, NB*B]`` fp32 rows of the dense image for each index (inactive blocks = 0)."""
    slots = resolve_slots(row_ptr, row_slots, row_mask, idx, num_blocks)  # [L, NB]
    B = values.shape[1]
    v = values.float()[slots.clamp(min=0)]  # [L, NB, B]
    v = v * (slots >= 0).unsqueeze(-1)
    return v.reshape(idx.numel(), num_blocks * B), slots


def entry_scale(per_sample_weights, keep, bag, counts, mode):
    """Weight of each entry in its bag's sum (0 for padding), fp32."""
    scale = keep.float()
    if per_sample_weights is not None:
        scale = scale * per_sample_weights.reshape(-1)[: keep.numel()].float()
    if mode == MODE_MEAN:
        scale = scale / counts.clamp(min=1).float()[bag]
    return scale


def entry_grads(grad_out: Tensor, indices, offsets, per_sample_weights, max_idx, mode, padding_idx):
    """Gradient of the dense image row of every entry, ``[L, D]`` fp32 (batch-sized)."""
    idx, bag, keep, counts = bag_layout(indices, offsets, padding_idx)
    g = grad_out.float()
    L, D = idx.numel(), g.shape[1]
    if mode == MODE_MAX:
        eg = torch.zeros(L, D, device=g.device)
        valid = max_idx >= 0
        cols = torch.arange(D, device=g.device).expand_as(max_idx)
        eg[max_idx[valid], cols[valid]] = g[valid]
        return idx, keep, eg
    scale = entry_scale(per_sample_weights, keep, bag, counts, mode)
    return idx, keep, g[bag] * scale.unsqueeze(1)
