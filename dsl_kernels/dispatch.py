"""Compatibility alias of :mod:`dsl_kernels.backends.registry` (the backend registry lived here
before the backends got their folders)."""
from .backends.registry import (BACKEND_NAMES, BrokenBackend, get, implementation,  # noqa: F401
                                register_backend, register_impl, report as backends, resolve,
                                why_not)
from .backends.registry import why_not as _why_not  # noqa: F401
