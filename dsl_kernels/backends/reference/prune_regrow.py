"""``dsl::prune_regrow_`` in pure PyTorch (see :mod:`dsl_kernels.ops.prune_regrow` for the op):
the oracle, and the implementation every backend uses until it has a kernel of its own.

Memory: the temporaries are one fp32 ``[C]`` (magnitudes, computed in chunks so fp16/bf16 pools
are never upcast whole), one bool ``[C]``, one bool per candidate and chunk-sized int64 arrays
(the candidates' activeness test), plus ``k``-sized results — about 4 % of the steady state of an
Adam-trained pool; nothing of size ``N * NB`` or ``N * D``. ``keep_first`` adds chunk-sized
temporaries only (:func:`first_block_flags` per chunk of slots).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...format import is_active
from ..registry import register_impl

_CHUNK = 1 << 16  # slots per magnitude chunk: bounds the upcast temporary of fp16/bf16 pools
_KEY_CHUNK = 1 << 14  # candidate keys per activeness-test chunk


def block_magnitudes(values: Tensor, slots: Optional[Tensor] = None) -> Tensor:
    """Ranking magnitude of every slot (or of ``slots``): the fp32 SQUARED L2 norm, ``-inf``
    where the block is not finite (or its squared norm overflows fp32). It ranks blocks exactly
    as the norm does, up to ties.

    Formed in one defined order, ``((x0*x0 + x1*x1) + x2*x2) + ...`` in fp32 with every product
    and sum rounded on its own, so the C++ kernel (csrc/cpu/prune_regrow.cpp) gets the same bits
    and the same ties. Not ``torch.linalg.vector_norm``: its summation order depends on the CPU's
    vector width, and torch's vectorised fp32 ``sqrt`` is not correctly rounded (AVX-512: 1 ulp
    off), so blocks whose norms differ in the last bit (grown blocks after one identical
    optimizer step) were ranked differently by the two backends."""
    src_n = values.shape[0] if slots is None else slots.numel()
    mag = torch.empty(src_n, dtype=torch.float32, device=values.device)
    for a in range(0, src_n, _CHUNK):
        b = min(src_n, a + _CHUNK)
        chunk = (values[a:b] if slots is None else values[slots[a:b]]).float()
        acc = mag[a:b]
        torch.mul(chunk[:, 0], chunk[:, 0], out=acc)
        for c in range(1, chunk.shape[1]):
            acc.add_(chunk[:, c] * chunk[:, c])  # mul, then add: two roundings, no FMA
    # NaN/Inf -> -inf in place (a norm is never -inf, so nothing else is touched).
    return mag.nan_to_num_(nan=float("-inf"), posinf=float("-inf"))


def smallest_k(mag: Tensor, k: int, largest: bool = False) -> Tensor:
    """Positions (int64, ascending) of the ``k`` smallest (``largest=True``: largest) entries of
    the 1-D ``mag`` (no NaN), ties to the lower position. ``kthvalue`` + one bool mask +
    ``nonzero``: no full sort, no copy of ``mag`` in Python."""
    n = mag.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=mag.device)
    if k >= n:
        return torch.arange(n, device=mag.device)
    v = torch.kthvalue(mag, n - k + 1 if largest else k).values
    # One bool temporary; with ties at v (e.g. several all-zero blocks just grown), the tied
    # positions past the k-th are dropped from the (small) selected set, not from a full mask.
    pos = torch.nonzero(mag >= v if largest else mag <= v).squeeze(1)  # ascending
    extra = pos.numel() - k
    if extra > 0:
        ties = torch.nonzero(mag[pos] == v).squeeze(1)
        keep = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
        keep[ties[ties.numel() - extra:]] = False
        pos = pos[keep]
    return pos


def is_active_chunked(row_mask: Tensor, keys: Tensor, num_blocks: int,
                      chunk: int = _KEY_CHUNK) -> Tensor:
    """:func:`is_active` in chunks: one bool per key plus chunk-sized int64 temporaries,
    however many candidates a window collected."""
    out = torch.empty(keys.numel(), dtype=torch.bool, device=keys.device)
    for a in range(0, keys.numel(), chunk):
        out[a:a + chunk] = is_active(row_mask, keys[a:a + chunk], num_blocks)
    return out


def first_block_flags(keys: Tensor, row_mask: Tensor, num_blocks: int) -> Tensor:
    """bool per entry of ``keys`` (block keys ``row * num_blocks + col``; negative = free slot,
    never flagged): True where ``col`` is the lowest set bit of ``row_mask[row]`` (bit ``j`` in
    word ``j >> 6``), i.e. the block is its row's first (lowest-column) active block. A few
    ``keys``-sized int64 temporaries: call it on chunks (:func:`count_first_blocks`). Raises
    ``IndexError`` naming the entry when a key is not a block of the table."""
    keys = keys.long()
    N, W = row_mask.shape
    if keys.numel() and int(keys.max()) >= N * num_blocks:
        i = int(torch.nonzero(keys >= N * num_blocks)[0])
        raise IndexError(f"coord entry {i} = {int(keys[i])} is not a block of the {N} x "
                         f"{num_blocks} table (keep_first reads its row's mask)")
    row = keys.clamp(min=0)
    col = row % num_blocks
    row //= num_blocks
    wi = col >> 6
    word = row_mask[row, wi]
    low = word.neg().bitwise_and_(word)  # the word's lowest set bit (bit 63 maps to itself)
    del word
    bit = torch.ones_like(col).bitwise_left_shift_(col.bitwise_and_(63))
    del col
    out = low == bit
    del low, bit
    out &= keys >= 0
    if W > 1:  # every lower word of the row must be empty
        for w in range(int(wi.max()) if wi.numel() else 0):
            out &= (wi <= w) | (row_mask[row, w] == 0)
    return out


def count_first_blocks(coord: Tensor, row_mask: Tensor, num_blocks: int,
                       slots: Optional[Tensor] = None, chunk: int = _KEY_CHUNK) -> int:
    """How many of ``coord`` (or of ``coord[slots]``) are their row's first active block."""
    n = coord.numel() if slots is None else slots.numel()
    total = 0
    for a in range(0, n, chunk):
        c = coord[a:a + chunk] if slots is None else coord[slots[a:a + chunk]]
        total += int(first_block_flags(c, row_mask, num_blocks).sum())
    return total


# ---------------------------------------------------------------------------- reference


@register_impl("reference", "prune_regrow_")
@torch.no_grad()
def prune_regrow_reference(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
                           cand_scores: Tensor, k: int, num_blocks: int,
                           prune_slots: Optional[Tensor], keep_first: bool = False
                           ) -> Tuple[Tensor, Tensor]:
    """Pure-torch oracle of ``dsl::prune_regrow_`` (see the module docstring); mutates
    ``values`` and ``coord``; returns ``(slots int64[k'], pruned_keys int64[k'])``.
    ``keep_first``: a row's first (lowest-column) active block is never pruned."""
    dev = coord.device
    ps = None if prune_slots is None else prune_slots.long()
    # Read (and checked) before anything is written.
    n_first = count_first_blocks(coord, row_mask, num_blocks, ps) if keep_first else 0
    # Candidates first, magnitudes after, and temporaries dropped as soon as they are used: the
    # peak stays near max(candidate-sized, [C]) instead of their sum.
    # 1. growable candidates: finite score, inactive now, merged by key (max score).
    ck = cand_keys.long().reshape(-1)
    cs = cand_scores.float().reshape(-1)
    ok = torch.isfinite(cs)
    ok &= ~is_active_chunked(row_mask, ck, num_blocks)
    if not bool(ok.all()):  # the accumulator's candidates usually all pass: no copy then
        ck, cs = ck[ok], cs[ok]
    del ok
    if ck.numel() > 1 and not bool((ck[1:] > ck[:-1]).all()):
        # Merge duplicates (max score) and sort; skipped for the accumulator's output, which is
        # already unique and ascending.
        uk, inv = torch.unique(ck, sorted=True, return_inverse=True)
        del ck
        us = torch.full((uk.numel(),), float("-inf"), device=dev)
        us.scatter_reduce_(0, inv, cs, "amax", include_self=True)
        del inv, cs
    else:
        uk, us = ck, cs
    # 2. prunable blocks.
    if prune_slots is None:
        n_prunable = int((coord >= 0).sum()) - n_first
    else:
        n_prunable = ps.numel() - int((coord[ps] < 0).sum()) - n_first
    k = max(0, min(int(k), n_prunable, uk.numel()))
    # k largest scores, ties to the lower key; positions ascending = keys ascending. Selection,
    # not a sort: O(#candidates).
    grown = uk[smallest_k(us, k, largest=True)]
    del uk, us
    # 3. the k weakest active blocks ([C] fp32 magnitudes; free slots never chosen).
    if prune_slots is None:
        mag = block_magnitudes(values)
        mag.masked_fill_(coord < 0, float("inf"))
    else:
        mag = block_magnitudes(values, ps)
        mag.masked_fill_(coord[ps] < 0, float("inf"))
    if keep_first:  # protected blocks: never chosen, like a free slot
        for a in range(0, mag.numel(), _KEY_CHUNK):
            c = coord[a:a + _KEY_CHUNK] if prune_slots is None else coord[ps[a:a + _KEY_CHUNK]]
            mag[a:a + _KEY_CHUNK].masked_fill_(first_block_flags(c, row_mask, num_blocks),
                                              float("inf"))
    pos = smallest_k(mag, k)
    del mag
    # 4. hand the freed slots over.
    slots = pos if prune_slots is None else torch.sort(ps[pos]).values
    pruned = coord[slots].clone()
    coord[slots] = grown
    values[slots] = 0
    return slots, pruned


prune_regrow_reference.keeps_first = True  # read by dsl_kernels/ops/prune_regrow.py
