"""The ``dsl`` operators: torch.library schemas, fake (meta) impls, autograd, backend dispatch.

Every op takes a trailing ``backend: str`` naming the implementation (see
:mod:`dsl_kernels.backends`); the op body forwards to that backend's function, whose signature
is the reference one (:mod:`dsl_kernels.reference`). Because the ops are real
``torch.library`` custom ops with fake impls, models using them trace under ``torch.compile``.

Ops
---
``dsl::lookup``          embedding-bag forward over the slot pool -> ``(out, max_idx)``
``dsl::lookup_backward`` masked gradient scatter -> ``grad_values [C, B]``
``dsl::grow_scores``     gradient magnitude of inactive blocks of touched rows -> ``(rows, scores)``
``dsl::rebuild_index``   CSR row index from ``coord`` -> ``(row_ptr, row_slots, row_mask)``
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .reference import MODE_MAX, MODE_SUM, num_mask_words


def _fn(backend: str, op: str):
    return dispatch.function(backend, op)


# ---------------------------------------------------------------------------- lookup


@torch.library.custom_op("dsl::lookup", mutates_args=())
def lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
           indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
           frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
           deterministic: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Embedding-bag forward. ``frozen`` and ``deterministic`` only matter to the backward."""
    out, max_idx = _fn(backend, "lookup")(values, row_ptr, row_slots, row_mask, indices, offsets,
                                          per_sample_weights, num_blocks, mode, padding_idx)
    return out, max_idx


@lookup.register_fake
def _lookup_fake(values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights,
                 frozen, num_blocks, mode, padding_idx, deterministic, backend):
    num_bags = offsets.shape[0] - 1
    D = num_blocks * values.shape[1]
    out = values.new_empty((num_bags, D))
    if mode == MODE_MAX:
        max_idx = values.new_empty((num_bags, D), dtype=torch.int64)
    else:
        max_idx = values.new_empty((0,), dtype=torch.int64)
    return out, max_idx


@torch.library.custom_op("dsl::lookup_backward", mutates_args=())
def lookup_backward(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                    row_mask: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor], max_idx: Tensor,
                    frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                    deterministic: bool, backend: str) -> Tensor:
    return _fn(backend, "lookup_backward")(grad_out, values, row_ptr, row_slots, row_mask,
                                           indices, offsets, per_sample_weights, max_idx, frozen,
                                           num_blocks, mode, padding_idx, deterministic)


@lookup_backward.register_fake
def _lookup_backward_fake(grad_out, values, *args):
    return torch.empty_like(values)


def _lookup_setup_context(ctx, inputs, output):
    (values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, num_blocks, mode,
     padding_idx, deterministic, backend) = inputs
    _, max_idx = output
    ctx.save_for_backward(values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen,
                          max_idx)
    ctx.args = (num_blocks, mode, padding_idx, deterministic, backend)


def _lookup_backward_autograd(ctx, grad_out, _grad_max_idx):
    values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx = ctx.saved_tensors
    num_blocks, mode, padding_idx, deterministic, backend = ctx.args
    grad_out = grad_out.contiguous()
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
            None)


lookup.register_autograd(_lookup_backward_autograd, setup_context=_lookup_setup_context)


def per_sample_weights_grad(grad_out, values, row_ptr, row_slots, row_mask, indices, offsets,
                            num_blocks, padding_idx, backend) -> Tensor:
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


# ------------------------------------------------------------------------- grow scores


@torch.library.custom_op("dsl::grow_scores", mutates_args=())
def grow_scores(grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                max_idx: Tensor, num_blocks: int, mode: int, padding_idx: int,
                backend: str) -> Tuple[Tensor, Tensor]:
    rows, scores = _fn(backend, "grow_scores")(grad_out, row_ptr, row_slots, row_mask, indices,
                                               offsets, per_sample_weights, max_idx, num_blocks,
                                               mode, padding_idx)
    return rows, scores


@grow_scores.register_fake
def _grow_scores_fake(grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                      per_sample_weights, max_idx, num_blocks, mode, padding_idx, backend):
    R = torch.library.get_ctx().new_dynamic_size()
    return (indices.new_empty((R,), dtype=torch.int64),
            grad_out.new_empty((R, num_blocks), dtype=torch.float32))


# ------------------------------------------------------------------------------ index


@torch.library.custom_op("dsl::rebuild_index", mutates_args=())
def rebuild_index(coord: Tensor, num_rows: int, num_blocks: int,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    row_ptr, row_slots, row_mask = _fn(backend, "rebuild_index")(coord, num_rows, num_blocks)
    return row_ptr, row_slots, row_mask


@rebuild_index.register_fake
def _rebuild_index_fake(coord, num_rows, num_blocks, backend):
    return (coord.new_empty((num_rows + 1,), dtype=torch.int32),
            coord.new_empty(coord.shape, dtype=torch.int32),
            coord.new_empty((num_rows, num_mask_words(num_blocks)), dtype=torch.int64))
