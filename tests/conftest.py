"""Shared test setup: which backends/devices run here, and small helpers.

Triton kernels run on CPU tensors only under the interpreter, so TRITON_INTERPRET=1 is set
before anything imports triton when no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import types  # noqa: E402

import dsl_kernels  # noqa: E402
from dsl_kernels.backends import BACKEND_NAMES, get, why_not  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available_backends(device: str):
    """Backends that can run on ``device`` here (reference always)."""
    return [b for b in BACKEND_NAMES if why_not(b, device) is None]


def backend_ops(name: str, device: str = "cpu") -> types.SimpleNamespace:
    """The ops backend ``name`` implements itself, as attributes (``be.lookup(...)``); fails
    (never skips) when the backend does not load."""
    reason = why_not(name, device)
    assert reason is None, f"the {name} backend must load here: {reason}"
    return types.SimpleNamespace(**get(name))


def backend_device_params():
    """pytest params (backend, device) for every backend available on every device here."""
    out = []
    for dev in DEVICES:
        for b in available_backends(dev):
            out.append(pytest.param(b, dev, id=f"{b}-{dev}"))
    return out


SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data, skipping the test with a clear message when it is absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data sets not found at {path} (they live beside the project)")
    return path
