"""The evaluation protocol of the ranking runs, and equal-memory baselines.

* :func:`carve_validation` holds out a share of every user's *training* items as a validation
  split. Epochs (and, in sweeps, hyperparameters) are chosen on it; the test split is scored once,
  at the selected point (:class:`BestSnapshot`). DSL's official code reports the best *test*
  epoch; that is optimistic and we do not do it.
* :func:`density_for_memory` and :func:`dim_for_memory` turn "this share of the dense table's
  memory" (values + index + optimizer state, the bytes :func:`report.memory_report` measures) into
  a sparse density or a dense-small dimension, so that every method of a sweep is compared at the
  same measured memory.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

# Optimizer state tensors per trained value (Adam: exp_avg + exp_avg_sq).
STATES_PER_VALUE = {"adam": 2, "adagrad": 1, "sgd": 0}


def carve_validation(users: Tensor, items: Tensor, fraction: float,
                     seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split interactions into (train users, train items, val users, val items): each user keeps
    ``round(fraction * n_u)`` of its ``n_u`` items for validation, chosen at random, and always at
    least one item for training.

    >>> u = torch.tensor([0] * 10 + [1] * 3); i = torch.arange(13)
    >>> tu, ti, vu, vi = carve_validation(u, i, 0.2)
    >>> (vu == 0).sum().item(), (vu == 1).sum().item(), tu.numel() + vu.numel()
    (2, 1, 13)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n = users.numel()
    if fraction == 0.0 or n == 0:
        e = users.new_empty(0)
        return users, items, e, e.clone()
    g = torch.Generator().manual_seed(seed + 12_345)
    # Random order within each user: sort by (user, random key).
    key = torch.rand(n, generator=g, dtype=torch.float64)
    order = torch.argsort(users.double() * 2.0 + key)
    su = users[order]
    counts = torch.bincount(su, minlength=int(su.max()) + 1 if n else 0)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - start[su]
    n_val = torch.round(counts.double() * fraction).long().clamp(max=(counts - 1).clamp(min=0))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[order] = rank < n_val[su]
    return users[~is_val], items[~is_val], users[is_val], items[is_val]


def dense_bytes(num_rows: int, dim: int, optimizer: str, elem: int = 4) -> int:
    """Bytes of a dense ``[num_rows, dim]`` table plus its optimizer state."""
    return num_rows * dim * elem * (1 + STATES_PER_VALUE[optimizer])


def sparse_bytes(num_rows: int, dim: int, block_size: int, slots: int, optimizer: str,
                 elem: int = 4) -> int:
    """Bytes of a slot pool (``dsl_kernels`` format) with ``slots`` slots plus its optimizer
    state: values + optimizer rows + ``coord`` (int64) + ``row_slots`` (int32) per slot,
    ``row_ptr`` (int32) and the ``row_mask`` words (int64) per row."""
    nb = dim // block_size
    per_slot = block_size * elem * (1 + STATES_PER_VALUE[optimizer]) + 8 + 4
    per_row = 4 + 8 * math.ceil(nb / 64)
    return slots * per_slot + num_rows * per_row + 4


def density_for_memory(share: float, num_rows: int, dim: int, block_size: int,
                       optimizer: str = "adam") -> float:
    """The density whose pool (+ optimizer state) costs ``share`` of the dense table's bytes.

    >>> d = density_for_memory(0.2, 1000, 64, 8)
    >>> round(d, 3), round(sparse_bytes(1000, 64, 8, round(d * 8000), "adam")
    ...                    / dense_bytes(1000, 64, "adam"), 3)
    (0.164, 0.2)
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"memory share must be in (0, 1], got {share}")
    nb = dim // block_size
    fixed = sparse_bytes(num_rows, dim, block_size, 0, optimizer)
    per_slot = sparse_bytes(num_rows, dim, block_size, 1, optimizer) - fixed
    slots = (share * dense_bytes(num_rows, dim, optimizer) - fixed) / per_slot
    d = slots / (num_rows * nb)
    if d <= 0:
        raise ValueError(f"memory share {share} is below the index overhead of a "
                         f"{num_rows} x {dim} table with block size {block_size}")
    return min(1.0, d)


def dim_for_memory(share: float, dim: int) -> int:
    """The dense-small dimension at ``share`` of a ``dim``-wide dense table's bytes (the
    optimizer state scales with it, so the share is the ratio of dimensions)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"memory share must be in (0, 1], got {share}")
    return max(1, int(round(share * dim)))


class BestSnapshot:
    """Keeps the model state of the epoch with the best validation metric (higher is better).

    The copy is of ``model.state_dict()``: for sparse tables that is the slot pool (values +
    coord), never a dense image of the table."""

    def __init__(self):
        self.metric: float = -math.inf
        self.epoch: Optional[int] = None
        self.row: Dict = {}
        self._state = None

    def offer(self, model: nn.Module, epoch: int, metric: float, row: Dict) -> bool:
        if not metric > self.metric:  # NaN never wins
            return False
        self.metric, self.epoch, self.row = metric, epoch, dict(row)
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(copy.copy(self._state))

    def state_dict(self) -> Dict:
        return {"metric": self.metric, "epoch": self.epoch, "row": self.row,
                "state": self._state}

    def load_state_dict(self, sd: Dict) -> None:
        self.metric, self.epoch = sd["metric"], sd["epoch"]
        self.row, self._state = dict(sd["row"]), sd["state"]
