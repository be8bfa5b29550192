"""``SparseEmbeddingBagCollectionSharder``: torchrec's ``DistributedModelParallel`` shards a
:class:`~dsl_kernels.torchrec.TorchrecSparseEmbeddingBagCollection` table-wise or row-wise.

Each rank holds one :class:`~dsl_kernels.torchrec.shard_pool.ShardPool` with its pieces (whole
tables, or row ranges ``[r * ceil(N / W), ...)`` of tables) and only their slots and index. The
data movement is torchrec's own: table-wise features travel by KJT all-to-all
(``TwSparseFeaturesDist``) and come back by pooled-embedding all-to-all
(``TwPooledEmbeddingDist``); row-wise features are bucketized by row range and sent by KJT
all-to-all (``RwSparseFeaturesDist``), each rank pools the entries it owns for the global batch,
and a reduce-scatter (``RwPooledEmbeddingDist``) sums the partial bags and returns each rank its
own batch. Row-wise MEAN tables pool SUM and divide by the bag lengths after the reduction, as
torchrec does. Autograd runs back through the same collectives, so every shard sees the gradient
of the global batch (which is what the growth scores of the sparsity engine read).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torchrec.distributed.embedding_sharding import EmbeddingShardingContext
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingDist, RwSparseFeaturesDist
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingDist, TwSparseFeaturesDist
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import (Awaitable, LazyAwaitable, ModuleSharder,
                                        ParameterSharding, ShardedModule, ShardingEnv,
                                        ShardingType)
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .collection import TorchrecSparseEmbeddingBagCollection, lookup_features
from .shard_pool import Piece, ShardPool

TABLE_WISE, ROW_WISE = ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value


@dataclass
class _Group:
    """Features sharded one way: the order they travel in, and what this rank computes."""

    kind: str
    features: List[str] = field(default_factory=list)  # input order = output-dist column order
    dims: List[int] = field(default_factory=list)
    local: List[tuple] = field(default_factory=list)  # (pool table or None, features, dim)


@dataclass
class _Ctx:
    batch_per_rank: Dict[str, List[int]] = field(default_factory=dict)
    divisor: Optional[Tensor] = None  # row-wise MEAN: bag lengths, [batch, rw columns]


def _rows_of(num_rows: int, world: int, rank: int) -> tuple:
    """torchrec's row-wise split: blocks of ceil(N / W) rows, the last ones shorter or empty."""
    block = -(-num_rows // world)
    lo = min(num_rows, rank * block)
    return lo, min(num_rows, lo + block) - lo


class ShardedSparseEmbeddingBagCollection(ShardedModule):
    """The sharded form of a :class:`TorchrecSparseEmbeddingBagCollection` (made by the
    sharder; forward: ``KeyedJaggedTensor`` -> awaitable ``KeyedTensor``). Its ``pool`` is this
    rank's :class:`ShardPool`; ``state_dict()`` holds the local pool, ``load_state_dict`` takes
    either that or the unsharded collection's ``values``/``coord``
    (see :func:`dsl_kernels.torchrec.full_state_dict`)."""

    def __init__(self, module: TorchrecSparseEmbeddingBagCollection,
                 table_plan: Dict[str, ParameterSharding], env: ShardingEnv,
                 device: Optional[torch.device] = None, capacity_factor: float = 1.25):
        super().__init__()
        pg = env.process_group
        rank, world = env.rank, env.world_size
        device = torch.device("cpu") if device is None else device
        cfgs = module.embedding_bag_configs()
        self._configs = cfgs
        self._feature_names = list(module.feature_names)
        self._feature_dims = list(module.feature_dims)
        self.unsharded_budget = module.budget
        self.block_size = module.block_size
        kinds = {}
        for t in cfgs:
            ps = table_plan.get(t.name)
            if ps is None:
                raise ValueError(f"the sharding plan has no entry for table {t.name!r}")
            if ps.sharding_type not in (TABLE_WISE, ROW_WISE):
                raise ValueError(f"table {t.name!r}: sharding_type must be {TABLE_WISE!r} or "
                                 f"{ROW_WISE!r}, got {ps.sharding_type!r}")
            kinds[t.name] = ps.sharding_type
        specs = {s.name: s for s in module.tables}
        tw, rw = _Group(TABLE_WISE), _Group(ROW_WISE)
        per_rank = [[] for _ in range(world)]
        pieces: List[Piece] = []
        B = module.block_size
        coord = module.coord
        for t in cfgs:
            spec, nb = specs[t.name], t.embedding_dim // B
            if kinds[t.name] == TABLE_WISE:
                owner = table_plan[t.name].ranks[0]
                per_rank[owner].append(t)
                lo, rows = (0, t.num_embeddings) if owner == rank else (0, 0)
            else:
                lo, rows = _rows_of(t.num_embeddings, world, rank)
                self._check_rw_plan(t.name, table_plan[t.name], world)
            if rows:
                # capacity: the blocks these rows hold (their share of the budget) plus headroom
                # for blocks the global mask update moves here.
                g_lo = (spec.row_start + lo) * module.num_blocks
                g_hi = (spec.row_start + lo + rows) * module.num_blocks
                held = int(((coord >= g_lo) & (coord < g_hi)).sum())
                cap = min(rows * nb, max(1, math.ceil(held * capacity_factor)))
                mode = "sum" if kinds[t.name] == ROW_WISE else module.table(t.name).mode
                pieces.append(Piece(t.name, t.name, lo, rows, t.embedding_dim, mode, cap,
                                    spec.row_start))
            if kinds[t.name] == ROW_WISE:
                rw.features += t.feature_names
                rw.dims += [t.embedding_dim] * len(t.feature_names)
                rw.local.append((t.name if rows else None, t.feature_names, t.embedding_dim))
        for r in range(world):
            for t in per_rank[r]:
                tw.features += t.feature_names
                tw.dims += [t.embedding_dim] * len(t.feature_names)
                if r == rank:
                    tw.local.append((t.name, t.feature_names, t.embedding_dim))
        if not pieces:
            raise ValueError(f"rank {rank} holds no table: table-wise sharding needs at least "
                             f"as many tables as ranks ({world}); shard some tables row-wise")
        self.pool = ShardPool(pieces, B, module.num_blocks, pg, dtype=module.values.dtype,
                              device=device, backend=module.backend, validate=module.validate,
                              deterministic=module.deterministic)
        self.pool.load_unsharded_(module.values.detach(), module.coord)
        self._groups = [g for g in (tw, rw) if g.features]
        # Plain lists, not submodules: torchrec's dists carry persistent buffers that are not
        # model state (the state dict holds the pool only).
        self._input_dists: List[nn.Module] = []
        self._output_dists: List[nn.Module] = []
        for g in self._groups:
            if g.kind == TABLE_WISE:
                self._input_dists.append(TwSparseFeaturesDist(
                    pg, [sum(len(t.feature_names) for t in ts) for ts in per_rank]))
                dims = [[t.embedding_dim for t in ts for _ in t.feature_names] for ts in per_rank]
                self._output_dists.append(TwPooledEmbeddingDist(pg, [sum(d) for d in dims],
                                                                dims, device))
            else:
                sizes = [t.num_embeddings for t in cfgs if kinds[t.name] == ROW_WISE
                         for _ in t.feature_names]
                self._input_dists.append(RwSparseFeaturesDist(pg, len(g.features), sizes,
                                                              device=device))
                self._output_dists.append(RwPooledEmbeddingDist(pg, g.dims))
        order = [f for g in self._groups for f in g.features]
        self._mean_rw = [f for t in cfgs if kinds[t.name] == ROW_WISE
                         and t.pooling == PoolingType.MEAN for f in t.feature_names]
        # columns of the dists' output (groups side by side) -> unsharded feature order
        start, off = {}, 0
        for f in order:
            start[f] = off
            off += self._feature_dims[self._feature_names.index(f)]
        cols = [torch.arange(start[f], start[f] + d)
                for f, d in zip(self._feature_names, self._feature_dims)]
        self.register_buffer("_columns", torch.cat(cols).to(device), persistent=False)
        self._dist_order = order

    @staticmethod
    def _check_rw_plan(name: str, ps: ParameterSharding, world: int) -> None:
        spec = ps.sharding_spec
        shards = getattr(spec, "shards", None)
        if not shards:
            return
        n = sum(s.shard_sizes[0] for s in shards)
        for s in shards:
            lo, rows = _rows_of(n, world, s.placement.rank())
            if (s.shard_offsets[0], s.shard_sizes[0]) != (lo, rows):
                raise ValueError(f"table {name!r}: the plan's row-wise shard of rank "
                                 f"{s.placement.rank()} is rows {s.shard_offsets[0]}+"
                                 f"{s.shard_sizes[0]}; the sharder supports torchrec's even "
                                 f"split (blocks of ceil(N / world) rows) only")

    # ------------------------------------------------------------------ ShardedModule API
    @property
    def unsharded_module_type(self):
        return TorchrecSparseEmbeddingBagCollection

    def create_context(self) -> _Ctx:
        return _Ctx()

    def input_dist(self, ctx: _Ctx, features: KeyedJaggedTensor) -> Awaitable:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"features must be a KeyedJaggedTensor, got "
                            f"{type(features).__name__}")
        keys = features.keys()
        missing = [f for f in self._dist_order if f not in keys]
        if missing:
            raise KeyError(f"the KeyedJaggedTensor lacks features {missing}; it has {keys}")
        with torch.no_grad():
            idx = [keys.index(f) for f in self._dist_order]
            parts = features.permute(idx).split([len(g.features) for g in self._groups])
            if self._mean_rw:
                ctx.divisor = self._mean_divisor(parts[-1], features.stride())
        return _InputAwaitable([d(p) for d, p in zip(self._input_dists, parts)],
                               [g.kind for g in self._groups], ctx)

    def _mean_divisor(self, rw: KeyedJaggedTensor, batch: int) -> Tensor:
        g = self._groups[-1]
        lengths = rw.lengths().view(len(g.features), batch).to(self.pool.values.dtype)
        cols = [lengths[i].clamp(min=1).unsqueeze(1).expand(batch, d) if f in self._mean_rw
                else lengths.new_ones(batch, d)
                for i, (f, d) in enumerate(zip(g.features, g.dims))]
        return torch.cat(cols, 1)

    def compute(self, ctx: _Ctx, dist_input: List[KeyedJaggedTensor]) -> List[Tensor]:
        return [lookup_features(self.pool, kjt, g.local)
                for g, kjt in zip(self._groups, dist_input)]

    def output_dist(self, ctx: _Ctx, output: List[Tensor]) -> LazyAwaitable[KeyedTensor]:
        aws = [d(o, EmbeddingShardingContext(batch_size_per_rank=ctx.batch_per_rank.get(g.kind,
                                                                                         [])))
               for d, g, o in zip(self._output_dists, self._groups, output)]
        return _OutputAwaitable(aws, ctx, self)

    def sharded_parameter_names(self, prefix: str = ""):
        # Parameters AND pool buffers: DDP must neither all-reduce nor broadcast a shard.
        for name, _ in self.named_parameters(prefix):
            yield name
        for name, _ in self.named_buffers(prefix):
            yield name

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        v, c = prefix + "values", prefix + "coord"
        if v in state_dict or c in state_dict:  # the unsharded collection's state dict
            if not (v in state_dict and c in state_dict):
                raise KeyError(f"an unsharded state dict needs both {v!r} and {c!r}")
            values, coord = state_dict.pop(v), state_dict.pop(c)
            if values.shape[0] != self.unsharded_budget:
                raise ValueError(f"{v} has {values.shape[0]} slots, the unsharded collection "
                                 f"{self.unsharded_budget}")
            lv, lc = self.pool.from_unsharded(values, coord)
            state_dict[prefix + "pool.values"], state_dict[prefix + "pool.coord"] = lv, lc
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _InputAwaitable(Awaitable):
    """Waits for the splits of every group's KJT all-to-all, then for the tensors."""

    def __init__(self, awaitables, kinds, ctx: _Ctx):
        super().__init__()
        self._aws, self._kinds, self._ctx = awaitables, kinds, ctx

    def _wait_impl(self):
        tensors = [a.wait() for a in self._aws]
        for kind, t in zip(self._kinds, tensors):
            spr = getattr(t, "_stride_per_rank", None)
            if spr is not None:
                self._ctx.batch_per_rank[kind] = list(spr)
        return _ListAwaitable(tensors)


class _ListAwaitable(Awaitable):
    def __init__(self, awaitables):
        super().__init__()
        self._aws = awaitables

    def _wait_impl(self):
        return [a.wait() for a in self._aws]


class _OutputAwaitable(LazyAwaitable[KeyedTensor]):
    """The groups' pooled embeddings side by side, in the unsharded feature order."""

    def __init__(self, awaitables, ctx: _Ctx, module: ShardedSparseEmbeddingBagCollection):
        super().__init__()
        self._aws, self._ctx, self._m = awaitables, ctx, module

    def _wait_impl(self) -> KeyedTensor:
        embs = [a.wait() for a in self._aws]
        if self._ctx.divisor is not None:
            embs[-1] = embs[-1] / self._ctx.divisor
        values = torch.cat(embs, 1) if len(embs) > 1 else embs[0]
        values = values.index_select(1, self._m._columns)
        return KeyedTensor(keys=list(self._m._feature_names),
                           length_per_key=list(self._m._feature_dims), values=values)


class SparseEmbeddingBagCollectionSharder(ModuleSharder[TorchrecSparseEmbeddingBagCollection]):
    """torchrec ``ModuleSharder`` for :class:`TorchrecSparseEmbeddingBagCollection`: sharding
    types ``table_wise`` and ``row_wise``, compute kernel ``fused`` (the name torchrec's cost model knows for a table-batched kernel; ours runs).

    ``capacity_factor``: slots of a shard over the blocks it holds when sharded (its share of
    the budget): headroom for blocks the global mask update moves to it; 1.0 = exactly the
    share (then budget moves between ranks only into slots freed there).

    Example (each rank, after ``dist.init_process_group``)::

        from torchrec.distributed import DistributedModelParallel
        from dsl_kernels.torchrec import SparseEmbeddingBagCollectionSharder
        model = DistributedModelParallel(model, sharders=[SparseEmbeddingBagCollectionSharder()])
    """

    def __init__(self, capacity_factor: float = 1.25, qcomm_codecs_registry=None):
        super().__init__(qcomm_codecs_registry)
        if not capacity_factor >= 1.0:
            raise ValueError(f"capacity_factor must be >= 1.0, got {capacity_factor}")
        self.capacity_factor = float(capacity_factor)

    @property
    def module_type(self):
        return TorchrecSparseEmbeddingBagCollection

    def shard(self, module, params, env, device=None, module_fqn=None):
        return ShardedSparseEmbeddingBagCollection(module, params, env, device,
                                                   self.capacity_factor)

    def shardable_parameters(self, module) -> Dict[str, nn.Parameter]:
        # The planner reasons about [N, D] tables; meta tensors give it the geometry without
        # allocating anything (the real storage is the pool, see storage_usage).
        return {t.name: nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim,
                                                 device="meta"), requires_grad=False)
                for t in module.embedding_bag_configs()}

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [TABLE_WISE, ROW_WISE]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [EmbeddingComputeKernel.FUSED.value]
