"""Compatibility alias: the reference implementation of every ``dsl`` op (now one file per op in
``dsl_kernels/backends/reference/``) and the format helpers (``dsl_kernels/format.py``)."""
from .backends.reference.fused_update import reference_fused_update as fused_update  # noqa: F401
from .backends.reference.grow_scores import grow_scores  # noqa: F401
from .backends.reference.lookup import lookup  # noqa: F401
from .backends.reference.lookup_backward import lookup_backward  # noqa: F401
from .backends.reference.prune_regrow import prune_regrow_reference as prune_regrow_  # noqa: F401
from .backends.reference.rebuild_index import rebuild_index  # noqa: F401
from .format import (MODE_MAX, MODE_MEAN, MODE_SUM, MODES, num_mask_words,  # noqa: F401
                     popcount64, resolve_slots)
