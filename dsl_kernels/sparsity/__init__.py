"""The sparsity engine: the mask of every sparse table changes during training while the memory
stays at the budget.

One scheduler, three published methods:

* ``schedule="from_scratch"`` — Dynamic Sparse Learning (Wang et al., WSDM 2024): start sparse
  at the budget; every ``update_every`` steps until ``stop_at`` prune the
  ``alpha_t = prune_fraction / 2 * (1 + cos(pi * t / stop_at))`` share of active blocks with the
  smallest L2 norm and regrow as many inactive blocks with the largest gradient score
  (``grow="gradient"``, accumulated over the last ``score_window`` batches) or at random
  (``grow="random"``). ``distribution="global"`` ranks blocks across all tables of one pool
  (a ``SparseEmbeddingBagCollection``), so budget moves to the tables that need it;
  ``"per_table"`` keeps every table's count. Separate modules always keep their own budgets.
* ``schedule="dense_to_sparse"`` — cubic density decay plus compaction: start dense
  (``density=1.0`` or ``from_dense``), cubic decay of density to ``target_density`` between
  ``t_start`` and ``t_end`` (the schedule arXiv 2010.08655 uses), the per-table share learned by
  the global magnitude criterion; the pool SHRINKS (values, coord and optimizer state are
  compacted, the Parameter object stays the same); afterwards prune+regrow every
  ``adapt_every`` steps at constant budget so the mask follows a drifting stream. This is not
  that paper's method, which keeps training a full model and periodically derives the sparse
  one from it (a full model is exactly what this engine never holds).
* ``skip_stale=True`` — Slipstream (arXiv 2404.04270): hot slots whose values stopped changing
  are frozen (``module.frozen``): the backward skips them and the scheduler holds their values and
  optimizer state across ``optimizer.step()`` so momentum cannot move them.

Pools trained by the fused optimizer (``dsl_kernels.fused.fuse_optimizer``) work too: pass
``optimizer=None`` (or the optimizer of the dense parameters); the module-held fused state is
reset for reassigned slots and compacted with the pool, and the fused update skips frozen slots.

Usage (the loop is ``loss.backward(); optimizer.step(); scheduler.step()``)::

    >>> import torch, dsl_kernels
    >>> from dsl_kernels.sparsity import DSLScheduler
    >>> emb = dsl_kernels.SparseEmbeddingBag(1000, 32, mode="sum", density=0.3, block_size=8,
    ...                                      backend="reference")
    >>> opt = torch.optim.Adam(emb.parameters(), lr=1e-2)
    >>> sched = DSLScheduler(emb, opt, update_every=10, prune_fraction=0.3, stop_at=100,
    ...                      grow="gradient", score_window=5)
    >>> for step in range(30):
    ...     idx = torch.randint(0, 1000, (64, 4))
    ...     loss = emb(idx).pow(2).sum()
    ...     opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    >>> emb.num_active_blocks == emb.budget   # the budget never changes
    True
    >>> s = sched.stats(); s["mask_updates"], s["moved_blocks"] > 0
    (3, True)

Checkpoint: ``{"model": model.state_dict(), "opt": opt.state_dict(), "sched":
sched.state_dict()}``. To resume, build the model, optimizer and scheduler the same way, then call
``sched.load_state_dict(ck["sched"])`` FIRST (with ``dense_to_sparse`` it resizes the pools to the
checkpoint's sizes), then ``model.load_state_dict(ck["model"])`` and
``opt.load_state_dict(ck["opt"])`` — or simply :func:`load_checkpoint`. Resume is bit-exact on
deterministic backends.
"""
from .layout import align_, allocate_by_frequency_
from .prune_regrow import prune_regrow_, reset_optimizer_rows, register_optimizer_state
from .schedules import cosine_update_fraction, cubic_density
from .scheduler import DSLScheduler, load_checkpoint

__all__ = [
    "DSLScheduler",
    "load_checkpoint",
    "align_",
    "allocate_by_frequency_",
    "prune_regrow_",
    "reset_optimizer_rows",
    "register_optimizer_state",
    "cosine_update_fraction",
    "cubic_density",
]
