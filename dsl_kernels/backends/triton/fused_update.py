"""Triton ``fused_update``: lookup backward fused with the optimizer step (see
:mod:`dsl_kernels.fused` for the semantics; the formulas are those of
``backends/reference/fused_update.py``).

Work list: the touched-rows plan (entries grouped by row, ``backends/touched_rows.py``).
One program per unique row walks the row's active blocks as a ``[NB, B]`` tile, sums the
gradient of its entries ``T`` at a time (a ``[T, NB, B]`` gather of ``grad_out`` reduced over
the entries: fixed order, so deterministic) and applies the update in registers; nothing of
size ``[C, B]`` is written besides the touched slots themselves.

Zipf workloads have rows looked up ~10^5 times per batch; one program looping over all of them
would be the whole step's tail. Runs longer than ``CHUNK`` entries are therefore split: a first
kernel sums each chunk of ``CHUNK`` entries into a small fp32 buffer (``[chunks, NB, B]``, only
for the hot rows), and the hot row's program then sums its chunks in order and updates.

Used through ``dsl_kernels.ops.fused_update(..., backend="triton")`` (or a module with
``backend="triton"`` and :func:`dsl_kernels.fused.fuse_optimizer`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...format import MODE_MAX, NAN_IGNORE
from ..reference.fused_update import adam_step_size
from ..registry import register_impl
from ..touched_rows import split_heavy_runs, touched_rows_plan
from ._bits import resolve_slot


CHUNK = 1024  # entries per partial sum of a hot row
ENTRY_TILE = 16  # entries gathered per loop iteration


@triton.jit
def _isfinite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _gather_sum(acc, grad_out_ptr, perm_ptr, bag_ptr, scale_ptr, max_idx_ptr, e_lo, e_hi, col,
                colmask, D, MODE_MAX: tl.constexpr, T: tl.constexpr):
    """acc[NB, B] += sum over entries perm[e_lo:e_hi] of their gradient contribution."""
    te = tl.arange(0, T)
    for e in range(e_lo, e_hi, T):
        emask = (e + te) < e_hi
        i = tl.load(perm_ptr + e + te, mask=emask, other=0)
        b = tl.load(bag_ptr + i, mask=emask, other=0)
        off = b[:, None, None] * D + col[None, :, :]
        m3 = emask[:, None, None] & colmask[None, :, :]
        go = tl.load(grad_out_ptr + off, mask=m3, other=0.0).to(tl.float32)
        if MODE_MAX:
            mi = tl.load(max_idx_ptr + off, mask=m3, other=-1)
            go = tl.where(mi == i[:, None, None], go, 0.0)
        else:
            s = tl.load(scale_ptr + i, mask=emask, other=0.0)
            go = go * s[:, None, None]
        acc += tl.sum(go, axis=0)
    return acc


@triton.jit
def _partial_kernel(grad_out_ptr, perm_ptr, bag_ptr, scale_ptr, max_idx_ptr, chunk_lo_ptr,
                    chunk_hi_ptr, partial_ptr, D, B, NB, MODE_MAX: tl.constexpr,
                    NB_P: tl.constexpr, B_P: tl.constexpr, T: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NB_P)[:, None]
    k = tl.arange(0, B_P)[None, :]
    colmask = (j < NB) & (k < B)
    col = j * B + k
    e_lo = tl.load(chunk_lo_ptr + c)
    e_hi = tl.load(chunk_hi_ptr + c)
    acc = tl.zeros((NB_P, B_P), tl.float32)
    acc = _gather_sum(acc, grad_out_ptr, perm_ptr, bag_ptr, scale_ptr, max_idx_ptr, e_lo, e_hi,
                      col, colmask, D, MODE_MAX, T)
    tl.store(partial_ptr + c * (NB_P * B_P) + j * B_P + k, acc)


@triton.jit
def _update_kernel(grad_out_ptr, values_ptr, state1_ptr, state2_ptr, row_ptr_ptr, row_slots_ptr,
                   row_mask_ptr, perm_ptr, run_start_ptr, run_rows_ptr, run_ids_ptr, bag_ptr,
                   scale_ptr, max_idx_ptr, frozen_ptr, partial_ptr, chunk_ptr_ptr, skipped_ptr,
                   D, B, NB, num_rows, lr, beta1, beta2, eps, weight_decay, step_size,
                   W: tl.constexpr, MODE_MAX: tl.constexpr, OPT: tl.constexpr,
                   NAN_CHECK: tl.constexpr, HAS_FROZEN: tl.constexpr,
                   FROM_PARTIAL: tl.constexpr, NB_P: tl.constexpr, B_P: tl.constexpr,
                   T: tl.constexpr):
    q = tl.program_id(0).to(tl.int64)
    r = tl.load(run_ids_ptr + q)
    row = tl.load(run_rows_ptr + r)
    j = tl.arange(0, NB_P)[:, None]
    k = tl.arange(0, B_P)[None, :]
    jvalid = j < NB
    kvalid = k < B
    rowv = row + j.to(tl.int64) * 0  # the row as a tile: every load is a block load
    slot, active = resolve_slot(row_mask_ptr, row_ptr_ptr, row_slots_ptr, rowv, rowv >= 0, j,
                                jvalid, num_rows, W)
    slot = slot.to(tl.int64)
    if HAS_FROZEN:
        fz = tl.load(frozen_ptr + slot, mask=active, other=0)
        active = active & (fz == 0)
    m2 = active & kvalid
    acc = tl.zeros((NB_P, B_P), tl.float32)
    if FROM_PARTIAL:
        c_lo = tl.load(chunk_ptr_ptr + q)
        c_hi = tl.load(chunk_ptr_ptr + q + 1)
        for c in range(c_lo, c_hi):
            acc += tl.load(partial_ptr + c * (NB_P * B_P) + j * B_P + k)
    else:
        e_lo = tl.load(run_start_ptr + r)
        e_hi = tl.load(run_start_ptr + r + 1)
        acc = _gather_sum(acc, grad_out_ptr, perm_ptr, bag_ptr, scale_ptr, max_idx_ptr, e_lo,
                          e_hi, j * B + k, m2, D, MODE_MAX, T)
    g = acc
    voff = slot * B + k
    p = tl.load(values_ptr + voff, mask=m2, other=0.0).to(tl.float32)
    if OPT != 4:  # L2 weight decay (0.0 is a no-op)
        g = g + weight_decay * p
    if OPT == 0:
        new_p = p - lr * g
    elif OPT == 1:
        s1 = tl.load(state1_ptr + voff, mask=m2, other=0.0)
        n1 = s1 + g * g
        new_p = p - lr * g / (tl.sqrt(n1) + eps)
    elif OPT == 2:
        s1 = tl.load(state1_ptr + slot, mask=active, other=0.0)  # [NB_P, 1]
        sq = tl.sum(tl.where(kvalid, g * g, 0.0), axis=1)[:, None]
        n1 = s1 + sq / B
        new_p = p - lr * g / (tl.sqrt(n1) + eps)
    else:
        if OPT == 4:
            p = p * (1.0 - lr * weight_decay)
        s1 = tl.load(state1_ptr + voff, mask=m2, other=0.0)
        s2 = tl.load(state2_ptr + voff, mask=m2, other=0.0)
        n1 = s1 + (g - s1) * (1.0 - beta1)
        n2 = s2 + (g * g - s2) * (1.0 - beta2)
        new_p = p - step_size * (n1 / (tl.sqrt(n2) + eps))
    out = new_p.to(values_ptr.dtype.element_ty)
    ok = active
    if NAN_CHECK:
        fin = _isfinite(out.to(tl.float32)) | (~kvalid)
        if OPT == 1:
            fin = fin & _isfinite(n1)
        if OPT == 2:
            fin = fin & _isfinite(n1)
        if OPT >= 3:
            fin = fin & _isfinite(n1) & _isfinite(n2)
        nbad = tl.sum(tl.where(fin, 0, 1), axis=1)[:, None]
        ok = active & (nbad == 0)
        bad = tl.sum(tl.sum((active & (nbad != 0)).to(tl.int64), axis=1), axis=0)
        if bad > 0:  # rare: no atomic traffic on the common path
            tl.atomic_add(skipped_ptr, bad)
    w2 = ok & kvalid
    tl.store(values_ptr + voff, out, mask=w2)
    if OPT == 1:
        tl.store(state1_ptr + voff, n1, mask=w2)
    if OPT == 2:
        tl.store(state1_ptr + slot, n1, mask=ok)
    if OPT >= 3:
        tl.store(state1_ptr + voff, n1, mask=w2)
        tl.store(state2_ptr + voff, n2, mask=w2)


@register_impl("triton", "fused_update")
def fused_update(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                 row_mask: Tensor, indices: Tensor, offsets: Tensor,
                 per_sample_weights: Optional[Tensor], max_idx: Tensor, frozen: Optional[Tensor],
                 state1: Tensor, state2: Tensor, num_blocks: int, mode: int, padding_idx: int,
                 optimizer: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, nan_policy: int) -> Tensor:
    """Triton backend of ``dsl::fused_update`` (see :mod:`dsl_kernels.fused`)."""
    C, B = values.shape
    D = num_blocks * B
    if grad_out.shape[1] != D:
        raise ValueError(f"grad_out must have {D} columns, got {tuple(grad_out.shape)}")
    if not values.is_contiguous():
        raise ValueError("values must be contiguous")
    dev = values.device
    skipped = torch.zeros(1, dtype=torch.int64, device=dev)
    perm, run_start, run_rows, bag, scale = touched_rows_plan(
        indices, offsets, per_sample_weights, mode, padding_idx, row_mask.shape[0])
    R = run_rows.numel()
    if R == 0:
        return skipped
    grad_out = grad_out.contiguous()
    row_mask = row_mask.contiguous()
    W = row_mask.shape[1]
    NB_P, B_P = triton.next_power_of_2(num_blocks), triton.next_power_of_2(B)
    is_max = mode == MODE_MAX
    mx = max_idx.contiguous() if is_max else skipped
    sc = scale if not is_max else skipped.float()
    s1 = state1 if state1.numel() else skipped.float()
    s2 = state2 if state2.numel() else skipped.float()
    fz = frozen.contiguous().view(torch.uint8) if frozen is not None else skipped
    light, heavy, chunk_lo, chunk_hi, chunk_ptr = split_heavy_runs(run_start, CHUNK)
    nw = 4 if NB_P * B_P >= 256 else 1
    common = dict(D=D, B=B, NB=num_blocks, num_rows=row_mask.shape[0], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay,
                  step_size=adam_step_size(lr, beta1, beta2, step), W=W, MODE_MAX=is_max,
                  OPT=optimizer, NAN_CHECK=nan_policy != NAN_IGNORE,
                  HAS_FROZEN=frozen is not None, NB_P=NB_P, B_P=B_P, T=ENTRY_TILE, num_warps=nw)
    args = (grad_out, values, s1, s2, row_ptr, row_slots, row_mask, perm, run_start, run_rows)
    if light.numel():
        _update_kernel[(light.numel(),)](*args, light, bag, sc, mx, fz, skipped, skipped,
                                         skipped, FROM_PARTIAL=False, **common)
    if heavy.numel():
        partial = torch.empty(chunk_lo.numel(), NB_P, B_P, dtype=torch.float32, device=dev)
        _partial_kernel[(chunk_lo.numel(),)](grad_out, perm, bag, sc, mx, chunk_lo, chunk_hi,
                                             partial, D, B, num_blocks, MODE_MAX=is_max,
                                             NB_P=NB_P, B_P=B_P, T=ENTRY_TILE, num_warps=nw)
        _update_kernel[(heavy.numel(),)](*args, heavy, bag, sc, mx, fz, partial, chunk_ptr,
                                         skipped, FROM_PARTIAL=True, **common)
    return skipped
