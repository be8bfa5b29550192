"""Largest allocation made while running a function, to prove no step builds a dense ``[N, D]``
tensor. Uses the torch profiler's memory tracking, which sees allocations made inside custom
ops and C++ kernels too. An op's ``self_cpu_memory_usage`` sums all of its own allocations, so
the figure is an upper bound on the largest single tensor (conservative for these tests)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch.profiler import ProfilerActivity, profile


def largest_allocation(fn: Callable[[], object]) -> Tuple[int, str]:
    """``(bytes, op name)`` of the op that allocated most for itself while ``fn()`` ran (CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    best, name = 0, ""
    for e in prof.events():
        if e.name != "[memory]" and e.self_cpu_memory_usage > best:
            best, name = e.self_cpu_memory_usage, e.name
    return best, name


def assert_no_dense_allocation(fn: Callable[[], object], num_rows: int, dim: int,
                               fraction: float, element_size: int = 4) -> int:
    """Fail if any op allocated ``fraction`` of the dense ``[num_rows, dim]`` table or more.
    ``fraction`` is required: pass what the step may legitimately allocate (e.g. the pool's
    share of dense), not a blanket allowance."""
    limit = fraction * num_rows * dim * element_size
    got, op = largest_allocation(fn)
    assert got < limit, (f"{op} allocated {got} bytes, >= {fraction} of the dense table "
                         f"({num_rows}x{dim})")
    return got


def assert_sparse_sized(fn: Callable[[], object], pool_bytes: int, batch_bytes: int,
                        dense_bytes: int) -> int:
    """Fail unless every op's own allocations stay within what a sparse step needs: the slot
    pool (``values``-sized state) or two batch-sized ``[L, D]`` temporaries, 5 % slack. The
    dense table must be well above that bound for the check to mean anything."""
    limit = 1.05 * max(pool_bytes, 2 * batch_bytes)
    assert limit < 0.5 * dense_bytes, "test sizes: the bound must be far below the dense table"
    got, op = largest_allocation(fn)
    assert got <= limit, (f"{op} allocated {got} bytes, more than the pool ({pool_bytes}) or two "
                          f"batch-sized temporaries ({batch_bytes}); dense is {dense_bytes}")
    return got


# --------------------------------------------------------------------------------------------
# Dispatch-level recorder (sparsity engine tests): sees every aten op, so it also reports the
# largest single NEW tensor (views and in-place results excluded) and the peak of the extra bytes
# alive at once inside a block.
#
# >>> x = torch.zeros(1000)
# >>> with AllocationRecorder() as rec:
# ...     y = x[:10] + 1          # a view (not counted) and a 10-element result
# ...     x.add_(1)               # in place: not counted
# >>> rec.max_numel, rec.peak_bytes
# (10, 40)

import weakref
from typing import Dict, List
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())


def _custom_op_body(func):
    """The Python function behind a ``torch.library.custom_op`` overload, or None."""
    if getattr(func, "namespace", "aten") in ("aten", "prim", "prims"):
        return None
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    name = f"{func.namespace}::{func._schema.name.split('::')[-1]}"
    opdef = OPDEFS.get(name)
    return None if opdef is None else getattr(opdef, "_init_fn", None)


class AllocationRecorder(TorchDispatchMode):
    """Record the tensors created inside the ``with`` block (see the comment above)."""

    def __init__(self, keep_all: bool = False, enter_custom_ops: bool = True):
        super().__init__()
        self.keep_all = keep_all
        # Run the Python body of torch.library custom ops (dsl::*) under the recorder, so the
        # temporaries they make are seen too (otherwise only their outputs are).
        self.enter_custom_ops = enter_custom_ops
        self.max_numel = 0
        self.max_op = None
        self.allocations: List[Tuple[str, int, int]] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: Dict[tuple, int] = {}

    def watch(self, *tensors) -> None:
        """Count the freeing of these PRE-EXISTING tensors inside the block as negative
        allocations, so ``peak_bytes`` becomes the net peak (e.g. an old index dropped before its
        replacement is built). Keeps no reference to them."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is not None and key not in self._live and key[3]:
                    self._watched = getattr(self, "_watched", set())
                    if key in self._watched:
                        continue
                    self._watched.add(key)
                    weakref.finalize(t.untyped_storage(), self._unwatch, key[3])

    def _unwatch(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def _release(self, key):
        n = self._live.pop(key, None)
        if n is not None:
            self.live_bytes -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_op_body(func) if self.enter_custom_ops else None
        if body is not None:
            with self:
                out = body(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        ins = {_storage_key(t) for t in tree_flatten((args, kwargs))[0]
               if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None or key in ins or key in self._live or key[3] == 0:
                continue
            n = t.numel()
            if n > self.max_numel:
                self.max_numel, self.max_op = n, str(func)
            if self.keep_all:
                self.allocations.append((str(func), n, key[3]))
            self._live[key] = key[3]
            self.live_bytes += key[3]
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                if self.keep_all:  # what was alive at the peak, for debugging
                    self.peak_op, self.peak_live = str(func), dict(self._live)
            weakref.finalize(t.untyped_storage(), self._release, key)
        return out


# --------------------------------------------------------------------------------------------
# Allocator-level peak: the torch profiler's memory records, which every torch allocation makes
# (inside C++ kernels and inside aten kernels too, e.g. the int64 temporary a bool .sum() widens
# to), unlike the dispatch recorder above, which sees only the tensors ops return. Frees of
# tensors allocated before ``fn`` started are not recorded, so the figure is an upper bound when
# ``fn`` drops pre-existing tensors.


def allocator_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated (net of frees) at once while ``fn()`` ran (CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
