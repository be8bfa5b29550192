"""``dsl::grow_scores``: for the rows a batch touched, the gradient norm of their inactive
blocks (the growth criterion) -> ``(rows int64[R] ascending, scores fp32[R, NB])``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import implementation
from .checks import check_bags


@torch.library.custom_op("dsl::grow_scores", mutates_args=())
def grow_scores(grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                max_idx: Tensor, num_blocks: int, mode: int, padding_idx: int,
                backend: str) -> Tuple[Tensor, Tensor]:
    rows, scores = implementation(backend, "grow_scores")(
        grad_out, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights, max_idx,
        num_blocks, mode, padding_idx)
    return rows, scores


@grow_scores.register_fake
def _grow_scores_fake(grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                      per_sample_weights, max_idx, num_blocks, mode, padding_idx, backend):
    check_bags(indices, offsets, per_sample_weights, mode)
    R = torch.library.get_ctx().new_dynamic_size()
    return (indices.new_empty((R,), dtype=torch.int64),
            grad_out.new_empty((R, num_blocks), dtype=torch.float32))
