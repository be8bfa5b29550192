"""Host-side helpers shared by the Triton launchers: argument checks and dummy pointers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def check_values(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_bags(indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
               device: torch.device) -> None:
    """The CSR bag layout every kernel reads (the modules normalise user input before this)."""
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (CSR layout), got shape {tuple(indices.shape)}")
    if indices.dtype not in _INTS:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be 1-D with num_bags + 1 entries, got shape "
                         f"{tuple(offsets.shape)}")
    if offsets.dtype != indices.dtype:
        raise TypeError(f"offsets must have the dtype of indices ({indices.dtype}), got "
                        f"{offsets.dtype}")
    for name, t in (("indices", indices), ("offsets", offsets),
                    ("per_sample_weights", per_sample_weights)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but values are on {device}")
    if per_sample_weights is not None and per_sample_weights.numel() != indices.numel():
        raise ValueError(f"per_sample_weights must have one weight per index "
                         f"({indices.numel()}), got {per_sample_weights.numel()}")


def mask_words(row_mask: Tensor, num_blocks: int) -> int:
    W = (num_blocks + 63) // 64
    if row_mask.dim() != 2 or row_mask.shape[1] != W or row_mask.dtype != torch.int64:
        raise ValueError(f"row_mask must be int64 [num_rows, {W}], got {row_mask.dtype} "
                         f"{tuple(row_mask.shape)}")
    return W


def contiguous(*ts):
    return tuple(None if t is None else t.contiguous() for t in ts)
