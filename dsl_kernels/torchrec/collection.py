"""torchrec's interface on the shared slot pool: ``EmbeddingBagConfig`` tables in,
``KeyedJaggedTensor`` in, ``KeyedTensor`` out."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ..modules import SparseEmbeddingBagCollection, TableConfig

_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}
_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16,
           DataType.BF16: torch.bfloat16}


class TorchrecSparseEmbeddingBagCollection(SparseEmbeddingBagCollection):
    """A :class:`~dsl_kernels.SparseEmbeddingBagCollection` that takes torchrec's tables and
    batches: several features per table (``EmbeddingBagConfig.feature_names``), a
    ``KeyedJaggedTensor`` in, a ``KeyedTensor`` keyed by feature out (keys in table order, then
    feature order, like ``torchrec.EmbeddingBagCollection``). All tables share one slot pool.
    Build it with :meth:`SparseEmbeddingBagCollection.from_torchrec`; shard it with
    :class:`~dsl_kernels.torchrec.SparseEmbeddingBagCollectionSharder`.

    ``density`` is one float or ``{table name: density}``. Pooling SUM and MEAN are supported.

    >>> import torch, dsl_kernels
    >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    >>> tables = [EmbeddingBagConfig(name="t0", num_embeddings=100, embedding_dim=16,
    ...                              feature_names=["f0", "f1"])]
    >>> ebc = dsl_kernels.SparseEmbeddingBagCollection.from_torchrec(tables, density=0.25,
    ...                                                              block_size=4)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.tensor([1, 2, 3, 4]),
    ...                                           torch.tensor([2, 0, 1, 1]))
    >>> kt = ebc(kjt)
    >>> kt.keys(), kt.values().shape
    (['f0', 'f1'], torch.Size([2, 32]))
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig],
                 density: Union[float, Mapping[str, float]] = 0.1, block_size: int = 8, **kw):
        tables = list(tables)
        if not tables:
            raise ValueError("tables must hold at least one EmbeddingBagConfig")
        seen: Dict[str, str] = {}
        for t in tables:
            if not isinstance(t, EmbeddingBagConfig):
                raise TypeError(f"tables must be torchrec EmbeddingBagConfig, got "
                                f"{type(t).__name__}")
            if t.pooling not in _MODES:
                raise ValueError(f"table {t.name!r}: pooling must be SUM or MEAN, got "
                                 f"{t.pooling}")
            if not t.feature_names:
                raise ValueError(f"table {t.name!r}: feature_names is empty")
            for f in t.feature_names:
                if f in seen:
                    raise ValueError(f"feature {f!r} is named by tables {seen[f]!r} and "
                                     f"{t.name!r}")
                seen[f] = t.name
        if isinstance(density, Mapping):
            unknown = set(density) - {t.name for t in tables}
            if unknown:
                raise KeyError(f"density names unknown tables {sorted(unknown)}")
            missing = [t.name for t in tables if t.name not in density]
            if missing:
                raise ValueError(f"density has no entry for tables {missing}")
            dens = {t.name: float(density[t.name]) for t in tables}
        else:
            dens = {t.name: float(density) for t in tables}
        dtypes = {_DTYPES.get(t.data_type) for t in tables}
        if None in dtypes or len(dtypes) != 1:
            raise ValueError(f"all tables must share one data_type of FP32/FP16/BF16, got "
                             f"{sorted({str(t.data_type) for t in tables})}")
        kw.setdefault("dtype", dtypes.pop())
        kw.pop("output", None)
        super().__init__([TableConfig(t.name, t.num_embeddings, t.embedding_dim,
                                      _MODES[t.pooling], dens[t.name]) for t in tables],
                         density=min(dens.values()), block_size=block_size, **kw)
        self._embedding_bag_configs = tables
        self.table_densities = dens
        self.feature_names: List[str] = [f for t in tables for f in t.feature_names]
        self.feature_dims: List[int] = [t.embedding_dim for t in tables for _ in t.feature_names]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The torchrec tables this collection was built from (as torchrec's EBC names it)."""
        return self._embedding_bag_configs

    def forward(self, features):  # type: ignore[override]
        """A ``KeyedJaggedTensor`` -> ``KeyedTensor``; anything else as
        :meth:`SparseEmbeddingBagCollection.forward` (a dict per table)."""
        if isinstance(features, KeyedJaggedTensor):
            return self.forward_kjt(features)
        return super().forward(features)

    def forward_kjt(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        missing = [f for f in self.feature_names if f not in kjt.keys()]
        if missing:
            raise KeyError(f"the KeyedJaggedTensor lacks features {missing}; it has "
                           f"{kjt.keys()}")
        out = lookup_features(self, kjt, [(t.name, t.feature_names, t.embedding_dim)
                                          for t in self._embedding_bag_configs])
        return KeyedTensor(keys=list(self.feature_names), length_per_key=list(self.feature_dims),
                           values=out)


def lookup_features(pool: SparseEmbeddingBagCollection, kjt: KeyedJaggedTensor,
                    tables: Sequence[Tuple[Optional[str], Sequence[str], int]]) -> Tensor:
    """Pooled ``[batch, sum of dims]`` of ``kjt``'s features through ``pool``: ``tables`` lists
    ``(pool table name, feature names, dim)``; the features of one table are looked up as one
    batch of bags (one launch per (dim, mode) group for all tables). Columns: feature after
    feature in ``tables`` order. A table named None (a shard without rows) pools to zeros."""
    jt = kjt.to_dict()
    batch = kjt.stride()
    feats = {}
    for name, fnames, _ in tables:
        if name is None:
            continue
        parts = [jt[f] for f in fnames]
        idx = torch.cat([p.values() for p in parts])
        lengths = torch.cat([p.lengths() for p in parts])
        offsets = torch.zeros(lengths.numel(), dtype=torch.int64, device=idx.device)
        if lengths.numel() > 1:
            offsets[1:] = torch.cumsum(lengths[:-1].to(torch.int64), 0)
        w = [p.weights_or_none() for p in parts]
        feats[name] = (idx, offsets, None if w[0] is None else torch.cat(w))
    pooled = SparseEmbeddingBagCollection.forward(pool, feats) if feats else {}
    cols = []
    for name, fnames, dim in tables:
        f = len(fnames)
        if name is None:
            cols.append(pool.values.new_zeros(batch, f * dim))
            continue
        # [F * batch, D] feature-major -> [batch, F * D], features side by side
        cols.append(pooled[name].view(f, batch, dim).transpose(0, 1).reshape(batch, f * dim))
    if not cols:
        return pool.values.new_zeros(batch, 0)
    return torch.cat(cols, dim=1)


def from_torchrec(tables: Sequence[EmbeddingBagConfig],
                  density: Union[float, Mapping[str, float]] = 0.1, block_size: int = 8,
                  **kw) -> TorchrecSparseEmbeddingBagCollection:
    """See :meth:`dsl_kernels.SparseEmbeddingBagCollection.from_torchrec`."""
    return TorchrecSparseEmbeddingBagCollection(tables, density=density, block_size=block_size,
                                                **kw)
