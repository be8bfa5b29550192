"""Triton backend of the ``dsl`` ops (``backend="triton"``).

Each op lives in its own file with its kernels and launcher; the functions here have exactly the
signatures of :mod:`dsl_kernels.reference`, which :mod:`dsl_kernels.dispatch` relies on. On CPU
tensors the kernels run only under ``TRITON_INTERPRET=1`` (tests); on CUDA they compile.

>>> import torch, dsl_kernels
>>> emb = dsl_kernels.SparseEmbeddingBag(100, 16, mode="sum", density=0.5, block_size=4,
...                                      backend="triton")  # doctest: +SKIP
"""
from .grow_scores import grow_scores
from .lookup import lookup
from .lookup_backward import lookup_backward
from .rebuild_index import rebuild_index

__all__ = ["lookup", "lookup_backward", "grow_scores", "rebuild_index"]
