"""Pure-PyTorch oracle of every ``dsl`` op.

This is the ``reference`` backend: vectorised torch code (no Python loop over bags or indices)
that defines what every other backend must compute. It never builds an ``[N, D]`` tensor: the
largest temporaries are batch-sized (``[L, D]`` for ``L`` looked-up indices) or pool-sized
(``[C]``).

Conventions shared by all backends (see ``dsl_kernels/ops.py`` for the op schemas):

* ``offsets`` is always CSR: ``num_bags + 1`` entries, ``offsets[0] == 0``, same dtype as
  ``indices`` (int32 or int64). The module normalises ``include_last_offset`` and 2-D input.
* ``mode``: 0 = sum, 1 = mean, 2 = max (``MODE_SUM``, ``MODE_MEAN``, ``MODE_MAX``).
* ``padding_idx`` is ``-1`` for none, otherwise a row id in ``[0, N)``.
* ``max_idx`` (max mode only): ``int64[num_bags, D]``, the position in ``indices`` of the entry
  that won column ``d`` (first maximum, like torch), ``-1`` for a bag without entries.
* A block ``(r, j)`` is active when bit ``j`` of ``row_mask[r]`` is set; its slot is
  ``row_slots[row_ptr[r] + popcount(row_mask[r] & ((1 << j) - 1))]``. Inactive blocks read as 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

MODE_SUM, MODE_MEAN, MODE_MAX = 0, 1, 2
MODES = {"sum": MODE_SUM, "mean": MODE_MEAN, "max": MODE_MAX}

# (1 << b) - 1 for b in [0, 64), as signed int64 (all fit: the largest is 2**63 - 1).
_LOW_MASKS = [(1 << b) - 1 for b in range(64)]
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


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


def num_mask_words(num_blocks: int) -> int:
    return (num_blocks + 63) // 64


# ----------------------------------------------------------------------------- index


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
    low = torch.tensor(_LOW_MASKS, dtype=torch.int64, device=rows.device)[b_of_j]
    rank = before[:, w_of_j] + popcount64(word_j & low)
    pos = row_ptr[rows].long().unsqueeze(1) + rank
    pos = torch.where(bit_set, pos, torch.zeros_like(pos))
    slot = row_slots.long()[pos] if row_slots.numel() else torch.zeros_like(pos)
    return torch.where(bit_set, slot, torch.full_like(slot, -1))


# ------------------------------------------------------------------------------ bags


def _bag_layout(indices: Tensor, offsets: Tensor, padding_idx: int):
    """Per-entry bag id, the entries that count (not padding), and per-bag entry counts."""
    idx = indices.long()
    off = offsets.long()
    num_bags = off.numel() - 1
    L = int(off[-1]) if num_bags >= 0 and off.numel() else 0
    idx = idx[:L]
    lengths = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(num_bags, device=idx.device), lengths)
    keep = idx != padding_idx if padding_idx >= 0 else torch.ones_like(idx, dtype=torch.bool)
    counts = torch.zeros(num_bags, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, bag, keep.long())
    return idx, bag, keep, counts


def _gather_rows(values: Tensor, row_ptr, row_slots, row_mask, idx: Tensor, num_blocks: int):
    """``[L, NB*B]`` fp32 rows of the dense image for each index (inactive blocks = 0)."""
    slots = resolve_slots(row_ptr, row_slots, row_mask, idx, num_blocks)  # [L, NB]
    B = values.shape[1]
    v = values.float()[slots.clamp(min=0)]  # [L, NB, B]
    v = v * (slots >= 0).unsqueeze(-1)
    return v.reshape(idx.numel(), num_blocks * B), slots


def _entry_scale(per_sample_weights, keep, bag, counts, mode):
    """Weight of each entry in its bag's sum (0 for padding), fp32."""
    scale = keep.float()
    if per_sample_weights is not None:
        scale = scale * per_sample_weights.reshape(-1)[: keep.numel()].float()
    if mode == MODE_MEAN:
        scale = scale / counts.clamp(min=1).float()[bag]
    return scale


def lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
           indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
           num_blocks: int, mode: int, padding_idx: int) -> Tuple[Tensor, Tensor]:
    """Embedding-bag forward over the block pool. Returns ``(out, max_idx)``."""
    num_bags = offsets.numel() - 1
    D = num_blocks * values.shape[1]
    idx, bag, keep, counts = _bag_layout(indices, offsets, padding_idx)
    rows, _ = _gather_rows(values, row_ptr, row_slots, row_mask, idx, num_blocks)
    dev = values.device
    if mode == MODE_MAX:
        L = idx.numel()
        src = torch.where(keep.unsqueeze(1), rows, torch.full_like(rows, float("-inf")))
        best = torch.full((num_bags, D), float("-inf"), device=dev)
        best.scatter_reduce_(0, bag.unsqueeze(1).expand(L, D), src, "amax", include_self=True)
        # First entry reaching the maximum wins, as in torch.
        pos = torch.arange(L, device=dev).unsqueeze(1).expand(L, D)
        is_best = (src == best[bag]) & keep.unsqueeze(1)
        cand = torch.where(is_best, pos, torch.full_like(pos, L))
        max_idx = torch.full((num_bags, D), L, dtype=torch.int64, device=dev)
        max_idx.scatter_reduce_(0, bag.unsqueeze(1).expand(L, D), cand, "amin", include_self=True)
        empty = counts == 0
        max_idx[empty] = -1
        max_idx[max_idx == L] = -1  # only reachable with NaN rows: no winner
        out = torch.where(empty.unsqueeze(1), torch.zeros_like(best), best)
        return out.to(values.dtype), max_idx
    scale = _entry_scale(per_sample_weights, keep, bag, counts, mode)
    out = torch.zeros(num_bags, D, device=dev)
    out.index_add_(0, bag, rows * scale.unsqueeze(1))
    return out.to(values.dtype), torch.empty(0, dtype=torch.int64, device=dev)


def _entry_grads(grad_out: Tensor, indices, offsets, per_sample_weights, max_idx, mode, padding_idx):
    """Gradient of the dense image row of every entry, ``[L, D]`` fp32 (batch-sized)."""
    idx, bag, keep, counts = _bag_layout(indices, offsets, padding_idx)
    g = grad_out.float()
    L, D = idx.numel(), g.shape[1]
    if mode == MODE_MAX:
        eg = torch.zeros(L, D, device=g.device)
        valid = max_idx >= 0
        cols = torch.arange(D, device=g.device).expand_as(max_idx)
        eg[max_idx[valid], cols[valid]] = g[valid]
        return idx, keep, eg
    scale = _entry_scale(per_sample_weights, keep, bag, counts, mode)
    return idx, keep, g[bag] * scale.unsqueeze(1)


def lookup_backward(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                    row_mask: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor], max_idx: Tensor,
                    frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                    deterministic: bool) -> Tensor:
    """Masked gradient scatter: ``grad[C, B]`` of the pool; inactive blocks, padding entries and
    ``frozen`` slots get nothing."""
    C, B = values.shape
    idx, keep, eg = _entry_grads(grad_out, indices, offsets, per_sample_weights, max_idx, mode,
                                 padding_idx)
    slots = resolve_slots(row_ptr, row_slots, row_mask, idx, num_blocks)  # [L, NB]
    ok = (slots >= 0) & keep.unsqueeze(1)
    if frozen is not None:
        ok &= ~frozen.bool()[slots.clamp(min=0)]
    tgt = slots[ok]
    src = eg.view(-1, num_blocks, B)[ok]  # [M, B]
    grad = torch.zeros(C, B, device=values.device)
    if deterministic and grad.is_cuda:
        order = torch.sort(tgt, stable=True).indices
        tgt, src = tgt[order], src[order]
        uniq, cnt = torch.unique_consecutive(tgt, return_counts=True)
        if uniq.numel():
            grad[uniq] = torch.segment_reduce(src, "sum", lengths=cnt, axis=0)
    else:
        grad.index_add_(0, tgt, src)
    return grad.to(values.dtype)


def grow_scores(grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                max_idx: Tensor, num_blocks: int, mode: int, padding_idx: int
                ) -> Tuple[Tensor, Tensor]:
    """Growth criterion for the rows a batch touched: ``(rows int64[R] ascending,
    scores fp32[R, NB])`` with ``scores[r, j]`` the L2 norm of the dense gradient of block
    ``(rows[r], j)`` when it is inactive, 0 when it is active."""
    idx, keep, eg = _entry_grads(grad_out, indices, offsets, per_sample_weights, max_idx, mode,
                                 padding_idx)
    rows, inv = torch.unique(idx[keep], sorted=True, return_inverse=True)
    D = eg.shape[1]
    acc = torch.zeros(rows.numel(), D, device=eg.device)
    acc.index_add_(0, inv, eg[keep])
    # Explicit block size: with no touched rows a -1 in view() would be ambiguous.
    scores = acc.view(rows.numel(), num_blocks, D // num_blocks).norm(dim=2)
    active = resolve_slots(row_ptr, row_slots, row_mask, rows, num_blocks) >= 0
    return rows, scores.masked_fill(active, 0.0)
