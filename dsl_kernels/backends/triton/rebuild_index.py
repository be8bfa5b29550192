"""``dsl::rebuild_index`` in Triton: CSR row index of the slot pool, on the pool's device.

``torch.sort`` orders the slots by block key (free slots last), ``torch.searchsorted`` of the
row starts ``r * NB`` in the sorted keys gives ``row_ptr`` without a host sync, and a Triton
kernel sets the bits of ``row_mask`` (``atomic_or``: several slots of one row share a word).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..registry import register_impl

_BLOCK = 1024


@triton.jit(do_not_specialize=["C", "total"])
def _mask_kernel(keys_ptr, row_mask_ptr, C, total, NB: tl.constexpr, W: tl.constexpr,
                 BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + i, mask=i < C, other=total)
    act = key < total
    row = key // NB
    col = key - row * NB
    one = tl.full([BLOCK], 1, tl.int64)
    tl.atomic_or(row_mask_ptr + row * W + (col >> 6), one << (col & 63), mask=act,
                 sem="relaxed")


@register_impl("triton", "rebuild_index")
def rebuild_index(coord: Tensor, num_rows: int, num_blocks: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(row_ptr int32[N+1], row_slots int32[C], row_mask int64[N, W])`` from ``coord``; same
    contract as :func:`dsl_kernels.reference.rebuild_index`.

    Example (CPU needs ``TRITON_INTERPRET=1``)::

        >>> import torch
        >>> from dsl_kernels.triton import rebuild_index
        >>> row_ptr, row_slots, row_mask = rebuild_index(torch.tensor([3, -1, 0]), 2, 2)
        >>> row_ptr.tolist(), row_slots.tolist(), row_mask.tolist()
        ([0, 1, 2], [2, 0, -1], [[1], [2]])
    """
    if coord.dim() != 1 or coord.dtype != torch.int64:
        raise ValueError(f"coord must be 1-D int64, got {coord.dtype} {tuple(coord.shape)}")
    if num_rows < 0 or num_blocks < 1:
        raise ValueError(f"num_rows must be >= 0 and num_blocks >= 1, got {num_rows}, "
                         f"{num_blocks}")
    total = num_rows * num_blocks
    keys = torch.where(coord >= 0, coord, torch.full_like(coord, total))
    sk, order = torch.sort(keys, stable=True)
    return index_from_sorted_keys(sk, order, num_rows, num_blocks)


def index_from_sorted_keys(sorted_keys: Tensor, order: Tensor, num_rows: int,
                           num_blocks: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The index from block keys already sorted ascending (free slots carry the key
    ``num_rows * num_blocks`` and sort last) and ``order`` (the slot of each sorted key).
    Benchmarks building huge pools in sorted order call this directly and skip the sort."""
    dev = sorted_keys.device
    C = sorted_keys.numel()
    total = num_rows * num_blocks
    W = (num_blocks + 63) // 64
    sk = sorted_keys.contiguous()
    row_slots = torch.where(sk < total, order, torch.full_like(order, -1)).to(torch.int32)
    starts = torch.arange(num_rows + 1, dtype=torch.int64, device=dev) * num_blocks
    row_ptr = torch.searchsorted(sk, starts).to(torch.int32)
    row_mask = torch.zeros(num_rows, W, dtype=torch.int64, device=dev)
    if C and num_rows:
        _mask_kernel[(triton.cdiv(C, _BLOCK),)](sk, row_mask, C, total, NB=num_blocks, W=W,
                                                 BLOCK=_BLOCK, num_warps=4)
    return row_ptr, row_slots, row_mask
