"""``dsl::grow_scores`` in pure PyTorch: gradient norms of the inactive blocks of touched rows."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...format import resolve_slots
from .bags import entry_grads
from ..registry import register_impl


@register_impl("reference", "grow_scores")
def grow_scores(grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                max_idx: Tensor, num_blocks: int, mode: int, padding_idx: int
                ) -> Tuple[Tensor, Tensor]:
    """Growth criterion for the rows a batch touched: ``(rows int64[R] ascending,
    scores fp32[R, NB])`` with ``scores[r, j]`` the L2 norm of the dense gradient of block
    ``(rows[r], j)`` when it is inactive, 0 when it is active."""
    idx, keep, eg = entry_grads(grad_out, indices, offsets, per_sample_weights, max_idx, mode,
                                 padding_idx)
    rows, inv = torch.unique(idx[keep], sorted=True, return_inverse=True)
    D = eg.shape[1]
    acc = torch.zeros(rows.numel(), D, device=eg.device)
    acc.index_add_(0, inv, eg[keep])
    # Explicit block size: with no touched rows a -1 in view() would be ambiguous.
    scores = acc.view(rows.numel(), num_blocks, D // num_blocks).norm(dim=2)
    active = resolve_slots(row_ptr, row_slots, row_mask, rows, num_blocks) >= 0
    return rows, scores.masked_fill(active, 0.0)
