"""The ``cpu`` backend: the C++/OpenMP kernels of ``dsl_kernels._C`` (csrc/cpu).

:func:`load` imports the extension (which registers the ``torch.ops.dsl_C`` ops), registers
fake impls for them (so ``torch.library.opcheck`` and ``torch.compile`` can trace them) and
returns this module, whose functions have exactly the signatures of
:mod:`dsl_kernels.reference`. ``dsl_kernels.dispatch`` calls :func:`load` lazily and reports
the exception it raises (for instance "not built") in ``dsl_kernels.backends()``.

>>> import torch
>>> from dsl_kernels import _cpu_backend, reference
>>> be = _cpu_backend.load()  # doctest: +SKIP
>>> coord = torch.tensor([3, -1, 0])  # slot 0 holds block (1, 1), slot 2 block (0, 0)
>>> be.rebuild_index(coord, 2, 2)[1]  # doctest: +SKIP
tensor([ 2,  0, -1], dtype=torch.int32)
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import MODE_MAX, num_mask_words

_FAKES_REGISTERED = False


def _import_extension():
    try:
        from . import _C  # noqa: F401  (importing registers torch.ops.dsl_C.*)
    except ImportError as e:
        msg = (f"the C++ extension dsl_kernels._C is not built or cannot be loaded ({e}); build "
               f"it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
               f"--inplace`)")
        warnings.warn(msg + "; falling back to the reference backend for CPU tensors",
                      RuntimeWarning, stacklevel=2)
        raise ImportError(msg) from e
    return _C


def register_fakes() -> None:
    """Fake (meta) impls of the ``dsl_C`` ops: output shapes from input shapes, no data."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("dsl_C::lookup")
    def _lookup_fake(values, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights,
                     num_blocks, mode, padding_idx):
        num_bags = offsets.shape[0] - 1
        D = num_blocks * values.shape[1]
        out = values.new_empty((num_bags, D))
        if mode == MODE_MAX:
            return out, values.new_empty((num_bags, D), dtype=torch.int64)
        return out, values.new_empty((0,), dtype=torch.int64)

    @torch.library.register_fake("dsl_C::lookup_backward")
    def _lookup_backward_fake(grad_out, values, row_ptr, row_slots, row_mask, indices, offsets,
                              per_sample_weights, max_idx, frozen, num_blocks, mode, padding_idx,
                              deterministic):
        return torch.empty_like(values)

    @torch.library.register_fake("dsl_C::grow_scores")
    def _grow_scores_fake(grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                          per_sample_weights, max_idx, num_blocks, mode, padding_idx):
        R = torch.library.get_ctx().new_dynamic_size()
        return (indices.new_empty((R,), dtype=torch.int64),
                grad_out.new_empty((R, num_blocks), dtype=torch.float32))

    @torch.library.register_fake("dsl_C::rebuild_index")
    def _rebuild_index_fake(coord, num_rows, num_blocks):
        return (coord.new_empty((num_rows + 1,), dtype=torch.int32),
                coord.new_empty(coord.shape, dtype=torch.int32),
                coord.new_empty((num_rows, num_mask_words(num_blocks)), dtype=torch.int64))

    _FAKES_REGISTERED = True


def load():
    """Import the CPU extension and return the backend (this module); raises ImportError with
    the reason when the extension is missing or broken."""
    _import_extension()
    register_fakes()
    return sys.modules[__name__]


# -------------------------------------------------- the backend functions (reference signatures)


def lookup(values: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
           indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
           num_blocks: int, mode: int, padding_idx: int) -> Tuple[Tensor, Tensor]:
    """Embedding-bag forward over the pool (see :func:`dsl_kernels.reference.lookup`)."""
    out, max_idx = torch.ops.dsl_C.lookup.default(values, row_ptr, row_slots, row_mask, indices,
                                                  offsets, per_sample_weights, num_blocks, mode,
                                                  padding_idx)
    return out, max_idx


def lookup_backward(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                    row_mask: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor], max_idx: Tensor,
                    frozen: Optional[Tensor], num_blocks: int, mode: int, padding_idx: int,
                    deterministic: bool) -> Tensor:
    """Masked gradient scatter (see :func:`dsl_kernels.reference.lookup_backward`); always
    deterministic on CPU."""
    return torch.ops.dsl_C.lookup_backward.default(grad_out, values, row_ptr, row_slots,
                                                   row_mask, indices, offsets,
                                                   per_sample_weights, max_idx, frozen,
                                                   num_blocks, mode, padding_idx, deterministic)


def grow_scores(grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor, row_mask: Tensor,
                indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                max_idx: Tensor, num_blocks: int, mode: int, padding_idx: int
                ) -> Tuple[Tensor, Tensor]:
    """Gradient norm of the inactive blocks of the touched rows (see
    :func:`dsl_kernels.reference.grow_scores`)."""
    rows, scores = torch.ops.dsl_C.grow_scores.default(grad_out, row_ptr, row_slots, row_mask,
                                                       indices, offsets, per_sample_weights,
                                                       max_idx, num_blocks, mode, padding_idx)
    return rows, scores


def rebuild_index(coord: Tensor, num_rows: int, num_blocks: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR row index from ``coord`` (see :func:`dsl_kernels.reference.rebuild_index`)."""
    row_ptr, row_slots, row_mask = torch.ops.dsl_C.rebuild_index.default(coord, num_rows,
                                                                         num_blocks)
    return row_ptr, row_slots, row_mask
