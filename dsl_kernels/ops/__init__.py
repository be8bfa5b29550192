"""The ``dsl`` operators, one file each: schema (``torch.library.custom_op``), fake impl with
structural ``torch._check``s (so models trace under ``torch.compile``) and autograd.

Every op takes a trailing ``backend: str`` naming the implementation
(:mod:`dsl_kernels.backends`); the op body forwards to that backend's registered function.

=========================  ==============================================================
``dsl::lookup``            embedding-bag forward over the slot pool -> ``(out, max_idx)``
``dsl::lookup_backward``   masked gradient scatter -> ``grad_values [C, B]``
``dsl::grow_scores``       gradient norm of inactive blocks of touched rows -> ``(rows, scores)``
``dsl::rebuild_index``     CSR row index from ``coord`` -> ``(row_ptr, row_slots, row_mask)``
``dsl::prune_regrow_``     in-place mask update -> ``(slots, pruned_keys)``
``dsl::update_index_``     the row index brought up to date in place after a mask update
``dsl::fill_rows_``        ``t[rows] = value`` (optimizer-state rows of reassigned slots)
``dsl::fused_update``      backward + optimizer step in place -> ``skipped int64[1]``
``dsl::fused_lookup``      forward of a fused module (its backward is the optimizer step)
``dsl::observe_lookup``    backward hook: hands a lookup's gradient to the sparsity engine
``dsl::fused_step_``       backward hook: the fused optimizer's step (hooks.py)
=========================  ==============================================================

``dsl_kernels.ops.<op>`` is the op itself (the file is ``dsl_kernels/ops/<op>.py``).
"""
from .fill_rows import fill_rows_
from .fused_lookup import fused_lookup
from .fused_update import fused_update
from .grow_scores import grow_scores
from .lookup import lookup, per_sample_weights_grad
from .lookup_backward import lookup_backward
from .prune_regrow import prune_regrow_
from .rebuild_index import rebuild_index
from .update_index import update_index_

__all__ = ["lookup", "lookup_backward", "grow_scores", "rebuild_index", "prune_regrow_",
           "fused_update", "fused_lookup", "update_index_", "fill_rows_",
           "per_sample_weights_grad"]
