"""Pool compaction for dense-to-sparse training: the pool SHRINKS, releasing memory.

The kept slots are gathered into a new, smaller ``values`` tensor that replaces ``param.data``
(the Parameter object stays, so the optimizer keeps referring to it), and every optimizer state
tensor with one row per slot, the gradient, ``coord`` and ``frozen`` are shrunk the same way.
The old tensors are released when the last reference goes, so memory falls with the budget.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..pool import BlockSparseBase
from .prune_regrow import block_magnitudes, row_state_tensors, smallest_k


# Per-slot buffers of dsl_kernels.fused.FusedOptimizer (shrunk / resized with the pool).
_FUSED_STATE = ("fused_state1", "fused_state2")


def rebuild_index_lean(module: BlockSparseBase) -> None:
    """``module.rebuild_index()`` after dropping the old index first, so the old and the new
    index (``row_ptr`` N+1, ``row_mask`` N*W words, ``row_slots`` C) never coexist: at 1M rows
    that overlap alone was +13 % of the steady-state memory of an update. (The old index is
    stale once ``coord`` changed; nothing reads it in between.)"""
    module.row_ptr = module.row_slots = module.row_mask = None
    module.rebuild_index()


def _replace_data(p: torch.nn.Parameter, new: Tensor) -> None:
    """``p.data = new`` with a different shape. Autograd caches the leaf's gradient accumulator
    (with the old shape) while any graph that used ``p`` is alive — e.g. the previous ``loss``
    still referenced by the training loop — and only drops it when ``.data`` changes dtype or
    device. Passing through another dtype forces that reset, so the next backward accumulates
    into the new shape instead of failing with "invalid gradient ... expected shape"."""
    other = torch.float64 if p.dtype != torch.float64 else torch.float32
    p.data = torch.empty(0, dtype=other, device=p.device)
    p.data = new


@torch.no_grad()
def compact_(module: BlockSparseBase, keep: Tensor,
             optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Keep only slots ``keep`` (int64, ascending) of ``module``'s pool, in that order.

    >>> import torch, dsl_kernels
    >>> emb = dsl_kernels.SparseEmbeddingBag(10, 8, density=1.0, block_size=4)
    >>> opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    >>> p = emb.values
    >>> compact_(emb, torch.arange(0, 20, 2), [opt])
    >>> emb.values is p, emb.budget, emb.num_active_blocks
    (True, 10, 10)
    """
    p = module.values
    C = p.shape[0]
    keep = keep.to(device=p.device, dtype=torch.int64)
    for opt in optimizers:
        st = opt.state.get(p)
        if st:
            for k, v in row_state_tensors(opt, p).items():
                st[k] = v[keep]
    _replace_data(p, p.data[keep])
    if p.grad is not None:
        p.grad = p.grad[keep] if p.grad.shape[0] == C else None
    module.coord = module.coord[keep]
    if module.frozen is not None:
        module.frozen = module.frozen[keep]
    for name in _FUSED_STATE:  # a fused optimizer keeps its per-slot state in module buffers
        buf = module._buffers.get(name)
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == C:
            module._buffers[name] = buf[keep]
    rebuild_index_lean(module)


def resize_pool_(module: BlockSparseBase, budget: int) -> None:
    """Give ``module`` an empty pool of ``budget`` slots (all free), keeping the Parameter
    object: used before loading a checkpoint written after compaction."""
    p = module.values
    _replace_data(p, p.data.new_zeros((budget, p.shape[1])))
    p.grad = None
    module.coord = torch.full((budget,), -1, dtype=torch.int64, device=p.device)
    module.frozen = None
    for name in _FUSED_STATE:
        buf = module._buffers.get(name)
        if buf is not None and buf.dim() >= 1 and buf.numel():
            module._buffers[name] = buf.new_zeros((budget,) + tuple(buf.shape[1:]))
    rebuild_index_lean(module)


def keep_largest(module: BlockSparseBase, n_keep: int, per_table_counts: Optional[dict] = None
                 ) -> Tensor:
    """Slots (ascending) to keep when the pool shrinks to ``n_keep`` blocks: the largest
    magnitudes over the whole pool (global criterion), or, with ``per_table_counts`` ({table
    name: count}), the largest of each table. Free slots and non-finite blocks go first; ties go
    to the lower slot. Temporaries are ``[C]``-sized."""
    C = module.budget
    mag = block_magnitudes(module.values.detach())
    mag.masked_fill_(module.coord < 0, float("-inf"))
    if per_table_counts is None:
        drop = smallest_k(mag, C - n_keep)
    else:
        drops = []
        for t in module.tables:
            s = module.table_slots(t)
            n_drop = max(0, s.numel() - per_table_counts[t.name])
            drops.append(s[smallest_k(mag[s], n_drop)])
        drops.append(torch.nonzero(module.coord < 0).squeeze(1))
        drop = torch.cat(drops)
    keep = torch.ones(C, dtype=torch.bool, device=mag.device)
    keep[drop] = False
    return torch.nonzero(keep).squeeze(1)
