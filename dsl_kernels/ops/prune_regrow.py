"""``dsl::prune_regrow_``: the in-place mask update of a slot pool.

Given the pool (``values [C, B]``, ``coord int64[C]``, the row header ``row_mask``) and growth
candidates (``cand_keys``, ``cand_scores``: global block keys ``row * NB + col`` with a score),
the op

1. picks the ``k`` active blocks of smallest L2 norm (among ``prune_slots`` when given),
2. picks the ``k`` inactive candidates with the largest score (duplicates merged by max score,
   candidates that are active now dropped, so a block is never grown twice and a block pruned in
   this update is never regrown by it),
3. hands the freed slots to the grown blocks (freed slots ascending <- grown keys ascending),
   writes ``coord`` and zeroes the grown ``values`` in place,

and returns ``(slots, pruned_keys)``. ``k`` shrinks to the number of usable candidates (and of
prunable blocks): the number of active blocks never changes. The caller then re-initialises the
grown values if wanted, resets the optimizer-state rows of ``slots`` and rebuilds the row index.

``tables`` (optional, ``int64[T, 4]``: ``row_start, num_rows, num_blocks, padding_row`` per
table, ``padding_row = -1`` for none; :meth:`BlockSparseBase.table_layout`) lets the op reject
candidates outside their table's columns or in a padding row, which would otherwise give a
``coord`` that no module (and no checkpoint verifier) accepts. An implementation marked
``checks_tables`` (the cpu kernel) does that check in its own pass over the keys, with the same
``ValueError`` text; for the others it runs here in Python (candidate-sized temporaries).

``keep_first`` (default False): a row's first active block -- an active slot whose column
(``coord % num_blocks``) is the lowest set bit of ``row_mask[coord // num_blocks]`` -- is not
prunable: it is neither counted among the prunable blocks (``k`` shrinks accordingly) nor ever
chosen, so no row that has blocks loses all of them. With ``prune_slots`` both restrictions
apply. It costs no ``[C]`` temporary (the cpu kernel reads the row's mask words in its key pass;
the reference works in chunks). ``DSLScheduler(keep_rows=True)``, the default, sets it.

Determinism: ties in magnitude go to the lower slot, ties in score to the lower key.
Non-finite numbers: a block holding NaN/Inf has magnitude ``-inf`` — it is pruned FIRST; a
non-finite candidate score is ignored (such a candidate is never grown).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import implementation


def _check_structure(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
                     cand_scores: Tensor, k: int, num_blocks: int, tables: Optional[Tensor]
                     ) -> None:
    """Checks on shapes and dtypes only: they hold under ``torch.compile`` too."""
    torch._check_value(values.dim() == 2,
                 lambda: f"values must be [C, B], got shape {tuple(values.shape)}")
    torch._check_value(coord.dtype == torch.int64 and coord.shape == values.shape[:1],
                 lambda: f"coord must be int64[{values.shape[0]}], got {coord.dtype} "
                         f"{tuple(coord.shape)}")
    torch._check_value(cand_keys.shape == cand_scores.shape and cand_keys.dim() == 1,
                 lambda: f"cand_keys and cand_scores must be 1-D of the same length, got "
                         f"{tuple(cand_keys.shape)} and {tuple(cand_scores.shape)}")
    torch._check_type(cand_keys.dtype in (torch.int32, torch.int64),
                      lambda: f"cand_keys must be int32 or int64, got {cand_keys.dtype}")
    torch._check_type(cand_scores.is_floating_point(),
                      lambda: f"cand_scores must be floating point, got {cand_scores.dtype}")
    torch._check_value(k >= 0, lambda: f"k must be >= 0, got {k}")
    torch._check_value(num_blocks > 0 and row_mask.dim() == 2,
                 lambda: "num_blocks must be positive and row_mask [N, W]")
    if tables is not None:
        torch._check_value(tables.dim() == 2 and tables.shape[1] == 4 and tables.dtype == torch.int64,
                     lambda: f"tables must be int64[T, 4], got {tables.dtype} "
                             f"{tuple(tables.shape)}")


def _check_keys(values: Tensor, row_mask: Tensor, cand_keys: Tensor, num_blocks: int,
                prune_slots: Optional[Tensor], tables: Optional[Tensor]) -> None:
    """Data-dependent checks (they read the tensors): eager calls only. The ``tables`` part
    builds candidate-sized temporaries; an implementation with ``checks_tables = True`` does it
    itself (with the same message) and gets ``tables=None`` here."""
    if cand_keys.numel():
        lo, hi = int(cand_keys.min()), int(cand_keys.max())
        limit = row_mask.shape[0] * num_blocks
        if lo < 0 or hi >= limit:
            raise ValueError(f"cand_keys must lie in [0, {limit}) (rows x num_blocks), got "
                             f"[{lo}, {hi}]")
        if tables is not None and tables.numel():
            keys = cand_keys.long()
            row, col = keys // num_blocks, keys % num_blocks
            tb = tables.to(keys.device)
            t = (torch.searchsorted(tb[:, 0].contiguous(), row, right=True) - 1).clamp(min=0)
            bad = (row >= tb[t, 0] + tb[t, 1]) | (row < tb[t, 0]) | (col >= tb[t, 2])
            bad |= row == tb[t, 3]
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"cand_keys[{i}] = {int(keys[i])} is block (row {int(row[i])}, column "
                    f"{int(col[i])}), outside table {int(t[i])} (rows [{int(tb[t[i], 0])}, "
                    f"{int(tb[t[i], 0] + tb[t[i], 1])}), {int(tb[t[i], 2])} blocks per row, "
                    f"padding row {int(tb[t[i], 3])})")
    if prune_slots is not None and prune_slots.numel():
        if int(prune_slots.min()) < 0 or int(prune_slots.max()) >= values.shape[0]:
            raise ValueError(f"prune_slots must lie in [0, {values.shape[0]})")


@torch.library.custom_op("dsl::prune_regrow_", mutates_args=("values", "coord"))
def prune_regrow_(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
                  cand_scores: Tensor, k: int, num_blocks: int, prune_slots: Optional[Tensor],
                  backend: str, tables: Optional[Tensor] = None, keep_first: bool = False
                  ) -> Tuple[Tensor, Tensor]:
    """In-place prune/regrow of a slot pool (module docstring). Call under ``torch.no_grad()``
    with ``values`` the pool's Parameter (or its ``.data``). Bad arguments raise before anything
    is written.

    >>> import torch
    >>> from dsl_kernels.sparsity import prune_regrow_
    >>> values = torch.tensor([[3.0], [0.1], [2.0]]); coord = torch.tensor([0, 1, 2])
    >>> row_mask = torch.tensor([[0b0111]])            # one row, blocks 0, 1, 2 active
    >>> slots, pruned = prune_regrow_(values, coord, row_mask, torch.tensor([5, 2, 4]),
    ...                               torch.tensor([0.5, 9.0, 0.7]), 1, 8, None, "reference")
    >>> slots.tolist(), pruned.tolist(), coord.tolist(), values[1].item()
    ([1], [1], [0, 4, 2], 0.0)
    """
    _check_structure(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks, tables)
    impl = implementation(backend, "prune_regrow_")
    in_kernel = getattr(impl, "checks_tables", False)  # the kernel checks the layout itself
    _check_keys(values, row_mask, cand_keys, num_blocks, prune_slots,
                None if in_kernel else tables)
    kw = {}
    if keep_first:
        if getattr(impl, "keeps_first", False):
            kw["keep_first"] = True
        else:  # an implementation without the flag (a user backend): the slot list instead
            prune_slots = _unprotected_slots(coord, row_mask, num_blocks, prune_slots)
    if in_kernel:
        return impl(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks, prune_slots,
                    tables, **kw)
    return impl(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks, prune_slots,
                **kw)


def _unprotected_slots(coord: Tensor, row_mask: Tensor, num_blocks: int,
                       prune_slots: Optional[Tensor]) -> Tensor:
    """The active slots of ``prune_slots`` (None = all slots) less the rows' first active
    blocks: ``keep_first`` for an implementation that lacks the flag (an ``int64`` list, ``[C]``
    at most)."""
    from ..backends.reference.prune_regrow import first_block_flags

    slots = (torch.arange(coord.numel(), device=coord.device) if prune_slots is None
             else prune_slots.long())
    c = coord[slots]
    return slots[(c >= 0) & ~first_block_flags(c, row_mask, num_blocks)]


@prune_regrow_.register_fake
def _prune_regrow_fake(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks,
                       prune_slots, backend, tables=None, keep_first=False):
    _check_structure(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks, tables)
    n = torch.library.get_ctx().new_dynamic_size()
    return coord.new_empty((n,)), coord.new_empty((n,))
