"""``DSLScheduler``: drives prune/regrow, dense-to-sparse decay and stale skipping of every sparse
pool of a model. See :mod:`dsl_kernels.sparsity` for the methods and a usage example."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from ..pool import BlockSparseBase, LookupRecord
from .compaction import (compact_, keep_largest, rebuild_index_lean, resize_pool_,
                         update_index_lean)
from .prune_regrow import optimizer_state_keys, prune_regrow_, reset_optimizer_rows
from .schedules import cosine_update_fraction, cubic_density
from .scores import GrowthScoreAccumulator, sample_inactive_blocks, split_by_table
from .stale import StaleTracker

GrowInit = Union[str, float, Callable[[Tensor], Optional[Tensor]]]


@dataclass
class _Pool:
    module: BlockSparseBase
    acc: GrowthScoreAccumulator
    tracker: Optional[StaleTracker]
    total_blocks: int  # blocks of all tables (the density denominator)
    initial_density: float
    observer: Callable = field(repr=False, default=None)


def _cat(ts: List[Tensor]) -> Tensor:
    """``torch.cat`` without the copy of a single tensor (k-sized, at every update)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _fused(m: BlockSparseBase):
    """The module's fused optimizer (dsl_kernels.fused), or None."""
    return getattr(m, "fused_optimizer", None)


def _modules_of(model_or_modules) -> List[BlockSparseBase]:
    if isinstance(model_or_modules, BlockSparseBase):
        mods = [model_or_modules]
    elif isinstance(model_or_modules, nn.Module):
        mods = [m for m in model_or_modules.modules() if isinstance(m, BlockSparseBase)]
    elif isinstance(model_or_modules, Iterable):
        mods = list(model_or_modules)
        for m in mods:
            if not isinstance(m, BlockSparseBase):
                raise TypeError(f"model_or_modules must hold BlockSparseBase modules, got "
                                f"{type(m).__name__}")
    else:
        raise TypeError(f"model_or_modules must be an nn.Module or a list of sparse modules, "
                        f"got {type(model_or_modules).__name__}")
    out, seen = [], set()
    for m in mods:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    if not out:
        raise ValueError("model_or_modules holds no sparse module (SparseEmbeddingBag, "
                         "SparseEmbedding, SparseEmbeddingBagCollection)")
    return out


class DSLScheduler:
    """Mask schedule of every sparse pool in a model.

    Args:
        model_or_modules: a model (every :class:`~dsl_kernels.BlockSparseBase` in
            ``model.modules()`` is one pool), one sparse module, or a list of them.
        optimizer: the torch optimizer training the pools' ``values`` (its per-slot state is
            reset for reassigned slots, shrunk by compaction, held for frozen slots). A pool
            trained by a fused optimizer (:func:`dsl_kernels.fused.fuse_optimizer`) needs none:
            its module-held state is reset and compacted directly, and the fused update skips
            frozen slots itself; ``optimizer`` may then be None or the optimizer of the other
            (dense) parameters.
        update_every: ΔT, steps between mask updates (and between density steps of
            ``dense_to_sparse``).
        prune_fraction: α0 of the cosine update fraction (``from_scratch``) and the default
            ``adapt_fraction``.
        stop_at: T_end; no prune/regrow from this step on (required for ``from_scratch``).
            With ``dense_to_sparse`` it only ends the adaptation after ``t_end`` (the density
            decay always completes); None (default) adapts forever, as on a stream.
        grow: ``"gradient"`` (largest accumulated gradient norm of inactive blocks) or
            ``"random"``.
        score_window: gradient scores are summed over the last ``score_window`` batches before
            an update (1 = the original single-batch criterion); at most the update interval.
        distribution: ``"global"`` ranks blocks across all tables of a pool so budget moves
            between tables; ``"per_table"`` keeps every table's block count (and, in
            ``dense_to_sparse``, decays every table to the target density on its own).
        schedule: ``"from_scratch"`` or ``"dense_to_sparse"`` (cubic density decay plus pool
            compaction, then constant-budget adaptation; see :mod:`dsl_kernels.sparsity`).
        t_start, t_end: the cubic density decay window of ``dense_to_sparse``.
        target_density: final density of ``dense_to_sparse`` (blocks of the pool).
        adapt_every: steps between prune+regrow after ``t_end`` (default ``update_every``).
        adapt_fraction: share of active blocks moved per adaptation (default
            ``prune_fraction``).
        skip_stale: Slipstream stale-slot skipping (see :mod:`.stale`).
        target_skip: share of slot updates to skip (sets the staleness threshold).
        stale_window: steps between stale checks (default ``update_every``).
        freeze_windows: windows a stale slot stays frozen before it is re-checked.
        hot_fraction: at most this share of the pool's slots is tracked per window.
        max_stale_change: never freeze a slot that changed more than this (relative).
        grow_init: value of grown blocks: ``"zeros"`` (default), a float σ (normal(0, σ) from the
            scheduler's generator), or ``f(Tensor[k, B]) -> Tensor | None``.
        nan_policy: ``"raise"`` (FloatingPointError when a pool holds NaN/Inf at an update or
            NaN/Inf growth scores were seen), ``"skip"`` (that pool's update is skipped and
            counted in ``stats()["nonfinite_skips"]``) or ``"ignore"`` (non-finite scores are
            dropped, non-finite blocks are pruned first). With raise/skip the engine never writes
            NaN/Inf into a pool or an optimizer state.
        seed: seed of the scheduler's generator (random growth, σ-init, sampling).
        reset_optimizer: zero the optimizer state (moments, step counts) of reassigned slots
            (default). ``False`` keeps the pruned block's state for the grown one, as DSL's
            published code does; it is offered for that baseline.
        keep_rows: never prune a row's last active block (its lowest column is kept out of the
            prune candidates), so no row that has blocks loses all of them: a user or item with
            no active block scores 0 against everything. On by default (the ``dsl-train``
            recipe's choice); ``False`` is plain DSL (the paper's baseline prunes any block).
            Done inside ``dsl::prune_regrow_`` (``keep_first``) at no extra memory. A pool whose
            rows hold one block each (e.g. an aligned mask at density ``1 / num_blocks``) has
            nothing prunable then, and its mask does not move; a protected block that holds
            NaN/Inf (``nan_policy="ignore"``) is not pruned either.

    The loop is ``loss.backward(); optimizer.step(); scheduler.step()``.
    """

    def __init__(self, model_or_modules, optimizer: Optional[torch.optim.Optimizer],
                 update_every: int = 100, prune_fraction: float = 0.3,
                 stop_at: Optional[int] = None, grow: str = "gradient", score_window: int = 1,
                 distribution: str = "global", schedule: str = "from_scratch",
                 t_start: int = 0, t_end: Optional[int] = None,
                 target_density: Optional[float] = None, adapt_every: Optional[int] = None,
                 adapt_fraction: Optional[float] = None, skip_stale: bool = False,
                 target_skip: float = 0.2, stale_window: Optional[int] = None,
                 freeze_windows: int = 1, hot_fraction: float = 0.1,
                 max_stale_change: Optional[float] = None, grow_init: GrowInit = "zeros",
                 nan_policy: str = "raise", seed: int = 0, reset_optimizer: bool = True,
                 keep_rows: bool = True):
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(isinstance(update_every, int) and update_every >= 1,
             f"update_every must be a positive int, got {update_every!r}")
        need(0.0 <= prune_fraction <= 1.0,
             f"prune_fraction must be in [0, 1], got {prune_fraction}")
        need(grow in ("gradient", "random"), f"grow must be 'gradient' or 'random', got {grow!r}")
        need(distribution in ("global", "per_table"),
             f"distribution must be 'global' or 'per_table', got {distribution!r}")
        need(schedule in ("from_scratch", "dense_to_sparse"),
             f"schedule must be 'from_scratch' or 'dense_to_sparse', got {schedule!r}")
        need(nan_policy in ("raise", "skip", "ignore"),
             f"nan_policy must be 'raise', 'skip' or 'ignore', got {nan_policy!r}")
        need(isinstance(score_window, int) and score_window >= 1,
             f"score_window must be a positive int, got {score_window!r}")
        adapt_every = update_every if adapt_every is None else adapt_every
        adapt_fraction = prune_fraction if adapt_fraction is None else adapt_fraction
        need(isinstance(adapt_every, int) and adapt_every >= 1,
             f"adapt_every must be a positive int, got {adapt_every!r}")
        need(0.0 <= adapt_fraction <= 1.0,
             f"adapt_fraction must be in [0, 1], got {adapt_fraction}")
        if schedule == "from_scratch":
            need(stop_at is not None and stop_at >= 1,
                 "stop_at (T_end of the cosine schedule) is required with schedule='from_scratch'")
            need(score_window <= update_every,
                 f"score_window ({score_window}) must not exceed update_every ({update_every})")
        else:
            need(target_density is not None and 0.0 < target_density <= 1.0,
                 f"target_density in (0, 1] is required with schedule='dense_to_sparse', got "
                 f"{target_density!r}")
            need(t_end is not None and t_end > t_start >= 0,
                 f"dense_to_sparse needs 0 <= t_start < t_end, got t_start={t_start}, "
                 f"t_end={t_end}")
            need(score_window <= adapt_every,
                 f"score_window ({score_window}) must not exceed adapt_every ({adapt_every})")
        need(0.0 <= target_skip < 1.0, f"target_skip must be in [0, 1), got {target_skip}")
        need(freeze_windows >= 1, f"freeze_windows must be >= 1, got {freeze_windows}")
        need(0.0 < hot_fraction <= 1.0, f"hot_fraction must be in (0, 1], got {hot_fraction}")
        if not (grow_init == "zeros" or callable(grow_init)
                or (isinstance(grow_init, (int, float)) and grow_init >= 0)):
            raise ValueError(f"grow_init must be 'zeros', a std >= 0 or a callable, got "
                             f"{grow_init!r}")
        stale_window = update_every if stale_window is None else stale_window
        need(isinstance(stale_window, int) and stale_window >= 1,
             f"stale_window must be a positive int, got {stale_window!r}")

        self.optimizer = optimizer
        self.update_every, self.prune_fraction, self.stop_at = update_every, prune_fraction, stop_at
        self.grow, self.score_window, self.distribution = grow, score_window, distribution
        self.schedule, self.t_start, self.t_end = schedule, t_start, t_end
        self.target_density = target_density
        self.adapt_every, self.adapt_fraction = adapt_every, adapt_fraction
        self.skip_stale, self.stale_window = skip_stale, stale_window
        self.grow_init, self.nan_policy = grow_init, nan_policy
        self.reset_optimizer = bool(reset_optimizer)
        self.keep_rows = bool(keep_rows)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        # requested_moves: blocks the schedule asked to move; moved_blocks: blocks that moved
        # (fewer when there are not enough growable candidates, e.g. zero gradient scores).
        self._stats: Dict[str, Any] = {"mask_updates": 0, "requested_moves": 0,
                                       "moved_blocks": 0, "compactions": 0,
                                       "nonfinite_skips": 0, "last_update_fraction": 0.0}

        params = (set() if optimizer is None
                  else {id(p) for g in optimizer.param_groups for p in g["params"]})
        self.pools: List[_Pool] = []
        for m in _modules_of(model_or_modules):
            if _fused(m) is None and optimizer is not None:
                # unknown optimizer: fail now, not at the first update
                optimizer_state_keys(optimizer)
            if _fused(m) is None and id(m.values) not in params:
                raise ValueError(f"the optimizer does not train {type(m).__name__}.values "
                                 f"(tables {[t.name for t in m.tables]}): pass the optimizer "
                                 f"that holds the sparse modules' parameters")
            if m.row_ptr is None:
                m.rebuild_index()
            total = sum(t.num_rows * t.num_blocks for t in m.tables)
            tracker = (StaleTracker(m, target_skip, hot_fraction, freeze_windows,
                                    max_stale_change) if skip_stale else None)
            pool = _Pool(m, GrowthScoreAccumulator(), tracker, total,
                         m.num_active_blocks / total)
            pool.observer = self._make_observer(pool)
            m.lookup_observers.append(pool.observer)
            self.pools.append(pool)
        self._hooks = []
        self._held = None
        if skip_stale and optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
            self._hooks.append(optimizer.register_step_post_hook(self._post_step))

    # ------------------------------------------------------------------ timeline
    def _action(self, t: int) -> Optional[str]:
        """What happens at the end of step ``t`` (1-based): None, "regrow" or "decay"."""
        stopped = self.stop_at is not None and t >= self.stop_at
        if self.schedule == "from_scratch":
            return "regrow" if t % self.update_every == 0 and not stopped else None
        # dense_to_sparse: the decay always completes (stop_at only ends the adaptation).
        if self.t_start <= t <= self.t_end:
            if (t - self.t_start) % self.update_every == 0 or t == self.t_end:
                return "decay" if t > 0 else None
            return None
        if t > self.t_end and (t - self.t_end) % self.adapt_every == 0 and not stopped:
            return "regrow"
        return None

    def _next_regrow(self, s: int) -> Optional[int]:
        """First step >= s that regrows (None if none)."""
        if self.schedule == "from_scratch":
            n = -(-s // self.update_every) * self.update_every
        else:
            base = max(s, self.t_end + 1)
            n = self.t_end + -(-(base - self.t_end) // self.adapt_every) * self.adapt_every
        if self.stop_at is not None and n >= self.stop_at:
            return None
        return n

    def _collecting(self) -> bool:
        """Does the batch being back-propagated (the coming step) fall in a score window?"""
        s = self.step_count + 1
        n = self._next_regrow(s)
        return n is not None and n - s < self.score_window

    def _make_observer(self, pool: _Pool):
        def observe(module: BlockSparseBase, rec: LookupRecord) -> None:
            if self.grow == "gradient" and self._collecting():
                pool.acc.add_record(module, rec)
            if pool.tracker is not None:
                pool.tracker.observe(rec)
        return observe

    def update_fraction(self, t: Optional[int] = None) -> float:
        """Share of active blocks a regrow at step ``t`` moves."""
        t = self.step_count if t is None else t
        if self.schedule == "from_scratch":
            return cosine_update_fraction(t, self.prune_fraction, self.stop_at)
        return self.adapt_fraction

    def density_at(self, pool_index: int = 0, t: Optional[int] = None) -> float:
        """Scheduled density of a pool at step ``t`` (dense_to_sparse)."""
        t = self.step_count if t is None else t
        p = self.pools[pool_index]
        if self.schedule != "dense_to_sparse":
            return p.initial_density
        return cubic_density(t, self.t_start, self.t_end, p.initial_density, self.target_density)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> None:
        """Call once per training step, after ``optimizer.step()``."""
        self.step_count += 1
        t = self.step_count
        action = self._action(t)
        for i, pool in enumerate(self.pools):
            if self.nan_policy == "raise" and pool.acc.nonfinite:
                raise FloatingPointError(
                    f"non-finite gradient in the growth scores of pool {i} "
                    f"({[tb.name for tb in pool.module.tables]}) before step {t} "
                    f"(nan_policy='raise'; use 'skip' or 'ignore' to go on)")
            if action is None:
                continue
            if not self._finite_ok(i, pool, t):
                pool.acc.clear()
                continue
            if action == "regrow":
                self._regrow(pool, self.update_fraction(t))
            else:
                self._decay(pool, t)
        if action == "regrow":
            self._stats["mask_updates"] += 1
            self._stats["last_update_fraction"] = self.update_fraction(t)
        stale_check = self.skip_stale and t % self.stale_window == 0
        if stale_check:
            for pool in self.pools:
                pool.tracker.check(self.generator)
        if action is not None or stale_check:
            # Data-parallel runs: rank 0's decision wins and is broadcast (mask, values, frozen
            # flags, optimizer rows), so every replica holds the identical pool. No-op without
            # torch.distributed.
            from ..distributed import sync_mask_

            for pool in self.pools:
                sync_mask_(pool.module, 0, self.optimizer)

    def _finite_ok(self, i: int, pool: _Pool, t: int) -> bool:
        if self.nan_policy == "ignore":
            return True
        v = pool.module.values.detach()
        bad = not bool(torch.isfinite(v.sum(dtype=torch.float32)))
        bad_scores = pool.acc.nonfinite > 0
        if not (bad or bad_scores):
            return True
        if self.nan_policy == "raise":
            raise FloatingPointError(
                f"pool {i} ({[tb.name for tb in pool.module.tables]}) holds NaN/Inf values at "
                f"the mask update of step {t} (nan_policy='raise'; 'skip' skips the update, "
                f"'ignore' prunes non-finite blocks first)")
        self._stats["nonfinite_skips"] += 1
        return False

    def _candidates(self, pool: _Pool, tables, k: int):
        m = pool.module
        if self.grow == "gradient":
            keys, scores = pool.acc.take()
            # Data-parallel replicas: sum the candidates' scores over ranks, so the mask follows
            # the global batch (no-op in one process and for sharded pools, whose scores already
            # come from the global batch).
            from ..distributed import reduce_growth_scores

            keys, scores = reduce_growth_scores(m, keys.to(m.coord.device),
                                                scores.to(m.coord.device))
            return keys, scores
        keys = sample_inactive_blocks(m, tables, k, self.generator)
        scores = torch.arange(keys.numel(), 0, -1, dtype=torch.float32, device=keys.device)
        return keys, scores

    def _regrow(self, pool: _Pool, frac: float) -> None:
        m = pool.module
        backend = m.backend_for()
        layout = m.table_layout()  # grown blocks must fit their table (columns, padding row)
        slots_all, pruned_all = [], []  # pruned_all stays complete only without sharding
        requested = 0
        if self.distribution == "global" or len(m.tables) == 1:
            # Active blocks = row_ptr[N] of the current index (a pass over coord otherwise).
            active = int(m.row_ptr[-1]) if m.row_ptr is not None else m.num_active_blocks
            k = int(round(frac * active))
            requested += k
            keys, scores = self._candidates(pool, m.tables, k)
            # Extension point: a pool that is one shard of a larger collection (see
            # dsl_kernels.torchrec) defines ``dsl_prune_regrow_(keys, scores, fraction,
            # prunable=None, keep_first=False) -> grown slots`` and applies one threshold across
            # all shards itself; ``keep_first=True`` (passed only when keep_rows) asks it to keep
            # every row's first active block, as the op does.
            sharded = getattr(m, "dsl_prune_regrow_", None)
            if sharded is not None:
                kw = {"keep_first": True} if self.keep_rows else {}
                slots_all.append(sharded(keys, scores, frac, None, **kw))
                pruned_all = None
            elif k > 0:
                # keep_rows: the op keeps each row's first block itself (no slot list).
                slots, pruned = prune_regrow_(m.values, m.coord, m.row_mask, keys, scores, k,
                                              m.num_blocks, None, backend, layout,
                                              self.keep_rows)
                slots_all.append(slots)
                pruned_all.append(pruned)
        else:
            if self.grow == "gradient":
                keys, scores = self._candidates(pool, m.tables, 0)
                per = split_by_table(m, keys, scores)
            for j, t in enumerate(m.tables):
                ps = m.table_slots(t)
                k = int(round(frac * ps.numel()))
                requested += max(k, 0)
                if k <= 0:
                    continue
                if self.grow == "gradient":
                    tk, ts = per[j][1], per[j][2]
                else:
                    tk, ts = self._candidates(pool, [t], k)
                slots, pruned = prune_regrow_(m.values, m.coord, m.row_mask, tk, ts, k,
                                              m.num_blocks, ps, backend, layout, self.keep_rows)
                slots_all.append(slots)
                pruned_all.append(pruned)
        pool.acc.clear()
        slots = _cat(slots_all) if slots_all else m.coord.new_empty(0)
        if slots.numel():
            self._init_grown(m, slots)
            fo = _fused(m)
            if not self.reset_optimizer:
                pass
            elif fo is not None:
                fo.reset_state(slots)
            else:
                reset_optimizer_rows(self.optimizer, m.values, slots, backend)
            if m.values.grad is not None:
                m.values.grad[slots] = 0
            if pool.tracker is not None:
                pool.tracker.on_reassign(slots)
            elif m.frozen is not None:
                m.frozen[slots] = False
            if pruned_all is None:  # a sharded pool rewrote coord itself
                rebuild_index_lean(m)
            else:  # in place where the backend can (cpu): no second index, no full rebuild
                update_index_lean(m, slots, _cat(pruned_all))
        self._stats["requested_moves"] = self._stats.get("requested_moves", 0) + requested
        self._stats["moved_blocks"] += int(slots.numel())
        if (self.keep_rows and requested > 0 and slots.numel() == 0
                and not getattr(self, "_warned_static", False)):
            # The default keeps every row's only block: a pool of one block per row (e.g. an
            # aligned mask at density 1 / num_blocks) has nothing to prune, and DSL would
            # silently train a static mask.
            self._warned_static = True
            warnings.warn(f"DSLScheduler: no block moved although {requested} were requested. "
                          "With keep_rows=True (the default) a row's only block is never "
                          "pruned, so a pool whose rows hold at most one block cannot move; "
                          "pass keep_rows=False or use a higher density.", RuntimeWarning,
                          stacklevel=3)

    def _init_grown(self, m: BlockSparseBase, slots: Tensor) -> None:
        gi = self.grow_init
        if isinstance(gi, str):  # "zeros": the op already wrote zeros
            return
        shape = (slots.numel(), m.block_size)
        if callable(gi):
            buf = torch.zeros(shape, dtype=m.values.dtype, device=m.values.device)
            out = gi(buf)
            buf = out if isinstance(out, Tensor) else buf
        else:
            buf = torch.randn(shape, generator=self.generator, dtype=torch.float32)
            buf = (buf * float(gi)).to(device=m.values.device, dtype=m.values.dtype)
        if self.nan_policy != "ignore" and not bool(torch.isfinite(buf).all()):
            if self.nan_policy == "raise":
                raise FloatingPointError("grow_init produced NaN/Inf values "
                                         "(nan_policy='raise')")
            buf = torch.nan_to_num(buf, nan=0.0, posinf=0.0, neginf=0.0)
        m.values.data[slots] = buf.to(m.values.dtype)

    def _decay(self, pool: _Pool, t: int) -> None:
        m = pool.module
        d = cubic_density(t, self.t_start, self.t_end, pool.initial_density, self.target_density)
        if self.distribution == "global" or len(m.tables) == 1:
            n_keep = max(1, int(round(d * pool.total_blocks)))
            if n_keep >= m.budget:
                return
            keep = keep_largest(m, n_keep)
        else:
            counts = {tb.name: max(1, int(round(d * tb.num_rows * tb.num_blocks)))
                      for tb in m.tables}
            if sum(counts.values()) >= m.budget:
                return
            keep = keep_largest(m, 0, counts)
        compact_(m, keep, [] if self.optimizer is None else [self.optimizer])
        if pool.tracker is not None:
            pool.tracker.on_compact(keep)
        pool.acc.clear()
        self._stats["compactions"] += 1

    # ------------------------------------------------------------------ stale holding
    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._held = [p.tracker.hold([optimizer]) for p in self.pools]

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._held is None:
            return
        for p, saved in zip(self.pools, self._held):
            p.tracker.restore(saved)
        self._held = None

    # ------------------------------------------------------------------ reporting
    def stats(self) -> Dict[str, Any]:
        """Counters for logging: mask updates, moved blocks, active blocks / budget, densities
        per pool and table, frozen slots and the skipped-update ratio."""
        s = dict(self._stats)
        s["step"] = self.step_count
        s["active_blocks"] = sum(p.module.num_active_blocks for p in self.pools)
        s["budget"] = sum(p.module.budget for p in self.pools)
        s["density"] = [p.module.num_active_blocks / p.total_blocks for p in self.pools]
        s["table_density"] = {
            t.name: p.module.table_slots(t).numel() / (t.num_rows * t.num_blocks)
            for p in self.pools for t in p.module.tables}
        if self.skip_stale:
            tr = [p.tracker for p in self.pools]
            touches = sum(x.touches for x in tr)
            s["frozen_slots"] = sum(int(x.frozen_slots.numel()) for x in tr)
            s["skipped_update_ratio"] = sum(x.skipped for x in tr) / max(1, touches)
            s["stale_threshold"] = [x.threshold for x in tr]
        return s

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed for a bit-exact resume: step counter, generator state, stats,
        accumulated scores, stale trackers, frozen masks and pool sizes."""
        return {
            "version": 1,
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "stats": dict(self._stats),
            "schedule": self.schedule,
            "pools": [{
                "budget": p.module.budget,
                "initial_density": p.initial_density,
                "acc": p.acc.state_dict(),
                "tracker": None if p.tracker is None else p.tracker.state_dict(),
                "frozen": None if p.module.frozen is None else p.module.frozen.clone(),
            } for p in self.pools],
        }

    def _check_state(self, state: Dict[str, Any]) -> None:
        """Every check :meth:`load_state_dict` needs, before anything is written."""
        if len(state["pools"]) != len(self.pools):
            raise ValueError(f"the checkpoint has {len(state['pools'])} sparse pools, this "
                             f"scheduler drives {len(self.pools)}")
        for i, (p, sd) in enumerate(zip(self.pools, state["pools"])):
            if sd["budget"] != p.module.budget and self.schedule != "dense_to_sparse":
                raise ValueError(f"pool {i} has {p.module.budget} slots but the checkpoint "
                                 f"{sd['budget']}; only dense_to_sparse changes the budget")
            if p.tracker is not None and sd["tracker"] is None:
                raise ValueError(f"pool {i}: the checkpoint was written without skip_stale")
            if sd["frozen"] is not None and tuple(sd["frozen"].shape) != (sd["budget"],):
                raise ValueError(f"pool {i}: frozen flags of shape {tuple(sd['frozen'].shape)} "
                                 f"do not match the budget {sd['budget']}")

    def _backup(self) -> Dict[str, Any]:
        """What :meth:`load_state_dict` (and :func:`load_checkpoint`) may overwrite."""
        opt_state = {} if self.optimizer is None else self.optimizer.state
        return {"state": self.state_dict(),
                "pools": [p.module.pool_tensors() for p in self.pools],
                "opt_rows": [opt_state.get(p.module.values) for p in self.pools]}

    def _restore(self, backup: Dict[str, Any]) -> None:
        for p, saved, rows in zip(self.pools, backup["pools"], backup["opt_rows"]):
            if saved["values"].shape != p.module.values.shape:
                p.module.restore_pool_tensors(saved)
            if rows is not None:
                self.optimizer.state[p.module.values] = rows
        self._load(backup["state"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Call it BEFORE ``model.load_state_dict``: a pool the
        checkpoint recorded smaller (dense_to_sparse compaction) is resized first so the model's
        state dict fits (:func:`load_checkpoint` does the three loads all-or-nothing).
        All or nothing: a state that does not fit raises and leaves pools, optimizer state and
        scheduler untouched."""
        self._check_state(state)
        backup = self._backup()
        try:
            self._load(state)
        except Exception:
            self._restore(backup)
            raise

    def _load(self, state: Dict[str, Any]) -> None:
        for p, sd in zip(self.pools, state["pools"]):
            if sd["budget"] != p.module.budget:
                resize_pool_(p.module, sd["budget"])
                st = (None if self.optimizer is None
                      else self.optimizer.state.get(p.module.values))
                if st:  # stale rows: opt.load_state_dict replaces them
                    self.optimizer.state.pop(p.module.values)
                if p.tracker is not None:
                    p.tracker.counts = p.tracker.counts.new_zeros(sd["budget"])
            p.initial_density = sd["initial_density"]
            p.acc.load_state_dict(sd["acc"], p.module.coord.device)
            if p.tracker is not None:
                p.tracker.load_state_dict(sd["tracker"])
            else:
                p.module.frozen = (None if sd["frozen"] is None
                                   else sd["frozen"].to(p.module.coord.device).clone())
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        self._stats = dict(state["stats"])

    def close(self) -> None:
        """Detach the observers and optimizer hooks (the scheduler stops tracking)."""
        for p in self.pools:
            if p.observer in p.module.lookup_observers:
                p.module.lookup_observers.remove(p.observer)
        for h in self._hooks:
            h.remove()
        self._hooks = []


def load_checkpoint(checkpoint: Dict[str, Any], model: nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], scheduler: DSLScheduler,
                    keys=("model", "optimizer", "scheduler")) -> None:
    """Load ``{"model": ..., "optimizer": ..., "scheduler": ...}`` in the order that works
    (scheduler first: it resizes compacted pools), all or nothing: when one of the three loads
    fails, model, optimizer and scheduler are put back as they were and the error is raised."""
    km, ko, ks = keys
    backup_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backup_opt = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    backup_sched = scheduler._backup()
    try:
        scheduler.load_state_dict(checkpoint[ks])
        model.load_state_dict(checkpoint[km])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint[ko])
    except Exception:
        scheduler._restore(backup_sched)  # pool sizes first, so the model's state fits again
        model.load_state_dict(backup_model)
        if backup_opt is not None:
            optimizer.load_state_dict(backup_opt)
        raise
