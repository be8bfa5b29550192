"""Shared ``@triton.jit`` helpers of the Triton backend: popcount and the bitmask slot lookup.

Triton has no portable 64-bit popcount intrinsic (and the interpreter has none at all), so the
rank of a block inside its row is computed with the SWAR bit trick on int64. Triton's ``>>`` on
signed integers is an *arithmetic* shift: every shifted value below is masked before a
sign-extended bit could land in a counted position (see the comments), so the result is exact
for negative words (bit 63 set) too.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def popcount64(x):
    """Number of set bits of every int64 element of ``x``."""
    # Pairs: the masks clear bit 63, so the sign bits that >> copies in are dropped.
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    # Each nibble holds <= 4, so the top nibble is < 8 and x is non-negative from here on:
    # arithmetic and logical shifts agree.
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


@triton.jit
def resolve_slot(row_mask_ptr, row_ptr_ptr, row_slots_ptr, row, rvalid, j, jvalid, num_rows,
                 W: tl.constexpr):
    """Slot (int32) of block ``(row, j)`` and whether it is active.

    A row outside ``[0, num_rows)`` is inactive and reads nothing: no kernel reads the row index
    (or writes the slot it would name) at an unchecked row, whatever the validation flags.

    ``row`` (int64) and ``rvalid`` have the row-level shape (e.g. ``[G, 1, 1]``), ``j`` and
    ``jvalid`` the block-level one (e.g. ``[1, NBT, 1]``); results have the broadcast shape.
    Row-level loads (``row_ptr``, mask words) stay row-level, so a tile does not replicate them
    per block. Invalid or inactive lanes return ``active = False`` and touch no slot memory.
    """
    j = j.to(tl.int64)
    b = j & 63
    rvalid = rvalid & (row >= 0) & (row < num_rows)
    base = row * W
    valid = rvalid & jvalid
    if W == 1:
        word = tl.load(row_mask_ptr + base, mask=rvalid, other=0)  # one word per row
    else:
        word = tl.load(row_mask_ptr + base + (j >> 6), mask=valid, other=0)
    active = valid & (((word >> b) & 1) != 0)  # & 1 after the shift: the sign fill is harmless
    one = tl.full(b.shape, 1, tl.int64)
    # (1 << b) - 1 wraps correctly for b = 63 (INT64_MIN - 1 = INT64_MAX).
    rank = popcount64(word & ((one << b) - 1)).to(tl.int32)
    if W > 1:
        # Active blocks in the words before j's word (W <= 8 for D <= 512 at block_size 1).
        w = (j >> 6).to(tl.int32)
        for k in tl.static_range(W - 1):
            wk = tl.load(row_mask_ptr + base + k, mask=rvalid, other=0)
            rank += tl.where(k < w, popcount64(wk).to(tl.int32), 0)
    start = tl.load(row_ptr_ptr + row, mask=rvalid, other=0)
    slot = tl.load(row_slots_ptr + (start + rank), mask=active, other=0)
    return slot, active


@triton.jit
def bag_tile(offsets_ptr, num_bags, G: tl.constexpr, NBT: tl.constexpr, BP: tl.constexpr,
             CB: tl.constexpr):
    """The tile of the program: ``G`` bags (axis 0 of the grid) x ``NBT`` blocks x ``BP``
    columns of a block (axis 1 cuts blocks into ``CB`` column chunks). Shared by the lookup
    forward and backward so both walk bags identically.

    Returns ``bag, bmask, start, length, max_len`` over the bags (``[G]``) and the block and
    column indices ``j3 [1, NBT, 1]``, ``c3 [1, 1, BP]``.
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    bag = pid_b.to(tl.int64) * G + tl.arange(0, G)
    bmask = bag < num_bags
    start = tl.load(offsets_ptr + bag, mask=bmask, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1, mask=bmask, other=0).to(tl.int64)
    length = end - start
    max_len = tl.max(length, 0)
    j = (pid_c // CB) * NBT + tl.arange(0, NBT)
    c = (pid_c % CB) * BP + tl.arange(0, BP)
    return bag, bmask, start, length, max_len, j[None, :, None], c[None, None, :]
