"""The three recommendation models, written against any embedding module.

Each model takes its embedding table(s) from the caller (``methods.make_table`` /
``methods.make_collection``): a stock ``nn.Embedding`` / ``nn.EmbeddingBag`` for the dense
baseline or a ``dsl_kernels`` sparse module. ``embedding_modules()`` names the tables so the method
controller can swap one (magnitude pruning) and the memory report can measure them.

* :class:`MF` - matrix factorisation with the BPR loss; users and items share one table of
  ``num_users + num_items`` rows (items after users), so a global sparsity criterion can move the
  budget between the user and the item side.
* :class:`LightGCN` - LightGCN (He et al., SIGIR 2020): ``K`` propagation layers over the
  symmetric-normalised user-item adjacency (a ``torch.sparse`` matrix), layer mean, BPR loss, L2
  on the batch's layer-0 embeddings.
* :class:`DLRM` - DLRM-style CTR model: bottom MLP on the dense features, one embedding bag per
  categorical feature, pairwise dot interaction, top MLP, BCE.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def all_rows(emb: nn.Module, num_rows: int) -> Tensor:
    """Every row of a table as a ``[num_rows, D]`` activation (LightGCN's layer 0, evaluation).

    Dense tables return their weight; sparse ones are looked up (inactive blocks read 0), so
    the gradient still lands only in the active slots."""
    if isinstance(emb, nn.Embedding):
        return emb.weight
    dev = next(emb.parameters()).device
    return emb(torch.arange(num_rows, device=dev))


def bpr(pos: Tensor, neg: Tensor) -> Tensor:
    """Bayesian personalised ranking loss ``-log sigmoid(pos - neg)``, mean over the batch.
    ``pos`` is ``[B]``; ``neg`` is ``[B]`` or ``[B, n]`` (n negatives per positive, averaged).

    >>> round(bpr(torch.tensor([1.0]), torch.tensor([[1.0, 1.0]])).item(), 4)
    0.6931
    """
    if neg.dim() == 2:
        pos = pos.unsqueeze(1)
    return F.softplus(neg - pos).mean()


LOSSES = ("softmax", "bpr")
# Cosine scores divide by the row norm; a row with no active entries has norm 0, and
# F.normalize's default eps (1e-12) would scale its gradient by 1e12 (growth scores of empty
# rows, and Adam moments of a freshly grown zero block, would be swamped). Norms of trained rows
# are ~0.1-1, so 1e-2 changes nothing for them and bounds the gradient for the rest.
NORM_EPS = 1e-2


def _unit(e: Tensor) -> Tensor:
    return F.normalize(e, dim=1, eps=NORM_EPS)


def sampled_softmax(eu: Tensor, ep: Tensor, en: Tensor, tau: float) -> Tensor:
    """Sampled softmax over cosine similarities: each user's positive against ``M`` shared
    negatives, ``-log softmax([cos(u, p), cos(u, n_1..M)] / tau)[0]``, mean over the batch.
    Rows with no active entries (all zero) score 0 against everything.

    >>> u = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[2.0, 0.0]]); n = torch.tensor([[0.0, 1.0]])
    >>> round(sampled_softmax(u, p, n, 1.0).item(), 4)     # log(1 + e^(0 - 1))
    0.3133
    """
    eu, ep, en = _unit(eu), _unit(ep), _unit(en)
    logits = torch.cat([(eu * ep).sum(1, keepdim=True), eu @ en.T], 1) / tau
    return F.cross_entropy(logits, torch.zeros(eu.shape[0], dtype=torch.long,
                                               device=eu.device))


SCORES = ("masked", "cosine")


def block_stats(e: Tensor, block: int):
    """``(e, squared norm of every block [n, NB], active blocks [n, NB])`` of rows ``e``; a
    block is active when it holds a non-zero (inactive blocks of a sparse table read 0)."""
    sq = e.view(e.shape[0], -1, block).pow(2).sum(-1)
    return e, sq, (sq > 0).to(e.dtype)


def masked_cosine(u, v, pairwise: bool) -> Tensor:
    """Cosine similarity over the columns both rows hold (``u``, ``v`` from
    :func:`block_stats`): ``<u, v> / (|u restricted to v's blocks| * |v restricted to u's|)``.

    With mixed per-row dimensions (a sparse table whose frequent rows hold more blocks) the plain
    cosine divides by the whole norm of a wide row although a narrow partner sees only its first
    columns, so wide (popular) rows are scored down for narrow (rare) partners. For rows that
    hold every block this is the plain cosine. ``pairwise``: rows i of ``u`` and ``v`` -> ``[n]``;
    else all pairs -> ``[n, m]``.

    >>> u = block_stats(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 2)      # holds block 0 only
    >>> v = block_stats(torch.tensor([[1.0, 0.0, 5.0, 5.0]]), 2)      # holds blocks 0 and 1
    >>> masked_cosine(u, v, True).item(), round(float(F.cosine_similarity(u[0], v[0])), 4)
    (1.0, 0.14)
    """
    eu, su, mu = u
    ev, sv, mv = v
    if pairwise:
        dot, nu, nv = (eu * ev).sum(1), (su * mv).sum(1), (mu * sv).sum(1)
    else:
        dot, nu, nv = eu @ ev.T, su @ mv.T, mu @ sv.T
    e2 = NORM_EPS * NORM_EPS
    return dot / (nu.clamp_min(e2).sqrt() * nv.clamp_min(e2).sqrt())


def _pair_scores(eu: Tensor, ep: Tensor, en: Tensor, n_neg: int):
    """(``[B]`` positive scores, ``[B]`` or ``[B, n]`` negative scores) of user rows ``eu``,
    positive rows ``ep`` and the ``B * n`` negative rows ``en`` (user-major)."""
    pos = (eu * ep).sum(1)
    if n_neg == 1:
        return pos, (eu * en).sum(1)
    return pos, (eu.unsqueeze(1) * en.view(eu.shape[0], n_neg, -1)).sum(2)


class MF(nn.Module):
    """Matrix factorisation: ``score(u, i) = <e_u, e_{num_users + i}>``.

    >>> import torch
    >>> m = MF(3, 4, torch.nn.Embedding(7, 8))
    >>> loss, _ = m.loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1]), 1e-4)
    >>> loss.dim(), m.score_users(torch.tensor([0, 2])).shape
    (0, torch.Size([2, 4]))
    """

    def __init__(self, num_users: int, num_items: int, emb: nn.Module, loss: str = "bpr",
                 tau: float = 0.1, score: str = "masked"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if score not in SCORES:
            raise ValueError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
        self.num_users, self.num_items = num_users, num_items
        self.emb = emb
        self.loss_kind, self.tau, self.score_kind = loss, tau, score
        self._cache = None

    def _block(self, e: Tensor) -> int:
        """Columns per block for the masked cosine: the sparse table's block size (a stock
        dense table is one block per row, i.e. the plain cosine)."""
        b = getattr(self.emb, "block_size", None)
        return e.shape[1] if b is None or self.score_kind == "cosine" else int(b)

    def _scores(self, eu: Tensor, ev: Tensor, pairwise: bool) -> Tensor:
        if self.loss_kind == "bpr":
            return (eu * ev).sum(1) if pairwise else eu @ ev.T
        return masked_cosine(block_stats(eu, self._block(eu)), block_stats(ev, self._block(ev)),
                             pairwise)

    def embedding_modules(self) -> Dict[str, nn.Module]:
        return {"emb": self.emb}

    def replace_embedding(self, name: str, module: nn.Module) -> None:
        assert name == "emb"
        self.emb = module

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor, reg: float):
        """(ranking loss + ``reg`` * L2 of the batch's embeddings / batch, the ranking loss
        alone). BPR: ``neg`` is ``[B]`` or ``[B, n]`` (n negatives per positive). Softmax:
        ``neg`` is ``[M]``, negatives shared by the whole batch."""
        n = users.numel()
        n_neg = 1 if neg.dim() == 1 else neg.shape[1]
        nodes = torch.cat([users, pos + self.num_users, neg.reshape(-1) + self.num_users])
        e = self.emb(nodes)
        eu, ep, en = e[:n], e[n:2 * n], e[2 * n:]
        if self.loss_kind == "softmax":
            logits = torch.cat([self._scores(eu, ep, True).unsqueeze(1),
                                self._scores(eu, en, False)], 1) / self.tau
            b = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=e.device))
        else:
            b = bpr(*_pair_scores(eu, ep, en, n_neg))
        l2 = 0.5 * e.pow(2).sum() / n
        return b + reg * l2, b

    @torch.no_grad()
    def prepare_eval(self) -> None:
        """Cache the item output matrix for a round of :meth:`score_users` calls."""
        dev = next(self.emb.parameters()).device
        items = torch.arange(self.num_users, self.num_users + self.num_items, device=dev)
        self._cache = self.emb(items)

    def end_eval(self) -> None:
        self._cache = None

    @torch.no_grad()
    def score_users(self, users: Tensor) -> Tensor:
        dev = next(self.emb.parameters()).device
        items = self._cache
        if items is None:
            items = self.emb(torch.arange(self.num_users, self.num_users + self.num_items,
                                          device=dev))
        return self._scores(self.emb(users.to(dev)), items, False)


def normalized_adjacency(num_users: int, num_items: int, users: Tensor, items: Tensor,
                         device=None) -> Tensor:
    """``D^-1/2 A D^-1/2`` of the bipartite user-item graph (nodes: users then items) as a
    coalesced sparse COO tensor ``[U + I, U + I]``.

    >>> a = normalized_adjacency(1, 2, torch.tensor([0, 0]), torch.tensor([0, 1]))
    >>> a.to_dense()[0, 1:].tolist()   # user degree 2, item degree 1 -> 1/sqrt(2)
    [0.7071067690849304, 0.7071067690849304]
    """
    n = num_users + num_items
    r = torch.cat([users, items + num_users])
    c = torch.cat([items + num_users, users])
    deg = torch.bincount(r, minlength=n).float()
    dinv = deg.clamp(min=1).rsqrt()
    val = dinv[r] * dinv[c]
    a = torch.sparse_coo_tensor(torch.stack([r, c]), val, (n, n),
                                check_invariants=False).coalesce()
    return a.to(device) if device is not None else a


class LightGCN(nn.Module):
    """LightGCN: ``E_final = mean(E_0, A E_0, ..., A^K E_0)`` with ``A`` the normalised
    adjacency of the training graph; BPR on ``E_final``, L2 on the layer-0 rows of the batch.

    >>> import torch
    >>> m = LightGCN(2, 3, torch.nn.Embedding(5, 4), torch.tensor([0, 1]), torch.tensor([1, 2]))
    >>> m.score_users(torch.tensor([0, 1])).shape
    torch.Size([2, 3])
    """

    def __init__(self, num_users: int, num_items: int, emb: nn.Module, train_users: Tensor,
                 train_items: Tensor, layers: int = 3, loss: str = "bpr", tau: float = 0.1):
        super().__init__()
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        if loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_kind, self.tau = loss, tau
        self.num_users, self.num_items, self.layers = num_users, num_items, layers
        self.emb = emb
        dev = next(emb.parameters()).device
        self.adj = normalized_adjacency(num_users, num_items, train_users, train_items, dev)
        self._cache = None

    def embedding_modules(self) -> Dict[str, nn.Module]:
        return {"emb": self.emb}

    def replace_embedding(self, name: str, module: nn.Module) -> None:
        assert name == "emb"
        self.emb = module

    def propagate(self):
        """(final embeddings, layer-0 embeddings), both ``[U + I, D]`` activations."""
        e0 = all_rows(self.emb, self.num_users + self.num_items)
        acc, e = e0, e0
        for _ in range(self.layers):
            e = torch.sparse.mm(self.adj, e)
            acc = acc + e
        return acc / (self.layers + 1), e0

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor, reg: float):
        out, e0 = self.propagate()
        n_neg = 1 if neg.dim() == 1 else neg.shape[1]
        u, p, q = users, pos + self.num_users, neg.reshape(-1) + self.num_users
        if self.loss_kind == "softmax":
            b = sampled_softmax(out[u], out[p], out[q], self.tau)
        else:
            b = bpr(*_pair_scores(out[u], out[p], out[q], n_neg))
        l2 = 0.5 * (e0[u].pow(2).sum() + e0[p].pow(2).sum() + e0[q].pow(2).sum()) / users.numel()
        return b + reg * l2, b

    @torch.no_grad()
    def prepare_eval(self) -> None:
        out = self.propagate()[0]
        self._cache = _unit(out) if self.loss_kind == "softmax" else out

    def end_eval(self) -> None:
        self._cache = None

    @torch.no_grad()
    def score_users(self, users: Tensor) -> Tensor:
        out = self._cache
        if out is None:
            out = self.propagate()[0]
            out = _unit(out) if self.loss_kind == "softmax" else out
        users = users.to(out.device)
        return out[users] @ out[self.num_users:].T


class DenseEmbeddingBagCollection(nn.Module):
    """The dense baseline of a ``SparseEmbeddingBagCollection``: one stock ``nn.EmbeddingBag``
    (mode ``sum``) per categorical feature; ``forward(x [B, F]) -> [B, F, D]``."""

    def __init__(self, sizes: Sequence[int], dim: int, init_std: float = 0.05, device=None):
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", device=device)
                                  for n in sizes)
        for b in self.bags:
            nn.init.normal_(b.weight, std=init_std)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([b(x[:, j:j + 1]) for j, b in enumerate(self.bags)], 1)


class SparseTables(nn.Module):
    """Adapter giving a ``SparseEmbeddingBagCollection`` (``output="concat"``, one table per
    feature, 1-element bags) the ``[B, F] -> [B, F, D]`` interface of the dense collection."""

    def __init__(self, collection: nn.Module, names: List[str], dim: int):
        super().__init__()
        self.collection = collection
        self.names, self.dim = list(names), dim

    def forward(self, x: Tensor) -> Tensor:
        feats = {n: x[:, j:j + 1] for j, n in enumerate(self.names)}
        return self.collection(feats).view(x.shape[0], len(self.names), self.dim)


def _mlp(sizes: Sequence[int], last_act: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM-style CTR model: ``logit = top([bottom(x_dense), upper-triangle of Z Z^T])`` with
    ``Z = [bottom(x_dense); emb_1(x_1); ...; emb_F(x_F)]``.

    >>> import torch
    >>> m = DLRM(4, DenseEmbeddingBagCollection([10, 20], 8), dim=8)
    >>> m(torch.rand(3, 4), torch.tensor([[1, 2], [3, 4], [0, 0]])).shape
    torch.Size([3])
    """

    def __init__(self, num_dense: int, tables: nn.Module, dim: int,
                 bottom: Sequence[int] = (64,), top: Sequence[int] = (64, 32)):
        super().__init__()
        self.tables = tables
        self.bottom = _mlp([num_dense, *bottom, dim], last_act=True)
        nf = self._num_features() + 1
        self.top = _mlp([dim + nf * (nf - 1) // 2, *top, 1], last_act=False)
        iu = torch.triu_indices(nf, nf, offset=1)
        self.register_buffer("_iu", iu, persistent=False)

    def _num_features(self) -> int:
        t = self.tables
        return len(t.bags) if isinstance(t, DenseEmbeddingBagCollection) else len(t.names)

    def embedding_modules(self) -> Dict[str, nn.Module]:
        return {"tables": self.tables}

    def replace_embedding(self, name: str, module: nn.Module) -> None:
        assert name == "tables"
        self.tables = module

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        b = self.bottom(dense)
        z = torch.cat([b.unsqueeze(1), self.tables(sparse)], 1)
        inter = torch.bmm(z, z.transpose(1, 2))[:, self._iu[0], self._iu[1]]
        return self.top(torch.cat([b, inter], 1)).squeeze(1)
