"""``dsl::lookup_backward`` in Triton: the masked gradient scatter into the ``[C, B]`` pool.

Two modes, neither of which builds an ``[N, D]`` (or ``[L, D]``) buffer:

* fast (``deterministic=False``): the forward's bag-parallel walk, but each entry's gradient
  block is ``atomic_add``-ed (fp32) straight into the slot it came from; inactive blocks,
  padding entries and ``frozen`` slots are skipped without a memory access. Cast to the values
  dtype at the end.
* deterministic: entries sorted by row, fixed-order segment reduction (see ``_segments.py``);
  each active slot is written once with a plain store, so the result is bit-identical run to run
  (and needs no fp32 staging buffer).

Max mode: entry ``i`` of bag ``b`` gets ``grad_out[b, d]`` for the columns where
``max_idx[b, d] == i``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...format import MODE_MAX, MODE_MEAN, MODE_SUM
from ..registry import register_impl

from ._bits import bag_tile, resolve_slot
from ._common import check_bags, check_values, contiguous, mask_words
from ._config import tile_config
from . import _segments
from ._segments import build_segments, segment_reduce



# Sizes and padding_idx are not specialised on (divisibility by 16 would only multiply the
# compiled variants).
@triton.jit(do_not_specialize=["num_bags", "padding_idx", "num_rows"])
def _backward_atomic_kernel(grad_out_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr, indices_ptr,
                            offsets_ptr, psw_ptr, max_idx_ptr, frozen_ptr, grad_ptr, num_bags,
                            padding_idx, num_rows, B: tl.constexpr, NB: tl.constexpr, W: tl.constexpr,
                            NBT: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr,
                            G: tl.constexpr, MODE: tl.constexpr, HAS_PSW: tl.constexpr,
                            HAS_FROZEN: tl.constexpr,
                            SLOT64: tl.constexpr):
    D: tl.constexpr = NB * B
    bag, bmask, start, length, max_len, j3, c3 = bag_tile(offsets_ptr, num_bags, G, NBT, BP, CB)
    jvalid = j3 < NB
    cvalid = c3 < B
    goff = bag[:, None, None] * D + j3 * B + c3
    gmask = bmask[:, None, None] & jvalid & cvalid
    g = tl.load(grad_out_ptr + goff, mask=gmask, other=0.0).to(tl.float32)
    if MODE == 2:
        mi = tl.load(max_idx_ptr + goff, mask=gmask, other=-1)
    if MODE == 1:
        cnt = length.to(tl.int32)
        if padding_idx >= 0:
            # Count the non-padding entries first (index loads only).
            cnt = tl.zeros([G], tl.int32)
            for k in range(0, max_len):
                em = bmask & (k < length)
                idx = tl.load(indices_ptr + start + k, mask=em, other=padding_idx)
                cnt += (em & (idx != padding_idx)).to(tl.int32)
        g = g / tl.maximum(cnt, 1).to(tl.float32)[:, None, None]

    for k in range(0, max_len):
        pos = start + k
        keep = bmask & (k < length)
        idx = tl.load(indices_ptr + pos, mask=keep, other=0).to(tl.int64)
        keep = keep & (idx != padding_idx)  # -1 (no padding) never matches
        keep3 = keep[:, None, None]
        slot, active = resolve_slot(row_mask_ptr, row_ptr_ptr, row_slots_ptr,
                                    idx[:, None, None], keep3, j3, jvalid, num_rows, W)
        if SLOT64:
            slot = slot.to(tl.int64)
        if HAS_FROZEN:
            fz = tl.load(frozen_ptr + slot, mask=active, other=1)
            active = active & (fz == 0)
        m = active & cvalid
        if MODE == 2:
            m = m & (mi == pos[:, None, None])
            contrib = g
        elif HAS_PSW:
            w = tl.load(psw_ptr + pos, mask=keep, other=0.0).to(tl.float32)
            contrib = g * w[:, None, None]
        else:
            contrib = g
        tl.atomic_add(grad_ptr + slot * B + c3, contrib, mask=m, sem="relaxed")


@register_impl("triton", "lookup_backward")
def lookup_backward(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                    row_mask: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor], max_idx: Tensor,
                    frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                    deterministic: bool) -> Tensor:
    """Gradient ``[C, B]`` of the pool (values dtype); same contract as
    :func:`dsl_kernels.reference.lookup_backward`.

    Example (CPU needs ``TRITON_INTERPRET=1``)::

        >>> import torch
        >>> from dsl_kernels import reference
        >>> from dsl_kernels.triton import lookup_backward
        >>> coord = torch.tensor([0, 3])               # blocks (0,0) and (1,1), 2 rows x 2
        >>> row_ptr, row_slots, row_mask = reference.rebuild_index(coord, 2, 2)
        >>> values = torch.zeros(2, 4)
        >>> g = lookup_backward(torch.ones(1, 8), values, row_ptr, row_slots, row_mask,
        ...                     torch.tensor([0, 1, 1]), torch.tensor([0, 3]), None,
        ...                     torch.empty(0, dtype=torch.int64), None, 2, 0, -1, True)
        >>> g.tolist()
        [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]
    """
    check_values("values", values)
    check_bags(indices, offsets, per_sample_weights, values.device)
    if mode not in (MODE_SUM, MODE_MEAN, MODE_MAX):
        raise ValueError(f"mode must be 0 (sum), 1 (mean) or 2 (max), got {mode}")
    C, B = values.shape
    D = num_blocks * B
    num_bags = offsets.numel() - 1
    if grad_out.shape != (num_bags, D):
        raise ValueError(f"grad_out must be [{num_bags}, {D}], got {tuple(grad_out.shape)}")
    if mode == MODE_MAX and max_idx.shape != (num_bags, D):
        raise ValueError(f"max_idx must be int64 [{num_bags}, {D}] in max mode, got "
                         f"{tuple(max_idx.shape)}")
    if frozen is not None and frozen.shape != (C,):
        raise ValueError(f"frozen must be bool [{C}], got {tuple(frozen.shape)}")
    W = mask_words(row_mask, num_blocks)
    (grad_out, row_ptr, row_slots, row_mask, indices, offsets, psw, max_idx,
     frozen) = contiguous(grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                          per_sample_weights, max_idx, frozen)
    if frozen is not None and frozen.dtype != torch.bool:
        frozen = frozen.bool()
    dev = values.device
    if num_bags == 0 or D == 0 or C == 0:
        return torch.zeros(C, B, dtype=values.dtype, device=dev)
    if deterministic:
        cfg = tile_config(num_blocks, B)
        grad = torch.zeros(C, B, dtype=values.dtype, device=dev)
        seg = build_segments(indices, offsets, psw, mode, padding_idx, row_ptr.numel() - 1,
                             _segments.SEGMENT_CHUNK)
        segment_reduce(seg, grad_out, max_idx, grad, frozen, row_ptr, row_slots, row_mask,
                       num_blocks, B, W, mode, 0, cfg)
        return grad

    grad = torch.zeros(C, B, dtype=torch.float32, device=dev)
    cfg = tile_config(num_blocks, B, indices.numel() / num_bags)
    grid = (triton.cdiv(num_bags, cfg.G), cfg.n_col_tiles)
    _backward_atomic_kernel[grid](
        grad_out, row_ptr, row_slots, row_mask, indices, offsets,
        psw if psw is not None else grad_out, max_idx if mode == MODE_MAX else grad_out,
        frozen.view(torch.uint8) if frozen is not None else grad, grad, num_bags, padding_idx,
        row_mask.shape[0], B=B, NB=num_blocks, W=W, NBT=cfg.NBT, BP=cfg.BP, CB=cfg.CB, G=cfg.G, MODE=mode,
        HAS_PSW=psw is not None and mode != MODE_MAX,
        HAS_FROZEN=frozen is not None, SLOT64=grad.numel() >= 2 ** 31,
        num_warps=cfg.num_warps)
    return grad if values.dtype == torch.float32 else grad.to(values.dtype)
