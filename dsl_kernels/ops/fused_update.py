"""``dsl::fused_update``: the backward of ``dsl::lookup`` fused with an optimizer step, in place
on ``values`` / ``state1`` / ``state2`` (codes in :mod:`dsl_kernels.format`; the user API is
:mod:`dsl_kernels.fused`). Returns int64[1], the number of slots skipped as non-finite.
``step`` is the (already incremented) global step count used by Adam's bias correction."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import implementation
from ..format import NAN_RAISE, OPTIMIZERS
from .checks import check_bags, check_pool


@torch.library.custom_op("dsl::fused_update", mutates_args=("values", "state1", "state2"))
def fused_update(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                 row_mask: Tensor, indices: Tensor, offsets: Tensor,
                 per_sample_weights: Optional[Tensor], max_idx: Tensor, frozen: Optional[Tensor],
                 state1: Tensor, state2: Tensor, num_blocks: int, mode: int, padding_idx: int,
                 optimizer: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, nan_policy: int, backend: str) -> Tensor:
    return implementation(backend, "fused_update")(
        grad_out, values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights,
        max_idx, frozen, state1, state2, num_blocks, mode, padding_idx, optimizer, lr, beta1,
        beta2, eps, weight_decay, step, nan_policy)


@fused_update.register_fake
def _fused_update_fake(grad_out, values, row_ptr, row_slots, row_mask, indices, offsets,
                       per_sample_weights, max_idx, frozen, state1, state2, num_blocks, mode,
                       padding_idx, optimizer, lr, beta1, beta2, eps, weight_decay, step,
                       nan_policy, backend):
    check_pool(values, row_ptr, row_slots, row_mask, num_blocks)
    check_bags(indices, offsets, per_sample_weights, mode)
    torch._check_value(optimizer in OPTIMIZERS.values(),
                       lambda: f"optimizer code must be one of {sorted(OPTIMIZERS.values())}, "
                               f"got {optimizer}")
    torch._check_value(0 <= nan_policy <= NAN_RAISE,
                       lambda: f"nan_policy code must be 0, 1 or 2, got {nan_policy}")
    return values.new_empty((1,), dtype=torch.int64)
