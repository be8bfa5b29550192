"""``dsl::fused_lookup``: the forward of a module trained by a fused optimizer, whose backward is
the optimizer step (``values.grad`` is never formed).

Forward: the lookup of ``backend``, and with ``with_plan`` the backward's work list too
(``plan int32[P, 2]``, ``plan_scale fp32[P or 0]``; a backend that implements the ``fused_lookup``
registry op emits it while it resolves the slots anyway, so the backward needs no second pass).
Backward: :func:`dsl_kernels.ops.hooks.fused_step_` hands the gradient to the optimizer named by
``fused`` (an id, see :mod:`.hooks`), which updates ``values`` and its state in place and returns
the gradient of ``per_sample_weights``. Everything Python-side happens inside that opaque op, so
the module traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import implementation
from ..format import MODE_MAX
from .checks import check_bags, check_pool
from .hooks import fused_step_, observe_lookup


@torch.library.custom_op("dsl::fused_lookup", mutates_args=())
def fused_lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                 indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                 frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                 backend: str, with_plan: bool, fused: int, observer: int = -1
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, max_idx, plan, plan_scale)``; the plan is empty unless ``with_plan``."""
    if with_plan:
        out, plan, plan_scale = implementation(backend, "fused_lookup")(
            values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights, frozen,
            num_blocks, mode, padding_idx)
        return out, plan.new_empty((0,), dtype=torch.int64), plan, plan_scale
    out, max_idx = implementation(backend, "lookup")(values, row_ptr, row_slots, row_mask,
                                                     indices, offsets, per_sample_weights,
                                                     num_blocks, mode, padding_idx)
    return (out, max_idx, values.new_empty((0, 2), dtype=torch.int32),
            values.new_empty((0,), dtype=torch.float32))


@fused_lookup.register_fake
def _fused_lookup_fake(values, row_ptr, row_slots, row_mask, indices, offsets,
                       per_sample_weights, frozen, num_blocks, mode, padding_idx, backend,
                       with_plan, fused, observer=-1):
    check_pool(values, row_ptr, row_slots, row_mask, num_blocks)
    check_bags(indices, offsets, per_sample_weights, mode)
    num_bags = offsets.shape[0] - 1
    D = num_blocks * values.shape[1]
    out = values.new_empty((num_bags, D))
    has_max = mode == MODE_MAX and not with_plan
    max_idx = values.new_empty((num_bags, D) if has_max else (0,), dtype=torch.int64)
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size() if with_plan else 0
    m = ctx.new_dynamic_size() if with_plan else 0
    return (out, max_idx, values.new_empty((n, 2), dtype=torch.int32),
            values.new_empty((m,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, num_blocks, mode,
     padding_idx, backend, with_plan, fused, observer) = inputs
    _, max_idx, plan, plan_scale = output
    ctx.save_for_backward(row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx,
                          plan, plan_scale)
    # values is held, not saved: the backward updates it in place, and a saved copy would trip
    # autograd's version check when the pool is looked up twice in one graph.
    ctx.values = values
    ctx.args = (num_blocks, mode, padding_idx, backend, fused, observer)


def _backward(ctx, grad_out, _g_max_idx, _g_plan, _g_plan_scale):
    row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx, plan, plan_scale = \
        ctx.saved_tensors
    num_blocks, mode, padding_idx, backend, fused, observer = ctx.args
    grad_out = grad_out.contiguous()
    if observer >= 0:
        grad_out = observe_lookup(grad_out, indices, offsets, psw, max_idx, num_blocks, mode,
                                  padding_idx, observer)
    psw_grad = psw is not None and ctx.needs_input_grad[6]
    grad_psw = fused_step_(ctx.values, grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                           psw, max_idx, frozen, plan, plan_scale, num_blocks, mode, padding_idx,
                           psw_grad, backend, fused)
    return (None, None, None, None, None, None, grad_psw.to(psw.dtype) if psw_grad else None,
            None, None, None, None, None, None, None, None)


fused_lookup.register_autograd(_backward, setup_context=_setup_context)
