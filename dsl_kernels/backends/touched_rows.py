"""The touched-rows plan of the fused backward + optimizer: the batch's entries grouped by row,
the work list the C++, CUDA and Triton ``fused_update`` kernels walk (defined here once; the CPU
extension has a counting-sort twin, ``dsl_C::fused_plan``, tested against it)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..format import MODE_MAX, MODE_MEAN


def touched_rows_plan(indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                      mode: int, padding_idx: int, num_rows: Optional[int] = None
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Entries grouped by row, the work list of the fused kernels (all batch-sized):

    ``perm int64[L']`` positions in ``indices`` sorted by row (stable: input order inside a
    row; padding entries and entries past ``offsets[-1]`` dropped), ``run_start int64[R+1]``
    (the entries of unique row ``run_rows[r]`` are ``perm[run_start[r]:run_start[r+1]]``),
    ``run_rows int64[R]``, ``bag int64[L]`` (bag of every position) and ``scale fp32[L]`` (weight
    of every position in its bag's sum: per-sample weight, 1/count for mean; empty for max).
    """
    dev = indices.device
    idx = indices.long()
    L = idx.numel()
    off = offsets.long()
    num_bags = off.numel() - 1
    pos = torch.arange(L, device=dev)
    # Bag of each position; entries past offsets[-1] get bag == num_bags and are dropped.
    bag = torch.searchsorted(off[1:], pos, right=True)
    keep = bag < num_bags
    if padding_idx >= 0:
        keep &= idx != padding_idx
    if mode == MODE_MAX:
        scale = torch.empty(0, dtype=torch.float32, device=dev)
    else:
        scale = keep.float()
        if per_sample_weights is not None:
            scale = scale * per_sample_weights.reshape(-1)[:L].float()
        if mode == MODE_MEAN:
            counts = torch.zeros(num_bags + 1, dtype=torch.float32, device=dev)
            counts.index_add_(0, bag, keep.float())
            scale = scale / counts.clamp(min=1.0)[bag]
    # Dropped entries sort last under a key past every row; cut them off after the sort.
    # 32-bit keys when row ids allow: half the radix passes of a 64-bit sort on the GPU.
    top = num_rows if num_rows is not None else (int(idx.max()) + 1 if L else 0)  # no sync if given
    kdt = torch.int32 if top < 2 ** 31 - 1 else torch.int64
    big = torch.iinfo(kdt).max
    key = torch.where(keep, idx, torch.full_like(idx, big)).to(kdt)
    skey, perm = torch.sort(key, stable=True)
    run_rows, counts = torch.unique_consecutive(skey, return_counts=True)
    if run_rows.numel() and int(run_rows[-1]) == big:
        run_rows, counts = run_rows[:-1], counts[:-1]
    run_rows = run_rows.long()
    run_start = torch.zeros(run_rows.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=run_start[1:])
    return perm, run_start, run_rows, bag, scale


def split_heavy_runs(run_start: Tensor, chunk: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Split the plan's runs for the GPU kernels: ``light`` (int64 run ids with at most
    ``chunk`` entries, one program each) and ``heavy`` (the Zipf-hot rest). Each heavy run is cut
    into chunks of ``chunk`` entries, chunk ``c`` covering entries ``[chunk_lo[c], chunk_hi[c])``;
    heavy run ``heavy[h]`` owns chunks ``[chunk_ptr[h], chunk_ptr[h+1])`` (in entry order, so the
    two-level sum stays deterministic)."""
    dev = run_start.device
    counts = run_start[1:] - run_start[:-1]
    is_heavy = counts > chunk
    light = torch.nonzero(~is_heavy).squeeze(1)
    heavy = torch.nonzero(is_heavy).squeeze(1)
    if heavy.numel() == 0:
        e = torch.zeros(0, dtype=torch.int64, device=dev)
        return light, heavy, e, e, torch.zeros(1, dtype=torch.int64, device=dev)
    nch = torch.div(counts[heavy] + chunk - 1, chunk, rounding_mode="floor")
    chunk_ptr = torch.zeros(heavy.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(nch, 0, out=chunk_ptr[1:])
    total = int(chunk_ptr[-1])
    owner = torch.repeat_interleave(torch.arange(heavy.numel(), device=dev), nch,
                                    output_size=total)
    k = torch.arange(total, device=dev) - chunk_ptr[owner]
    run = heavy[owner]
    chunk_lo = run_start[run] + k * chunk
    chunk_hi = torch.minimum(chunk_lo + chunk, run_start[run + 1])
    return light, heavy, chunk_lo, chunk_hi, chunk_ptr
