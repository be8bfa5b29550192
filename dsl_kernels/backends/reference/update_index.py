"""``dsl::update_index_`` in pure PyTorch: the oracle of the in-place index update is the full
rebuild of :mod:`.rebuild_index`, copied into the given tensors after every check passed."""
from __future__ import annotations

import torch
from torch import Tensor

from ...format import is_active
from ..registry import register_impl
from .rebuild_index import rebuild_index


@register_impl("reference", "update_index_")
@torch.no_grad()
def update_index_reference(row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor, coord: Tensor,
                           slots: Tensor, old_keys: Tensor, num_blocks: int) -> None:
    C, N = coord.numel(), row_mask.shape[0]
    if slots.numel() != old_keys.numel() or slots.dim() != 1:
        raise ValueError(f"slots and old_keys must be 1-D of the same length, got "
                         f"{tuple(slots.shape)} and {tuple(old_keys.shape)}")
    if slots.numel() == 0:
        return
    if int(slots.min()) < 0 or int(slots.max()) >= C:
        raise IndexError(f"slots must lie in [0, {C}), got [{int(slots.min())}, "
                         f"{int(slots.max())}]")
    if torch.unique(slots).numel() != slots.numel():
        raise ValueError("slots lists a slot twice")
    if int(old_keys.min()) < -1 or int(old_keys.max()) >= N * num_blocks:
        raise IndexError(f"old_keys must lie in [-1, {N * num_blocks})")
    old = old_keys[old_keys >= 0]
    if old.numel() and not bool(is_active(row_mask, old, num_blocks).all()):
        raise ValueError("old_keys names a block that is not active in row_mask: the index is "
                         "not that of the old coord")
    new = coord[slots]
    if int(new.min()) < -1 or int(new.max()) >= N * num_blocks:
        raise IndexError(f"coord[slots] must lie in [-1, {N * num_blocks})")
    active = coord[coord >= 0]
    if torch.unique(active).numel() != active.numel():
        raise ValueError("coord[slots] names a block that another slot already holds")
    rp, rs, rm = rebuild_index(coord, N, num_blocks)
    row_ptr.copy_(rp)
    row_slots.copy_(rs)
    row_mask.copy_(rm)
