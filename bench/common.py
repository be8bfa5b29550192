"""Timing helpers shared by every benchmark in ``bench/``.

* :func:`time_cuda` - CUDA-event timing of a callable, L2 flushed before every timed run,
  median of ``iters`` runs (milliseconds).
* :func:`time_cpu` - the same with ``time.perf_counter`` for CPU code.
* :func:`measure_copy_bandwidth` - device-to-device copy bandwidth (read + write bytes / time)
  measured in the same process, the yardstick for "% of copy bandwidth".
* :func:`env_header` - device / versions / date, one markdown-friendly line.

Example::

    >>> from bench.common import time_cpu
    >>> ms = time_cpu(lambda: sum(range(1000)), warmup=1, iters=5)
    >>> ms >= 0
    True
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

_FLUSH: Dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the L2 size; writing it evicts whatever a previous run left in L2."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FLUSH:
        props = torch.cuda.get_device_properties(idx)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0) or 64 * 2 ** 20
        _FLUSH[idx] = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
    return _FLUSH[idx]


def time_cuda_all(fn: Callable[[], object], warmup: int = 5, iters: int = 20,
                  flush_l2: bool = True, device: Optional[torch.device] = None) -> List[float]:
    """Milliseconds of each of ``iters`` timed runs of ``fn`` (after ``warmup`` untimed ones).

    Every run gets its own pair of CUDA events; the L2 flush (a write of 2x the L2 size) happens
    between runs, outside the timed region, so each run starts from cold caches like a real
    training step does for an embedding table far larger than L2.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    buf = _flush_buffer(device) if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cuda(fn: Callable[[], object], warmup: int = 5, iters: int = 20,
              flush_l2: bool = True) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device (see :func:`time_cuda_all`)."""
    return statistics.median(time_cuda_all(fn, warmup, iters, flush_l2))


def time_cpu(fn: Callable[[], object], warmup: int = 1, iters: int = 5) -> float:
    """Median wall-clock milliseconds of ``fn`` (CPU code, or anything that synchronises)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = 1 << 30, device: Optional[str] = None,
                           iters: int = 20) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s), counting read + write: ``2 * nbytes / time``.

    On CUDA a ``nbytes`` device-to-device ``copy_`` (median of ``iters``, buffer far larger
    than L2); on CPU a ``nbytes // 16`` copy timed with perf_counter (smoke runs only).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=iters, flush_l2=False)
        del src, dst
        return 2 * nbytes / (ms * 1e-3) / 1e9
    n = max(1, nbytes // 16 // 4)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_cpu(lambda: dst.copy_(src), warmup=1, iters=5)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def device_name(device: Optional[str] = None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def device_tag(device: Optional[str] = None) -> str:
    """File-name-safe device name, e.g. ``NVIDIA_H100_80GB_HBM3`` or ``cpu``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        return "cpu"
    return "".join(ch if ch.isalnum() else "_" for ch in device_name(device)).strip("_")


def env_header(device: Optional[str] = None) -> str:
    """One line naming the device and versions, for the top of every results table."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = [f"device: {device_name(device)}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:  # triton is optional for some benchmarks
        pass
    parts.append(f"python {platform.python_version()}")
    parts.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return " | ".join(parts)


def write_report(out_dir: str, name: str, text: str) -> str:
    """Write ``text`` to ``out_dir/name`` (the directory is created), print it and the path;
    returns the path."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {path}")
    return path


def markdown_table(rows: List[dict], columns: List[str]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)
