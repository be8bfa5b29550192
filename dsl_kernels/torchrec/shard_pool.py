"""The slot pool one rank holds for its shards of a collection, and the mask update with one
threshold across all shards.

A rank's :class:`ShardPool` is an ordinary :class:`~dsl_kernels.SparseEmbeddingBagCollection`
whose tables are *pieces*: whole tables (table-wise) or row ranges of tables (row-wise). Every
kernel, the sparsity engine and the fused optimizer run on it unchanged. What it adds:

* the map between its local block keys and the keys of the unsharded collection
  (:meth:`ShardPool.global_keys`, :meth:`ShardPool.load_unsharded_`);
* ``is_shard = True``, so the replica helpers of :mod:`dsl_kernels.distributed` leave it alone;
* ``dsl_prune_regrow_``, the extension point ``DSLScheduler`` calls instead of a local
  prune/regrow: one global ``k``, the ``k`` weakest active blocks and the ``k`` best growth
  candidates of the whole collection, chosen from every shard's ``k`` local candidates (one
  all-gather of ``O(k)`` statistics per rank), so budget moves between tables and ranks.

Each pool has headroom (``capacity``, slots beyond its share of the budget) so a shard can
receive more blocks than it gives; a shard that runs full takes no more (the next-best candidate
elsewhere is grown instead), so the number of active blocks stays the budget globally and within
each shard's capacity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.reference.prune_regrow import first_block_flags
from ..distributed import all_gather_varlen
from ..modules import SparseEmbeddingBagCollection, TableConfig

_NO_KEY = torch.iinfo(torch.int64).max  # padding key: sorts after every real key


@dataclass(frozen=True)
class Piece:
    """Rows ``[row_offset, row_offset + num_rows)`` of table ``table`` stored on this rank."""

    table: str
    local_name: str
    row_offset: int
    num_rows: int
    embedding_dim: int
    mode: str  # the local pooling ("sum" for a row-wise mean table: divided after the reduction)
    capacity: int  # slots of this piece's share plus headroom
    global_row_start: int  # the table's first row in the unsharded pool


class ShardPool(SparseEmbeddingBagCollection):
    """One rank's pieces of a sharded collection in one slot pool (built by the sharder)."""

    is_shard = True

    def __init__(self, pieces: List[Piece], block_size: int, global_num_blocks: int,
                 process_group, **kw):
        cfgs = []
        for p in pieces:
            nb = p.embedding_dim // block_size
            cfgs.append(TableConfig(p.local_name, p.num_rows, p.embedding_dim, p.mode,
                                    density=p.capacity / (p.num_rows * nb)))
        super().__init__(cfgs, block_size=block_size, **kw)
        if self.budget != sum(p.capacity for p in pieces):
            raise RuntimeError(f"shard pool got {self.budget} slots for capacity "
                               f"{sum(p.capacity for p in pieces)}")
        self.pieces = list(pieces)
        self.global_num_blocks = global_num_blocks
        self.process_group = process_group
        dev = self.coord.device
        self._local_start = torch.tensor([t.row_start for t in self.tables], device=dev)
        self._row_shift = torch.tensor([p.global_row_start + p.row_offset - t.row_start
                                        for p, t in zip(pieces, self.tables)], device=dev)
        with torch.no_grad():  # empty until loaded from the unsharded collection
            self.coord.fill_(-1)
            self.values.zero_()
        self.rebuild_index()

    def compact_slots_(self, keep: Tensor) -> None:
        # dense_to_sparse would shrink each shard on its own, off the global budget.
        raise NotImplementedError(
            "schedule='dense_to_sparse' (pool compaction) is not supported on a sharded "
            "collection; use schedule='from_scratch', or compact the unsharded model first")

    def resize_pool_(self, budget: int) -> None:
        raise NotImplementedError("a sharded pool keeps its capacity: resizing it (a "
                                  "dense_to_sparse checkpoint) is not supported")

    # ------------------------------------------------------------------ key maps
    def global_keys(self, keys: Tensor) -> Tensor:
        """Local block keys -> keys of the unsharded collection (``row * NB + col``)."""
        keys = keys.to(torch.int64)
        row = torch.div(keys, self.num_blocks, rounding_mode="floor")
        col = keys - row * self.num_blocks
        piece = torch.searchsorted(self._local_start, row, right=True) - 1
        return (row + self._row_shift[piece]) * self.global_num_blocks + col

    @torch.no_grad()
    def from_unsharded(self, values: Tensor, coord: Tensor) -> Tuple[Tensor, Tensor]:
        """This rank's ``(values [budget, B], coord [budget])``, taken from the unsharded pool
        ``values [C, B]``, ``coord [C]``: its blocks, sorted by local key, then free slots."""
        act = coord >= 0
        gkey, gval = coord[act].to(self.coord.device), values[act].to(self.values)
        grow = torch.div(gkey, self.global_num_blocks, rounding_mode="floor")
        col = gkey - grow * self.global_num_blocks
        keys, vals = [], []
        for p, t in zip(self.pieces, self.tables):
            lo = p.global_row_start + p.row_offset
            sel = (grow >= lo) & (grow < lo + p.num_rows)
            keys.append((grow[sel] - lo + t.row_start) * self.num_blocks + col[sel])
            vals.append(gval[sel])
        k = torch.cat(keys)
        if k.numel() > self.budget:
            raise ValueError(
                f"rank {self._rank()} would hold {k.numel()} active blocks of "
                f"{[p.table for p in self.pieces]} but its pool has {self.budget} slots: "
                f"shard with a larger capacity_factor")
        order = torch.argsort(k)
        out_c = torch.full_like(self.coord, -1)
        out_v = torch.zeros_like(self.values)
        out_c[: k.numel()] = k[order]
        out_v[: k.numel()] = torch.cat(vals)[order]
        return out_v, out_c

    @torch.no_grad()
    def load_unsharded_(self, values: Tensor, coord: Tensor) -> None:
        """Load this rank's blocks of the unsharded pool in place (see :meth:`from_unsharded`)."""
        v, c = self.from_unsharded(values, coord)
        self.values.copy_(v)
        self.coord.copy_(c)
        self.rebuild_index()

    def _rank(self) -> int:
        return dist.get_rank(self.process_group) if dist.is_initialized() else 0

    # ------------------------------------------------------------------ global mask update
    @torch.no_grad()
    def dsl_prune_regrow_(self, keys: Tensor, scores: Tensor, fraction: float,
                          prunable: Optional[Tensor] = None, keep_first: bool = False
                          ) -> Tensor:
        """``DSLScheduler``'s extension point (see the module docstring): prune the ``k =
        round(fraction * active blocks of all shards)`` weakest blocks of the collection (among
        this rank's ``prunable`` slots, default all active ones; ``keep_first``: less every
        row's first active block, as ``dsl::prune_regrow_(keep_first=True)``) and grow its
        ``k`` best candidates; ties go to the lower key of the unsharded collection. Returns
        this rank's slots that received a grown block (zeroed); freed slots are emptied and the
        index is rebuilt here."""
        pg = self.process_group
        active = self.coord >= 0
        n_active = int(active.sum())
        stats = torch.tensor([[n_active, self.budget]], dtype=torch.int64)
        all_stats = torch.cat(all_gather_varlen(stats, pg))  # [world, 2]
        k = int(round(fraction * int(all_stats[:, 0].sum())))
        if k <= 0:
            return self.coord.new_empty(0)
        # Growth candidates: finite scores of blocks inactive now (a block pruned by this update
        # is never regrown by it), best k locally.
        keys = keys.to(self.coord.device, torch.int64).reshape(-1)
        scores = scores.to(self.coord.device, torch.float32).reshape(-1)
        ok = torch.isfinite(scores) & ~torch.isin(keys, self.coord[active])
        keys, scores = keys[ok], scores[ok]
        gk = self.global_keys(keys)
        g_order = _order(-scores, gk)[:k]
        # Prune candidates: the k weakest active blocks locally (NaN/Inf blocks first).
        slots = (torch.nonzero(active).squeeze(1) if prunable is None
                 else prunable.to(self.coord.device, torch.int64))
        if keep_first:  # a row's first (lowest-column) active block stays
            slots = slots[~first_block_flags(self.coord[slots], self.row_mask, self.num_blocks)]
        mag = torch.linalg.vector_norm(self.values[slots].float(), dim=1)
        mag = mag.nan_to_num_(nan=float("-inf"), posinf=float("-inf"))
        pk = self.global_keys(self.coord[slots])
        p_order = _order(mag, pk)[:k]
        # One all-gather of (value, key) pairs: k per rank at most.
        mine = torch.stack([torch.cat([mag[p_order].double(), (-scores[g_order]).double()]),
                            torch.cat([pk[p_order], gk[g_order]]).double()], 1)
        n = torch.tensor([[p_order.numel(), g_order.numel()]], dtype=torch.int64)
        parts = all_gather_varlen(mine, pg)
        counts = torch.cat(all_gather_varlen(n, pg))
        rank = self._rank()
        prune_sel, grow_sel = _choose(parts, counts, all_stats, k)
        pruned = slots[p_order[prune_sel[rank]]]
        grown_keys = keys[g_order[grow_sel[rank]]]
        # Apply this rank's share: empty the pruned slots, hand free slots (ascending) to the
        # grown keys (ascending).
        self.coord[pruned] = -1
        self.values[pruned] = 0
        free = torch.nonzero(self.coord < 0).squeeze(1)[: grown_keys.numel()]
        self.coord[free] = torch.sort(grown_keys).values
        self.values[free] = 0
        self.rebuild_index()
        return free


def _order(primary: Tensor, key: Tensor) -> Tensor:
    """Positions sorted by ``primary`` ascending, ties by ``key`` ascending."""
    by_key = torch.argsort(key, stable=True)
    return by_key[torch.argsort(primary[by_key], stable=True)]


def _choose(parts: List[Tensor], counts: Tensor, stats: Tensor, k: int
            ) -> Tuple[List[Tensor], List[Tensor]]:
    """The same decision on every rank from the gathered candidates: per rank, which of its
    (sorted) prune and grow candidates are taken. Grow in global score order while the owner
    has room (free slots + its pruned blocks); if fewer than k can be grown, prune fewer."""
    world = len(parts)
    p_val, p_key, p_rank, p_pos, g_val, g_key, g_rank, g_pos = ([] for _ in range(8))
    for r, (t, (np_, ng)) in enumerate(zip(parts, counts.tolist())):
        for lst_v, lst_k, lst_r, lst_p, a, b in ((p_val, p_key, p_rank, p_pos, 0, np_),
                                                 (g_val, g_key, g_rank, g_pos, np_, np_ + ng)):
            lst_v.append(t[a:b, 0])
            lst_k.append(t[a:b, 1])
            lst_r.append(torch.full((b - a,), r, dtype=torch.int64))
            lst_p.append(torch.arange(b - a))
    pv, pkk, pr, pp = (torch.cat(x) for x in (p_val, p_key, p_rank, p_pos))
    gv, gkk, gr, gp = (torch.cat(x) for x in (g_val, g_key, g_rank, g_pos))
    po, go = _order(pv, pkk), _order(gv, gkk)  # weakest first; best first
    free = stats[:, 1] - stats[:, 0]
    n = min(k, po.numel(), go.numel())
    while True:
        # A rank's candidates appear in the global order in its own order, so "grow in global
        # order while the owner has room" = the first n candidates whose position within their
        # rank is below that rank's room.
        room = free + torch.bincount(pr[po[:n]], minlength=world)
        take_t = go[gp[go] < room[gr[go]]][:n]
        if take_t.numel() == n:
            break
        n = take_t.numel()  # a shard ran full: move fewer blocks
    prune_ranks = pr[po[:n]]
    prune_sel = [pp[po[:n]][prune_ranks == r] for r in range(world)]
    grow_sel = [gp[take_t][gr[take_t] == r] for r in range(world)]
    return prune_sel, grow_sel
