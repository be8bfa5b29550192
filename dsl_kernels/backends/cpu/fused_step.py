"""The CPU fused training step (csrc/cpu/fused_step.cpp): a forward that also emits the step's
plan, and a backward + optimizer that consumes it.

``dsl::fused_update`` has to rebuild the touched-rows plan from ``indices`` and walk the row
index a second time in the backward; on the CPU that bookkeeping cost more than the arithmetic.
Here the forward (``dsl_C::fused_lookup``) already resolves every entry to its slots and keeps
them as the plan (``int32 [P, 2]``: slot, bag * NB + col; plus per-item scales in mean mode or
with per-sample weights), and the backward (``dsl_C::fused_apply``) sorts it by slot (radix,
stable) and applies the optimizer to each touched slot once. Same numbers as
``dsl::fused_update`` on the cpu backend, bit for bit; frozen slots are dropped from the plan
before the sort. Registered as the cpu backend's ``fused_lookup`` and ``fused_apply``:
``dsl::fused_lookup`` (ops/fused_lookup.py) takes this path for sum/mean pooling on the cpu
backend; max pooling keeps ``dsl::fused_update``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...format import MODE_MAX
from ..reference.fused_update import adam_step_size
from ..registry import register_impl
from .fused_update import has_compiled_op


# Asked once: the dispatcher query is not traceable by torch.compile (and never changes).
_HAS_KERNELS = has_compiled_op("dsl_C::fused_lookup", "CPU")


def supported(values: Tensor, mode: int) -> bool:
    """Whether the plan path runs for this pool and pooling mode."""
    return values.device.type == "cpu" and mode != MODE_MAX and _HAS_KERNELS


def lookup_with_plan(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                     indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                     frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out, plan, plan_scale)``: the bags' sums (means) and the plan of their backward."""
    return torch.ops.dsl_C.fused_lookup(values, row_ptr, row_slots, row_mask, indices, offsets,
                                        per_sample_weights, frozen, num_blocks, mode, padding_idx)


def apply_plan(grad_out: Tensor, values: Tensor, state1: Tensor, state2: Tensor, plan: Tensor,
               plan_scale: Tensor, optimizer: int, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, nan_policy: int) -> Tensor:
    """Backward + optimizer step from the plan, in place; int64[1] slots skipped as non-finite."""
    return torch.ops.dsl_C.fused_apply(grad_out.contiguous(), values, state1, state2, plan,
                                       plan_scale, optimizer, lr, beta1, beta2, eps,
                                       weight_decay, adam_step_size(lr, beta1, beta2, step),
                                       nan_policy)


if _HAS_KERNELS:
    lookup_with_plan.supports = supported  # type: ignore[attr-defined]
    register_impl("cpu", "fused_lookup")(lookup_with_plan)
    register_impl("cpu", "fused_apply")(apply_plan)
