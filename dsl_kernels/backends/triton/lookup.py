"""``dsl::lookup`` in Triton: embedding-bag forward over the block-slot pool.

One program handles ``G`` bags x one column tile (``NBT`` blocks x ``BP`` columns). It walks
the bags' entries in lockstep (entry ``k`` of each of the ``G`` bags per iteration, so ``G``
independent gather chains are in flight), finds the slot of every block through the row
bitmask and a popcount rank, loads only active blocks (inactive ones read as zero without a
memory access), and accumulates in fp32. Max mode keeps the first maximum and its entry position
(``max_idx``), which is all the backward needs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...format import MODE_MAX, MODE_MEAN, MODE_SUM
from ..registry import register_impl

from ._bits import bag_tile, resolve_slot
from ._common import check_bags, check_values, contiguous, mask_words
from ._config import tile_config



# Sizes and padding_idx are not specialised on (divisibility by 16 would only multiply the
# compiled variants).
@triton.jit(do_not_specialize=["num_bags", "padding_idx", "num_rows"])
def _lookup_kernel(values_ptr, row_ptr_ptr, row_slots_ptr, row_mask_ptr, indices_ptr,
                   offsets_ptr, psw_ptr, out_ptr, max_idx_ptr, num_bags, padding_idx, num_rows,
                   B: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, NBT: tl.constexpr,
                   BP: tl.constexpr, CB: tl.constexpr, G: tl.constexpr, MODE: tl.constexpr,
                   HAS_PSW: tl.constexpr, SLOT64: tl.constexpr):
    D: tl.constexpr = NB * B
    bag, bmask, start, length, max_len, j3, c3 = bag_tile(offsets_ptr, num_bags, G, NBT, BP, CB)
    jvalid = j3 < NB  # [1, NBT, 1]
    cvalid = c3 < B  # [1, 1, BP]

    acc = tl.zeros([G, NBT, BP], tl.float32)
    if MODE == 2:
        best = tl.full([G, NBT, BP], float("-inf"), tl.float32)
        best_pos = tl.full([G, NBT, BP], -1, tl.int64)
    cnt = tl.zeros([G], tl.int32)
    for k in range(0, max_len):
        pos = start + k
        keep = bmask & (k < length)
        idx = tl.load(indices_ptr + pos, mask=keep, other=0).to(tl.int64)
        # padding_idx is -1 without padding and never equals a row id: no specialisation needed
        # (fewer compiled variants).
        keep = keep & (idx != padding_idx)
        cnt += keep.to(tl.int32)
        keep3 = keep[:, None, None]
        slot, active = resolve_slot(row_mask_ptr, row_ptr_ptr, row_slots_ptr,
                                    idx[:, None, None], keep3, j3, jvalid, num_rows, W)
        if SLOT64:
            slot = slot.to(tl.int64)
        v = tl.load(values_ptr + slot * B + c3, mask=active & cvalid, other=0.0).to(tl.float32)
        if MODE == 2:
            # Inactive blocks of kept entries compete as 0 (the dense image); padding never.
            vm = tl.where(keep3, v, float("-inf"))
            upd = vm > best  # strict: the first maximum wins, as in torch
            best = tl.where(upd, vm, best)
            best_pos = tl.where(upd, pos[:, None, None], best_pos)
        else:
            if HAS_PSW:
                w = tl.load(psw_ptr + pos, mask=keep, other=0.0).to(tl.float32)
                acc += v * w[:, None, None]
            else:
                acc += v

    out_off = bag[:, None, None] * D + j3 * B + c3
    smask = bmask[:, None, None] & jvalid & cvalid
    if MODE == 2:
        has = (cnt > 0)[:, None, None]
        res = tl.where(has, best, 0.0)
        tl.store(max_idx_ptr + out_off, tl.where(has, best_pos, -1), mask=smask)
    elif MODE == 1:
        res = acc / tl.maximum(cnt, 1).to(tl.float32)[:, None, None]
    else:
        res = acc
    tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=smask)


@register_impl("triton", "lookup")
def lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
           indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
           num_blocks: int, mode: int, padding_idx: int) -> Tuple[Tensor, Tensor]:
    """Embedding-bag forward over the block pool; same contract as
    :func:`dsl_kernels.reference.lookup`. Returns ``(out [num_bags, D], max_idx)``.

    Example (CPU needs ``TRITON_INTERPRET=1``)::

        >>> import torch
        >>> from dsl_kernels import reference
        >>> from dsl_kernels.triton import lookup
        >>> coord = torch.tensor([0, 3, 5])            # blocks (0,0) (1,1) (2,1) of 3 rows x 2
        >>> row_ptr, row_slots, row_mask = reference.rebuild_index(coord, 3, 2)
        >>> values = torch.arange(12.).view(3, 4)      # block_size 4, D = 8
        >>> out, _ = lookup(values, row_ptr, row_slots, row_mask, torch.tensor([0, 1, 2]),
        ...                 torch.tensor([0, 2, 3]), None, 2, 0, -1)
        >>> out[0].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    check_values("values", values)
    check_bags(indices, offsets, per_sample_weights, values.device)
    if mode not in (MODE_SUM, MODE_MEAN, MODE_MAX):
        raise ValueError(f"mode must be 0 (sum), 1 (mean) or 2 (max), got {mode}")
    W = mask_words(row_mask, num_blocks)
    values, row_ptr, row_slots, row_mask, indices, offsets, psw = contiguous(
        values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights)
    B = values.shape[1]
    D = num_blocks * B
    num_bags = offsets.numel() - 1
    dev = values.device
    out = torch.empty(num_bags, D, dtype=values.dtype, device=dev)
    if mode == MODE_MAX:
        max_idx = torch.empty(num_bags, D, dtype=torch.int64, device=dev)
    else:
        max_idx = torch.empty(0, dtype=torch.int64, device=dev)
    if num_bags == 0 or D == 0:
        return out, max_idx
    cfg = tile_config(num_blocks, B, indices.numel() / num_bags)
    grid = (triton.cdiv(num_bags, cfg.G), cfg.n_col_tiles)
    _lookup_kernel[grid](
        values, row_ptr, row_slots, row_mask, indices, offsets,
        psw if psw is not None else values, out, max_idx if mode == MODE_MAX else out,
        num_bags, padding_idx, row_mask.shape[0],
        B=B, NB=num_blocks, W=W, NBT=cfg.NBT, BP=cfg.BP, CB=cfg.CB, G=cfg.G, MODE=mode,
        HAS_PSW=psw is not None and mode != MODE_MAX,
        SLOT64=values.numel() >= 2 ** 31,
        num_warps=cfg.num_warps)
    return out, max_idx
