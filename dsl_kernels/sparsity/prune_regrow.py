"""Prune/regrow for the sparsity engine: the ``dsl::prune_regrow_`` op (defined in
:mod:`dsl_kernels.ops.prune_regrow`, implemented per backend in
``dsl_kernels/backends/<b>/prune_regrow.py``) and the optimizer-state reset that goes with it.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import Tensor

from ..backends.reference.prune_regrow import (block_magnitudes, is_active_chunked,  # noqa: F401
                                               prune_regrow_reference, smallest_k)
from ..format import is_active  # noqa: F401
from ..ops.fill_rows import fill_rows_
from ..ops.prune_regrow import prune_regrow_  # noqa: F401


# --------------------------------------------------------------------- optimizer state

# Per-parameter state tensors that hold one entry per value (so one row per slot), and the value
# a fresh row gets. Anything else (step counters) is per-parameter and left alone.
_Fill = Union[float, Callable[[dict], float]]
_OPT_STATE: Dict[type, Dict[str, _Fill]] = {}


def register_optimizer_state(cls: type, keys: Union[Iterable[str], Dict[str, _Fill]]) -> None:
    """Teach the engine the per-slot state of an optimizer class: ``keys`` names the state
    tensors shaped like the parameter (zeroed for a reassigned slot), or maps each to its fresh
    value (a float, or ``f(param_group) -> float``). Subclasses inherit the registration.

    >>> import torch
    >>> from dsl_kernels.sparsity import register_optimizer_state
    >>> class MySGD(torch.optim.Optimizer):
    ...     pass
    >>> register_optimizer_state(MySGD, ["velocity"])
    """
    _OPT_STATE[cls] = dict(keys) if isinstance(keys, dict) else {k: 0.0 for k in keys}


_ADAM = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
for _cls, _keys in [
    (torch.optim.Adam, _ADAM), (torch.optim.AdamW, _ADAM),
    (torch.optim.SparseAdam, ("exp_avg", "exp_avg_sq")),
    (torch.optim.SGD, ("momentum_buffer",)),
    (torch.optim.RMSprop, ("square_avg", "momentum_buffer", "grad_avg")),
    (torch.optim.Adamax, ("exp_avg", "exp_inf")),
    (torch.optim.NAdam, ("exp_avg", "exp_avg_sq")),
    (torch.optim.RAdam, ("exp_avg", "exp_avg_sq")),
    (torch.optim.Adadelta, ("square_avg", "acc_delta")),
]:
    register_optimizer_state(_cls, _keys)
# Adagrad's accumulator starts at initial_accumulator_value, not 0.
register_optimizer_state(torch.optim.Adagrad,
                         {"sum": lambda g: float(g.get("initial_accumulator_value", 0.0))})


def optimizer_state_keys(optimizer: torch.optim.Optimizer) -> Dict[str, _Fill]:
    """The registered per-slot state of ``optimizer`` (by class, MRO order); raises a TypeError
    naming the class when the engine does not know it."""
    for cls in type(optimizer).__mro__:
        if cls in _OPT_STATE:
            return _OPT_STATE[cls]
    raise TypeError(
        f"optimizer {type(optimizer).__module__}.{type(optimizer).__name__} is not known to the "
        f"sparsity engine, so the state of reassigned slots cannot be reset; known: "
        f"{sorted(c.__name__ for c in _OPT_STATE)}. Register it with "
        f"dsl_kernels.sparsity.register_optimizer_state(cls, ['state_key', ...])")


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> Optional[dict]:
    for g in optimizer.param_groups:
        if any(p is param for p in g["params"]):
            return g
    return None


@torch.no_grad()
def reset_optimizer_rows(optimizer: torch.optim.Optimizer, param: Tensor, rows: Tensor,
                         backend: str = "reference") -> int:
    """Reset the optimizer state of ``param`` at ``rows`` (slots) to a fresh state (zeros;
    Adagrad's ``initial_accumulator_value``) by ``dsl::fill_rows_`` of ``backend``; other rows
    are untouched. Returns how many state
    tensors were written. Raises TypeError for an optimizer the engine does not know.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(4, 2)); opt = torch.optim.Adam([p])
    >>> p.grad = torch.ones(4, 2); opt.step()
    >>> reset_optimizer_rows(opt, p, torch.tensor([1]))
    2
    >>> opt.state[p]["exp_avg"][:, 0].tolist()
    [0.10000000149011612, 0.0, 0.10000000149011612, 0.10000000149011612]
    """
    keys = optimizer_state_keys(optimizer)
    state = optimizer.state.get(param)
    if not state or rows.numel() == 0:
        return 0
    group = _group_of(optimizer, param) or {}
    n = 0
    for key, fill in keys.items():
        t = state.get(key)
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != param.shape[0]:
            continue
        fill_rows_(t, rows.to(t.device), float(fill(group) if callable(fill) else fill),
                   backend)
        n += 1
    return n


def row_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> Dict[str, Tensor]:
    """Every state tensor of ``param`` with one row per slot (what compaction must shrink and
    stale-slot holding must restore)."""
    state = optimizer.state.get(param) or {}
    return {k: v for k, v in state.items()
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == param.shape[0]}
