"""``dsl::grow_scores`` in Triton: gradient norm of the inactive blocks of the rows a batch
touched (the DSL growth criterion).

The touched rows are the unique non-padding indices (found by the row sort of
``_segments.py``); one program per (row item, block tile) sums the dense gradient of the row's
entries in fixed order and writes ``||grad block||_2`` for inactive blocks, 0 for active ones.
Memory is O(L) for the sort plus ``R x NB`` scores (``R`` touched rows), never ``N``-sized.
The window accumulation over batches is the caller's (the sparsity engine adds the returned
scores into its own per-row buffer).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..registry import register_impl

from ._common import check_bags, contiguous, mask_words
from ._config import tile_config
from . import _segments
from ._segments import build_segments, segment_reduce


@register_impl("triton", "grow_scores")
def grow_scores(grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                max_idx: Tensor, num_blocks: int, mode: int, padding_idx: int
                ) -> Tuple[Tensor, Tensor]:
    """``(rows int64[R] ascending, scores fp32[R, NB])``; same contract as
    :func:`dsl_kernels.reference.grow_scores`.

    Example (CPU needs ``TRITON_INTERPRET=1``)::

        >>> import torch
        >>> from dsl_kernels import reference
        >>> from dsl_kernels.triton import grow_scores
        >>> row_ptr, row_slots, row_mask = reference.rebuild_index(torch.tensor([1]), 2, 2)
        >>> rows, scores = grow_scores(torch.ones(1, 4), row_ptr, row_slots, row_mask,
        ...                            torch.tensor([0]), torch.tensor([0, 1]), None,
        ...                            torch.empty(0, dtype=torch.int64), 2, 0, -1)
        >>> rows.tolist(), scores.tolist()            # block (0, 1) is active -> 0
        ([0], [[1.4142135381698608, 0.0]])
    """
    check_bags(indices, offsets, per_sample_weights, grad_out.device)
    W = mask_words(row_mask, num_blocks)
    num_bags = offsets.numel() - 1
    if grad_out.dim() != 2 or grad_out.shape[0] != num_bags or grad_out.shape[1] % num_blocks:
        raise ValueError(f"grad_out must be [num_bags={num_bags}, D] with D a multiple of "
                         f"num_blocks={num_blocks}, got {tuple(grad_out.shape)}")
    B = grad_out.shape[1] // num_blocks
    (grad_out, row_ptr, row_slots, row_mask, indices, offsets, psw,
     max_idx) = contiguous(grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                           per_sample_weights, max_idx)
    dev = grad_out.device
    if num_bags == 0 or indices.numel() == 0:
        return (torch.empty(0, dtype=torch.int64, device=dev),
                torch.zeros(0, num_blocks, dtype=torch.float32, device=dev))
    seg = build_segments(indices, offsets, psw, mode, padding_idx, row_ptr.numel() - 1,
                         _segments.SEGMENT_CHUNK)
    scores = torch.zeros(seg.rows.numel(), num_blocks, dtype=torch.float32, device=dev)
    # The score is a norm over the whole block: one tile must hold whole blocks.
    cfg = tile_config(num_blocks, B, whole_blocks=True)
    segment_reduce(seg, grad_out, max_idx, scores, None, row_ptr, row_slots, row_mask,
                   num_blocks, B, W, mode, 1, cfg)
    return seg.rows, scores
