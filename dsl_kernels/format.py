"""The storage format of a slot pool and the codes of the ``dsl`` op arguments, defined once.

Every backend (reference, cpu, cuda, triton) reads the same format; the constants below are
the only Python definition of it (C++/CUDA mirror the mode codes in ``csrc/checks.h`` and
``csrc/cuda/launch.h``; Triton's jitted row lookup is ``backends/triton/_bits.py``).

Pool
----
* ``values [C, B]``: ``C`` slots of ``B`` values (the only Parameter).
* ``coord int64[C]``: block key ``row * NB + col`` held by a slot, ``-1`` for a free slot.

Row index (derived from ``coord`` by ``dsl::rebuild_index``; never saved)
----------------------------------------------------------------------
* ``row_ptr int32[N+1]``: CSR over rows; the active slots of row ``r`` are
  ``row_slots[row_ptr[r]:row_ptr[r+1]]``, sorted by column.
* ``row_slots int32[C]``: slots sorted by (row, col); entries past the active count are ``-1``.
* ``row_mask int64[N, W]``, ``W = ceil(NB / 64)`` (the "row header"): bit ``j & 63`` of word
  ``j >> 6`` is set when block ``(r, j)`` is active.
* Slot of an active block ``(r, j)``: ``row_slots[row_ptr[r] + rank]`` with ``rank`` the number
  of active blocks of row ``r`` left of ``j`` (popcount of the lower bits, plus the popcounts of
  the earlier words). A cleared bit reads as zeros and receives no gradient.

Bags (the layout every op receives; the modules normalise user input to it)
--------------------------------------------------------------------------
``offsets`` is CSR (``num_bags + 1`` entries, ``offsets[0] == 0``, dtype of ``indices``);
``padding_idx`` is ``-1`` for none; in max mode ``max_idx int64[num_bags, D]`` is the position
in ``indices`` of the entry that won column ``d`` (first maximum), ``-1`` for an empty bag.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

# ---------------------------------------------------------------- op argument codes
MODE_SUM, MODE_MEAN, MODE_MAX = 0, 1, 2
MODES: Dict[str, int] = {"sum": MODE_SUM, "mean": MODE_MEAN, "max": MODE_MAX}

# dsl::fused_update's ``optimizer`` and ``nan_policy`` codes.
SGD, ADAGRAD, ROWWISE_ADAGRAD, ADAM, ADAMW = 0, 1, 2, 3, 4
OPTIMIZERS: Dict[str, int] = {"sgd": SGD, "adagrad": ADAGRAD, "rowwise_adagrad": ROWWISE_ADAGRAD,
                              "adam": ADAM, "adamw": ADAMW}
NAN_IGNORE, NAN_SKIP, NAN_RAISE = 0, 1, 2
NAN_POLICIES: Dict[str, int] = {"ignore": NAN_IGNORE, "skip": NAN_SKIP, "raise": NAN_RAISE}

# ------------------------------------------------------------------ row header
# (1 << b) - 1 for b in [0, 64), as signed int64 (all fit: the largest is 2**63 - 1).
LOW_MASKS = [(1 << b) - 1 for b in range(64)]
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def num_mask_words(num_blocks: int) -> int:
    """Words ``W`` of the row header of a row with ``num_blocks`` blocks."""
    return (num_blocks + 63) // 64


def popcount64(x: Tensor) -> Tensor:
    """Bit count of each int64 element (SWAR; safe under arithmetic shifts: every shifted
    value is masked before it can carry a sign bit into a counted position)."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4  # each byte now holds its count (<= 8), top bit clear
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def resolve_slots(row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor, rows: Tensor,
                  num_blocks: int) -> Tensor:
    """Slot of every block ``(rows[i], j)``, ``j < num_blocks``, as ``int64[len(rows), NB]``;
    -1 where the block is inactive. ``rows`` must be valid row ids."""
    rows = rows.long()
    words = row_mask[rows]  # [L, W]
    # Active blocks of the row in words before word w: exclusive prefix sum of popcounts.
    pc = popcount64(words)
    before = torch.cumsum(pc, 1) - pc  # [L, W]
    j = torch.arange(num_blocks, device=rows.device)
    w_of_j, b_of_j = j >> 6, j & 63
    word_j = words[:, w_of_j]  # [L, NB]
    bit_set = ((word_j >> b_of_j) & 1).bool()
    low = torch.tensor(LOW_MASKS, dtype=torch.int64, device=rows.device)[b_of_j]
    rank = before[:, w_of_j] + popcount64(word_j & low)
    pos = row_ptr[rows].long().unsqueeze(1) + rank
    pos = torch.where(bit_set, pos, torch.zeros_like(pos))
    slot = row_slots.long()[pos] if row_slots.numel() else torch.zeros_like(pos)
    return torch.where(bit_set, slot, torch.full_like(slot, -1))


def is_active(row_mask: Tensor, keys: Tensor, num_blocks: int) -> Tensor:
    """Bool per key: is block ``key = row * num_blocks + col`` set in ``row_mask``? (In-place
    arithmetic: at most three key-sized int64 temporaries; chunk large inputs.)"""
    W = row_mask.shape[1]
    col = torch.remainder(keys, num_blocks)
    flat = torch.div(keys, num_blocks, rounding_mode="floor").mul_(W).add_(col >> 6)
    word = row_mask.reshape(-1)[flat]
    del flat
    return word.bitwise_right_shift_(col.bitwise_and_(63)).bitwise_and_(1).bool()
