"""Unsharded state dicts of sharded models, and sharded checkpoints with
``torch.distributed.checkpoint`` (DCP).

* :func:`full_state_dict` — on every rank, the state dict the unsharded model would have: each
  sharded collection's local pools are gathered into the unsharded ``values``/``coord`` (active
  blocks in ascending key order, then free slots). ``model.load_state_dict(full)`` on the sharded
  model takes it back (each rank keeps its blocks), and so does the unsharded model in one
  process.
* :func:`save_sharded` / :func:`load_sharded` — every rank writes its own model, optimizer,
  scheduler and RNG state through DCP (one metadata file; tensors go through DCP's tensor path,
  the rest as one small object per rank). Resume is bit-exact with the same number of
  processes; to change it, go through :func:`full_state_dict`.
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import all_gather_varlen
from .sharding import ShardedSparseEmbeddingBagCollection

_FORMAT = 1


def _unwrap(model: nn.Module) -> nn.Module:
    from torchrec.distributed.model_parallel import get_unwrapped_module

    return get_unwrapped_module(model)


def sharded_collections(model: nn.Module
                        ) -> Iterator[Tuple[str, ShardedSparseEmbeddingBagCollection]]:
    """``(state-dict prefix, module)`` of every sharded collection in ``model``."""
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, ShardedSparseEmbeddingBagCollection):
            yield (name + "." if name else ""), m


@torch.no_grad()
def unsharded_pool(m: ShardedSparseEmbeddingBagCollection) -> Tuple[Tensor, Tensor]:
    """``(values [C, B], coord [C])`` of the unsharded collection, on every rank (collective)."""
    pool = m.pool
    act = pool.coord >= 0
    keys = torch.cat(all_gather_varlen(pool.global_keys(pool.coord[act]), pool.process_group))
    vals = torch.cat(all_gather_varlen(pool.values.detach()[act], pool.process_group))
    C = m.unsharded_budget
    if keys.numel() > C:
        raise RuntimeError(f"the shards hold {keys.numel()} active blocks, more than the "
                           f"unsharded budget {C}")
    order = torch.argsort(keys)
    coord = torch.full((C,), -1, dtype=torch.int64, device=keys.device)
    values = vals.new_zeros(C, pool.block_size)
    coord[: keys.numel()] = keys[order]
    values[: keys.numel()] = vals[order]
    return values, coord


def full_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The unsharded model's state dict, on every rank (a collective: call it on all ranks).

    Example (each rank of a ``DistributedModelParallel`` model)::

        sd = full_state_dict(dmp)           # same dict on every rank
        single = MyModel(); single.load_state_dict(sd)   # one process, unsharded
        dmp.load_state_dict(sd)             # back into the sharded model
    """
    sd = model.state_dict()
    for prefix, m in sharded_collections(model):
        for k in [k for k in sd if k.startswith(prefix + "pool.")]:
            del sd[k]
        sd[prefix + "values"], sd[prefix + "coord"] = unsharded_pool(m)
    return sd


# ----------------------------------------------------------------------------- DCP


class _Ref:
    """Where a tensor was in a nested structure (stored in the skeleton instead of it)."""

    def __init__(self, key: str, t: Tensor):
        self.key, self.shape, self.dtype = key, tuple(t.shape), t.dtype


def _split(obj: Any, prefix: str, out: Dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        out[prefix] = obj
        return _Ref(prefix, obj)
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}.{k}", out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{prefix}.{i}", out) for i, v in enumerate(obj))
    return obj


def _join(obj: Any, tensors: Dict[str, Tensor]) -> Any:
    if isinstance(obj, _Ref):
        return tensors[obj.key]
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, tensors) for v in obj)
    return obj


def _refs(obj: Any) -> List[_Ref]:
    if isinstance(obj, _Ref):
        return [obj]
    vals = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [r for v in vals for r in _refs(v)]


def save_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler=None, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write a sharded checkpoint to the directory ``path`` with ``torch.distributed.checkpoint``
    (a collective: call on every rank). Holds the model (each rank's shards and replicated
    parts), optimizer, :class:`~dsl_kernels.sparsity.DSLScheduler`, the torch RNG state and
    ``extra`` (any picklable object, e.g. the data position)."""
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    state = {"model": model.state_dict(),
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng": torch.get_rng_state(), "extra": extra}
    tensors: Dict[str, Tensor] = {}
    skeleton = _split(state, f"rank{rank}", tensors)
    meta = {"format": _FORMAT, "world_size": world, "rank": rank, "skeleton": skeleton}
    # the skeleton travels as one bytes leaf (DCP would flatten a dict into its items)
    dcp.save({f"rank{rank}.meta": pickle.dumps(meta),
              **{k: v.detach() for k, v in tensors.items()}},
             checkpoint_id=path)


def load_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler=None) -> Any:
    """Restore :func:`save_sharded` on every rank (same world size); returns ``extra``.
    Raises ValueError when the checkpoint was written by a different number of processes."""
    import torch.distributed.checkpoint as dcp

    from ..sparsity import load_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    box = {f"rank{rank}.meta": b""}
    dcp.load(box, checkpoint_id=path)
    meta = pickle.loads(box[f"rank{rank}.meta"])
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a dsl_kernels sharded checkpoint")
    if meta["world_size"] != world:
        raise ValueError(f"{path} was written by {meta['world_size']} processes, this run has "
                         f"{world}: resume with --nproc {meta['world_size']} or convert through "
                         f"full_state_dict")
    tensors = {r.key: torch.empty(r.shape, dtype=r.dtype) for r in _refs(meta["skeleton"])}
    dcp.load(tensors, checkpoint_id=path)
    state = _join(meta["skeleton"], tensors)
    if scheduler is not None:
        load_checkpoint(state, model, optimizer, scheduler)
    else:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["extra"]
