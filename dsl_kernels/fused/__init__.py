"""Fused backward + optimizer on the slot pool (``dsl::fused_update``), as FBGEMM's
table-batched embeddings do it: the lookup gradient is scattered straight into an optimizer
update of the *touched* active slots, so ``values.grad`` is never materialised and no
``optimizer.step()`` runs for the module.

For every active, non-frozen slot touched by the batch the op computes ``g`` = the sum of its
contributions (deterministic: entries grouped by row with a stable sort, summed in input order)
and applies one of

=================== =====================================================================
``"sgd"``           ``p -= lr * (g + wd * p)``  (like ``torch.optim.SGD`` without momentum)
``"adagrad"``       ``s += g^2; p -= lr * g / (sqrt(s) + eps)`` (``torch.optim.Adagrad``,
                    ``wd`` added to ``g``)
``"rowwise_adagrad"`` one fp32 state per slot (FBGEMM's row-wise Adagrad at block granularity):
                    ``s += mean(g^2); p -= lr * g / (sqrt(s) + eps)``
``"adam"``          lazy Adam exactly like ``torch.optim.SparseAdam``: only touched slots
                    update their moments, bias correction uses the global step count,
                    ``p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``; ``wd`` is L2 (added
                    to ``g``) as in ``torch.optim.Adam``
``"adamw"``         the same with decoupled weight decay on the touched slots
                    (``p *= 1 - lr * wd`` first, as ``torch.optim.AdamW``)
=================== =====================================================================

Untouched slots are not modified at all (lazy semantics): with ``weight_decay=0`` this equals
the dense torch optimizer for SGD and Adagrad, whose untouched rows get a zero gradient.

Layout: ``optim.py`` (the user API). A fused module's forward is ``dsl::fused_lookup``
(:mod:`dsl_kernels.ops.fused_lookup`), whose backward reaches :meth:`FusedOptimizer.step_from_backward`
through the opaque op ``dsl::fused_step_`` (so it compiles with ``fullgraph=True``); the update
itself is ``dsl::fused_update`` (:mod:`dsl_kernels.ops.fused_update`, implemented in
``dsl_kernels/backends/<b>/fused_update.py`` over the touched-rows plan of
``dsl_kernels/backends/touched_rows.py``), or on the cpu backend the plan the forward emitted
(``backends/cpu/fused_step.py``).

Optimizer state is fp32 ``[C, B]`` (``[C]`` for row-wise Adagrad), registered as buffers of the
module (``fused_state1``, ``fused_state2``, ``fused_step``), hence saved in its ``state_dict``
and moved by ``.to()``. The sparsity engine resets the state of re-assigned slots with
:func:`reset_optimizer_state`.

``nan_policy``: ``"ignore"`` writes whatever comes out (like torch); ``"skip"`` leaves a slot
untouched (values and state) when its update would be non-finite; ``"raise"`` checks the
gradient first and raises ``FloatingPointError`` before anything is written (and raises after
the update if a slot still had to be skipped).

Example::

    >>> import torch, dsl_kernels
    >>> from dsl_kernels.fused import fuse_optimizer
    >>> emb = dsl_kernels.SparseEmbeddingBag(1000, 16, mode="sum", density=0.25, block_size=4)
    >>> opt = fuse_optimizer(emb, "adam", lr=1e-2)
    >>> before = emb.values.detach().clone()
    >>> emb(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])).sum().backward()
    >>> emb.values.grad is None, bool((emb.values != before).any()), int(emb.fused_step)
    (True, True, 1)
"""
from __future__ import annotations

from ..backends.reference.fused_update import adam_step_size, apply_rows, reference_fused_update
from ..backends.touched_rows import split_heavy_runs, touched_rows_plan
from ..format import (ADAGRAD, ADAM, ADAMW, NAN_IGNORE, NAN_POLICIES, NAN_RAISE, NAN_SKIP,
                      OPTIMIZERS, ROWWISE_ADAGRAD, SGD)
from ..ops import fused_update
from .optim import FusedOptimizer, fuse_optimizer, reset_optimizer_state, unfuse_optimizer

__all__ = ["FusedOptimizer", "fuse_optimizer", "unfuse_optimizer", "reset_optimizer_state",
           "fused_update", "reference_fused_update", "touched_rows_plan", "split_heavy_runs",
           "apply_rows", "adam_step_size", "OPTIMIZERS", "NAN_POLICIES", "SGD", "ADAGRAD",
           "ROWWISE_ADAGRAD", "ADAM", "ADAMW", "NAN_IGNORE", "NAN_SKIP", "NAN_RAISE"]
