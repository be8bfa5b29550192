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
                               fraction: float = 0.25, element_size: int = 4) -> int:
    """Fail if any op allocated ``fraction`` of the dense ``[num_rows, dim]`` table or more."""
    limit = fraction * num_rows * dim * element_size
    got, op = largest_allocation(fn)
    assert got < limit, (f"{op} allocated {got} bytes, >= {fraction} of the dense table "
                         f"({num_rows}x{dim})")
    return got
