"""``dsl::rebuild_index``: the CSR row index ``(row_ptr, row_slots, row_mask)`` of a pool from
``coord`` (format.py), rebuilt after every mask change."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..backends import implementation
from ..format import num_mask_words


@torch.library.custom_op("dsl::rebuild_index", mutates_args=())
def rebuild_index(coord: Tensor, num_rows: int, num_blocks: int,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    row_ptr, row_slots, row_mask = implementation(backend, "rebuild_index")(coord, num_rows,
                                                                            num_blocks)
    return row_ptr, row_slots, row_mask


@rebuild_index.register_fake
def _rebuild_index_fake(coord, num_rows, num_blocks, backend):
    torch._check_value(coord.dim() == 1 and coord.dtype == torch.int64,
                       lambda: f"coord must be int64[C], got {coord.dtype} {tuple(coord.shape)}")
    torch._check_value(num_rows >= 0 and num_blocks > 0,
                       lambda: f"num_rows must be >= 0 and num_blocks > 0, got {num_rows}, "
                               f"{num_blocks}")
    return (coord.new_empty((num_rows + 1,), dtype=torch.int32),
            coord.new_empty(coord.shape, dtype=torch.int32),
            coord.new_empty((num_rows, num_mask_words(num_blocks)), dtype=torch.int64))
