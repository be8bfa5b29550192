"""Quality metrics.

* :func:`ranking_metrics` - Recall@K and NDCG@K with full ranking over every item not in the
  user's training set (the LightGCN protocol), computed in user batches with a top-k on the
  device: at most ``[user_batch, num_items]`` scores exist at once, never ``users x items``.
* :func:`auc` (Mann-Whitney, ties averaged) and :func:`log_loss` for CTR.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor


def to_csr(users: Tensor, items: Tensor, num_users: int) -> Tuple[Tensor, Tensor]:
    """Group interactions by user: ``(indptr int64[num_users+1], items sorted by user)``.

    >>> to_csr(torch.tensor([1, 0, 1]), torch.tensor([5, 6, 7]), 3)
    (tensor([0, 1, 3, 3]), tensor([6, 5, 7]))
    """
    order = torch.sort(users, stable=True).indices
    counts = torch.bincount(users, minlength=num_users)
    indptr = torch.zeros(num_users + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, items[order]


def _gather_rows(indptr: Tensor, cols: Tensor, users: Tensor) -> Tuple[Tensor, Tensor]:
    """(row-in-batch, column) pairs of the CSR rows ``users``, vectorised."""
    start = indptr[users]
    cnt = indptr[users + 1] - start
    total = int(cnt.sum())
    if total == 0:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z
    rows = torch.repeat_interleave(torch.arange(users.numel()), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    pos = torch.repeat_interleave(start - first, cnt) + torch.arange(total)
    return rows, cols[pos]


@torch.no_grad()
def ranking_metrics(score_fn: Callable[[Tensor], Tensor], train: Tuple[Tensor, Tensor],
                    test: Tuple[Tensor, Tensor], num_items: int, k: int = 20,
                    user_batch: int = 512, users: Tensor = None) -> Dict[str, float]:
    """Recall@k and NDCG@k averaged over users with at least one test item.

    ``score_fn(user_ids) -> [len(user_ids), num_items]`` scores on any device; ``train`` and
    ``test`` are CSR pairs from :func:`to_csr`. Train items are excluded from the ranking.
    ``users`` restricts the evaluation to a subset (e.g. a sample, for speed).

    >>> scores = torch.tensor([[3., 2., 1., 0.]])
    >>> tr = to_csr(torch.tensor([0]), torch.tensor([0]), 1)   # item 0 seen in training
    >>> te = to_csr(torch.tensor([0, 0]), torch.tensor([2, 3]), 1)
    >>> m = ranking_metrics(lambda u: scores[u], tr, te, 4, k=2)
    >>> m["recall"], round(m["ndcg"], 4)                      # top-2 = items 1, 2: one hit
    (0.5, 0.3869)
    """
    tr_ptr, tr_items = train
    te_ptr, te_items = test
    n_test = te_ptr[1:] - te_ptr[:-1]
    cand = torch.nonzero(n_test > 0).squeeze(1)
    if users is not None:
        keep = torch.zeros(n_test.numel(), dtype=torch.bool)
        keep[users] = True
        cand = cand[keep[cand]]
    if cand.numel() == 0:
        return {"recall": float("nan"), "ndcg": float("nan"), "users": 0}
    k = min(k, num_items)
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    idcg_table = torch.cumsum(disc, 0)
    rec_sum = ndcg_sum = 0.0
    for lo in range(0, cand.numel(), user_batch):
        u = cand[lo:lo + user_batch]
        scores = score_fn(u).float()
        dev = scores.device
        r, c = _gather_rows(tr_ptr, tr_items, u)
        scores[r.to(dev), c.to(dev)] = -math.inf
        top = torch.topk(scores, k, dim=1).indices
        r, c = _gather_rows(te_ptr, te_items, u)
        truth = torch.zeros(u.numel(), num_items, dtype=torch.bool, device=dev)
        truth[r.to(dev), c.to(dev)] = True
        hits = truth.gather(1, top).double().cpu()
        nt = n_test[u].double()
        rec_sum += float((hits.sum(1) / nt).sum())
        idcg = idcg_table[(nt.clamp(max=k) - 1).long()]
        ndcg_sum += float(((hits * disc).sum(1) / idcg).sum())
    n = cand.numel()
    return {"recall": rec_sum / n, "ndcg": ndcg_sum / n, "users": int(n)}


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (probability a random positive outranks a random negative, ties
    count one half); NaN when one class is absent.

    >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0., 0., 1., 1.]))
    0.75
    >>> auc(torch.tensor([0.5, 0.5]), torch.tensor([0., 1.]))
    0.5
    """
    s = scores.detach().double().flatten().cpu()
    y = labels.detach().flatten().cpu() > 0.5
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    sv, order = torch.sort(s)
    _, inverse, counts = torch.unique_consecutive(sv, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def log_loss(probs: Tensor, labels: Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to ``[eps, 1 - eps]``).

    >>> round(log_loss(torch.tensor([0.9, 0.2]), torch.tensor([1., 0.])), 4)
    0.1643
    """
    p = probs.detach().double().flatten().clamp(eps, 1 - eps).cpu()
    y = labels.detach().double().flatten().cpu()
    if p.numel() == 0:
        return float("nan")
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
