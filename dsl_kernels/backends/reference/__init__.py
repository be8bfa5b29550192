"""The ``reference`` backend: every ``dsl`` op in vectorised pure PyTorch (no Python loop over
bags or indices). It defines what every other backend computes (the tests' oracle), is the
fallback of any op a backend lacks, and runs on any device. It never builds an ``[N, D]``
tensor: temporaries are batch-sized (``[L, D]``) or pool-sized (``[C]``).
"""
from . import fused_update, grow_scores, lookup, lookup_backward, prune_regrow, rebuild_index  # noqa: F401
from . import fill_rows, update_index  # noqa: F401
