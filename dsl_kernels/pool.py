"""The block-slot pool: the storage every sparse module is built on.

A pool holds ``C`` slots of ``B`` values (``values: Parameter[C, B]``, the only trainable
tensor) and ``coord: int64[C]`` naming the block each slot holds (``row * NB + col``, -1 for a
free slot). The CSR row index (``row_ptr``, ``row_slots``, ``row_mask``) is derived from
``coord`` by the ``dsl::rebuild_index`` op after every mask change; it is not saved.

One pool may serve several tables (``SparseEmbeddingBagCollection``): table ``t`` owns the
global rows ``[row_start_t, row_start_t + N_t)`` and its blocks ``j < NB_t``; ``NB`` of the pool
is the largest ``NB_t``. That is what lets the sparsity engine move budget between tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .ops import hooks
from .backends import resolve
from .format import MODES


@dataclass(frozen=True)
class TableSpec:
    """Where one table lives in a pool."""

    name: str
    row_start: int
    num_rows: int
    num_blocks: int  # NB_t = embedding_dim / block_size
    mode: str
    padding_idx: Optional[int]  # local row id, or None


@dataclass
class LookupRecord:
    """What a lookup saw, handed with its output gradient to lookup observers (the sparsity
    engine's growth-score and hot-row trackers)."""

    indices: Tensor  # global row ids, 1-D
    offsets: Tensor  # CSR
    per_sample_weights: Optional[Tensor]
    max_idx: Tensor
    num_blocks: int
    mode: int
    padding_idx: int  # global, -1 for none
    grad_out: Optional[Tensor] = None


def budget_for(num_rows: int, num_blocks: int, density: float) -> int:
    """Slots a table of ``num_rows x num_blocks`` blocks gets at ``density`` (at least 1)."""
    return max(1, min(num_rows * num_blocks, int(round(density * num_rows * num_blocks))))


MASK_INITS = ("aligned", "random")


def even_random_mask(num_rows: int, num_blocks: int, count: int, exclude_row: Optional[int],
                     device, mask_init: str = "random") -> Tensor:
    """``count`` distinct blocks spread evenly over the rows (each row gets floor or ceil of the
    mean, the padding row none), as local ``row * num_blocks + col`` keys: at random columns, or
    with ``mask_init="aligned"`` in each row's first columns (row r with k blocks holds columns
    0..k-1, so two rows always share their first min(k_a, k_b) blocks: dot products between
    rows, as in a recommender, do not start at 0). Never builds an ``N x NB`` tensor unless rows
    are more than half full (then it is at most twice the budget)."""
    if mask_init not in MASK_INITS:
        raise ValueError(f"mask_init must be one of {', '.join(MASK_INITS)}, got {mask_init!r}")
    avail = num_rows - (1 if exclude_row is not None else 0)
    if avail <= 0:
        raise ValueError("a table needs at least one row besides padding_idx")
    count = min(count, avail * num_blocks)
    base, extra = divmod(count, avail)
    per_row = torch.full((avail,), base, dtype=torch.int64, device=device)
    if extra:
        per_row[torch.randperm(avail, device=device)[:extra]] += 1
    row_ids = torch.arange(avail, device=device)
    if exclude_row is not None:
        row_ids = row_ids + (row_ids >= exclude_row).long()
    rows = torch.repeat_interleave(row_ids, per_row)
    top = base + (1 if extra else 0)
    if mask_init == "aligned":
        first = torch.cumsum(per_row, 0) - per_row
        cols = torch.arange(count, device=device) - torch.repeat_interleave(first, per_row)
    elif 2 * top > num_blocks:
        # Dense rows: random permutation of the columns of each row, first per_row[r] kept.
        perm = torch.argsort(torch.rand(avail, num_blocks, device=device), dim=1)
        keep = torch.arange(num_blocks, device=device).unsqueeze(0) < per_row.unsqueeze(1)
        cols = perm[keep]
    else:
        # Sparse rows: rejection sampling of duplicate (row, col) pairs; converges fast since
        # each row is at most half full.
        cols = torch.randint(num_blocks, (count,), device=device)
        while True:
            keys = rows * num_blocks + cols
            sk, order = torch.sort(keys)
            dup = torch.zeros_like(sk, dtype=torch.bool)
            dup[1:] = sk[1:] == sk[:-1]
            if not bool(dup.any()):
                break
            redo = order[dup]
            cols[redo] = torch.randint(num_blocks, (redo.numel(),), device=device)
    return torch.sort(rows * num_blocks + cols).values


class BlockSparseBase(nn.Module):
    """A slot pool plus the tables stored in it. Subclasses add the user-facing forward."""

    values: nn.Parameter
    coord: Tensor

    def __init__(self, tables: List[TableSpec], num_blocks: int, block_size: int, budget: int,
                 dtype=None, device=None, backend: str = "auto", validate: bool = True,
                 deterministic: bool = False):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.tables = tables
        self.num_rows = sum(t.num_rows for t in tables)
        self.num_blocks = num_blocks
        self._block_size = block_size
        self.backend = backend
        self.validate = validate
        self.deterministic = deterministic
        self.values = nn.Parameter(torch.empty(budget, block_size, dtype=dtype, device=device))
        self.register_buffer("coord", torch.full((budget,), -1, dtype=torch.int64, device=device))
        self.register_buffer("row_ptr", None, persistent=False)
        self.register_buffer("row_slots", None, persistent=False)
        self.register_buffer("row_mask", None, persistent=False)
        # Slots whose updates are skipped (stale-embedding skipping); None = none frozen.
        self.register_buffer("frozen", None, persistent=False)
        # Names of buffers with one row per slot (a fused optimizer's state): resized and
        # compacted with the pool, so no caller has to know who registered them.
        self.slot_buffers: List[str] = []
        self.lookup_observers: List[Callable[["BlockSparseBase", LookupRecord], None]] = []
        self._hook_id = hooks.register(self)  # how the lookup's backward finds the observers
        self.register_load_state_dict_post_hook(lambda module, keys: module.rebuild_index())

    # ------------------------------------------------------------------ properties
    @property
    def budget(self) -> int:
        """Number of slots (fixed at construction)."""
        return self.values.shape[0]

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_active_blocks(self) -> int:
        # count_nonzero: a bool .sum() widens to an int64 [C] temporary inside the kernel.
        return int(torch.count_nonzero(self.coord >= 0))

    @property
    def density(self) -> float:
        """Active blocks over all blocks of all tables."""
        total = sum(t.num_rows * t.num_blocks for t in self.tables)
        return self.num_active_blocks / total

    def memory_bytes(self) -> int:
        """Bytes the module really holds: values + coord + derived index (+ frozen flags)."""
        ts = [self.values, self.coord, self.row_ptr, self.row_slots, self.row_mask, self.frozen]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def backend_for(self, device_type: Optional[str] = None) -> str:
        return resolve(self.backend, device_type or self.values.device.type)

    # ------------------------------------------------------------------ pool size
    def register_slot_buffer(self, name: str, tensor: Tensor) -> None:
        """Register ``tensor`` (first dimension = budget) as a buffer that follows the pool's
        slots: :meth:`compact_slots_` gathers it, :meth:`resize_pool_` re-sizes it."""
        if tensor.dim() < 1 or tensor.shape[0] != self.budget:
            raise ValueError(f"slot buffer {name!r} must have {self.budget} rows (one per slot), "
                             f"got shape {tuple(tensor.shape)}")
        self.register_buffer(name, tensor)
        if name not in self.slot_buffers:
            self.slot_buffers.append(name)

    def unregister_slot_buffer(self, name: str) -> None:
        self._buffers.pop(name, None)
        if name in self.slot_buffers:
            self.slot_buffers.remove(name)

    def slot_state_shapes(self, budget: int) -> Dict[str, Tuple[int, ...]]:
        """State-dict shapes of the per-slot tensors if the pool had ``budget`` slots."""
        out = {"values": (budget, self.block_size), "coord": (budget,)}
        for n in self.slot_buffers:
            out[n] = (budget,) + tuple(self._buffers[n].shape[1:])
        return out

    def pool_tensors(self) -> Dict[str, Optional[Tensor]]:
        """The tensors :meth:`resize_pool_` and :meth:`compact_slots_` replace (for a rollback
        with :meth:`restore_pool_tensors`)."""
        out: Dict[str, Optional[Tensor]] = {"values": self.values.data, "coord": self.coord,
                                            "frozen": self.frozen}
        out.update({n: self._buffers[n] for n in self.slot_buffers})
        return out

    @torch.no_grad()
    def restore_pool_tensors(self, saved: Dict[str, Optional[Tensor]]) -> None:
        replace_data(self.values, saved["values"])
        self.coord, self.frozen = saved["coord"], saved["frozen"]
        for n in self.slot_buffers:
            self._buffers[n] = saved[n]
        self.rebuild_index()

    @torch.no_grad()
    def compact_slots_(self, keep: Tensor) -> None:
        """Keep only slots ``keep`` (int64) of the pool, in that order: values (the Parameter
        object stays), its gradient, coord, frozen flags and every slot buffer. The caller
        shrinks optimizer state held elsewhere and rebuilds the index."""
        p = self.values
        C = p.shape[0]
        keep = keep.to(device=p.device, dtype=torch.int64)
        replace_data(p, p.data[keep])
        if p.grad is not None:
            p.grad = p.grad[keep] if p.grad.shape[0] == C else None
        self.coord = self.coord[keep]
        if self.frozen is not None:
            self.frozen = self.frozen[keep]
        for n in self.slot_buffers:
            self._buffers[n] = self._buffers[n][keep]

    @torch.no_grad()
    def resize_pool_(self, budget: int) -> None:
        """An empty pool of ``budget`` slots (all free, slot buffers zeroed), keeping the
        Parameter object: what a checkpoint written after dense-to-sparse compaction loads
        into. The index is rebuilt."""
        p = self.values
        replace_data(p, p.data.new_zeros((budget, p.shape[1])))
        p.grad = None
        self.coord = torch.full((budget,), -1, dtype=torch.int64, device=p.device)
        self.frozen = None
        for n in self.slot_buffers:
            buf = self._buffers[n]
            self._buffers[n] = buf.new_zeros((budget,) + tuple(buf.shape[1:]))
        self.rebuild_index(drop_old=True)

    # ------------------------------------------------------------------ mask / index
    @torch.no_grad()
    def rebuild_index(self, drop_old: bool = False) -> None:
        """Recompute row_ptr / row_slots / row_mask from coord (on the pool's device).
        ``drop_old``: release the old index first, so the old and the new one (``row_ptr``
        N+1, ``row_mask`` N*W words, ``row_slots`` C) never coexist — at 1M rows that overlap
        alone was +13 % of the steady-state memory of a mask update. (The old index is stale
        once ``coord`` changed; nothing reads it in between.)"""
        if drop_old:
            self.row_ptr = self.row_slots = self.row_mask = None
        self.row_ptr, self.row_slots, self.row_mask = ops.rebuild_index(
            self.coord, self.num_rows, self.num_blocks, self.backend_for())

    def _global_key(self, t: TableSpec, local_key: Tensor) -> Tensor:
        row = torch.div(local_key, t.num_blocks, rounding_mode="floor")
        col = local_key - row * t.num_blocks
        return (row + t.row_start) * self.num_blocks + col

    @torch.no_grad()
    def _init_even(self, counts: List[int], init: Optional[Callable[[Tensor], object]],
                   mask_init: str = "random") -> None:
        keys = [self._global_key(t, even_random_mask(t.num_rows, t.num_blocks, c, t.padding_idx,
                                                     self.coord.device, mask_init))
                for t, c in zip(self.tables, counts)]
        k = torch.cat(keys)
        self.coord.fill_(-1)
        self.coord[: k.numel()] = k
        if init is None:
            nn.init.normal_(self.values)  # nn.EmbeddingBag's default
        else:
            init(self.values)
        self.values[k.numel():] = 0
        self.rebuild_index()

    def table_layout(self) -> Tensor:
        """``int64[T, 4]``: ``row_start, num_rows, num_blocks, padding_row`` (global, -1 for
        none) per table, the limits ``dsl::prune_regrow_`` checks grown blocks against."""
        return torch.tensor([[t.row_start, t.num_rows, t.num_blocks,
                              -1 if t.padding_idx is None else t.row_start + t.padding_idx]
                             for t in self.tables], dtype=torch.int64, device=self.coord.device)

    def table_slots(self, t: TableSpec) -> Tensor:
        """Slots (int64) holding blocks of table ``t``."""
        lo = t.row_start * self.num_blocks
        hi = (t.row_start + t.num_rows) * self.num_blocks
        return torch.nonzero((self.coord >= lo) & (self.coord < hi)).squeeze(1)

    @torch.no_grad()
    def table_to_dense(self, t: TableSpec) -> Tensor:
        """Dense ``[N_t, D_t]`` image of table ``t`` (tests and export only)."""
        B = self.block_size
        dense = torch.zeros(t.num_rows * t.num_blocks, B, dtype=self.values.dtype,
                            device=self.values.device)
        s = self.table_slots(t)
        key = self.coord[s]
        row = torch.div(key, self.num_blocks, rounding_mode="floor")
        col = key - row * self.num_blocks
        dense[(row - t.row_start) * t.num_blocks + col] = self.values.detach()[s]
        return dense.view(t.num_rows, t.num_blocks * B)

    # ------------------------------------------------------------------ lookup
    def _lookup(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor], num_blocks: int,
                mode: str, padding_idx: Optional[int]) -> Tensor:
        """Run ``dsl::lookup`` on already-normalised, already-global indices."""
        if self.row_ptr is None:
            self.rebuild_index()
        m = MODES[mode]
        pad = -1 if padding_idx is None else padding_idx
        observed = bool(self.lookup_observers) and torch.is_grad_enabled()
        observer = self._hook_id if observed else -1
        backend = self.backend_for(indices.device.type)
        # Observers and a fused optimizer (dsl_kernels.fused) act in the op's backward through
        # opaque ops reached by id, which torch.compile traces without a Python side effect.
        fo = getattr(self, "fused_optimizer", None)
        if fo is not None and torch.is_grad_enabled():
            out, *_ = ops.fused_lookup(self.values, self.row_ptr, self.row_slots, self.row_mask,
                                       indices, offsets, psw, self.frozen, num_blocks, m, pad,
                                       backend, fo.with_plan(backend, self.values, m),
                                       fo.hook_id, observer)
            return out
        out, _ = ops.lookup(self.values, self.row_ptr, self.row_slots, self.row_mask, indices,
                            offsets, psw, self.frozen, num_blocks, m, pad, self.deterministic,
                            backend, observer)
        return out

    def notify_lookup(self, grad_out: Tensor, indices: Tensor, offsets: Tensor,
                      psw: Optional[Tensor], max_idx: Tensor, num_blocks: int, mode: int,
                      padding_idx: int) -> None:
        """Hand a lookup and its output gradient to every lookup observer (called from the
        backward of ``dsl::lookup`` through :func:`dsl_kernels.ops.hooks.observe_lookup`)."""
        rec = LookupRecord(indices, offsets, psw, max_idx, num_blocks, mode, padding_idx,
                           grad_out)
        for obs in self.lookup_observers:
            obs(self, rec)

    def __setstate__(self, state) -> None:
        # A copy (deepcopy, pickle) is another pool: it gets its own hook id.
        super().__setstate__(state)
        self._hook_id = hooks.register(self)

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        v, c = state_dict.get(prefix + "values"), state_dict.get(prefix + "coord")
        if v is not None and tuple(v.shape) != tuple(self.values.shape):
            raise ValueError(f"{prefix}values has shape {tuple(v.shape)} in the checkpoint but "
                             f"the module's pool is {tuple(self.values.shape)} (budget x "
                             f"block_size): build the module with the same sizes and density")
        if c is not None:
            if c.shape != self.coord.shape:
                raise ValueError(f"{prefix}coord has {c.numel()} slots in the checkpoint, the "
                                 f"module has {self.coord.numel()}")
            act = c[c >= 0]
            if act.numel() and int(act.max()) >= self.num_rows * self.num_blocks:
                raise ValueError(f"{prefix}coord names a block outside the table")
            if c.numel() and int(c.min()) < -1:
                raise ValueError(f"{prefix}coord holds values below -1")
            if act.unique().numel() != act.numel():
                raise ValueError(f"{prefix}coord names a block twice")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"budget={self.budget}, block_size={self.block_size}, "
                f"density={self.num_active_blocks / max(1, sum(t.num_rows * t.num_blocks for t in self.tables)):.4f}, "
                f"dtype={self.values.dtype}, backend={self.backend!r}")


def replace_data(p: nn.Parameter, new: Tensor) -> None:
    """``p.data = new`` with a different shape. Autograd caches the leaf's gradient accumulator
    (with the old shape) while any graph that used ``p`` is alive — e.g. the previous ``loss``
    still referenced by the training loop — and only drops it when ``.data`` changes dtype or
    device. Passing through another dtype forces that reset, so the next backward accumulates
    into the new shape instead of failing with "invalid gradient ... expected shape"."""
    other = torch.float64 if p.dtype != torch.float64 else torch.float32
    p.data = torch.empty(0, dtype=other, device=p.device)
    p.data = new


def dense_equivalent_bytes(num_rows: int, dim: int, dtype: torch.dtype) -> int:
    return num_rows * dim * torch.empty(0, dtype=dtype).element_size()
