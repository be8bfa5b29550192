"""``dsl::rebuild_index`` in pure PyTorch: the CSR row index from ``coord``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...format import num_mask_words
from ..registry import register_impl


@register_impl("reference", "rebuild_index")
def rebuild_index(coord: Tensor, num_rows: int, num_blocks: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR row index of a slot pool, from ``coord`` (``row * num_blocks + col``, -1 = free).

    Returns ``row_ptr int32[N+1]``, ``row_slots int32[C]`` (slots sorted by (row, col); the
    entries past the number of active blocks are -1) and ``row_mask int64[N, ceil(NB/64)]``.
    """
    C = coord.numel()
    device = coord.device
    active = coord >= 0
    # Free slots sort last: give them a key past every real block.
    big = num_rows * num_blocks
    keys = torch.where(active, coord, torch.full_like(coord, big))
    order = torch.sort(keys, stable=True).indices
    n_active = int(active.sum())
    row_slots = torch.full((C,), -1, dtype=torch.int32, device=device)
    row_slots[:n_active] = order[:n_active].to(torch.int32)

    act = coord[active]
    rows = torch.div(act, num_blocks, rounding_mode="floor")
    cols = act - rows * num_blocks
    counts = torch.bincount(rows, minlength=num_rows)
    row_ptr = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)

    W = num_mask_words(num_blocks)
    row_mask = torch.zeros(num_rows * W, dtype=torch.int64, device=device)
    # Bits of one row are distinct, so their (wrapping) int64 sum is their OR.
    bits = torch.bitwise_left_shift(torch.ones_like(cols), cols & 63)
    row_mask.index_add_(0, rows * W + (cols >> 6), bits)
    return row_ptr, row_slots, row_mask.view(num_rows, W)
