"""The ``triton`` backend of the ``dsl`` ops (``backend="triton"``).

One file per op with its kernels and launcher, registering it (see
:mod:`dsl_kernels.backends.registry`); jitted helpers of the storage format (popcount rank,
slot lookup, bag tiles) are in ``_bits.py``. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1`` (tests); on CUDA they compile. Ops without a Triton kernel
(``prune_regrow_``) run the reference implementation.

>>> import torch, dsl_kernels
>>> emb = dsl_kernels.SparseEmbeddingBag(100, 16, mode="sum", density=0.5, block_size=4,
...                                      backend="triton")  # doctest: +SKIP
"""
import triton  # noqa: F401  (ImportError here says why the backend is unavailable)

from . import fused_update, grow_scores, lookup, lookup_backward, rebuild_index  # noqa: F401
