"""Structural checks shared by the fake impls and the eager ops: shapes, dtypes and codes only
(nothing that reads tensor data), written with ``torch._check_*`` so they hold under
``torch.compile`` too. Data-dependent checks (index ranges) are the modules' (validation.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..format import MODE_MAX, MODE_SUM, num_mask_words

_INTS = (torch.int32, torch.int64)


def check_pool(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
               num_blocks: int) -> None:
    """The slot pool and its row index (format.py) agree in shape and dtype."""
    torch._check_value(values.dim() == 2, lambda: f"values must be [C, B], got "
                                                  f"{tuple(values.shape)}")
    torch._check_value(num_blocks > 0, lambda: f"num_blocks must be positive, got {num_blocks}")
    torch._check_value(row_mask.dim() == 2 and row_mask.shape[1] == num_mask_words(num_blocks),
                       lambda: f"row_mask must be [num_rows, {num_mask_words(num_blocks)}], got "
                               f"{tuple(row_mask.shape)}")
    torch._check_value(row_ptr.dim() == 1 and row_ptr.shape[0] == row_mask.shape[0] + 1,
                       lambda: f"row_ptr must have num_rows + 1 = {row_mask.shape[0] + 1} "
                               f"entries, got {tuple(row_ptr.shape)}")
    torch._check_value(row_slots.dim() == 1 and row_slots.shape[0] == values.shape[0],
                       lambda: f"row_slots must have one entry per slot ({values.shape[0]}), "
                               f"got {tuple(row_slots.shape)}")


def check_bags(indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
               mode: int) -> None:
    """The CSR bag layout every op receives."""
    torch._check_value(MODE_SUM <= mode <= MODE_MAX,
                       lambda: f"mode must be 0 (sum), 1 (mean) or 2 (max), got {mode}")
    torch._check_value(indices.dim() == 1, lambda: f"indices must be 1-D (CSR), got "
                                                   f"{tuple(indices.shape)}")
    torch._check_type(indices.dtype in _INTS,
                      lambda: f"indices must be int32 or int64, got {indices.dtype}")
    torch._check_value(offsets.dim() == 1 and offsets.shape[0] >= 1,
                       lambda: f"offsets must be 1-D with num_bags + 1 entries, got "
                               f"{tuple(offsets.shape)}")
    torch._check_type(offsets.dtype == indices.dtype,
                      lambda: f"offsets must have the dtype of indices ({indices.dtype}), got "
                              f"{offsets.dtype}")
    if per_sample_weights is not None:
        torch._check_value(per_sample_weights.shape == indices.shape,
                           lambda: f"per_sample_weights must have one weight per index "
                                   f"{tuple(indices.shape)}, got "
                                   f"{tuple(per_sample_weights.shape)}")
