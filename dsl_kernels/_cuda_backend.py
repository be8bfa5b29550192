"""The ``cuda`` backend: the CUDA kernels of ``dsl_kernels._C_cuda`` (csrc/cuda).

The op schemas live in the CPU extension ``dsl_kernels._C`` (csrc/ops.cpp), so :func:`load`
imports it first, then ``_C_cuda``, which registers the CUDA implementations of the same
``torch.ops.dsl_C`` ops. The functions are those of :mod:`dsl_kernels._cpu_backend` (the op
dispatches on the device of its tensors), with the signatures of :mod:`dsl_kernels.reference`.
``lookup_backward(..., deterministic=True)`` sorts by row and segment-reduces (bit-identical to
the CPU and reference backends in fp32); ``deterministic=False`` uses atomics.

>>> import torch
>>> from dsl_kernels import _cuda_backend
>>> be = _cuda_backend.load()  # doctest: +SKIP  (needs a CUDA build)
>>> be.rebuild_index(torch.tensor([3, -1, 0], device="cuda"), 2, 2)[1]  # doctest: +SKIP
tensor([ 2,  0, -1], device='cuda:0', dtype=torch.int32)
"""
from __future__ import annotations

import sys
import warnings

import torch

from . import _cpu_backend
from ._cpu_backend import grow_scores, lookup, lookup_backward, rebuild_index  # noqa: F401

__all__ = ["load", "lookup", "lookup_backward", "grow_scores", "rebuild_index"]


def load():
    """Import the CUDA extension and return the backend (this module); raises ImportError with
    the reason when torch has no CUDA or the extension is missing or broken."""
    if torch.version.cuda is None:
        raise ImportError("the installed torch is a CPU-only build, so the CUDA extension "
                          "dsl_kernels._C_cuda is not built (install a CUDA build of torch and "
                          "reinstall dsl_kernels)")
    _cpu_backend._import_extension()  # the dsl_C schemas
    try:
        from . import _C_cuda  # noqa: F401  (registers the CUDA kernels)
    except ImportError as e:
        msg = (f"the CUDA extension dsl_kernels._C_cuda is not built or cannot be loaded ({e}); "
               f"build it with `pip install --no-build-isolation -e .` where nvcc is found "
               f"(DSL_KERNELS_CUDA=1 forces it)")
        warnings.warn(msg + "; falling back to Triton or the reference backend for CUDA "
                      "tensors", RuntimeWarning, stacklevel=2)
        raise ImportError(msg) from e
    _cpu_backend.register_fakes()
    return sys.modules[__name__]
