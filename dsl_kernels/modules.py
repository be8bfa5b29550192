"""User-facing modules: drop-in sparse replacements for ``nn.EmbeddingBag`` / ``nn.Embedding``
and a table-batched collection sharing one slot pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .pool import BlockSparseBase, TableSpec, budget_for
from .format import MODES
from .validation import _compiling, check_config, normalize_bags

Init = Optional[Callable[[Tensor], object]]


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return mode


class SparseEmbeddingBag(BlockSparseBase):
    """``nn.EmbeddingBag`` whose weight is block-sparse at a fixed budget.

    The table is cut into blocks of ``block_size`` consecutive columns; only
    ``budget = round(density * N * D / block_size)`` blocks are stored, in ``values``
    (``[budget, block_size]``, the only Parameter). Inactive blocks read as zero. The forward
    equals ``F.embedding_bag(input, self.to_dense(), offsets, ...)`` and the gradient lands in
    the slots of the active blocks only, so any torch optimizer trains it at the budget.

    The initial mask gives every row the same number of blocks (floor or ceil of the mean), in
    its first columns (``mask_init="aligned"``, the default: rows always share their leading
    blocks, so dot products between them are not 0 from the start) or at random columns
    (``"random"``). ``dsl_kernels.sparsity.allocate_by_frequency_`` re-lays the mask by row
    frequency when those are known (the recipe of ``dsl-train``; see docs/RESULTS.md).

    Example::

        >>> import torch, dsl_kernels
        >>> emb = dsl_kernels.SparseEmbeddingBag(1000, 64, mode="sum", density=0.1)
        >>> out = emb(torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 3]))
        >>> out.shape, emb.budget
        (torch.Size([2, 64]), 800)
        >>> ref = torch.nn.functional.embedding_bag(torch.tensor([1, 2, 4, 5, 4, 3]),
        ...     emb.to_dense(), torch.tensor([0, 3]), mode="sum")
        >>> torch.allclose(out, ref, atol=1e-6)
        True
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean",
                 density: float = 0.1, block_size: int = 8, padding_idx: Optional[int] = None,
                 include_last_offset: bool = False, dtype: Optional[torch.dtype] = None,
                 device=None, init: Init = None, backend: str = "auto", validate: bool = True,
                 deterministic: bool = False, mask_init: str = "aligned",
                 _init_mask: bool = True):
        padding_idx = check_config(num_embeddings, embedding_dim, density, block_size, padding_idx)
        nb = embedding_dim // block_size
        spec = TableSpec("weight", 0, num_embeddings, nb, _check_mode(mode), padding_idx)
        budget = budget_for(num_embeddings, nb, density)
        super().__init__([spec], nb, block_size, budget, dtype, device, backend, validate,
                         deterministic)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.padding_idx = mode, padding_idx
        self.include_last_offset = include_last_offset
        self.target_density = float(density)
        if _init_mask:
            self._init_even([budget], init, mask_init)

    def forward(self, input: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        indices, offsets, psw = normalize_bags(input, offsets, per_sample_weights, self.mode,
                                               self.include_last_offset, self.num_embeddings,
                                               self.values.device, self.validate)
        return self._lookup(indices, offsets, psw, self.num_blocks, self.mode, self.padding_idx)

    def to_dense(self) -> Tensor:
        """The ``[N, D]`` dense image (for tests and export; training never calls it)."""
        return self.table_to_dense(self.tables[0])

    @classmethod
    def from_dense(cls, weight: Tensor, density: float, block_size: int = 8, mode: str = "mean",
                   **kw) -> "SparseEmbeddingBag":
        """Keep the ``round(density * N * D / block_size)`` blocks of ``weight`` with the largest
        L2 norm (ties: lower row, then lower column), values copied.

        >>> import torch, dsl_kernels
        >>> w = torch.randn(100, 16)
        >>> emb = dsl_kernels.SparseEmbeddingBag.from_dense(w, density=0.25, block_size=4)
        >>> emb.num_active_blocks
        100
        """
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [N, D], got shape {tuple(weight.shape)}")
        N, D = weight.shape
        kw.setdefault("dtype", weight.dtype)
        kw.setdefault("device", weight.device)
        mod = cls(N, D, mode=mode, density=density, block_size=block_size, _init_mask=False, **kw)
        mod._copy_largest_blocks(weight)
        return mod

    @torch.no_grad()
    def _copy_largest_blocks(self, weight: Tensor) -> None:
        N, D = weight.shape
        B, nb = self.block_size, self.num_blocks
        blocks = weight.reshape(N * nb, B)
        norms = blocks.float().norm(dim=1)
        if self.padding_idx is not None:
            norms.view(N, nb)[self.padding_idx] = -1.0  # padding row holds no blocks
        order = torch.sort(norms, descending=True, stable=True).indices[: self.budget]
        keys = torch.sort(order).values
        self.coord.copy_(keys)
        self.values.copy_(blocks[keys].to(self.values.dtype))
        self.rebuild_index()


class SparseEmbedding(SparseEmbeddingBag):
    """``nn.Embedding`` over the block-sparse pool: any input shape -> ``[..., D]``.

    >>> import torch, dsl_kernels
    >>> emb = dsl_kernels.SparseEmbedding(50, 8, density=0.5, block_size=2)
    >>> emb(torch.tensor([[1, 2], [3, 4]])).shape
    torch.Size([2, 2, 8])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, density: float = 0.1,
                 block_size: int = 8, padding_idx: Optional[int] = None, **kw):
        super().__init__(num_embeddings, embedding_dim, mode="sum", density=density,
                         block_size=block_size, padding_idx=padding_idx, **kw)

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        flat = input.reshape(-1)
        offsets = torch.arange(flat.numel(), dtype=flat.dtype if flat.dtype in
                               (torch.int32, torch.int64) else torch.int64, device=flat.device)
        out = super().forward(flat, offsets)
        return out.view(*input.shape, self.embedding_dim)

    @classmethod
    def from_dense(cls, weight: Tensor, density: float, block_size: int = 8,  # type: ignore[override]
                   **kw) -> "SparseEmbedding":
        weight = weight.detach()
        N, D = weight.shape
        kw.setdefault("dtype", weight.dtype)
        kw.setdefault("device", weight.device)
        mod = cls(N, D, density=density, block_size=block_size, _init_mask=False, **kw)
        mod._copy_largest_blocks(weight)
        return mod


@dataclass(frozen=True)
class TableConfig:
    """One table of a :class:`SparseEmbeddingBagCollection`."""

    name: str
    num_embeddings: int
    embedding_dim: int
    mode: str = "sum"
    density: Optional[float] = None  # None: the collection's density


BagInput = Union[Tensor, Tuple[Tensor, Optional[Tensor]], Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]


class SparseEmbeddingBagCollection(BlockSparseBase):
    """Several embedding-bag tables sharing ONE slot pool, looked up in one launch per group of
    tables with the same (embedding_dim, mode) — one launch when all tables agree, like FBGEMM's
    table-batched embeddings. Sharing the pool is what lets the sparsity engine move budget
    between tables.

    Input: a dict ``{name: (indices, offsets[, per_sample_weights])}`` (or ``{name: 2-D
    tensor}``), or the jagged layout torchrec uses: ``forward_jagged(keys, values, lengths)``
    (or any object with ``keys()``, ``values()``, ``lengths()`` such as a KeyedJaggedTensor).
    Output: a dict ``{name: [batch, D_t]}``, or with ``output="concat"`` one ``[batch, sum D_t]``
    tensor in table order.

    >>> import torch, dsl_kernels
    >>> ebc = dsl_kernels.SparseEmbeddingBagCollection(
    ...     [dsl_kernels.TableConfig("user", 100, 16), dsl_kernels.TableConfig("item", 500, 16)],
    ...     density=0.2, block_size=4)
    >>> out = ebc({"user": (torch.tensor([1, 2, 3]), torch.tensor([0, 1])),
    ...            "item": (torch.tensor([7, 8]), torch.tensor([0, 2]))})
    >>> out["user"].shape, out["item"].shape
    (torch.Size([2, 16]), torch.Size([2, 16]))
    """

    def __init__(self, tables: Sequence[Union[TableConfig, Mapping]], density: float = 0.1,
                 block_size: int = 8, dtype: Optional[torch.dtype] = None, device=None,
                 init: Init = None, backend: str = "auto", validate: bool = True,
                 deterministic: bool = False, output: str = "dict", mask_init: str = "aligned"):
        cfgs = [t if isinstance(t, TableConfig) else TableConfig(**t) for t in tables]
        if not cfgs:
            raise ValueError("tables must name at least one table")
        names = [c.name for c in cfgs]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        if output not in ("dict", "concat"):
            raise ValueError(f"output must be 'dict' or 'concat', got {output!r}")
        specs, counts, start = [], [], 0
        for c in cfgs:
            d = density if c.density is None else c.density
            check_config(c.num_embeddings, c.embedding_dim, d, block_size, None)
            nb = c.embedding_dim // block_size
            specs.append(TableSpec(c.name, start, c.num_embeddings, nb, _check_mode(c.mode), None))
            counts.append(budget_for(c.num_embeddings, nb, d))
            start += c.num_embeddings
        super().__init__(specs, max(s.num_blocks for s in specs), block_size, sum(counts), dtype,
                         device, backend, validate, deterministic)
        self.configs = cfgs
        self.output = output
        self._init_even(counts, init, mask_init)

    @classmethod
    def from_torchrec(cls, tables, density=0.1, block_size: int = 8, **kw):
        """A collection built from torchrec ``EmbeddingBagConfig`` tables whose forward takes a
        ``KeyedJaggedTensor`` and returns a ``KeyedTensor`` (several features per table); needs
        the ``[torchrec]`` extra. See :class:`dsl_kernels.torchrec.TorchrecSparseEmbeddingBagCollection`.
        """
        from .torchrec import from_torchrec  # optional dependency: imported on use only

        return from_torchrec(tables, density=density, block_size=block_size, **kw)

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table named {name!r}; tables: {[t.name for t in self.tables]}")

    def to_dense(self, name: str) -> Tensor:
        """Dense image ``[N_t, D_t]`` of one table (tests and export only)."""
        return self.table_to_dense(self.table(name))

    def table_density(self) -> Dict[str, float]:
        """Share of each table's blocks that is active now (moves under global redistribution)."""
        out = {}
        for t in self.tables:
            out[t.name] = self.table_slots(t).numel() / (t.num_rows * t.num_blocks)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, features) -> Union[Dict[str, Tensor], Tensor]:
        if hasattr(features, "keys") and hasattr(features, "lengths") and callable(features.lengths):
            return self.forward_jagged(list(features.keys()), features.values(), features.lengths(),
                                       features.weights_or_none()
                                       if hasattr(features, "weights_or_none") else None)
        if not isinstance(features, Mapping):
            raise TypeError("features must be a dict {table: (indices, offsets)} or a jagged "
                            f"batch with keys()/values()/lengths(), got {type(features).__name__}")
        unknown = set(features) - {t.name for t in self.tables}
        if unknown:
            raise KeyError(f"features name unknown tables {sorted(unknown)}; tables: "
                           f"{[t.name for t in self.tables]}")
        return self._forward_tables({k: self._as_triplet(k, v) for k, v in features.items()})

    def forward_jagged(self, keys: Sequence[str], values: Tensor, lengths: Tensor,
                       weights: Optional[Tensor] = None) -> Union[Dict[str, Tensor], Tensor]:
        """torchrec's KeyedJaggedTensor layout: ``lengths`` is ``[len(keys) * batch]``, key-major;
        ``values`` holds the indices of all bags in that order.

        The flat layout is looked up as it is (FBGEMM's table-batched offsets): one CSR over all
        bags, global row ids from a per-key row offset; tables of another (dim, mode) group are
        masked as padding instead of being cut out, so with ``validate=False`` nothing is read
        back from the device."""
        keys = list(keys)
        unknown = [k for k in keys if k not in {t.name for t in self.tables}]
        if unknown:
            raise KeyError(f"keys name unknown tables {unknown}; tables: "
                           f"{[t.name for t in self.tables]}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must be unique, got {keys}")
        K = max(1, len(keys))
        if lengths.dim() != 1 or lengths.numel() % K:
            raise ValueError(f"lengths has {lengths.numel()} entries, not a multiple of "
                             f"len(keys)={len(keys)}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
        if values.dim() != 1 or values.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"values must be 1-D int32 or int64, got {values.dtype} "
                            f"{tuple(values.shape)}")
        if weights is not None and any(self.table(k).mode != "sum" for k in keys):
            raise ValueError("weights (per-sample weights) are only supported for mode='sum' "
                             "tables")
        if weights is not None and weights.shape != values.shape:
            raise ValueError(f"weights must have the shape of values {tuple(values.shape)}, got "
                             f"{tuple(weights.shape)}")
        dev = self.values.device
        for name, t in (("values", values), ("lengths", lengths), ("weights", weights)):
            if t is not None and t.device.type != dev.type:
                raise ValueError(f"{name} is on {t.device} but the pool is on {dev}")
        batch = lengths.numel() // K
        tables = [self.table(k) for k in keys]
        L = values.numel()
        per_key = lengths.view(K, batch).sum(1) if keys else lengths.new_zeros(0)
        check = self.validate and not _compiling()
        if check:
            if lengths.numel() and bool((lengths < 0).any()):
                raise ValueError("lengths must be non-negative")
            total = int(per_key.sum()) if keys else 0
            if total != L:
                raise ValueError(f"lengths sum to {total} but values has {L} entries")
        key_of = torch.repeat_interleave(torch.arange(len(keys), device=dev), per_key,
                                         output_size=L)
        if check:
            limit = torch.tensor([t.num_rows for t in tables], device=dev)[key_of]
            bad = (values < 0) | (values >= limit)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0, 0])
                raise IndexError(f"table {keys[int(key_of[i])]!r}: values[{i}] = "
                                 f"{int(values[i])} is out of range for its "
                                 f"{int(limit[i])} rows")
            if weights is not None and not weights.is_floating_point():
                raise TypeError(f"weights must be floating point, got {weights.dtype}")
        starts = self._constant(("row_start", tuple(keys)), [t.row_start for t in tables],
                                torch.int64, dev)
        rows = values.long() + starts[key_of]
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=dev)
        torch.cumsum(lengths, 0, out=offsets[1:])
        groups: Dict[Tuple[int, str], List[int]] = {}
        for i, t in enumerate(tables):
            groups.setdefault((t.num_blocks, t.mode), []).append(i)
        outs: Dict[str, Tensor] = {}
        for (nb, mode), members in groups.items():
            if len(members) == len(keys):
                grows, pad = rows, None
            else:
                # Entries of the other groups' keys become padding: a row of one of their
                # tables, which this group's entries never name.
                pad = tables[next(i for i in range(len(keys)) if i not in members)].row_start
                mine = self._constant(("members", tuple(keys), tuple(members)),
                                      [i in members for i in range(len(keys))], torch.bool, dev)
                grows = torch.where(mine[key_of], rows, torch.full_like(rows, pad))
            out = self._lookup(grows, offsets, weights, nb, mode, pad)
            pieces = out.split(batch) if batch else [out] * len(keys)
            for i in members:
                outs[keys[i]] = pieces[i]
        if self.output == "concat":
            return torch.cat([outs[t.name] for t in self.tables if t.name in outs], dim=1)
        return outs

    def _constant(self, key, data, dtype: torch.dtype, dev: torch.device) -> Tensor:
        """A small constant tensor on ``dev``, built once per key: ``torch.tensor(data,
        device="cuda")`` on every call would be a host-to-device copy, which synchronises and
        cannot be captured in a CUDA graph."""
        cache = self.__dict__.setdefault("_constants", {})
        k = (key, dtype, str(dev))
        t = cache.get(k)
        if t is None:
            t = cache[k] = torch.tensor(data, dtype=dtype, device=dev)
        return t

    def _as_triplet(self, name, v):
        if isinstance(v, Tensor):
            return (v, None, None)
        if isinstance(v, (tuple, list)) and 1 <= len(v) <= 3:
            v = tuple(v) + (None,) * (3 - len(v))
            return (v[0], v[1], v[2])
        raise TypeError(f"features[{name!r}] must be a tensor or (indices, offsets[, weights])")

    def _forward_tables(self, feats) -> Union[Dict[str, Tensor], Tensor]:
        # Normalise and validate every table first: nothing runs unless all inputs are good.
        norm: Dict[str, Tuple[Tensor, Tensor, Optional[Tensor]]] = {}
        for t in self.tables:
            if t.name not in feats:
                continue
            inp, off, w = feats[t.name]
            try:
                i, o, p = normalize_bags(inp, off, w, t.mode, False, t.num_rows,
                                         self.values.device, self.validate)
            except (ValueError, IndexError, TypeError) as e:
                raise type(e)(f"table {t.name!r}: {e}") from None
            norm[t.name] = (i, o, p)
        groups: Dict[Tuple[int, str], List[TableSpec]] = {}
        for t in self.tables:
            if t.name in norm:
                groups.setdefault((t.num_blocks, t.mode), []).append(t)
        outs: Dict[str, Tensor] = {}
        for (nb, mode), ts in groups.items():
            idx, offs, psws, sizes, base = [], [], [], [], 0
            any_w = any(norm[t.name][2] is not None for t in ts)
            for t in ts:
                i, o, p = norm[t.name]
                n = int(o.shape[0]) - 1
                idx.append(i.to(torch.int64) + t.row_start)
                offs.append(o[:-1].to(torch.int64) + base if n else o[:0].to(torch.int64))
                base += i.numel()
                if any_w:
                    psws.append(p if p is not None else torch.ones(i.numel(), device=i.device,
                                                                   dtype=self.values.dtype))
                sizes.append(n)
            offs.append(torch.full((1,), base, dtype=torch.int64, device=self.values.device))
            out = self._lookup(torch.cat(idx), torch.cat(offs), torch.cat(psws) if any_w else None,
                               nb, mode, None)
            for t, piece in zip(ts, torch.split(out, sizes)):
                outs[t.name] = piece
        if self.output == "concat":
            return torch.cat([outs[t.name] for t in self.tables if t.name in outs], dim=1)
        return outs
