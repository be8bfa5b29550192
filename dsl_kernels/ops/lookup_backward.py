"""``dsl::lookup_backward``: the masked gradient scatter ``grad_values [C, B]`` of a lookup.

Inactive blocks, padding entries and ``frozen`` slots get nothing; never a dense ``[N, D]``
gradient. ``deterministic=True`` sums every slot's contributions in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import implementation
from .checks import check_bags, check_pool


@torch.library.custom_op("dsl::lookup_backward", mutates_args=())
def lookup_backward(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                    row_mask: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor], max_idx: Tensor,
                    frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                    deterministic: bool, backend: str) -> Tensor:
    return implementation(backend, "lookup_backward")(
        grad_out, values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights,
        max_idx, frozen, num_blocks, mode, padding_idx, deterministic)


@lookup_backward.register_fake
def _lookup_backward_fake(grad_out, values, row_ptr, row_slots, row_mask, indices, offsets,
                          per_sample_weights, max_idx, frozen, num_blocks, mode, padding_idx,
                          deterministic, backend):
    check_pool(values, row_ptr, row_slots, row_mask, num_blocks)
    check_bags(indices, offsets, per_sample_weights, mode)
    torch._check_value(grad_out.dim() == 2 and grad_out.shape[1] == num_blocks * values.shape[1],
                       lambda: f"grad_out must be [num_bags, {num_blocks * values.shape[1]}], "
                               f"got {tuple(grad_out.shape)}")
    return torch.empty_like(values)
