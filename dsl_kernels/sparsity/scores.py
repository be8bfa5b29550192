"""Growth candidates: gradient scores accumulated over a window of batches, or random blocks.

Gradient growth (RigL / DSL): the score of an inactive block is the L2 norm of its dense
gradient. ``dsl::grow_scores`` computes it for the rows a batch touched; the module's
``lookup_observers`` hook hands every backward to :meth:`GrowthScoreAccumulator.add_record`. The
accumulator is a sparse map ``global block key -> sum of per-batch scores`` (sum of norms, not the
norm of the summed gradient: it needs no ``[blocks, B]`` gradient storage and ranks blocks by how
much gradient they kept receiving). ``score_window=1`` is the original single-batch criterion.

Random growth samples inactive blocks by rejection (row, column drawn uniformly per table, active
and already-drawn keys rejected): no ``N * NB`` tensor, with the scheduler's own generator so a
resumed run draws the same blocks.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from ..pool import BlockSparseBase, LookupRecord, TableSpec
from .prune_regrow import is_active_chunked


class GrowthScoreAccumulator:
    """Sparse ``key -> score`` sum over a window of batches, kept as unique ascending keys and
    merged after every batch (each batch adds its score to a key once, in batch order) so its
    value is a canonical function of the batches it saw — the property bit-exact resume needs.

    >>> import torch
    >>> acc = GrowthScoreAccumulator()
    >>> acc.add(torch.tensor([7, 3, 7]), torch.tensor([1.0, 2.0, 0.5]))
    >>> acc.add(torch.tensor([3, 9]), torch.tensor([1.0, 0.0]))   # zero scores are dropped
    >>> k, s = acc.take(); k.tolist(), s.tolist(), acc.batches
    ([3, 7], [3.0, 1.5], 0)
    """

    def __init__(self) -> None:
        self.keys: Optional[Tensor] = None
        self.scores: Optional[Tensor] = None
        self.batches = 0
        self.nonfinite = 0  # scores dropped for being NaN/Inf in this window

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.numel()

    @torch.no_grad()
    def add(self, keys: Tensor, scores: Tensor) -> None:
        keys, scores = keys.reshape(-1).long(), scores.reshape(-1).float()
        bad = ~torch.isfinite(scores)
        n_bad = int(bad.sum())
        if n_bad:
            self.nonfinite += n_bad
            scores = scores.masked_fill(bad, 0.0)
        # One nonzero for both (a boolean index runs its own nonzero per tensor).
        sel = torch.nonzero(scores > 0).squeeze(1)
        keys, scores = keys.index_select(0, sel), scores.index_select(0, sel)
        self.batches += 1
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            # Sum duplicates within the batch (grow_scores output is already unique, ascending).
            order = torch.sort(keys, stable=True).indices
            keys, scores = keys[order], scores[order]
            keys, counts = torch.unique_consecutive(keys, return_counts=True)
            scores = torch.segment_reduce(scores, "sum", lengths=counts, axis=0)
        if self.keys is None or self.keys.numel() == 0:
            self.keys, self.scores = keys, scores
            return
        # Merge into the window's map: a key seen before adds its score in place (one addition
        # per batch, in batch order: the same float result however the run was interrupted);
        # new keys are inserted and the map re-sorted.
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        hit = self.keys[pos] == keys
        self.scores = self.scores.clone()
        self.scores[pos[hit]] += scores[hit]
        miss = ~hit
        if bool(miss.any()):
            k2 = torch.cat([self.keys, keys[miss]])
            s2 = torch.cat([self.scores, scores[miss]])
            order = torch.sort(k2).indices  # keys are distinct: any sort is deterministic
            self.keys, self.scores = k2[order], s2[order]

    def add_record(self, module: BlockSparseBase, rec: LookupRecord) -> None:
        """Scores of one backward (``dsl::grow_scores`` on the batch's touched rows)."""
        rows, scores = ops.grow_scores(rec.grad_out.contiguous(), module.row_ptr,
                                       module.row_slots, module.row_mask, rec.indices,
                                       rec.offsets, rec.per_sample_weights, rec.max_idx,
                                       rec.num_blocks, rec.mode, rec.padding_idx,
                                       module.backend_for(rec.indices.device.type))
        cols = torch.arange(rec.num_blocks, device=rows.device)
        keys = rows.unsqueeze(1) * module.num_blocks + cols
        self.add(keys, scores)

    def take(self) -> Tuple[Tensor, Tensor]:
        """The window's ``(keys ascending, scores)``; empties the accumulator."""
        k = self.keys if self.keys is not None else torch.empty(0, dtype=torch.int64)
        s = self.scores if self.scores is not None else torch.empty(0)
        self.clear()
        return k, s

    def clear(self) -> None:
        self.keys = self.scores = None
        self.batches = 0
        self.nonfinite = 0

    def state_dict(self) -> dict:
        # Copies: the live map is updated in place.
        return {"keys": None if self.keys is None else self.keys.clone(),
                "scores": None if self.scores is None else self.scores.clone(),
                "batches": self.batches,
                "nonfinite": self.nonfinite}

    def load_state_dict(self, sd: dict, device=None) -> None:
        self.keys = None if sd["keys"] is None else sd["keys"].to(device)
        self.scores = None if sd["scores"] is None else sd["scores"].to(device)
        self.batches = int(sd["batches"])
        self.nonfinite = int(sd["nonfinite"])


@torch.no_grad()
def sample_inactive_blocks(module: BlockSparseBase, tables: Sequence[TableSpec], n: int,
                           generator: torch.Generator, max_rounds: int = 64) -> Tensor:
    """Up to ``n`` distinct inactive blocks of ``tables`` (global keys, in draw order), drawn
    uniformly over the tables' blocks by rejection sampling on the CPU ``generator``. Returns
    fewer only when ``max_rounds`` rounds could not find enough (an almost full pool)."""
    dev = module.coord.device
    if n <= 0 or not tables:
        return torch.empty(0, dtype=torch.int64, device=dev)
    NB = module.num_blocks
    sizes = torch.tensor([t.num_rows * t.num_blocks for t in tables], dtype=torch.float64)
    n_rows = torch.tensor([t.num_rows for t in tables], dtype=torch.float64)
    n_cols = torch.tensor([t.num_blocks for t in tables], dtype=torch.float64)
    start = torch.tensor([t.row_start for t in tables], dtype=torch.int64)
    pad = torch.tensor([-1 if t.padding_idx is None else t.row_start + t.padding_idx
                        for t in tables], dtype=torch.int64)
    chosen = torch.empty(0, dtype=torch.int64)
    for _ in range(max_rounds):
        need = n - chosen.numel()
        if need <= 0:
            break
        # Rounds of at most max(8192, n/8) draws: temporaries stay a small share of the pool.
        m = min(2 * need + 16, max(1 << 13, n // 8))
        tab = torch.multinomial(sizes, m, replacement=True, generator=generator)
        row = (torch.rand(m, generator=generator, dtype=torch.float64) * n_rows[tab]).long()
        col = (torch.rand(m, generator=generator, dtype=torch.float64) * n_cols[tab]).long()
        grow = start[tab] + row
        keys = grow * NB + col
        ok = (grow != pad[tab]) & ~is_active_chunked(module.row_mask, keys.to(dev), NB).cpu()
        keys = torch.cat([chosen, keys[ok]])
        # Keep the first draw of every key (draw order is the random order).
        uk, inv = torch.unique(keys, return_inverse=True)
        pos = torch.arange(keys.numel())
        first = torch.full((uk.numel(),), keys.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inv, pos, "amin", include_self=True)
        keep = torch.zeros(keys.numel(), dtype=torch.bool)
        keep[first] = True
        chosen = keys[keep][:n]
    return chosen.to(dev)


def table_key_range(module: BlockSparseBase, t: TableSpec) -> Tuple[int, int]:
    """Global keys of table ``t`` lie in ``[lo, hi)``."""
    return t.row_start * module.num_blocks, (t.row_start + t.num_rows) * module.num_blocks


def split_by_table(module: BlockSparseBase, keys: Tensor, scores: Tensor
                   ) -> List[Tuple[TableSpec, Tensor, Tensor]]:
    """Candidates of each table (keys ascending stay ascending)."""
    out = []
    for t in module.tables:
        lo, hi = table_key_range(module, t)
        sel = (keys >= lo) & (keys < hi)
        out.append((t, keys[sel], scores[sel]))
    return out


def table_stats(module: BlockSparseBase) -> Dict[str, int]:
    """Active blocks per table."""
    return {t.name: int(module.table_slots(t).numel()) for t in module.tables}
