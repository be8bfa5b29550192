"""``dsl::fused_update`` in pure PyTorch: the oracle of the fused backward + optimizer.

The formulas (see :mod:`dsl_kernels.fused`) in the order every kernel follows them. The gradient
of the touched slots is formed batch-sized (per entry, sorted by slot, segment-summed), never as
a ``[C, B]`` tensor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...format import ADAGRAD, ADAM, ADAMW, NAN_IGNORE, ROWWISE_ADAGRAD, SGD, resolve_slots
from ..registry import register_impl
from .bags import entry_grads


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """SparseAdam's bias-corrected step ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (0 for non-Adam)."""
    if step <= 0:
        return 0.0
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def apply_rows(values: Tensor, state1: Tensor, state2: Tensor, slots: Tensor, g: Tensor,
               optimizer: int, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step_size: float, nan_policy: int) -> Tensor:
    """Apply one optimizer update to the rows ``slots`` (unique, int64) of the pool given their
    fp32 gradient ``g [U, B]``; returns the number of slots skipped as non-finite (int64[1]).
    Shared by the reference backend; the kernels follow the same formulas in the same order."""
    p = values[slots].float()
    if optimizer != ADAMW and weight_decay != 0.0:
        g = g + weight_decay * p
    s1 = s2 = None
    if optimizer == SGD:
        new_p = p - lr * g
    elif optimizer == ADAGRAD:
        s1 = state1[slots] + g * g
        new_p = p - lr * g / (s1.sqrt() + eps)
    elif optimizer == ROWWISE_ADAGRAD:
        s1 = state1[slots] + (g * g).mean(1)
        new_p = p - lr * g / (s1.sqrt() + eps).unsqueeze(1)
    elif optimizer in (ADAM, ADAMW):
        if optimizer == ADAMW:
            p = p * (1.0 - lr * weight_decay)
        m, v = state1[slots], state2[slots]
        s1 = m + (g - m) * (1.0 - beta1)
        s2 = v + (g * g - v) * (1.0 - beta2)
        new_p = p - step_size * (s1 / (s2.sqrt() + eps))
    else:
        raise ValueError(f"unknown optimizer code {optimizer}")
    skipped = torch.zeros(1, dtype=torch.int64, device=values.device)
    if nan_policy != NAN_IGNORE:
        ok = torch.isfinite(new_p.to(values.dtype)).all(1)
        for s in (s1, s2):
            if s is not None:
                ok &= torch.isfinite(s.view(s.shape[0], -1)).all(1)
        skipped += (~ok).sum()
        slots, new_p = slots[ok], new_p[ok]
        s1 = s1[ok] if s1 is not None else None
        s2 = s2[ok] if s2 is not None else None
    values[slots] = new_p.to(values.dtype)
    if s1 is not None:
        state1[slots] = s1
    if s2 is not None:
        state2[slots] = s2
    return skipped


@register_impl("reference", "fused_update")
def reference_fused_update(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                           row_mask: Tensor, indices: Tensor, offsets: Tensor,
                           per_sample_weights: Optional[Tensor], max_idx: Tensor,
                           frozen: Optional[Tensor], state1: Tensor, state2: Tensor,
                           num_blocks: int, mode: int, padding_idx: int, optimizer: int,
                           lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, step: int, nan_policy: int) -> Tensor:
    """The oracle: per-entry gradients (batch-sized), slot of every (entry, block), stable sort by
    slot, segment sum, then :func:`apply_rows`. Never builds a ``[C, B]`` gradient."""
    B = values.shape[1]
    idx, keep, eg = entry_grads(grad_out, indices, offsets, per_sample_weights,
                                           max_idx, mode, padding_idx)
    slots = resolve_slots(row_ptr, row_slots, row_mask, idx, num_blocks)  # [L, NB]
    ok = (slots >= 0) & keep.unsqueeze(1)
    if frozen is not None:
        ok &= ~frozen.bool()[slots.clamp(min=0)]
    tgt = slots[ok]
    src = eg.view(-1, num_blocks, B)[ok]
    order = torch.sort(tgt, stable=True).indices
    tgt, src = tgt[order], src[order]
    uniq, cnt = torch.unique_consecutive(tgt, return_counts=True)
    if uniq.numel() == 0:
        return torch.zeros(1, dtype=torch.int64, device=values.device)
    g = torch.segment_reduce(src, "sum", lengths=cnt, axis=0)
    return apply_rows(values, state1, state2, uniq, g, optimizer, lr, beta1, beta2, eps,
                      weight_decay, adam_step_size(lr, beta1, beta2, step), nan_policy)
