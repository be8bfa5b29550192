"""``dsl::fill_rows_`` (the optimizer-state reset of reassigned slots): the cpu kernel equals the
reference's ``index_fill_`` for every dtype and fill value, bad rows raise before anything is
written, and nothing outside the tensor is touched."""
import pytest
import torch

import dsl_kernels
from dsl_kernels import ops

BACKENDS = ["reference"] + (["cpu"] if dsl_kernels.backends.has_impl("cpu", "fill_rows_")
                            else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(50, 8), (50,), (50, 2, 3)])
def test_matches_index_fill(backend, dtype, value, shape):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g).to(dtype)
    rows = torch.randperm(50, generator=g)[:17]
    exp = t.clone().index_fill_(0, rows, value)
    ops.fill_rows_(t, rows, value, backend)
    assert torch.equal(t, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_raise_and_write_nothing(backend):
    t = torch.randn(10, 4)
    t0 = t.clone()
    for bad in ([3, 10], [-1, 2]):
        with pytest.raises(IndexError, match="rows"):
            ops.fill_rows_(t, torch.tensor(bad), 0.0, backend)
    assert torch.equal(t, t0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_no_write_outside_the_tensor():
    buf = torch.full((14, 4), 7.0)
    view = buf[2:12]
    ops.fill_rows_(view, torch.tensor([0, 9, 4]), 0.0, "cpu")
    assert (buf[:2] == 7).all() and (buf[12:] == 7).all()
    assert (view[[0, 9, 4]] == 0).all() and (view[1] == 7).all()
