"""torchrec integration (optional: ``pip install -e ".[torchrec]"``; the core package never
imports torchrec).

* :meth:`dsl_kernels.SparseEmbeddingBagCollection.from_torchrec` builds a
  :class:`TorchrecSparseEmbeddingBagCollection` from ``EmbeddingBagConfig`` tables: forward takes a
  ``KeyedJaggedTensor`` and returns a ``KeyedTensor``.
* :class:`SparseEmbeddingBagCollectionSharder` lets ``DistributedModelParallel`` shard it
  table-wise or row-wise (planner or forced plan); each rank holds only its shard's slot pool
  and index; ``DSLScheduler`` and ``fuse_optimizer`` run on the sharded model, with one global
  prune/regrow threshold across shards (:mod:`.shard_pool`).
* :func:`full_state_dict` / ``model.load_state_dict(unsharded)`` convert between the sharded and
  the unsharded model; :func:`save_sharded` / :func:`load_sharded` checkpoint with
  ``torch.distributed.checkpoint``.

Example (each rank; see docs/distributed.md)::

    import torch.distributed as dist
    from torchrec import EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    import dsl_kernels
    from dsl_kernels.torchrec import SparseEmbeddingBagCollectionSharder, full_state_dict

    dist.init_process_group("gloo")
    tables = [EmbeddingBagConfig(name="t0", num_embeddings=10_000, embedding_dim=64,
                                 feature_names=["f0", "f1"])]
    model = MyModel(dsl_kernels.SparseEmbeddingBagCollection.from_torchrec(tables, density=0.1))
    dmp = DistributedModelParallel(model, sharders=[SparseEmbeddingBagCollectionSharder()])
    kt = dmp.module.ebc(kjt)                 # KeyedJaggedTensor in, KeyedTensor out
"""
try:
    import torchrec  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dsl_kernels.torchrec needs torchrec: pip install -e \".[torchrec]\" (on CPU-only "
        "machines: pip install fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0 "
        "&& pip install tensordict torchmetrics==1.0.3 pyre-extensions iopath)") from e

from .collection import TorchrecSparseEmbeddingBagCollection, from_torchrec, lookup_features
from .model_parallel import ids_to_kjt, shard_model
from .shard_pool import Piece, ShardPool
from .sharding import ShardedSparseEmbeddingBagCollection, SparseEmbeddingBagCollectionSharder
from .state import (full_state_dict, load_sharded, save_sharded, sharded_collections,
                    unsharded_pool)

__all__ = [
    "TorchrecSparseEmbeddingBagCollection",
    "from_torchrec",
    "lookup_features",
    "SparseEmbeddingBagCollectionSharder",
    "ShardedSparseEmbeddingBagCollection",
    "ShardPool",
    "Piece",
    "full_state_dict",
    "unsharded_pool",
    "sharded_collections",
    "save_sharded",
    "load_sharded",
    "shard_model",
    "ids_to_kjt",
]
