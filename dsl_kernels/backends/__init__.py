"""Backends of the ``dsl`` ops, one folder each: ``reference`` (pure PyTorch, the oracle and the
fallback), ``cpu`` (C++/OpenMP, csrc/cpu), ``cuda`` (csrc/cuda), ``triton``; one file per op in
each, registering its implementation with :func:`register_impl` (see :mod:`.registry`).

``dsl_kernels.backends()`` (this package is callable) says which backends run here and why not:

>>> import dsl_kernels
>>> dsl_kernels.backends()["reference"]["cpu"] is None
True
"""
from __future__ import annotations

import sys
import types
from typing import Dict, Optional

from .registry import (BACKEND_NAMES, OPS, BrokenBackend, get, has_impl, implementation,
                       register_backend, register_impl, report, resolve, why_not)

__all__ = ["BACKEND_NAMES", "OPS", "BrokenBackend", "backends", "get", "has_impl",
           "implementation", "register_backend", "register_impl", "resolve", "why_not"]


def backends() -> Dict[str, Dict[str, Optional[str]]]:
    """What is available here and why not: ``{name: {"cpu": reason|None, "cuda": ...}}``."""
    return report()


class _CallablePackage(types.ModuleType):
    """``dsl_kernels.backends`` is both this package and the ``backends()`` report users call
    (the name was a function before the backends got their folder)."""

    def __call__(self) -> Dict[str, Dict[str, Optional[str]]]:
        return report()


sys.modules[__name__].__class__ = _CallablePackage
