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
def resolve_slot(row_mask_ptr, row_ptr_ptr, row_slots_ptr, row, j, valid, W: tl.constexpr):
    """Slot of block ``(row, j)`` and whether it is active (broadcasting ``row`` against ``j``).

    ``row`` is int64 (any shape broadcastable with ``j``), ``j`` the block column (int32/int64),
    ``valid`` masks lanes that must not touch memory (padding, past-the-end). Inactive or invalid
    lanes return ``active = False`` and slot 0; nothing is loaded for them beyond the mask word.
    """
    j = j.to(tl.int64)
    w = j >> 6
    b = j & 63
    base = row * W
    word = tl.load(row_mask_ptr + base + w, mask=valid, other=0)
    active = valid & (((word >> b) & 1) != 0)  # & 1 after the shift: the sign fill is harmless
    one = tl.full(b.shape, 1, tl.int64)
    # (1 << b) - 1 wraps correctly for b = 63 (INT64_MIN - 1 = INT64_MAX).
    rank = popcount64(word & ((one << b) - 1))
    if W > 1:
        # Active blocks in the words before w (W <= 8 for D <= 512 at block_size 1).
        for k in tl.static_range(W - 1):
            wk = tl.load(row_mask_ptr + base + k, mask=valid, other=0)
            rank += tl.where(k < w, popcount64(wk), 0)
    start = tl.load(row_ptr_ptr + row, mask=valid, other=0).to(tl.int64)
    slot = tl.load(row_slots_ptr + start + rank, mask=active, other=0).to(tl.int64)
    return slot, active
