"""The CUDA backend (csrc/cuda) against the reference backend; skipped without a GPU.

The conformance grid (``tests/test_conformance.py``) runs on ``cuda`` automatically when the
extension loads on a GPU machine. Here: bit-exact fp32 equality of the forward and of the
deterministic (sorted) backward with the reference computed on CPU, the atomic backward within
fp32 tolerance, the 16-byte vector paths (fp32 B=8, fp16 B=8) and the scalar path, several
mask words, grow_scores, rebuild_index, ``opcheck`` on CUDA tensors and the argument checks.
"""
from __future__ import annotations

import pytest
import torch

from dsl_kernels import SparseEmbeddingBag, dispatch, reference
from test_cpp_backend import MODES, case

HAS_GPU = torch.cuda.is_available()
BE, WHY = None, "no CUDA device"
if HAS_GPU:
    from dsl_kernels.backends import get, why_not

    WHY = why_not("cuda", "cuda")
    if WHY is None:
        import types

        BE = types.SimpleNamespace(**get("cuda"))

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
needs_ext = pytest.mark.skipif(BE is None, reason=WHY or "the CUDA extension loads")
DEV = "cuda"


def cu(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def cpu(*ts):
    return [None if t is None else t.cpu() for t in ts]


@needs_gpu
def test_extension_loads_on_gpu_machine():
    # On a GPU machine the CUDA backend must be there (a failed build should fail, not skip).
    assert BE is not None, WHY
    assert dispatch.resolve("auto", "cuda") == "cuda"


pytestmark = [needs_gpu]


@needs_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("pad", [-1, 7])
@pytest.mark.parametrize("B", [4, 8, 3])
def test_forward_and_sorted_backward_bit_exact(mode, index_dtype, pad, B):
    psw = mode == reference.MODE_SUM
    values, coord, (rp, rs, rm), idx, off, w = case(1, B=B, index_dtype=index_dtype, pad=pad,
                                                    psw=psw, num_bags=200)
    ref_out, ref_mi = reference.lookup(values, rp, rs, rm, idx, off, w, 5, mode, pad)
    out, mi = BE.lookup(*cu(values, rp, rs, rm, idx, off, w), 5, mode, pad)
    assert torch.equal(out.cpu(), ref_out) and torch.equal(mi.cpu(), ref_mi)
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(2))
    frozen = torch.zeros(values.shape[0], dtype=torch.bool)
    frozen[::5] = True
    for fz in (None, frozen):
        ref = reference.lookup_backward(g, values, rp, rs, rm, idx, off, w, ref_mi, fz, 5, mode,
                                        pad, True)
        det = BE.lookup_backward(*cu(g, values, rp, rs, rm, idx, off, w, mi, fz), 5, mode, pad,
                                 True)
        assert torch.equal(det.cpu(), ref)
        fast = BE.lookup_backward(*cu(g, values, rp, rs, rm, idx, off, w, mi, fz), 5, mode, pad,
                                  False)
        torch.testing.assert_close(fast.cpu(), ref, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [8, 4])
@pytest.mark.parametrize("mode", MODES)
def test_half_types(dtype, B, mode):
    values, coord, (rp, rs, rm), idx, off, w = case(3, B=B, dtype=dtype, num_bags=150)
    ref_out, ref_mi = reference.lookup(values, rp, rs, rm, idx, off, None, 5, mode, -1)
    out, mi = BE.lookup(*cu(values, rp, rs, rm, idx, off), None, 5, mode, -1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu(), ref_out, atol=0, rtol=0)
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref = reference.lookup_backward(g, values, rp, rs, rm, idx, off, None, ref_mi, None, 5, mode,
                                    -1, True)
    det = BE.lookup_backward(*cu(g, values, rp, rs, rm, idx, off, None, mi, None), 5, mode, -1,
                             True)
    assert det.dtype == dtype
    torch.testing.assert_close(det.cpu(), ref, atol=0, rtol=0)


@needs_ext
def test_three_mask_words_and_determinism():
    values, coord, (rp, rs, rm), idx, off, w = case(5, N=40, NB=130, B=1, density=0.4,
                                                    num_bags=300)
    for mode in MODES:
        ref_out, ref_mi = reference.lookup(values, rp, rs, rm, idx, off, None, 130, mode, -1)
        out, mi = BE.lookup(*cu(values, rp, rs, rm, idx, off), None, 130, mode, -1)
        assert torch.equal(out.cpu(), ref_out) and torch.equal(mi.cpu(), ref_mi)
        g = torch.randn(ref_out.shape)
        args = cu(g, values, rp, rs, rm, idx, off, None, mi, None)
        first = BE.lookup_backward(*args, 130, mode, -1, True)
        for _ in range(3):
            assert torch.equal(BE.lookup_backward(*args, 130, mode, -1, True), first)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_grow_scores(mode):
    values, coord, (rp, rs, rm), idx, off, w = case(7, pad=3, psw=mode != reference.MODE_MAX)
    out, mi = reference.lookup(values, rp, rs, rm, idx, off, w, 5, mode, 3)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    ref_rows, ref_scores = reference.grow_scores(g, rp, rs, rm, idx, off, w, mi, 5, mode, 3)
    rows, scores = BE.grow_scores(*cu(g, rp, rs, rm, idx, off, w, mi), 5, mode, 3)
    assert torch.equal(rows.cpu(), ref_rows)
    torch.testing.assert_close(scores.cpu(), ref_scores, atol=1e-6, rtol=1e-6)


@needs_ext
@pytest.mark.parametrize("NB", [1, 5, 64, 130])
def test_rebuild_index(NB):
    from test_cpp_backend import make_pool

    _, coord = make_pool(37, NB, 1, 0.3, torch.Generator().manual_seed(NB), free=11)
    got = BE.rebuild_index(coord.to(DEV), 37, NB)
    for a, b in zip(got, reference.rebuild_index(coord, 37, NB)):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b)


@needs_ext
def test_opcheck_on_cuda():
    """The dsl:: ops (schema, fake, autograd) with the CUDA kernels behind them (the dsl_C::
    kernels are internal: their fake implementations are the dsl:: ops')."""
    from dsl_kernels import ops

    values, coord, index, idx, off, w = case(9, N=30, num_bags=6, psw=True)
    values, coord, idx, off, w = cu(values, coord, idx, off, w)
    rp, rs, rm = cu(*index)
    for mode in MODES:
        ww = w if mode == reference.MODE_SUM else None
        torch.library.opcheck(ops.lookup, (values, rp, rs, rm, idx, off, ww, None, 5, mode, -1,
                                           True, "cuda"))
        out, mi = BE.lookup(values, rp, rs, rm, idx, off, ww, 5, mode, -1)
        g = torch.randn(out.shape, device=DEV)
        torch.library.opcheck(ops.lookup_backward, (g, values, rp, rs, rm, idx, off, ww, mi,
                                                    None, 5, mode, -1, True, "cuda"))
        torch.library.opcheck(ops.grow_scores, (g, rp, rs, rm, idx, off, ww, mi, 5, mode, -1,
                                                "cuda"),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.rebuild_index, (coord, 30, 5, "cuda"))


@needs_ext
def test_argument_checks_on_cuda():
    values, coord, (rp, rs, rm), idx, off, w = case(10, N=300)
    idx[5] = 300
    args = cu(values, rp, rs, rm, idx, off)
    before = [t.clone() for t in args]
    with pytest.raises(IndexError, match=r"dsl_C::lookup: indices\[5\] = 300 is out of range"):
        torch.ops.dsl_C.lookup(*args, None, 5, 0, -1)
    for a, b in zip(before, args):
        assert torch.equal(a, b)
    idx[5] = 0
    bad_off = off.clone()
    bad_off[0] = 1
    with pytest.raises(RuntimeError, match=r"offsets must start at 0"):
        torch.ops.dsl_C.lookup(*cu(values, rp, rs, rm, idx, bad_off), None, 5, 0, -1)
    with pytest.raises(RuntimeError, match=r"indices is on cpu but the pool is on cuda"):
        torch.ops.dsl_C.lookup(*cu(values, rp, rs, rm), idx, off, None, 5, 0, -1)
    with pytest.raises(IndexError, match=r"coord\[1\] = 20 is neither -1"):
        torch.ops.dsl_C.rebuild_index(torch.tensor([0, 20, -1], device=DEV), 5, 4)
    with pytest.raises(RuntimeError, match=r"names a block that another slot already holds"):
        torch.ops.dsl_C.rebuild_index(torch.tensor([7, -1, 7], device=DEV), 5, 4)


@needs_ext
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_module_training_matches_cpu(mode):
    mods = {}
    for device in ("cpu", DEV):
        torch.manual_seed(0)
        m = SparseEmbeddingBag(500, 32, mode=mode, density=0.2, block_size=8, padding_idx=2,
                               backend="reference", deterministic=True)
        m.to(device)
        m.backend = "auto"
        m.rebuild_index()
        mods[device] = m
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 500, (64, 6), generator=gen)
    idx[::3, 0] = 2
    for device, m in mods.items():
        assert m.backend_for() == ("cpu" if device == "cpu" else "cuda")
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            m(idx.to(device)).square().sum().backward()
            opt.step()
    torch.testing.assert_close(mods[DEV].values.cpu(), mods["cpu"].values, atol=1e-6, rtol=1e-6)
