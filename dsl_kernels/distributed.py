"""Data-parallel training of sparse tables with ``torch.distributed`` (gloo on CPU, nccl on GPU).

What DDP already does: the value pool ``values [C, B]`` is an ordinary Parameter, so
``DistributedDataParallel`` all-reduces its gradient like any other; with identical masks and
identical optimizer states every rank then applies the identical update.

What this module adds is what keeps the *masks* identical, because a mask update reads
rank-local information (growth scores come from each rank's own batches; random growth and
stale-slot decisions use each rank's RNG and statistics):

* :func:`all_reduce_scores_` — sum (or average) a dense score accumulator over ranks in place, so
  every rank ranks the same candidates; :func:`all_reduce_row_scores` does the same for the
  sparse ``(rows, scores)`` pairs that ``dsl::grow_scores`` returns (rows differ per rank).
* :func:`sync_mask_` — after a mask update, broadcast ``coord``, ``values`` and ``frozen`` (and
  optionally the optimizer state of the pool) from one rank, and rebuild the index, so every
  rank holds the bit-identical pool whatever each rank decided.
* :func:`ddp_ignore_pool_buffers` — tell DDP not to broadcast ``coord`` and the derived index
  before every forward (its default ``broadcast_buffers=True`` would ship ``row_ptr``/``row_mask``
  — O(num_rows) bytes — every step, and would overwrite ``coord`` without rebuilding the index);
  :func:`sync_mask_` after each mask update replaces it at a fraction of the cost.
* :func:`check_replicas_in_sync` — bit-exact comparison of all parameters, buffers and (optionally)
  optimizer state across ranks, naming what differs.

Every function is a no-op (returning its input) when ``torch.distributed`` is not available or not
initialised, so the sparsity scheduler can call them unconditionally.

Example (each rank)::

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from dsl_kernels import SparseEmbeddingBag, distributed as dd

    dist.init_process_group("gloo")
    emb = SparseEmbeddingBag(10_000, 64, mode="sum", density=0.1)
    dd.ddp_ignore_pool_buffers(emb)
    dd.sync_mask_(emb, src=0)                # same initial mask and values on every rank
    model = DDP(emb)
    opt = torch.optim.Adam(model.parameters())
    ...
    loss.backward(); opt.step()
    # at a mask update: all_reduce_scores_(acc) before choosing, sync_mask_(emb, 0, opt) after
    dd.check_replicas_in_sync(emb, opt)      # debugging aid: raises naming the tensor that drifted
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .pool import BlockSparseBase

__all__ = [
    "is_active",
    "all_reduce_scores_",
    "all_reduce_row_scores",
    "all_gather_varlen",
    "reduce_growth_scores",
    "is_shard",
    "sync_mask_",
    "broadcast_optimizer_state_",
    "ddp_ignore_pool_buffers",
    "check_replicas_in_sync",
    "ReplicaMismatchError",
]

# Buffers of a pool that DDP must leave alone: ``coord`` changes only at mask updates (then
# sync_mask_ ships it) and the rest is derived from it on each rank.
POOL_BUFFERS = ("coord", "row_ptr", "row_slots", "row_mask", "frozen")


class ReplicaMismatchError(RuntimeError):
    """Raised by :func:`check_replicas_in_sync` when ranks hold different states."""


def _dist():
    import torch.distributed as dist

    return dist


def is_active(group: Any = None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def is_shard(module: nn.Module) -> bool:
    """True for a pool that holds one shard of a larger collection (``is_shard = True``, set by
    :mod:`dsl_kernels.torchrec`): its contents differ per rank by design, so the replica helpers
    here leave it alone.

    >>> import dsl_kernels
    >>> is_shard(dsl_kernels.SparseEmbeddingBag(10, 4, block_size=2))
    False
    """
    return bool(getattr(module, "is_shard", False))


def _pools(module: nn.Module) -> List[BlockSparseBase]:
    """The replicated pools of ``module`` (shards excluded: see :func:`is_shard`)."""
    return [m for m in module.modules() if isinstance(m, BlockSparseBase) and not is_shard(m)]


# ----------------------------------------------------------------------------- scores


def all_reduce_scores_(tensor: Tensor, group: Any = None, average: bool = False) -> Tensor:
    """Sum ``tensor`` (e.g. a dense growth-score or hot-row counter accumulator) over all ranks,
    in place; ``average=True`` divides by the world size. No-op without torch.distributed.

    >>> import torch
    >>> from dsl_kernels.distributed import all_reduce_scores_
    >>> all_reduce_scores_(torch.ones(3))  # single process: unchanged
    tensor([1., 1., 1.])
    """
    if not is_active(group):
        return tensor
    dist = _dist()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    if average:
        if tensor.is_floating_point():
            tensor.div_(dist.get_world_size(group))
        else:
            tensor.floor_divide_(dist.get_world_size(group))
    return tensor


def all_gather_varlen(tensor: Tensor, group: Any = None) -> List[Tensor]:
    """Every rank's ``tensor`` (same dtype and trailing shape, any length along dim 0), in rank
    order, on every rank: one all-gather of the lengths, one of the padded tensors. Single
    process: ``[tensor]``.

    >>> import torch
    >>> from dsl_kernels.distributed import all_gather_varlen
    >>> all_gather_varlen(torch.tensor([3, 1]))
    [tensor([3, 1])]
    """
    if not is_active(group):
        return [tensor]
    dist = _dist()
    world = dist.get_world_size(group)
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(c) for c in sizes]
    pad = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    pad[: tensor.shape[0]] = tensor
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad, group=group)
    return [o[:c] for o, c in zip(out, counts)]


def all_reduce_row_scores(rows: Tensor, scores: Tensor, group: Any = None,
                          average: bool = False) -> Tuple[Tensor, Tensor]:
    """Sum sparse row scores over ranks: ``rows int64[R]`` (ascending, unique per rank) with
    ``scores [R, ...]``, as ``dsl::grow_scores`` returns them; every rank gets the union of rows
    (ascending) with the summed scores. Only rows some rank touched travel (no ``N``-sized
    tensor). No-op without torch.distributed.

    >>> import torch
    >>> from dsl_kernels.distributed import all_reduce_row_scores
    >>> all_reduce_row_scores(torch.tensor([2, 5]), torch.ones(2, 3))[0]
    tensor([2, 5])
    """
    if rows.dim() != 1 or scores.shape[0] != rows.shape[0]:
        raise ValueError(f"rows must be 1-D with one entry per scores row, got rows "
                         f"{tuple(rows.shape)} and scores {tuple(scores.shape)}")
    if not is_active(group):
        return rows, scores
    parts_rows = all_gather_varlen(rows.long(), group)
    if sum(r.numel() for r in parts_rows) == 0:
        return rows.long(), scores
    cat_rows = torch.cat(parts_rows)
    cat_scores = torch.cat(all_gather_varlen(scores, group))
    # Summation order is the rank order on every rank, so the result is bit-identical.
    urows, inv = torch.unique(cat_rows, sorted=True, return_inverse=True)
    out = scores.new_zeros((urows.numel(),) + tuple(scores.shape[1:]))
    out.index_add_(0, inv, cat_scores)
    if average:
        out = out / world if out.is_floating_point() else out // world
    return urows, out


def reduce_growth_scores(module: nn.Module, keys: Tensor, scores: Tensor, group: Any = None
                         ) -> Tuple[Tensor, Tensor]:
    """Growth candidates of a replicated pool summed over ranks: ``keys`` (ascending, unique)
    with ``scores`` -> the union of keys with summed scores, identical on every rank, so a mask
    update under data parallelism follows every rank's batches, not only rank 0's. Called by
    ``DSLScheduler`` before it ranks candidates. Unchanged in one process and for shards
    (:func:`is_shard`), whose scores already come from the global batch.

    >>> import torch, dsl_kernels
    >>> emb = dsl_kernels.SparseEmbeddingBag(10, 4, block_size=2)
    >>> reduce_growth_scores(emb, torch.tensor([3, 8]), torch.tensor([0.5, 1.0]))[1]
    tensor([0.5000, 1.0000])
    """
    if is_shard(module) or not is_active(group):
        return keys, scores
    return all_reduce_row_scores(keys, scores, group=group)


# ------------------------------------------------------------------------------- masks


@torch.no_grad()
def broadcast_optimizer_state_(optimizer: torch.optim.Optimizer,
                               params: Optional[Iterable[Tensor]] = None, src: int = 0,
                               group: Any = None) -> None:
    """Broadcast the tensor state of ``params`` (default: all of the optimizer's parameters)
    from rank ``src``, in place. Every rank must already hold state tensors of the same shapes
    (i.e. all ranks have stepped the same number of times). No-op without torch.distributed."""
    if not is_active(group):
        return
    dist = _dist()
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        st = optimizer.state.get(p, {})
        for k in sorted(st):
            v = st[k]
            if isinstance(v, Tensor):
                _broadcast_inplace(v, src, group)


def _broadcast_inplace(t: Tensor, src: int, group: Any) -> None:
    dist = _dist()
    if t.is_contiguous() and t.dim() > 0:
        dist.broadcast(t, src=src, group=group)
    else:
        tmp = t.detach().contiguous().reshape(-1)
        dist.broadcast(tmp, src=src, group=group)
        t.copy_(tmp.view(t.shape))


@torch.no_grad()
def sync_mask_(module: nn.Module, src: int = 0, optimizer: Optional[torch.optim.Optimizer] = None,
               group: Any = None) -> None:
    """Make every sparse pool in ``module`` bit-identical to rank ``src``'s: broadcast ``coord``,
    ``values`` and ``frozen`` and rebuild the index; with ``optimizer``, also broadcast the
    optimizer state of each pool's ``values``. Call it once before training (instead of relying
    on equal seeds) and after every mask update. No-op without torch.distributed.

    >>> import dsl_kernels
    >>> from dsl_kernels.distributed import sync_mask_
    >>> sync_mask_(dsl_kernels.SparseEmbeddingBag(10, 4, density=0.5, block_size=2))  # no-op
    """
    if not is_active(group):
        return
    dist = _dist()
    for m in _pools(module):
        dist.broadcast(m.coord, src=src, group=group)
        dist.broadcast(m.values.data, src=src, group=group)
        # frozen may be None on some ranks and a tensor on others: agree on src's choice.
        has = torch.tensor([0 if m.frozen is None else 1], dtype=torch.int64,
                           device=m.coord.device)
        dist.broadcast(has, src=src, group=group)
        if int(has):
            if m.frozen is None or m.frozen.shape != m.coord.shape:
                m.frozen = torch.zeros(m.coord.shape, dtype=torch.bool, device=m.coord.device)
            flags = m.frozen.to(torch.uint8)
            dist.broadcast(flags, src=src, group=group)
            m.frozen.copy_(flags.bool())
        else:
            m.frozen = None
        m.rebuild_index()
        if optimizer is not None:
            broadcast_optimizer_state_(optimizer, [m.values], src=src, group=group)


def ddp_ignore_pool_buffers(model: nn.Module) -> List[str]:
    """Mark the pool buffers (``coord``, ``row_ptr``, ``row_slots``, ``row_mask``, ``frozen``) of
    every sparse module in ``model`` as ignored by ``DistributedDataParallel``; call before
    wrapping. Returns the names it added. Other buffers (e.g. BatchNorm statistics) keep DDP's
    usual treatment.

    >>> import dsl_kernels
    >>> from dsl_kernels.distributed import ddp_ignore_pool_buffers
    >>> ddp_ignore_pool_buffers(dsl_kernels.SparseEmbeddingBag(10, 4, block_size=2))
    ['coord', 'row_ptr', 'row_slots', 'row_mask', 'frozen']
    """
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, BlockSparseBase):
            prefix = mod_name + "." if mod_name else ""
            names.extend(prefix + b for b in POOL_BUFFERS)
    old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = old + [n for n in names if n not in old]
    return names


# ------------------------------------------------------------------------------ checks


def _as_bytes(t: Tensor) -> Tensor:
    """The raw bytes of ``t`` as a flat uint8 tensor (exact comparison, NaN included)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(torch.uint8)


def _state_tensors(module: nn.Module, optimizer: Optional[torch.optim.Optimizer]
                   ) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    # Shards differ per rank by design: only replicated state is compared.
    sharded = {id(t) for m in module.modules() if is_shard(m)
               for t in list(m.parameters()) + list(m.buffers())}
    for name, p in module.named_parameters():
        if id(p) not in sharded:
            out["param:" + name] = p
    for name, b in module.named_buffers():
        if id(b) not in sharded:
            out["buffer:" + name] = b
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                label = names.get(id(p), f"group{gi}.param{pi}")
                if id(p) in sharded:
                    continue
                for k, v in sorted(optimizer.state.get(p, {}).items()):
                    if isinstance(v, Tensor):
                        out[f"optimizer:{label}.{k}"] = v
    return out


@torch.no_grad()
def check_replicas_in_sync(module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                           group: Any = None, raise_error: bool = True) -> List[str]:
    """Compare, bit for bit, every parameter and buffer of ``module`` (and the optimizer's
    state) with rank 0's. Returns the names that differ on any rank (the same list on every
    rank); raises :class:`ReplicaMismatchError` naming them when ``raise_error``. Costs one
    broadcast of the whole state: a debugging and testing aid, not a per-step call.
    Single process: returns ``[]``.

    >>> import dsl_kernels
    >>> from dsl_kernels.distributed import check_replicas_in_sync
    >>> check_replicas_in_sync(dsl_kernels.SparseEmbeddingBag(10, 4, block_size=2))
    []
    """
    if not is_active(group):
        return []
    dist = _dist()
    tensors = _state_tensors(module, optimizer)
    meta = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in tensors.items())
    metas: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(metas, meta, group=group)
    if any(m != metas[0] for m in metas):
        mine, ref = set(meta), set(metas[0])
        diff = sorted({k for k, *_ in mine ^ ref}) or ["<structure differs on another rank>"]
        bad = diff
    else:
        bad = []
        for k, *_ in meta:
            mine = _as_bytes(tensors[k])
            ref = mine.clone()
            dist.broadcast(ref, src=0, group=group)
            if not torch.equal(mine, ref):
                bad.append(k)
    # Every rank learns the union of mismatches.
    all_bad: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(all_bad, bad, group=group)
    union = sorted({k for b in all_bad for k in b})
    if union and raise_error:
        raise ReplicaMismatchError(f"replicas differ from rank 0 in: {', '.join(union[:20])}"
                                   + (" ..." if len(union) > 20 else ""))
    return union
