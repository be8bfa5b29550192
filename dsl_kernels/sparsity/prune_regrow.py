"""``dsl::prune_regrow_``: the in-place mask update of a slot pool, and the optimizer-state reset
that goes with it.

Given the pool (``values [C, B]``, ``coord int64[C]``, the active-block bitmask ``row_mask``) and
growth candidates (``cand_keys``, ``cand_scores``: global block keys ``row * NB + col`` with a
score), the op

1. picks the ``k`` active blocks of smallest L2 norm (among ``prune_slots`` when given),
2. picks the ``k`` inactive candidates with the largest score (duplicates merged by max score,
   candidates that are active now dropped, so a block is never grown twice and a block pruned in
   this update is never regrown by it),
3. hands the freed slots to the grown blocks (freed slots ascending <- grown keys ascending),
   writes ``coord`` and zeroes the grown ``values`` in place,

and returns ``(slots, pruned_keys)``. ``k`` shrinks to the number of usable candidates (and of
prunable blocks): the number of active blocks never changes. The caller then re-initialises the
grown values if wanted, zeroes the optimizer-state rows of ``slots``
(:func:`reset_optimizer_rows`) and rebuilds the row index (``module.rebuild_index()``).

Determinism: ties in magnitude go to the lower slot, ties in score to the lower key.

Non-finite numbers: a block holding NaN/Inf has magnitude ``-inf`` — it is pruned FIRST (the
update heals a corrupt block instead of keeping it); a non-finite candidate score is ignored (such
a candidate is never grown).

Memory: the temporaries are one fp32 ``[C]`` (magnitudes, computed in chunks so fp16/bf16 pools
are never upcast whole), one bool ``[C]``, one bool per candidate and chunk-sized int64 arrays
(the candidates' activeness test), plus ``k``-sized results — about 4 % of the steady state of an
Adam-trained pool; nothing of size ``N * NB`` or ``N * D``.

Backends: the op's ``backend`` argument names a :mod:`dsl_kernels.dispatch` backend; one that
does not define ``prune_regrow_`` (all of them so far) runs :func:`prune_regrow_reference`, which
is plain torch and therefore runs on CUDA tensors too.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import dispatch

_CHUNK = 1 << 16  # slots per magnitude chunk: bounds the upcast temporary of fp16/bf16 pools
_KEY_CHUNK = 1 << 14  # candidate keys per activeness-test chunk


# ----------------------------------------------------------------------------- helpers


def block_magnitudes(values: Tensor, slots: Optional[Tensor] = None) -> Tensor:
    """fp32 L2 norm of every slot (or of ``slots``), ``-inf`` where the block is not finite."""
    src_n = values.shape[0] if slots is None else slots.numel()
    mag = torch.empty(src_n, dtype=torch.float32, device=values.device)
    for a in range(0, src_n, _CHUNK):
        b = min(src_n, a + _CHUNK)
        chunk = values[a:b] if slots is None else values[slots[a:b]]
        mag[a:b] = torch.linalg.vector_norm(chunk.float(), dim=1)
    # NaN/Inf -> -inf in place (a norm is never -inf, so nothing else is touched).
    return mag.nan_to_num_(nan=float("-inf"), posinf=float("-inf"))


def smallest_k(mag: Tensor, k: int, largest: bool = False) -> Tensor:
    """Positions (int64, ascending) of the ``k`` smallest (``largest=True``: largest) entries of
    the 1-D ``mag`` (no NaN), ties to the lower position. ``kthvalue`` + one bool mask +
    ``nonzero``: no full sort, no copy of ``mag`` in Python."""
    n = mag.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=mag.device)
    if k >= n:
        return torch.arange(n, device=mag.device)
    v = torch.kthvalue(mag, n - k + 1 if largest else k).values
    # One bool temporary; with ties at v (e.g. several all-zero blocks just grown), the tied
    # positions past the k-th are dropped from the (small) selected set, not from a full mask.
    pos = torch.nonzero(mag >= v if largest else mag <= v).squeeze(1)  # ascending
    extra = pos.numel() - k
    if extra > 0:
        ties = torch.nonzero(mag[pos] == v).squeeze(1)
        keep = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
        keep[ties[ties.numel() - extra:]] = False
        pos = pos[keep]
    return pos


def is_active(row_mask: Tensor, keys: Tensor, num_blocks: int) -> Tensor:
    """Bool per key: is block ``key = row * num_blocks + col`` set in ``row_mask``? (In-place
    arithmetic: at most three key-sized int64 temporaries; chunk large inputs.)"""
    W = row_mask.shape[1]
    col = torch.remainder(keys, num_blocks)
    flat = torch.div(keys, num_blocks, rounding_mode="floor").mul_(W).add_(col >> 6)
    word = row_mask.reshape(-1)[flat]
    del flat
    return word.bitwise_right_shift_(col.bitwise_and_(63)).bitwise_and_(1).bool()


def is_active_chunked(row_mask: Tensor, keys: Tensor, num_blocks: int,
                      chunk: int = _KEY_CHUNK) -> Tensor:
    """:func:`is_active` in chunks: one bool per key plus chunk-sized int64 temporaries,
    however many candidates a window collected."""
    out = torch.empty(keys.numel(), dtype=torch.bool, device=keys.device)
    for a in range(0, keys.numel(), chunk):
        out[a:a + chunk] = is_active(row_mask, keys[a:a + chunk], num_blocks)
    return out


# ---------------------------------------------------------------------------- reference


@torch.no_grad()
def prune_regrow_reference(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
                           cand_scores: Tensor, k: int, num_blocks: int,
                           prune_slots: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Pure-torch oracle of ``dsl::prune_regrow_`` (see the module docstring); mutates
    ``values`` and ``coord``; returns ``(slots int64[k'], pruned_keys int64[k'])``."""
    dev = coord.device
    # Candidates first, magnitudes after, and temporaries dropped as soon as they are used: the
    # peak stays near max(candidate-sized, [C]) instead of their sum.
    # 1. growable candidates: finite score, inactive now, merged by key (max score).
    ck = cand_keys.long().reshape(-1)
    cs = cand_scores.float().reshape(-1)
    ok = torch.isfinite(cs)
    ok &= ~is_active_chunked(row_mask, ck, num_blocks)
    if not bool(ok.all()):  # the accumulator's candidates usually all pass: no copy then
        ck, cs = ck[ok], cs[ok]
    del ok
    if ck.numel() > 1 and not bool((ck[1:] > ck[:-1]).all()):
        # Merge duplicates (max score) and sort; skipped for the accumulator's output, which is
        # already unique and ascending.
        uk, inv = torch.unique(ck, sorted=True, return_inverse=True)
        del ck
        us = torch.full((uk.numel(),), float("-inf"), device=dev)
        us.scatter_reduce_(0, inv, cs, "amax", include_self=True)
        del inv, cs
    else:
        uk, us = ck, cs
    # 2. prunable blocks.
    if prune_slots is None:
        n_prunable = int((coord >= 0).sum())
    else:
        ps = prune_slots.long()
        n_prunable = ps.numel() - int((coord[ps] < 0).sum())
    k = max(0, min(int(k), n_prunable, uk.numel()))
    # k largest scores, ties to the lower key; positions ascending = keys ascending. Selection,
    # not a sort: O(#candidates).
    grown = uk[smallest_k(us, k, largest=True)]
    del uk, us
    # 3. the k weakest active blocks ([C] fp32 magnitudes; free slots never chosen).
    if prune_slots is None:
        mag = block_magnitudes(values)
        mag.masked_fill_(coord < 0, float("inf"))
    else:
        mag = block_magnitudes(values, ps)
        mag.masked_fill_(coord[ps] < 0, float("inf"))
    pos = smallest_k(mag, k)
    del mag
    # 4. hand the freed slots over.
    slots = pos if prune_slots is None else torch.sort(ps[pos]).values
    pruned = coord[slots].clone()
    coord[slots] = grown
    values[slots] = 0
    return slots, pruned


def _impl(backend: str) -> Callable:
    try:
        impl = dispatch.get(backend)
    except KeyError:
        impl = None
    fn = getattr(impl, "prune_regrow_", None) if impl is not None else None
    return fn if fn is not None else prune_regrow_reference


def _check(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
           cand_scores: Tensor, k: int, num_blocks: int, prune_slots: Optional[Tensor]) -> None:
    if values.dim() != 2:
        raise ValueError(f"values must be [C, B], got shape {tuple(values.shape)}")
    if coord.dtype != torch.int64 or coord.shape != values.shape[:1]:
        raise ValueError(f"coord must be int64[{values.shape[0]}], got {coord.dtype} "
                         f"{tuple(coord.shape)}")
    if cand_keys.shape != cand_scores.shape or cand_keys.dim() != 1:
        raise ValueError(f"cand_keys and cand_scores must be 1-D of the same length, got "
                         f"{tuple(cand_keys.shape)} and {tuple(cand_scores.shape)}")
    if cand_keys.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cand_keys must be int32 or int64, got {cand_keys.dtype}")
    if not cand_scores.is_floating_point():
        raise TypeError(f"cand_scores must be floating point, got {cand_scores.dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if num_blocks <= 0 or row_mask.dim() != 2:
        raise ValueError("num_blocks must be positive and row_mask [N, W]")
    if cand_keys.numel():
        lo, hi = int(cand_keys.min()), int(cand_keys.max())
        limit = row_mask.shape[0] * num_blocks
        if lo < 0 or hi >= limit:
            raise ValueError(f"cand_keys must lie in [0, {limit}) (rows x num_blocks), got "
                             f"[{lo}, {hi}]")
    if prune_slots is not None and prune_slots.numel():
        if int(prune_slots.min()) < 0 or int(prune_slots.max()) >= values.shape[0]:
            raise ValueError(f"prune_slots must lie in [0, {values.shape[0]})")


@torch.library.custom_op("dsl::prune_regrow_", mutates_args=("values", "coord"))
def prune_regrow_(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
                  cand_scores: Tensor, k: int, num_blocks: int, prune_slots: Optional[Tensor],
                  backend: str) -> Tuple[Tensor, Tensor]:
    """In-place prune/regrow of a slot pool (module docstring). Call under ``torch.no_grad()``
    with ``values`` the pool's Parameter (or its ``.data``).

    >>> import torch
    >>> from dsl_kernels.sparsity import prune_regrow_
    >>> values = torch.tensor([[3.0], [0.1], [2.0]]); coord = torch.tensor([0, 1, 2])
    >>> row_mask = torch.tensor([[0b0111]])            # one row, blocks 0, 1, 2 active
    >>> slots, pruned = prune_regrow_(values, coord, row_mask, torch.tensor([5, 2, 4]),
    ...                               torch.tensor([0.5, 9.0, 0.7]), 1, 8, None, "reference")
    >>> slots.tolist(), pruned.tolist(), coord.tolist(), values[1].item()
    ([1], [1], [0, 4, 2], 0.0)
    """
    _check(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks, prune_slots)
    return _impl(backend)(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks,
                          prune_slots)


@prune_regrow_.register_fake
def _prune_regrow_fake(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks,
                       prune_slots, backend):
    n = torch.library.get_ctx().new_dynamic_size()
    return coord.new_empty((n,)), coord.new_empty((n,))


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
def reset_optimizer_rows(optimizer: torch.optim.Optimizer, param: Tensor, rows: Tensor) -> int:
    """Reset the optimizer state of ``param`` at ``rows`` (slots) to a fresh state (zeros;
    Adagrad's ``initial_accumulator_value``); other rows are untouched. Returns how many state
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
        t[rows.to(t.device)] = fill(group) if callable(fill) else fill
        n += 1
    return n


def row_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> Dict[str, Tensor]:
    """Every state tensor of ``param`` with one row per slot (what compaction must shrink and
    stale-slot holding must restore)."""
    state = optimizer.state.get(param) or {}
    return {k: v for k, v in state.items()
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == param.shape[0]}
