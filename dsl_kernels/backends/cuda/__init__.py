"""The ``cuda`` backend: the CUDA kernels of ``dsl_kernels._C_cuda`` (csrc/cuda).

The compiled kernels' schemas live in the CPU extension ``dsl_kernels._C`` (csrc/ops.cpp), so
this package imports it first, then ``_C_cuda``, which registers the CUDA implementations of
the same ``torch.ops.dsl_C`` ops (the op dispatches on the device of its tensors).
``lookup_backward(..., deterministic=True)`` sorts by row and segment-reduces (bit-identical to
the CPU and reference backends in fp32); ``deterministic=False`` uses atomics.
"""
from __future__ import annotations

import importlib.util

import torch

from ..cpu import import_extension
from ..registry import BrokenBackend

if torch.version.cuda is None:
    raise ImportError("the installed torch is a CPU-only build, so the CUDA extension "
                      "dsl_kernels._C_cuda is not built (install a CUDA build of torch and "
                      "reinstall dsl_kernels)")
import_extension()  # the dsl_C schemas
try:
    from ... import _C_cuda  # noqa: F401  (registers the CUDA kernels)
except ImportError as e:
    if importlib.util.find_spec("dsl_kernels._C_cuda") is None:
        raise ImportError("the CUDA extension dsl_kernels._C_cuda is not built; build it with "
                          "`pip install --no-build-isolation -e .` where nvcc is found "
                          "(DSL_KERNELS_CUDA=1 forces it)") from e
    raise BrokenBackend(f"the CUDA extension dsl_kernels._C_cuda is built but cannot be loaded "
                        f"({e})") from e

from . import fused_update, grow_scores, lookup, lookup_backward, rebuild_index  # noqa: E402,F401
