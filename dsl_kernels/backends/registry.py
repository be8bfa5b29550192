"""The backend registry: which implementation of a ``dsl`` op runs, and why a backend does not.

Each backend is a package ``dsl_kernels/backends/<name>/`` with one file per op; importing the
package registers its implementations with :func:`register_impl` (and raises, with the reason,
when the backend cannot load: extension not built, Triton missing). An op a backend does not
implement runs the ``reference`` implementation, so a backend can be brought up one op at a
time. Every implementation has the signature of the op in :mod:`dsl_kernels.ops` without the
trailing ``backend`` argument.

Choice: ``backend="auto"`` (default) or the ``DSL_KERNELS_BACKEND`` environment variable.
CUDA tensors -> ``cuda`` extension, else ``triton``; CPU tensors -> ``cpu`` extension. ``auto``
falls back to ``reference`` only when the C++ extension was never built (with a warning); an
extension that exists but fails to load (:class:`BrokenBackend`) is an error, never a silent
fallback.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
OPS = ("lookup", "lookup_backward", "grow_scores", "rebuild_index", "prune_regrow_",
       "fused_update", "update_index_", "fill_rows_",
       # Optional, no reference: a forward that also emits the fused backward's plan, and the
       # step that consumes it (backends/cpu/fused_step.py). Implementations of fused_lookup
       # may carry a ``supports(values, mode)`` predicate.
       "fused_lookup", "fused_apply")
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


class BrokenBackend(ImportError):
    """A backend that is installed but fails to load (a compiled extension that exists but
    cannot be imported): ``auto`` raises instead of falling back."""


@dataclass
class _Entry:
    name: str
    devices: Tuple[str, ...]
    loader: Callable[[], Any]  # imports the backend (registering its ops) or raises the reason
    extra_check: Optional[Callable[[str], Optional[str]]] = None
    impls: Dict[str, Callable] = field(default_factory=dict)
    error: Optional[BaseException] = None
    loaded: bool = False

    def load(self) -> bool:
        """Import the backend once; True when it is usable."""
        if not self.loaded:
            self.loaded = True
            try:
                obj = self.loader()
            except Exception as e:  # a broken extension must never break `import dsl_kernels`
                self.error = e
                return False
            # A user backend may hand back an object with op functions (the old API).
            for op in OPS:
                fn = getattr(obj, op, None) if obj is not None else None
                if callable(fn) and op not in self.impls:
                    self.impls[op] = fn
        return self.error is None


_REGISTRY: Dict[str, _Entry] = {}


def register_backend(name: str, loader: Callable[[], Any], devices: Tuple[str, ...],
                     extra_check: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Register a backend lazily: ``loader()`` imports it on first use (registering its ops with
    :func:`register_impl`, or returning an object with op functions) and may raise to say why it
    is unavailable; ``extra_check(device_type)`` returns a reason string when the backend cannot
    run on that device type right now (e.g. Triton on CPU without the interpreter)."""
    _REGISTRY[name] = _Entry(name, tuple(devices), loader, extra_check)


def register_impl(backend: str, op: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` in ``backend`` (called by the backend's op files)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY[backend].impls[op] = fn
        return fn

    return deco


def why_not(name: str, device_type: str) -> Optional[str]:
    """None if backend ``name`` can run on ``device_type``, otherwise the reason."""
    e = _REGISTRY.get(name)
    if e is None:
        return f"unknown backend {name!r} (choose from {', '.join(_REGISTRY)} or 'auto')"
    if device_type not in e.devices:
        return f"backend {name!r} does not run on {device_type} tensors"
    if not e.load():
        return f"backend {name!r} failed to load ({type(e.error).__name__}: {e.error})"
    if e.extra_check is not None:
        return e.extra_check(device_type)
    return None


_warned_fallback = set()


def resolve(backend: Optional[str], device_type: str) -> str:
    """Name of the backend to use for tensors on ``device_type`` (``"cpu"``/``"cuda"``)."""
    backend = backend or "auto"
    if backend == "auto":
        backend = os.environ.get("DSL_KERNELS_BACKEND", "auto") or "auto"
    if backend != "auto":
        reason = why_not(backend, device_type)
        if reason is not None:
            raise ValueError(f"backend={backend!r} is not available: {reason}")
        return backend
    reasons = []
    for name in _AUTO_ORDER.get(device_type, ()):
        reason = why_not(name, device_type)
        if reason is None:
            return name
        err = _REGISTRY[name].error
        if isinstance(err, BrokenBackend):
            # Built but broken: falling back would hide it (and change numerics and speed).
            raise RuntimeError(f"backend='auto' on {device_type}: {reason}. Fix the build or "
                               f"choose backend='reference' explicitly")
        reasons.append(reason)
    if reasons and device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        warnings.warn(f"backend='auto' on {device_type} tensors falls back to 'reference': "
                      + "; ".join(reasons), RuntimeWarning, stacklevel=3)
    return "reference"


def implementation(backend: str, op: str) -> Callable:
    """The implementation of ``op`` in ``backend`` (the reference one when it has none)."""
    e = _REGISTRY[backend]
    if e.load():
        fn = e.impls.get(op)
        if fn is not None:
            return fn
    ref = _REGISTRY["reference"]
    ref.load()
    return ref.impls[op]


def has_impl(backend: str, op: str) -> bool:
    """Whether ``backend`` loads and implements ``op`` itself (no reference fallback)."""
    e = _REGISTRY.get(backend)
    return e is not None and e.load() and op in e.impls


def get(name: str) -> Optional[Dict[str, Callable]]:
    """The ops ``name`` implements (``{op: fn}``), or None when it does not load."""
    e = _REGISTRY[name]
    return dict(e.impls) if e.load() else None


def report() -> Dict[str, Dict[str, Optional[str]]]:
    """What is available here and why not: ``{name: {"cpu": reason|None, "cuda": ...}}``."""
    out = {}
    for name in _REGISTRY:
        out[name] = {dev: why_not(name, dev) for dev in ("cpu", "cuda")}
        if out[name]["cuda"] is None:
            import torch

            if not torch.cuda.is_available():
                out[name]["cuda"] = "no CUDA device visible to torch"
    return out


# ----------------------------------------------------------------------------- built-ins


def _import(name: str) -> Callable[[], Any]:
    return lambda: importlib.import_module(f"dsl_kernels.backends.{name}")


def _triton_check(device_type: str) -> Optional[str]:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


register_backend("reference", _import("reference"), ("cpu", "cuda"))
register_backend("cpu", _import("cpu"), ("cpu",))
register_backend("cuda", _import("cuda"), ("cuda",))
register_backend("triton", _import("triton"), ("cpu", "cuda"), extra_check=_triton_check)
