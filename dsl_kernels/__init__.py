"""dsl_kernels: block-sparse embedding bags trained sparse from start to finish.

>>> import torch, dsl_kernels
>>> emb = dsl_kernels.SparseEmbeddingBag(10_000, 64, mode="sum", density=0.1, block_size=8)
>>> emb(torch.randint(0, 10_000, (32, 20))).shape
torch.Size([32, 64])
"""
from . import ops  # noqa: F401  (registers the dsl:: ops)
from . import backends  # callable: dsl_kernels.backends() reports what runs here
from .backends import register_backend, register_impl
from .modules import SparseEmbedding, SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig
from .pool import BlockSparseBase, LookupRecord, TableSpec
from .checkpoint import CheckpointError, load, save
from .bounds import bounds_check_mode, check_bounds, get_bounds_check_mode, set_bounds_check_mode

__version__ = "0.1.0"

__all__ = [
    "SparseEmbeddingBag",
    "SparseEmbedding",
    "SparseEmbeddingBagCollection",
    "TableConfig",
    "BlockSparseBase",
    "TableSpec",
    "LookupRecord",
    "backends",
    "register_backend",
    "register_impl",
    "ops",
    "save",
    "load",
    "CheckpointError",
    "set_bounds_check_mode",
    "get_bounds_check_mode",
    "bounds_check_mode",
    "check_bounds",
]
