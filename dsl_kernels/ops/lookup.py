"""``dsl::lookup``: embedding-bag forward over the slot pool, and its autograd.

Returns ``(out [num_bags, D], max_idx)`` (``max_idx int64[num_bags, D]`` in max mode, empty
otherwise). ``frozen`` and ``deterministic`` only matter to the backward
(:mod:`.lookup_backward`). The gradient of ``per_sample_weights`` comes from this op itself
(one lookup per entry), so every backend gets it for free. ``observer >= 0`` names (see
:mod:`.hooks`) the pool whose lookup observers get the output gradient in the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import implementation
from ..format import MODE_MAX, MODE_SUM
from .checks import check_bags, check_pool
from .hooks import observe_lookup
from .lookup_backward import lookup_backward


@torch.library.custom_op("dsl::lookup", mutates_args=())
def lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
           indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
           frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
           deterministic: bool, backend: str, observer: int = -1) -> Tuple[Tensor, Tensor]:
    """Embedding-bag forward. ``frozen``, ``deterministic`` and ``observer`` only matter to the
    backward."""
    out, max_idx = implementation(backend, "lookup")(values, row_ptr, row_slots, row_mask,
                                                     indices, offsets, per_sample_weights,
                                                     num_blocks, mode, padding_idx)
    return out, max_idx


@lookup.register_fake
def _lookup_fake(values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights,
                 frozen, num_blocks, mode, padding_idx, deterministic, backend, observer=-1):
    check_pool(values, row_ptr, row_slots, row_mask, num_blocks)
    check_bags(indices, offsets, per_sample_weights, mode)
    num_bags = offsets.shape[0] - 1
    D = num_blocks * values.shape[1]
    out = values.new_empty((num_bags, D))
    if mode == MODE_MAX:
        max_idx = values.new_empty((num_bags, D), dtype=torch.int64)
    else:
        max_idx = values.new_empty((0,), dtype=torch.int64)
    return out, max_idx


def _setup_context(ctx, inputs, output):
    (values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, num_blocks, mode,
     padding_idx, deterministic, backend, observer) = inputs
    _, max_idx = output
    ctx.save_for_backward(values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen,
                          max_idx)
    ctx.args = (num_blocks, mode, padding_idx, deterministic, backend, observer)


def _backward(ctx, grad_out, _grad_max_idx):
    values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx = ctx.saved_tensors
    num_blocks, mode, padding_idx, deterministic, backend, observer = ctx.args
    grad_out = grad_out.contiguous()
    if observer >= 0:
        grad_out = observe_lookup(grad_out, indices, offsets, psw, max_idx, num_blocks, mode,
                                  padding_idx, observer)
    grad_values = grad_psw = None
    if ctx.needs_input_grad[0]:
        grad_values = lookup_backward(grad_out, values, row_ptr, row_slots, row_mask, indices,
                                      offsets, psw, max_idx, frozen, num_blocks, mode,
                                      padding_idx, deterministic, backend)
    if psw is not None and ctx.needs_input_grad[6]:
        grad_psw = per_sample_weights_grad(grad_out, values, row_ptr, row_slots, row_mask,
                                           indices, offsets, num_blocks, padding_idx, backend)
        grad_psw = grad_psw.to(psw.dtype)
    return (grad_values, None, None, None, None, None, grad_psw, None, None, None, None, None,
            None, None)


lookup.register_autograd(_backward, setup_context=_setup_context)


def per_sample_weights_grad(grad_out: Tensor, values: Tensor, row_ptr: Tensor,
                            row_slots: Tensor, row_mask: Tensor, indices: Tensor,
                            offsets: Tensor, num_blocks: int, padding_idx: int,
                            backend: str) -> Tensor:
    """d out / d psw[i] = <grad_out[bag(i)], W[indices[i]]>: the rows come from the lookup op
    itself (one entry per bag), so every backend gets this gradient for free."""
    L = indices.shape[0]
    single = torch.arange(L + 1, device=indices.device, dtype=indices.dtype)
    rows, _ = lookup(values, row_ptr, row_slots, row_mask, indices, single, None, None,
                     num_blocks, MODE_SUM, padding_idx, False, backend)
    lengths = (offsets[1:] - offsets[:-1]).long()
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=indices.device), lengths,
                                  output_size=L)
    return (rows.float() * grad_out.float()[bag]).sum(1)
