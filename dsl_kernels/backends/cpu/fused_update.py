"""``dsl::fused_update`` on CPU (and the C++ side shared with CUDA): the touched-rows plan, by
``dsl_C::fused_plan`` (a counting sort on CPU, a padded device-side plan on CUDA), then
``dsl_C::fused_update_rows``
(csrc/cpu/fused_update.cpp, csrc/cuda/fused_update*.c*)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.fused_update import adam_step_size
from ..registry import register_impl
from ..touched_rows import touched_rows_plan


def has_compiled_op(name: str, dispatch_key: str) -> bool:
    """Whether the compiled extension registered ``name`` (``"dsl_C::op"``) for the key."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    except Exception:  # the op is not defined at all (extension without this file)
        return False


@register_impl("cpu", "fused_update")
def fused_update(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                 row_mask: Tensor, indices: Tensor, offsets: Tensor,
                 per_sample_weights: Optional[Tensor], max_idx: Tensor, frozen: Optional[Tensor],
                 state1: Tensor, state2: Tensor, num_blocks: int, mode: int, padding_idx: int,
                 optimizer: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, nan_policy: int) -> Tensor:
    # The compiled plan: a counting sort on CPU; on CUDA a padded plan built with no host sync
    # (csrc/cuda/fused_plan.cu). The torch version needs read-backs on a GPU.
    if has_compiled_op("dsl_C::fused_plan", values.device.type.upper()):
        perm, run_start, run_rows, bag, scale = torch.ops.dsl_C.fused_plan(
            indices, offsets, per_sample_weights, mode, padding_idx, row_mask.shape[0])
    else:
        perm, run_start, run_rows, bag, scale = touched_rows_plan(
            indices, offsets, per_sample_weights, mode, padding_idx, row_mask.shape[0])
    return torch.ops.dsl_C.fused_update_rows(
        grad_out.contiguous(), values, state1, state2, row_ptr, row_slots, row_mask, perm,
        run_start, run_rows, bag, scale, max_idx, frozen, num_blocks, mode, optimizer, lr, beta1,
        beta2, eps, weight_decay, adam_step_size(lr, beta1, beta2, step), nan_policy)
