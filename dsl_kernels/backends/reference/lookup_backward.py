"""``dsl::lookup_backward`` in pure PyTorch: the masked gradient scatter, ``[C, B]``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...format import resolve_slots
from .bags import entry_grads
from ..registry import register_impl


@register_impl("reference", "lookup_backward")
def lookup_backward(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                    row_mask: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor], max_idx: Tensor,
                    frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                    deterministic: bool) -> Tensor:
    """Masked gradient scatter: ``grad[C, B]`` of the pool; inactive blocks, padding entries and
    ``frozen`` slots get nothing."""
    C, B = values.shape
    idx, keep, eg = entry_grads(grad_out, indices, offsets, per_sample_weights, max_idx, mode,
                                 padding_idx)
    slots = resolve_slots(row_ptr, row_slots, row_mask, idx, num_blocks)  # [L, NB]
    ok = (slots >= 0) & keep.unsqueeze(1)
    if frozen is not None:
        ok &= ~frozen.bool()[slots.clamp(min=0)]
    tgt = slots[ok]
    src = eg.view(-1, num_blocks, B)[ok]  # [M, B]
    grad = torch.zeros(C, B, device=values.device)
    if deterministic and grad.is_cuda:
        order = torch.sort(tgt, stable=True).indices
        tgt, src = tgt[order], src[order]
        uniq, cnt = torch.unique_consecutive(tgt, return_counts=True)
        if uniq.numel():
            grad[uniq] = torch.segment_reduce(src, "sum", lengths=cnt, axis=0)
    else:
        grad.index_add_(0, tgt, src)
    return grad.to(values.dtype)
