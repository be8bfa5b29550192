"""``dsl::update_index_``: bring a pool's row index up to date in place after a mask update.

``slots[i]`` held block ``old_keys[i]`` (-1 = free) and now holds ``coord[slots[i]]``;
``(row_ptr, row_slots, row_mask)`` is the index of the old ``coord``. Afterwards the three
tensors hold exactly what ``dsl::rebuild_index(coord)`` returns, in the same storage (nothing
else is allocated that scales with the table). Bad arguments (a slot out of range or listed
twice, a key outside the table, an old key that is not active, a new key another slot holds)
raise naming the argument before anything is written.

Optional per backend: the reference implementation is the full rebuild copied into the
tensors (the oracle); the cpu backend's kernel (csrc/cpu/update_index.cpp) touches only the
changed rows' mask words and shifts row_slots in one sweep.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import implementation


@torch.library.custom_op("dsl::update_index_", mutates_args=("row_ptr", "row_slots", "row_mask"))
def update_index_(row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor, coord: Tensor,
                  slots: Tensor, old_keys: Tensor, num_blocks: int, backend: str) -> None:
    implementation(backend, "update_index_")(row_ptr, row_slots, row_mask, coord,
                                             slots.long(), old_keys.long(), num_blocks)


@update_index_.register_fake
def _update_index_fake(row_ptr, row_slots, row_mask, coord, slots, old_keys, num_blocks,
                       backend):
    torch._check_value(slots.shape == old_keys.shape and slots.dim() == 1,
                       lambda: f"slots and old_keys must be 1-D of the same length, got "
                               f"{tuple(slots.shape)} and {tuple(old_keys.shape)}")
    return None
