"""Bounds checking of the CUDA kernels without host synchronisation (FBGEMM's ``BoundsCheckMode``).

The compiled CUDA ops check the values of every batch (offsets start at 0 and never decrease,
indices are rows of the table) with a small kernel. How they report a bad value is one
process-wide setting:

``"raise"`` (default)
    the op reads the kernel's record back before it writes anything and raises a message naming
    the argument: exact, but one host synchronisation per op (per lookup on the forward).
``"device"``
    the kernel records the first bad value in a per-device record that nothing reads back; the
    kernels skip what they cannot use (entries of rows outside the table, offsets clamped into
    the indices), so nothing is read or written out of bounds. :func:`check_bounds` raises the
    recorded error later (e.g. every N steps, or at the end of an epoch).
``"off"``
    no check at all; the kernels skip bad entries as in ``"device"``.

Together with ``validate=False`` on the module (which skips the Python-side value checks, see
:mod:`dsl_kernels.validation`), ``"device"`` or ``"off"`` makes a fused CUDA training step free of
host synchronisation, so it can be captured in a CUDA graph. CPU ops always check on the host
(no synchronisation to save there).

>>> import dsl_kernels
>>> previous = dsl_kernels.set_bounds_check_mode("device")
>>> dsl_kernels.set_bounds_check_mode(previous)
'device'
>>> with dsl_kernels.bounds_check_mode("off"):
...     dsl_kernels.get_bounds_check_mode()
'off'
>>> dsl_kernels.check_bounds()  # nothing recorded (and nothing to check without a GPU)
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

MODES = ("raise", "device", "off")

# The mode where no CUDA extension runs (a CPU-only build): kept so get returns what set got.
_mode = "raise"

# Error codes of csrc/cuda/launch.h (ErrorCode).
_OFFSET_START, _OFFSET_DECREASING, _OFFSET_PAST_END, _INDEX_RANGE, _MAX_IDX = 1, 2, 3, 4, 5


def _cuda_ops():
    """``torch.ops.dsl_C`` when the CUDA extension registered its settings ops, else None."""
    if not torch.cuda.is_available():
        return None
    from .backends import why_not

    if why_not("cuda", "cuda") is not None:  # imports the extension where it is built
        return None
    return torch.ops.dsl_C if hasattr(torch.ops.dsl_C, "cuda_bounds_check_mode") else None


def set_bounds_check_mode(mode: str) -> str:
    """Set the bounds-check mode of the CUDA ops (``"raise"``, ``"device"`` or ``"off"``);
    returns the previous one."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    previous = get_bounds_check_mode()
    ops = _cuda_ops()
    if ops is not None:
        ops.cuda_bounds_check_mode(MODES.index(mode))
    _mode = mode
    return previous


def get_bounds_check_mode() -> str:
    """The current bounds-check mode of the CUDA ops."""
    ops = _cuda_ops()
    if ops is not None:
        return MODES[int(ops.cuda_bounds_check_mode(-1))]
    return _mode


@contextlib.contextmanager
def bounds_check_mode(mode: str) -> Iterator[None]:
    """``with bounds_check_mode("device"): ...`` sets the mode for the block only."""
    previous = set_bounds_check_mode(mode)
    try:
        yield
    finally:
        set_bounds_check_mode(previous)


def check_bounds(device: Optional[Union[str, torch.device]] = None) -> None:
    """Raise the first bad value the ``"device"`` mode recorded on ``device`` (default: the
    current CUDA device) since the last call, and clear the record. Synchronises with that
    device (it reads the record); a no-op without the CUDA extension.

    Raises IndexError (an index outside the table) or ValueError (bad offsets), naming the
    position and the value; which table's batch it was is not recorded.
    """
    ops = _cuda_ops()
    if ops is None:
        return
    dev = torch.device(device) if device is not None else torch.device(
        "cuda", torch.cuda.current_device())
    record = ops.cuda_bounds_record(dev)
    code, pos, value = (int(x) for x in record[:3].tolist())
    if code == 0:
        return
    record.zero_()
    prefix = "bounds check (mode 'device')"
    if code == _INDEX_RANGE:
        raise IndexError(f"{prefix}: indices[{pos}] = {value} is out of range for the table it "
                         "was looked up in")
    if code == _OFFSET_START:
        raise ValueError(f"{prefix}: offsets must start at 0, got offsets[0] = {value}")
    if code == _OFFSET_DECREASING:
        raise ValueError(f"{prefix}: offsets must be non-decreasing, got offsets[{pos}] = "
                         f"{value} below the entry before it")
    if code == _OFFSET_PAST_END:
        raise ValueError(f"{prefix}: offsets point past the end of indices: last offset "
                         f"{value} (bag {pos})")
    if code == _MAX_IDX:
        raise IndexError(f"{prefix}: max_idx.flat[{pos}] = {value} is neither -1 nor an entry "
                         "of its bag")
    raise RuntimeError(f"{prefix}: validation failed with code {code}")
