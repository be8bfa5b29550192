"""The autograd function of a fused module: ``dsl::lookup`` forward, ``dsl::fused_update``
backward (the gradient of ``values`` is never materialised; ``values.grad`` stays None). On the
cpu backend with sum/mean pooling the forward also emits the backward's plan and the backward
consumes it (:mod:`dsl_kernels.backends.cpu.fused_step`): no plan is rebuilt per step."""
from __future__ import annotations

import torch

from .. import ops


def _cpu_plan_path(backend: str, values, mode: int):
    """The cpu backend's plan-emitting step (module) when it runs for this call, else None."""
    if backend != "cpu":
        return None
    try:
        from ..backends.cpu import fused_step
    except ImportError:  # extension not built: backend "cpu" is never chosen then anyway
        return None
    return fused_step if fused_step.supported(values, mode) else None


class _FusedLookup(torch.autograd.Function):
    """``dsl::lookup`` forward; backward = ``dsl::fused_update`` (values get no ``.grad``)."""

    @staticmethod
    def forward(ctx, fo, call_id, values, row_ptr, row_slots, row_mask, indices, offsets, psw,
                frozen, num_blocks, mode, padding_idx, deterministic, backend):
        plan = ()
        # (no plan when nothing will run a backward, e.g. under torch.no_grad)
        cpu_step = _cpu_plan_path(backend, values, mode) if ctx.needs_input_grad[2] else None
        if cpu_step is not None:
            # The forward resolves every entry's slots anyway: keep them as the backward's plan.
            out, *plan = cpu_step.lookup_with_plan(values, row_ptr, row_slots, row_mask, indices,
                                                   offsets, psw, frozen, num_blocks, mode,
                                                   padding_idx)
            max_idx = plan[0].new_empty((0,), dtype=torch.int64)
        else:
            out, max_idx = ops.lookup(values, row_ptr, row_slots, row_mask, indices, offsets,
                                      psw, frozen, num_blocks, mode, padding_idx, deterministic,
                                      backend)
        # values is not saved: the backward mutates it, and a saved copy would trip autograd's
        # version check when the pool is looked up twice in one graph.
        ctx.save_for_backward(row_ptr, row_slots, row_mask, indices, offsets, psw, frozen,
                              max_idx, *plan)
        ctx.fo, ctx.call_id = fo, call_id
        ctx.args = (num_blocks, mode, padding_idx, backend)
        ctx.mark_non_differentiable(max_idx)
        return out, max_idx

    @staticmethod
    def backward(ctx, grad_out, _grad_max_idx):
        row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx, *plan = \
            ctx.saved_tensors
        num_blocks, mode, padding_idx, backend = ctx.args
        fo = ctx.fo  # the FusedOptimizer (optim.py)
        module = fo.module
        grad_out = grad_out.contiguous()
        grad_psw = None
        if psw is not None and ctx.needs_input_grad[8]:
            # Uses the values before this step's update, as the unfused path does.
            grad_psw = ops.per_sample_weights_grad(
                grad_out, module.values.detach(), row_ptr, row_slots, row_mask, indices, offsets,
                num_blocks, padding_idx, backend).to(psw.dtype)
        fo._apply(ctx.call_id, grad_out, row_ptr, row_slots, row_mask, indices, offsets, psw,
                  max_idx, frozen, num_blocks, mode, padding_idx, backend, plan=plan)
        return (None, None, None, None, None, None, None, None, grad_psw, None, None, None, None,
                None, None)
