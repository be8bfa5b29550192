"""Row-sorted segment reduction shared by deterministic ``lookup_backward`` and ``grow_scores``.

Both need, for every row the batch touched, the sum of the dense gradients of its entries, in
an order that does not depend on scheduling. The entries are sorted by row (``torch.sort``,
stable, so equal rows keep their batch order); each row's run is cut into *items* of at most
``CH`` entries. An item program sums its entries with a fixed-shape tree (``tl.sum``), so the
result is bit-identical run to run. A row with a single item (the common case) goes straight to
the epilogue; a hot row (Zipf) with several items writes fp32 partials, which a second kernel
sums in item order. Memory: O(L) for the sort plus ``#items_of_hot_rows x D`` fp32 partials
(at most ``2 L / CH`` rows); never ``[N, D]``.

Epilogues: ``EPI == 0`` stores the row's gradient into its active, non-frozen slots (each slot
belongs to one (row, block), so plain stores, no atomics); ``EPI == 1`` stores the L2 norm of
each inactive block (growth score).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...format import MODE_MAX, MODE_MEAN
from ._bits import resolve_slot

# Entries per item (a hot row is split into items of this size). Read at call time, so tests can
# shrink it to exercise the merge path.
SEGMENT_CHUNK = 256


@dataclass
class RowSegments:
    perm: Tensor  # int64 [L]: entry positions sorted by row
    ebag: Tensor  # int64 [L]: bag of each entry (original order)
    escale: Tensor  # fp32 [L]: weight of each entry in its bag (0 for padding / outside bags)
    item_start: Tensor  # int64 [I]: sorted-position range [start, end) of each item
    item_end: Tensor
    item_row: Tensor  # int64 [I]
    item_final: Tensor  # int32 [I]: 1 when the item is its row's only item
    item_dst: Tensor  # int64 [I]: unique-row id (final) or partial id (not final)
    num_partials: int
    multi_first: Tensor  # int64 [M]: first partial of each multi-item row
    multi_count: Tensor  # int64 [M]
    multi_row: Tensor  # int64 [M]
    multi_u: Tensor  # int64 [M]: unique-row id
    rows: Tensor  # int64 [R]: touched rows, ascending


def build_segments(indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                   mode: int, padding_idx: int, num_rows: int, chunk: int) -> RowSegments:
    """Sort the batch's entries by row and cut the runs into items (torch ops on device)."""
    dev = indices.device
    L = indices.numel()
    idx = indices.long()
    off = offsets.long()
    num_bags = off.numel() - 1
    pos = torch.arange(L, device=dev)
    # Bag of each entry; entries past offsets[-1] belong to no bag (bag == num_bags).
    bag = torch.searchsorted(off[1:].contiguous(), pos, right=True)
    keep = bag < num_bags
    if padding_idx >= 0:
        keep &= idx != padding_idx
    bag = bag.clamp(max=max(num_bags - 1, 0))
    escale = keep.float()
    if per_sample_weights is not None and mode != MODE_MAX:
        escale = escale * per_sample_weights.reshape(-1).float()
    if mode == MODE_MEAN:
        # Non-padding entries per bag by an exact integer prefix sum (deterministic).
        cs = torch.zeros(L + 1, dtype=torch.int64, device=dev)
        cs[1:] = torch.cumsum(keep.long(), 0)
        counts = cs[off[1:].clamp(max=L)] - cs[off[:-1].clamp(max=L)]
        escale = escale / counts.clamp(min=1).float()[bag]
    key = torch.where(keep, idx, torch.full_like(idx, num_rows))  # dropped entries sort last
    sk, perm = torch.sort(key, stable=True)
    newseg = torch.ones(L, dtype=torch.bool, device=dev)
    newseg[1:] = sk[1:] != sk[:-1]
    segstart = torch.cummax(torch.where(newseg, pos, torch.zeros_like(pos)), 0).values
    item_flag = (pos - segstart) % chunk == 0
    starts = torch.nonzero(item_flag).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_full((min(1, starts.numel()),), L)])
    rows_i = sk[starts]
    real = rows_i < num_rows
    starts, ends, rows_i = starts[real], ends[real], rows_i[real]
    first = newseg[starts]
    last = (ends >= L) | newseg[ends.clamp(max=max(L - 1, 0))]
    final = first & last
    u = torch.cumsum(first.long(), 0) - 1
    nonfinal = ~final
    pid = torch.cumsum(nonfinal.long(), 0) - 1
    num_partials = int(nonfinal.sum())
    dst = torch.where(final, u, pid)
    mfirst_sel = first & nonfinal
    multi_first = pid[mfirst_sel]
    multi_count = torch.diff(multi_first, append=torch.full((1,), num_partials,
                                                             dtype=torch.int64, device=dev))
    return RowSegments(perm, bag, escale, starts, ends, rows_i, final.to(torch.int32), dst,
                       num_partials, multi_first, multi_count, rows_i[mfirst_sel], u[mfirst_sel],
                       rows_i[first])


@triton.jit
def _epilogue(tot, row, dst, out_ptr, frozen_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr,
              num_rows, j2, c2, B: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, EPI: tl.constexpr,
              HAS_FROZEN: tl.constexpr):
    jvalid = j2 < NB  # [NBT, 1]
    row2 = row + tl.zeros([1, 1], tl.int64)  # a [1, 1] block: tl.load needs block pointers
    slot, active = resolve_slot(row_mask_ptr, row_ptr_ptr, row_slots_ptr, row2, row2 >= 0, j2,
                                jvalid, num_rows, W)
    slot = slot.to(tl.int64)
    if EPI == 0:
        m = active & (c2 < B)
        if HAS_FROZEN:
            fz = tl.load(frozen_ptr + slot, mask=active, other=1)
            m = m & (fz == 0)
        tl.store(out_ptr + slot * B + c2, tot.to(out_ptr.dtype.element_ty), mask=m)
    else:
        norm = tl.sqrt(tl.sum(tot * tot, 1))  # [NBT]; the tile holds whole blocks
        act1 = tl.max(active.to(tl.int32), 1) != 0
        jj = tl.max(j2, 1)
        tl.store(out_ptr + dst * NB + jj, tl.where(act1, 0.0, norm), mask=jj < NB)


@triton.jit
def _items_kernel(grad_out_ptr, max_idx_ptr, perm_ptr, ebag_ptr, escale_ptr, item_start_ptr,
                  item_end_ptr, item_row_ptr, item_final_ptr, item_dst_ptr, partial_ptr,
                  out_ptr, frozen_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr, num_rows,
                  B: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, NBT: tl.constexpr,
                  BP: tl.constexpr, CB: tl.constexpr, BE: tl.constexpr, MODE: tl.constexpr,
                  EPI: tl.constexpr, HAS_FROZEN: tl.constexpr):
    i = tl.program_id(0)
    pid_c = tl.program_id(1)
    D: tl.constexpr = NB * B
    s = tl.load(item_start_ptr + i)
    e = tl.load(item_end_ptr + i)
    row = tl.load(item_row_ptr + i)
    dst = tl.load(item_dst_ptr + i)
    final = tl.load(item_final_ptr + i)
    j = (pid_c // CB) * NBT + tl.arange(0, NBT)
    c = (pid_c % CB) * BP + tl.arange(0, BP)
    j3 = j[None, :, None]
    c3 = c[None, None, :]
    colmask = (j3 < NB) & (c3 < B)
    d3 = j3 * B + c3
    acc = tl.zeros([BE, NBT, BP], tl.float32)
    for p0 in range(s, e, BE):
        p = p0 + tl.arange(0, BE)
        m = p < e
        orig = tl.load(perm_ptr + p, mask=m, other=0)
        bag = tl.load(ebag_ptr + orig, mask=m, other=0)
        m3 = m[:, None, None] & colmask
        goff = bag[:, None, None] * D + d3
        g = tl.load(grad_out_ptr + goff, mask=m3, other=0.0).to(tl.float32)
        if MODE == 2:
            mi = tl.load(max_idx_ptr + goff, mask=m3, other=-1)
            g = tl.where(mi == orig[:, None, None], g, 0.0)
        else:
            sc = tl.load(escale_ptr + orig, mask=m, other=0.0)
            g = g * sc[:, None, None]
        acc += g
    tot = tl.sum(acc, 0)  # [NBT, BP], fixed reduction tree
    if final != 0:
        _epilogue(tot, row, dst, out_ptr, frozen_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr,
                  num_rows, j[:, None], c[None, :], B, NB, W, EPI, HAS_FROZEN)
    else:
        tl.store(partial_ptr + dst * D + j[:, None] * B + c[None, :], tot,
                 mask=(j[:, None] < NB) & (c[None, :] < B))


@triton.jit
def _merge_kernel(partial_ptr, multi_first_ptr, multi_count_ptr, multi_row_ptr, multi_u_ptr,
                  out_ptr, frozen_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr, num_rows,
                  B: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, NBT: tl.constexpr,
                  BP: tl.constexpr, CB: tl.constexpr, BI: tl.constexpr, EPI: tl.constexpr,
                  HAS_FROZEN: tl.constexpr):
    r = tl.program_id(0)
    pid_c = tl.program_id(1)
    D: tl.constexpr = NB * B
    p_first = tl.load(multi_first_ptr + r)
    n = tl.load(multi_count_ptr + r)
    row = tl.load(multi_row_ptr + r)
    u = tl.load(multi_u_ptr + r)
    j = (pid_c // CB) * NBT + tl.arange(0, NBT)
    c = (pid_c % CB) * BP + tl.arange(0, BP)
    j3 = j[None, :, None]
    c3 = c[None, None, :]
    colmask = (j3 < NB) & (c3 < B)
    acc = tl.zeros([BI, NBT, BP], tl.float32)
    for q0 in range(0, n, BI):
        q = q0 + tl.arange(0, BI)
        m3 = (q < n)[:, None, None] & colmask
        acc += tl.load(partial_ptr + (p_first + q)[:, None, None] * D + j3 * B + c3, mask=m3,
                       other=0.0)
    tot = tl.sum(acc, 0)
    _epilogue(tot, row, u, out_ptr, frozen_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr,
              num_rows, j[:, None], c[None, :], B, NB, W, EPI, HAS_FROZEN)


def segment_reduce(seg: RowSegments, grad_out: Tensor, max_idx: Tensor, out: Tensor,
                   frozen: Optional[Tensor], row_ptr: Tensor, row_slots: Tensor,
                   row_mask: Tensor, num_blocks: int, block_size: int, W: int, mode: int,
                   epi: int, cfg) -> None:
    """Launch the item kernel then the merge kernel (when some row spans several items)."""
    B, NB = block_size, num_blocks
    D = NB * B
    I = seg.item_start.numel()
    if I == 0:
        return
    dev = grad_out.device
    partial = torch.empty(max(seg.num_partials, 1), D, dtype=torch.float32, device=dev)
    fz = frozen.view(torch.uint8) if frozen is not None else out
    tile = cfg.NBT * cfg.BP
    BE = max(1, min(32, 2048 // tile))
    mi = max_idx if mode == MODE_MAX else grad_out
    _items_kernel[(I, cfg.n_col_tiles)](
        grad_out, mi, seg.perm, seg.ebag, seg.escale, seg.item_start, seg.item_end,
        seg.item_row, seg.item_final, seg.item_dst, partial, out, fz, row_ptr, row_slots,
        row_mask, row_mask.shape[0], B=B, NB=NB, W=W, NBT=cfg.NBT, BP=cfg.BP, CB=cfg.CB, BE=BE, MODE=mode,
        EPI=epi, HAS_FROZEN=frozen is not None, num_warps=cfg.num_warps)
    M = seg.multi_first.numel()
    if M:
        _merge_kernel[(M, cfg.n_col_tiles)](
            partial, seg.multi_first, seg.multi_count, seg.multi_row, seg.multi_u, out, fz,
            row_ptr, row_slots, row_mask, row_mask.shape[0], B=B, NB=NB, W=W, NBT=cfg.NBT, BP=cfg.BP, CB=cfg.CB,
            BI=BE, EPI=epi, HAS_FROZEN=frozen is not None, num_warps=cfg.num_warps)
