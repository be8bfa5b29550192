"""``dsl::fill_rows_``: ``t[rows] = value`` along dim 0, the optimizer-state reset of the slots a
mask update reassigned. Reference: ``index_fill_``; the cpu kernel (csrc/cpu/fill_rows.cpp)
prefetches the scattered rows (~4x faster for a mask update's 80,000 rows at 1e6 x 64)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import implementation


@torch.library.custom_op("dsl::fill_rows_", mutates_args=("t",))
def fill_rows_(t: Tensor, rows: Tensor, value: float, backend: str) -> None:
    implementation(backend, "fill_rows_")(t, rows.long(), value)


@fill_rows_.register_fake
def _fill_rows_fake(t, rows, value, backend):
    torch._check_value(rows.dim() == 1, lambda: f"rows must be 1-D, got {tuple(rows.shape)}")
    return None
