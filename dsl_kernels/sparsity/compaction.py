"""Pool compaction for dense-to-sparse training: the pool SHRINKS, releasing memory.

The kept slots are gathered into a new, smaller ``values`` tensor that replaces ``param.data``
(the Parameter object stays, so the optimizer keeps referring to it), and every optimizer state
tensor with one row per slot, the gradient, ``coord``, ``frozen`` and the pool's slot buffers
(a fused optimizer's state) are shrunk the same way (:meth:`BlockSparseBase.compact_slots_`).
The old tensors are released when the last reference goes, so memory falls with the budget.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..backends import has_impl
from ..pool import BlockSparseBase
from .prune_regrow import block_magnitudes, row_state_tensors, smallest_k


def rebuild_index_lean(module: BlockSparseBase) -> None:
    """``module.rebuild_index(drop_old=True)``: the old index is released before the new one is
    built, so the two never coexist."""
    module.rebuild_index(drop_old=True)


def update_index_lean(module: BlockSparseBase, slots: Tensor, old_keys: Tensor) -> None:
    """The index after ``slots`` changed from ``old_keys`` to ``coord[slots]``: updated in place
    by ``dsl::update_index_`` where the pool's backend has a kernel for it (cpu: one sweep, no
    new index), else rebuilt (:func:`rebuild_index_lean`; the reference implementation of the
    op is that rebuild while the old index is alive: the oracle, not the lean path). Same index
    either way."""
    backend = module.backend_for()
    if (module.row_ptr is None or backend == "reference"
            or not has_impl(backend, "update_index_")):
        rebuild_index_lean(module)
        return
    ops.update_index_(module.row_ptr, module.row_slots, module.row_mask, module.coord, slots,
                      old_keys, module.num_blocks, backend)


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
    keep = keep.to(device=p.device, dtype=torch.int64)
    for opt in optimizers:
        st = opt.state.get(p)
        if st:
            for k, v in row_state_tensors(opt, p).items():
                st[k] = v[keep]
    module.compact_slots_(keep)  # values, grad, coord, frozen and slot buffers (fused state)
    rebuild_index_lean(module)


def resize_pool_(module: BlockSparseBase, budget: int) -> None:
    """Give ``module`` an empty pool of ``budget`` slots (all free), keeping the Parameter
    object: used before loading a checkpoint written after compaction
    (:meth:`BlockSparseBase.resize_pool_`)."""
    module.resize_pool_(budget)


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
