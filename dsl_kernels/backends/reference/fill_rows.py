"""``dsl::fill_rows_`` in pure PyTorch: ``index_fill_`` along dim 0 (rows checked first)."""
from __future__ import annotations

from torch import Tensor

from ..registry import register_impl


@register_impl("reference", "fill_rows_")
def fill_rows_reference(t: Tensor, rows: Tensor, value: float) -> None:
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= t.shape[0]):
        raise IndexError(f"rows must lie in [0, {t.shape[0]}), got [{int(rows.min())}, "
                         f"{int(rows.max())}]")
    t.index_fill_(0, rows.to(t.device), value)
