"""One call from a model to a ``DistributedModelParallel`` with the sparse sharder, and the
one-id-per-feature batch layout a DLRM-style trainer feeds."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .collection import TorchrecSparseEmbeddingBagCollection
from .sharding import ROW_WISE, TABLE_WISE, SparseEmbeddingBagCollectionSharder


def shard_model(model: nn.Module, sharding: Optional[str] = None,
                capacity_factor: float = 1.25, device: Optional[torch.device] = None):
    """``DistributedModelParallel(model)`` with :class:`SparseEmbeddingBagCollectionSharder`:
    ``sharding="table_wise"`` or ``"row_wise"`` forces every table of every
    :class:`TorchrecSparseEmbeddingBagCollection` in ``model``; None lets torchrec's planner
    choose. The rest of the model is data-parallel (DDP, set up by DMP). Call on every rank
    after ``torch.distributed.init_process_group``.

    Example (each rank)::

        dmp = shard_model(model, "row_wise")
        loss = loss_fn(dmp(batch)); loss.backward(); opt.step(); scheduler.step()
    """
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    if sharding not in (None, TABLE_WISE, ROW_WISE):
        raise ValueError(f"sharding must be {TABLE_WISE!r}, {ROW_WISE!r} or None (planner), got "
                         f"{sharding!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    sharder = SparseEmbeddingBagCollectionSharder(capacity_factor=capacity_factor)
    cons = None
    if sharding is not None:
        cons = {t.name: ParameterConstraints(sharding_types=[sharding])
                for m in model.modules() if isinstance(m, TorchrecSparseEmbeddingBagCollection)
                for t in m.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device=device.type),
        constraints=cons)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, sharders=[sharder], plan=plan, device=device)


def ids_to_kjt(ids: Tensor, names: Sequence[str]) -> KeyedJaggedTensor:
    """``ids [B, F]`` (one id per sample and feature) -> a KJT with one single-id bag per sample
    under each of the ``F`` feature ``names``.

    >>> ids_to_kjt(torch.tensor([[1, 7], [2, 8]]), ["a", "b"]).to_dict()["b"].values()
    tensor([7, 8])
    """
    if ids.dim() != 2 or ids.shape[1] != len(names):
        raise ValueError(f"ids must be [batch, {len(names)}], got {tuple(ids.shape)}")
    return KeyedJaggedTensor.from_lengths_sync(
        list(names), ids.t().reshape(-1),
        torch.ones(ids.numel(), dtype=torch.int32, device=ids.device))
