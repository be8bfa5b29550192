"""Backend registry: which implementation of the ``dsl`` ops runs for a given device.

A backend is an object (usually a module) exposing some of the functions

``lookup``, ``lookup_backward``, ``grow_scores``, ``rebuild_index``, ``prune_regrow_``,
``fused_update``

with exactly the signatures of :mod:`dsl_kernels.reference`. Missing functions fall back to the
reference implementation, so a backend can be brought up one op at a time.

Choice: ``backend="auto"`` (default) or the ``DSL_KERNELS_BACKEND`` environment variable.
CUDA tensors -> ``cuda`` extension, else ``triton``; CPU tensors -> ``cpu`` extension, else
``reference``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from . import reference

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


@dataclass
class _Entry:
    name: str
    devices: Tuple[str, ...]
    loader: Callable[[], Any]  # returns the implementation or raises (the reason)
    impl: Any = None
    error: Optional[str] = None
    loaded: bool = False
    extra_check: Optional[Callable[[str], Optional[str]]] = field(default=None)

    def load(self):
        if not self.loaded:
            self.loaded = True
            try:
                self.impl = self.loader()
            except Exception as e:  # a broken extension must never break import
                self.error = f"{type(e).__name__}: {e}"
        return self.impl


_REGISTRY: Dict[str, _Entry] = {}


def register_backend(name: str, loader: Callable[[], Any], devices: Tuple[str, ...],
                     extra_check: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Register a backend lazily: ``loader()`` imports it on first use and may raise to say why
    it is unavailable; ``extra_check(device_type)`` returns a reason string when the backend
    cannot run on that device type right now (e.g. Triton on CPU without the interpreter)."""
    _REGISTRY[name] = _Entry(name, devices, loader, extra_check=extra_check)


def _why_not(name: str, device_type: str) -> Optional[str]:
    """None if backend ``name`` can run on ``device_type``, otherwise the reason."""
    e = _REGISTRY.get(name)
    if e is None:
        return f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)} or 'auto')"
    if device_type not in e.devices:
        return f"backend {name!r} does not run on {device_type} tensors"
    if e.load() is None:
        return f"backend {name!r} failed to load ({e.error})"
    if e.extra_check is not None:
        return e.extra_check(device_type)
    return None


def resolve(backend: Optional[str], device_type: str) -> str:
    """Name of the backend to use for tensors on ``device_type`` (``"cpu"``/``"cuda"``)."""
    backend = backend or "auto"
    if backend == "auto":
        backend = os.environ.get("DSL_KERNELS_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            if _why_not(name, device_type) is None:
                return name
        return "reference"
    reason = _why_not(backend, device_type)
    if reason is not None:
        raise ValueError(f"backend={backend!r} is not available: {reason}")
    return backend


def get(name: str) -> Any:
    e = _REGISTRY[name]
    return e.load()


def function(name: str, op: str) -> Callable:
    """The implementation of ``op`` in backend ``name`` (reference when the backend lacks it)."""
    impl = get(name)
    fn = getattr(impl, op, None) if impl is not None else None
    return fn if fn is not None else getattr(reference, op)


def backends() -> Dict[str, Dict[str, Any]]:
    """What is available here and why not: ``{name: {"cpu": reason|None, "cuda": ...}}``.

    >>> import dsl_kernels
    >>> dsl_kernels.backends()["reference"]["cpu"] is None
    True
    """
    out = {}
    for name in BACKEND_NAMES:
        out[name] = {dev: _why_not(name, dev) for dev in ("cpu", "cuda")}
        if out[name]["cuda"] is None:
            import torch

            if not torch.cuda.is_available():
                out[name]["cuda"] = "no CUDA device visible to torch"
    return out


# ----------------------------------------------------------------------------- built-ins


def _load_reference():
    return reference


def _load_cpu():
    from . import _cpu_backend  # the C++ extension wrapper (csrc/)

    return _cpu_backend.load()


def _load_cuda():
    from . import _cuda_backend

    return _cuda_backend.load()


def _load_triton():
    import triton  # noqa: F401

    from . import triton as triton_backend

    return triton_backend


def _triton_check(device_type: str) -> Optional[str]:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


register_backend("reference", _load_reference, ("cpu", "cuda"))
register_backend("cpu", _load_cpu, ("cpu",))
register_backend("cuda", _load_cuda, ("cuda",))
register_backend("triton", _load_triton, ("cpu", "cuda"), extra_check=_triton_check)
