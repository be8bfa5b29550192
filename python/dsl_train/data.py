"""Data for the trainer: real-file loaders and synthetic generators.

Everything is read from a path given by the user (nothing is downloaded) and returned as plain
int64/float32 tensors on the CPU; the loop moves batches to the device.

* :func:`load_lightgcn` - LightGCN/NGCF text split (``train.txt``/``test.txt``, optionally
  ``.gz``: one line per user, ``user item item ...``), e.g. Gowalla.
* :func:`load_inter` - RecBole atomic ``.inter`` file (tab separated, typed header), turned into a
  time-ordered event stream (:class:`EventStream`) that :func:`stream_windows` cuts into windows.
* :func:`load_criteo` - Criteo-style CTR rows (label, 13 integer, 26 categorical; CSV with a
  header or headerless TSV; empty field = missing), categorical values hashed per feature.
* :func:`synthetic_implicit` / :func:`synthetic_stream` / :func:`synthetic_ctr` - the embedded
  defaults: implicit feedback from latent factors with Zipf item popularity (optionally drifting
  over time) and a CTR stream with Zipf-skewed categorical features.

A malformed file raises :class:`DataError` naming the file and the line.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A data file that cannot be read; the message names the file and the line."""


# ----------------------------------------------------------------------------- containers


@dataclass
class InteractionData:
    """Implicit feedback split into train and test interactions (ids are 0-based, contiguous).

    ``train_users``/``train_items`` are parallel int64 tensors (one entry per interaction);
    likewise ``test_users``/``test_items``.
    """

    name: str
    num_users: int
    num_items: int
    train_users: Tensor
    train_items: Tensor
    test_users: Tensor
    test_items: Tensor
    # Validation split carved out of train (:meth:`with_validation`); None when there is none.
    val_users: Optional[Tensor] = None
    val_items: Optional[Tensor] = None

    def with_validation(self, fraction: float, seed: int = 0) -> "InteractionData":
        """A copy whose train split gives ``fraction`` of every user's items to a validation
        split (:func:`dsl_train.protocol.carve_validation`); test is untouched."""
        from .protocol import carve_validation

        tu, ti, vu, vi = carve_validation(self.train_users, self.train_items, fraction, seed)
        return InteractionData(self.name, self.num_users, self.num_items, tu, ti,
                               self.test_users, self.test_items, vu, vi)

    @property
    def num_train(self) -> int:
        return int(self.train_users.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_users.numel())

    def summary(self) -> str:
        val = "" if self.val_users is None else f" / {self.val_users.numel():,} validation"
        return (f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, "
                f"{self.num_train:,} train{val} / {self.num_test:,} test interactions")


@dataclass
class EventStream:
    """Interactions in time order: parallel ``users``, ``items`` (int64) and ``times`` (float64)."""

    name: str
    num_users: int
    num_items: int
    users: Tensor
    items: Tensor
    times: Tensor

    def __len__(self) -> int:
        return int(self.users.numel())


@dataclass
class CTRData:
    """CTR rows: ``dense`` float32 [n, F_dense], ``sparse`` int64 [n, F_cat] (already hashed into
    ``[0, table_sizes[j])``; 0 is the "missing" bucket), ``labels`` float32 [n]."""

    name: str
    dense: Tensor
    sparse: Tensor
    labels: Tensor
    table_sizes: List[int]
    feature_names: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def split(self, test_fraction: float = 0.2) -> Tuple["CTRData", "CTRData"]:
        """Time-ordered split: the first rows train, the last ``test_fraction`` test."""
        n = len(self)
        cut = max(1, min(n - 1, int(round(n * (1 - test_fraction))))) if n > 1 else n
        mk = lambda sl: CTRData(self.name, self.dense[sl], self.sparse[sl], self.labels[sl],
                                self.table_sizes, self.feature_names)
        return mk(slice(0, cut)), mk(slice(cut, n))


# ----------------------------------------------------------------------------- file helpers


def _open_text(path: str):
    """Open ``path`` as text, transparently gunzipping ``.gz`` files."""
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _find(folder: str, stem: str) -> Optional[str]:
    for cand in (stem, stem + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


# ----------------------------------------------------------------------------- LightGCN text


def _read_user_lists(path: str) -> Tuple[np.ndarray, np.ndarray]:
    users: List[np.ndarray] = []
    items: List[np.ndarray] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            toks = line.split()
            if not toks:
                continue
            try:
                ids = np.array([int(t) for t in toks], dtype=np.int64)
            except ValueError:
                bad = next(t for t in toks if not t.lstrip("-").isdigit())
                raise DataError(f"{path}, line {lineno}: expected integer ids 'user item item "
                                f"...', found {bad!r}") from None
            if (ids < 0).any():
                raise DataError(f"{path}, line {lineno}: ids must be non-negative, found "
                                f"{int(ids[ids < 0][0])}")
            its = ids[1:]
            users.append(np.full(its.shape[0], ids[0], dtype=np.int64))
            items.append(its)
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def load_lightgcn(path: str, name: Optional[str] = None) -> InteractionData:
    """Load a LightGCN-format split from a folder holding ``train.txt[.gz]`` and
    ``test.txt[.gz]`` (one line per user: ``user item item ...``, 0-based ids).

    Duplicate (user, item) pairs are kept once. Users and items are counted from the largest
    id seen in either file.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "train.txt"), "w").write("0 0 1\\n1 2\\n")
    >>> _ = open(os.path.join(d, "test.txt"), "w").write("0 2\\n1 0\\n")
    >>> load_lightgcn(d).summary()
    '...: 2 users, 3 items, 3 train / 2 test interactions'
    """
    if os.path.isfile(path):
        folder = os.path.dirname(path) or "."
    elif os.path.isdir(path):
        folder = path
    else:
        raise DataError(f"--data {path!r}: no such file or folder")
    train = _find(folder, "train.txt")
    test = _find(folder, "test.txt")
    if train is None or test is None:
        raise DataError(f"{folder}: a LightGCN split needs train.txt[.gz] and test.txt[.gz] "
                        f"(found: {sorted(os.listdir(folder))})")
    tu, ti = _read_user_lists(train)
    su, si = _read_user_lists(test)
    if tu.size == 0:
        raise DataError(f"{train}: no interactions")
    nu = int(max(tu.max(initial=-1), su.max(initial=-1))) + 1
    ni = int(max(ti.max(initial=-1), si.max(initial=-1))) + 1
    tu, ti = _dedup(tu, ti, ni)
    su, si = _dedup(su, si, ni)
    return InteractionData(name or os.path.basename(os.path.normpath(folder)), nu, ni,
                           torch.from_numpy(tu), torch.from_numpy(ti),
                           torch.from_numpy(su), torch.from_numpy(si))


def _dedup(u: np.ndarray, i: np.ndarray, num_items: int) -> Tuple[np.ndarray, np.ndarray]:
    if u.size == 0:
        return u, i
    key = np.unique(u * max(1, num_items) + i)
    return key // max(1, num_items), key % max(1, num_items)


# ----------------------------------------------------------------------------- RecBole .inter


def load_inter(path: str, name: Optional[str] = None) -> EventStream:
    """Load a RecBole atomic ``.inter`` file (tab-separated, header ``field:type ...``) as a
    time-ordered stream. Needs ``user_id`` and ``item_id`` columns; ``timestamp`` orders the
    events (file order when absent). Tokens are mapped to contiguous ids in order of first
    appearance in time.

    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "x.inter")
    >>> _ = open(p, "w").write("user_id:token\\titem_id:token\\ttimestamp:float\\n"
    ...                        "a\\tx\\t2\\nb\\ty\\t1\\n")
    >>> s = load_inter(p); (len(s), s.users.tolist(), s.items.tolist())
    (2, [0, 1], [0, 1])
    """
    if os.path.isdir(path):
        cands = sorted(f for f in os.listdir(path) if f.endswith((".inter", ".inter.gz")))
        if not cands:
            raise DataError(f"{path}: no .inter or .inter.gz file in this folder")
        path = os.path.join(path, cands[0])
    if not os.path.isfile(path):
        raise DataError(f"--data {path!r}: no such file or folder")
    users, items, times = [], [], []
    with _open_text(path) as f:
        header = f.readline().rstrip("\n\r")
        if not header:
            raise DataError(f"{path}, line 1: empty file (expected a header like "
                            f"'user_id:token<TAB>item_id:token<TAB>timestamp:float')")
        cols = [c.split(":")[0].strip() for c in header.split("\t")]
        try:
            cu, ci = cols.index("user_id"), cols.index("item_id")
        except ValueError:
            raise DataError(f"{path}, line 1: header {header!r} must name user_id and item_id "
                            f"columns") from None
        ct = cols.index("timestamp") if "timestamp" in cols else None
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != len(cols):
                raise DataError(f"{path}, line {lineno}: {len(parts)} tab-separated fields, the "
                                f"header has {len(cols)}")
            users.append(parts[cu])
            items.append(parts[ci])
            if ct is not None:
                try:
                    times.append(float(parts[ct]))
                except ValueError:
                    raise DataError(f"{path}, line {lineno}: timestamp {parts[ct]!r} is not a "
                                    f"number") from None
            else:
                times.append(float(lineno))
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    umap: Dict[str, int] = {}
    imap: Dict[str, int] = {}
    uid = np.fromiter((umap.setdefault(users[k], len(umap)) for k in order), np.int64, len(order))
    iid = np.fromiter((imap.setdefault(items[k], len(imap)) for k in order), np.int64, len(order))
    return EventStream(name or os.path.basename(path).split(".")[0], len(umap), len(imap),
                       torch.from_numpy(uid), torch.from_numpy(iid), torch.from_numpy(t[order]))


def stream_windows(stream: EventStream, num_windows: int) -> List[Tuple[Tensor, Tensor]]:
    """Cut a time-ordered stream into ``num_windows`` consecutive windows of (nearly) equal event
    counts; returns ``[(users, items), ...]``.

    >>> s = EventStream("s", 2, 2, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]),
    ...                 torch.arange(4.))
    >>> [u.tolist() for u, _ in stream_windows(s, 2)]
    [[0, 1], [0, 1]]
    """
    if num_windows < 2:
        raise ValueError(f"num_windows must be >= 2 for prequential evaluation, got {num_windows}")
    n = len(stream)
    if n < num_windows:
        raise DataError(f"{stream.name}: {n} events cannot fill {num_windows} windows")
    cuts = [round(k * n / num_windows) for k in range(num_windows + 1)]
    return [(stream.users[a:b], stream.items[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


# ----------------------------------------------------------------------------- Criteo CTR

CRITEO_DENSE = 13
CRITEO_CAT = 26


def _hash_token(tok: str, feature: int, size: int) -> int:
    """Bucket in ``[1, size)`` of a categorical value (0 is the missing bucket); stable across
    runs and machines (crc32, not Python's salted ``hash``)."""
    return 1 + zlib.crc32(f"{feature}:{tok}".encode()) % (size - 1)


def load_criteo(path: str, hash_size: int = 100_000, max_rows: Optional[int] = None,
                name: Optional[str] = None) -> CTRData:
    """Load Criteo-style rows: ``label, I1..I13, C1..C26`` as CSV with a header (the sample in
    ``../shared/data/criteo-sample``) or the original headerless TSV. Integer features become
    ``log(1 + max(x, 0))`` (missing -> 0); each categorical feature gets its own table: one row
    per distinct value when they fit in ``hash_size`` rows, else values are hashed (crc32) into
    ``hash_size`` rows; row 0 means "missing".

    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "c.tsv")
    >>> _ = open(p, "w").write("1\\t" + "\\t".join(["3"] * 13 + ["ab"] * 26) + "\\n")
    >>> d = load_criteo(p, hash_size=16); (len(d), d.dense.shape, d.sparse.shape)
    (1, torch.Size([1, 13]), torch.Size([1, 26]))
    """
    if os.path.isdir(path):
        cands = sorted(f for f in os.listdir(path)
                       if f.endswith((".txt", ".csv", ".tsv", ".txt.gz", ".csv.gz", ".tsv.gz")))
        if not cands:
            raise DataError(f"{path}: no .txt/.csv/.tsv file in this folder")
        path = os.path.join(path, cands[0])
    if not os.path.isfile(path):
        raise DataError(f"--data {path!r}: no such file or folder")
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")
    ncol = 1 + CRITEO_DENSE + CRITEO_CAT
    labels: List[float] = []
    dense: List[List[float]] = []
    cats: List[List[str]] = []
    with _open_text(path) as f:
        first = f.readline()
        if not first.strip():
            raise DataError(f"{path}, line 1: empty file")
        sep = "\t" if first.count("\t") >= first.count(",") else ","
        header = first.strip().split(sep)
        names = ([f"C{j + 1}" for j in range(CRITEO_CAT)])
        lines: Iterator[Tuple[int, str]]
        if header and header[0].strip().lower() == "label":
            if len(header) != ncol:
                raise DataError(f"{path}, line 1: header has {len(header)} columns, expected "
                                f"{ncol} (label, I1..I13, C1..C26)")
            names = [h.strip() for h in header[1 + CRITEO_DENSE:]]
            lines = enumerate(f, 2)
        else:
            lines = iter([(1, first)] + list(enumerate(f, 2)))
        for lineno, line in lines:
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) != ncol:
                raise DataError(f"{path}, line {lineno}: {len(parts)} fields, expected {ncol} "
                                f"(label, 13 integer, 26 categorical; separator {sep!r})")
            try:
                lab = float(parts[0])
                if lab not in (0.0, 1.0):
                    raise ValueError
                row = [math.log1p(max(float(x), 0.0)) if x.strip() else 0.0
                       for x in parts[1:1 + CRITEO_DENSE]]
            except ValueError:
                bad = [x for x in parts[:1 + CRITEO_DENSE] if x.strip()]
                raise DataError(f"{path}, line {lineno}: label must be 0/1 and I1..I13 numbers "
                                f"or empty (fields: {bad[:4]}...)") from None
            labels.append(lab)
            dense.append(row)
            cats.append(parts[1 + CRITEO_DENSE:])
            if max_rows is not None and len(labels) >= max_rows:
                break
    if not labels:
        raise DataError(f"{path}: no data rows")
    n = len(labels)
    sizes, sparse = [], np.zeros((n, CRITEO_CAT), dtype=np.int64)
    for j in range(CRITEO_CAT):
        col = [r[j].strip() for r in cats]
        vocab = sorted(set(c for c in col if c))
        if len(vocab) + 1 <= hash_size:  # small vocabulary: one row per value, no collisions
            ids = {v: i + 1 for i, v in enumerate(vocab)}
            sizes.append(len(vocab) + 1)
            sparse[:, j] = [ids[c] if c else 0 for c in col]
        else:  # large vocabulary: hashing trick into hash_size rows
            sizes.append(hash_size)
            sparse[:, j] = [_hash_token(c, j, hash_size) if c else 0 for c in col]
    return CTRData(name or os.path.basename(path).split(".")[0],
                   torch.tensor(dense, dtype=torch.float32), torch.from_numpy(sparse),
                   torch.tensor(labels, dtype=torch.float32), sizes, names)


# ----------------------------------------------------------------------------- synthetic


def _zipf_probs(n: int, a: float, gen: torch.Generator) -> Tensor:
    """Zipf(a) probabilities over ``n`` ids in a random order (popular ids are not id 0)."""
    p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64).pow(a)
    p = p / p.sum()
    return p[torch.randperm(n, generator=gen)]


def synthetic_stream(num_users: int = 1500, num_items: int = 1000, num_windows: int = 6,
                     per_user: int = 12, rank: int = 8, zipf: float = 1.0, drift: float = 0.0,
                     temperature: float = 0.35, seed: int = 0) -> EventStream:
    """Implicit feedback drawn from latent factors with Zipf item popularity, ``per_user``
    interactions per user per window. ``drift`` in [0, 1] moves user tastes and item popularity
    between windows (0 = stationary): user factors are mixed with fresh noise, and a ``drift``
    share of the item popularity ranks is reshuffled. Times are window ids.

    >>> s = synthetic_stream(50, 40, num_windows=2, per_user=3)
    >>> len(s), s.num_users, s.num_items
    (300, 50, 40)
    """
    if num_users < 1 or num_items < 2 or per_user < 1 or num_windows < 1:
        raise ValueError("synthetic_stream needs num_users >= 1, num_items >= 2, per_user >= 1, "
                         "num_windows >= 1")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be in [0, 1], got {drift}")
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(num_users, rank, generator=g)
    V = torch.randn(num_items, rank, generator=g)
    logpop = _zipf_probs(num_items, zipf, g).log().float()
    per_user = min(per_user, num_items)
    us, its, ts = [], [], []
    for w in range(num_windows):
        if w and drift > 0:
            U = math.sqrt(1 - drift) * U + math.sqrt(drift) * torch.randn(U.shape, generator=g)
            k = int(round(drift * num_items))
            if k > 1:
                sel = torch.randperm(num_items, generator=g)[:k]
                logpop[sel] = logpop[sel[torch.randperm(k, generator=g)]]
        for lo in range(0, num_users, 1024):  # batched: never users x items at once
            hi = min(num_users, lo + 1024)
            logits = (U[lo:hi] @ V.T) / (temperature * math.sqrt(rank)) + logpop
            # Gumbel top-k = sampling without replacement proportional to softmax(logits).
            gum = -torch.log(-torch.log(torch.rand(logits.shape, generator=g).clamp_min(1e-12)))
            top = torch.topk(logits + gum, per_user, dim=1).indices
            us.append(torch.arange(lo, hi).repeat_interleave(per_user))
            its.append(top.reshape(-1))
            ts.append(torch.full((top.numel(),), float(w), dtype=torch.float64))
    users, items, times = torch.cat(us), torch.cat(its), torch.cat(ts)
    perm = torch.randperm(users.numel(), generator=g)
    order = torch.sort(times[perm], stable=True).indices  # time order, shuffled within a window
    perm = perm[order]
    return EventStream("synthetic-drift" if drift else "synthetic", num_users, num_items,
                       users[perm], items[perm], times[perm])


def synthetic_implicit(num_users: int = 1500, num_items: int = 1000, per_user: int = 30,
                       rank: int = 8, zipf: float = 1.0, test_fraction: float = 0.2,
                       seed: int = 0) -> InteractionData:
    """Stationary synthetic implicit feedback split per user into train and test (a random
    ``test_fraction`` of each user's interactions).

    >>> d = synthetic_implicit(30, 20, per_user=5)
    >>> d.num_train + d.num_test
    150
    """
    s = synthetic_stream(num_users, num_items, num_windows=1, per_user=per_user, rank=rank,
                         zipf=zipf, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    test = torch.rand(len(s), generator=g) < test_fraction
    return InteractionData("synthetic", num_users, num_items, s.users[~test], s.items[~test],
                           s.users[test], s.items[test])


def synthetic_ctr(num_rows: int = 20_000, num_features: int = 8, cardinality: int = 5000,
                  num_dense: int = 4, zipf: float = 1.2, seed: int = 0) -> CTRData:
    """A CTR stream with Zipf-skewed categorical features (a few hot values dominate, as in
    production click logs): the label is Bernoulli of a logistic model with a hidden weight per
    categorical value plus a dense term. Bucket 0 is never used (kept as "missing").

    >>> d = synthetic_ctr(100, num_features=3, cardinality=50)
    >>> d.sparse.shape, d.table_sizes
    (torch.Size([100, 3]), [51, 51, 51])
    """
    g = torch.Generator().manual_seed(seed)
    sparse = torch.empty(num_rows, num_features, dtype=torch.int64)
    logit = torch.full((num_rows,), -1.0)
    for j in range(num_features):
        p = _zipf_probs(cardinality, zipf, g)
        sparse[:, j] = 1 + torch.multinomial(p, num_rows, replacement=True, generator=g)
        w = torch.randn(cardinality + 1, generator=g) * 0.6
        logit += w[sparse[:, j]]
    dense = torch.rand(num_rows, num_dense, generator=g)
    logit += dense @ torch.randn(num_dense, generator=g)
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return CTRData("synthetic-ctr", dense, sparse, labels, [cardinality + 1] * num_features,
                   [f"C{j + 1}" for j in range(num_features)])


def events_to_split(users: Tensor, items: Tensor) -> Tuple[Tensor, Tensor]:
    """Deduplicate (user, item) events (keeps first occurrence order irrelevant)."""
    if users.numel() == 0:
        return users, items
    ni = int(items.max()) + 1
    key = torch.unique(users * ni + items)
    return key // ni, key % ni
