"""The autograd function of a fused module: ``dsl::lookup`` forward, ``dsl::fused_update``
backward (the gradient of ``values`` is never materialised; ``values.grad`` stays None)."""
from __future__ import annotations

import torch

from .. import ops


class _FusedLookup(torch.autograd.Function):
    """``dsl::lookup`` forward; backward = ``dsl::fused_update`` (values get no ``.grad``)."""

    @staticmethod
    def forward(ctx, fo, call_id, values, row_ptr, row_slots, row_mask, indices, offsets, psw,
                frozen, num_blocks, mode, padding_idx, deterministic, backend):
        out, max_idx = ops.lookup(values, row_ptr, row_slots, row_mask, indices, offsets, psw,
                                  frozen, num_blocks, mode, padding_idx, deterministic, backend)
        # values is not saved: the backward mutates it, and a saved copy would trip autograd's
        # version check when the pool is looked up twice in one graph.
        ctx.save_for_backward(row_ptr, row_slots, row_mask, indices, offsets, psw, frozen,
                              max_idx)
        ctx.fo, ctx.call_id = fo, call_id
        ctx.args = (num_blocks, mode, padding_idx, backend)
        ctx.mark_non_differentiable(max_idx)
        return out, max_idx

    @staticmethod
    def backward(ctx, grad_out, _grad_max_idx):
        row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx = ctx.saved_tensors
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
                  max_idx, frozen, num_blocks, mode, padding_idx, backend)
        return (None, None, None, None, None, None, None, None, grad_psw, None, None, None, None,
                None, None)
