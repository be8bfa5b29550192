"""The C++/OpenMP ``cpu`` backend (csrc/cpu) against the reference backend.

The conformance grid (``tests/test_conformance.py``) already runs on ``cpu`` once the extension
is built; this file adds what the grid does not see: bit-exact equality with the reference in
fp32 (same products, same order), determinism across runs and thread counts, grow_scores and
rebuild_index, ``torch.library.opcheck`` of the ``dsl`` ops on the cpu backend, and the C++-side
argument checks.

No skip: a missing or broken extension fails this file (and CI) instead of hiding behind the
reference fallback.
"""
from __future__ import annotations

import pytest
import torch

from dsl_kernels import SparseEmbeddingBag, dispatch, reference

from conftest import backend_ops
from dsl_kernels import ops

BE = backend_ops("cpu")

MODES = (reference.MODE_SUM, reference.MODE_MEAN, reference.MODE_MAX)


def make_pool(N, NB, B, density, gen, dtype=torch.float32, free=3):
    """A random pool: `density` of the N x NB blocks active, in shuffled slots, plus `free`
    free slots; values random."""
    nact = max(1, int(density * N * NB))
    keys = torch.randperm(N * NB, generator=gen)[:nact]
    coord = torch.cat([keys, torch.full((free,), -1, dtype=torch.int64)])
    coord = coord[torch.randperm(coord.numel(), generator=gen)]
    values = torch.randn(coord.numel(), B, generator=gen).to(dtype)
    return values, coord


def make_bags(N, num_bags, gen, index_dtype=torch.int64, max_len=9, pad=-1):
    lengths = torch.randint(0, max_len, (num_bags,), generator=gen)
    lengths[0] = 0
    L = int(lengths.sum())
    # Zipf-like skew: many repeats of the low rows, so rows recur within and across bags.
    idx = (torch.rand(L, generator=gen) ** 3 * N).long().clamp(max=N - 1)
    if pad >= 0 and L:
        idx[::4] = pad
    offsets = torch.zeros(num_bags + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return idx.to(index_dtype), offsets.to(index_dtype)


def case(seed=0, N=300, NB=5, B=4, density=0.35, num_bags=64, index_dtype=torch.int64,
         dtype=torch.float32, pad=-1, psw=False):
    gen = torch.Generator().manual_seed(seed)
    values, coord = make_pool(N, NB, B, density, gen, dtype)
    index = reference.rebuild_index(coord, N, NB)
    idx, off = make_bags(N, num_bags, gen, index_dtype, pad=pad)
    w = torch.randn(idx.numel(), generator=gen).to(dtype) if psw else None
    return values, coord, index, idx, off, w


# ------------------------------------------------------------------ equality with reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("pad", [-1, 7])
def test_forward_backward_bit_exact_fp32(mode, index_dtype, pad):
    psw = mode == reference.MODE_SUM
    values, coord, (rp, rs, rm), idx, off, w = case(1, index_dtype=index_dtype, pad=pad, psw=psw)
    NB = rm.shape[1] and 5
    out, mi = BE.lookup(values, rp, rs, rm, idx, off, w, NB, mode, pad)
    ref_out, ref_mi = reference.lookup(values, rp, rs, rm, idx, off, w, NB, mode, pad)
    assert torch.equal(out, ref_out)
    assert torch.equal(mi, ref_mi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    frozen = torch.zeros(values.shape[0], dtype=torch.bool)
    frozen[::5] = True
    for fz in (None, frozen):
        grad = BE.lookup_backward(g, values, rp, rs, rm, idx, off, w, mi, fz, NB, mode, pad, True)
        ref = reference.lookup_backward(g, values, rp, rs, rm, idx, off, w, ref_mi, fz, NB, mode,
                                        pad, True)
        assert torch.equal(grad, ref)
        if fz is not None:
            assert not grad[fz].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_types_round_once(dtype, mode):
    values, coord, (rp, rs, rm), idx, off, w = case(3, dtype=dtype, index_dtype=torch.int32)
    out, mi = BE.lookup(values, rp, rs, rm, idx, off, None, 5, mode, -1)
    ref_out, ref_mi = reference.lookup(values, rp, rs, rm, idx, off, None, 5, mode, -1)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # same fp32 sum, one rounding
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    grad = BE.lookup_backward(g, values, rp, rs, rm, idx, off, None, mi, None, 5, mode, -1, False)
    ref = reference.lookup_backward(g, values, rp, rs, rm, idx, off, None, ref_mi, None, 5, mode,
                                    -1, False)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref, atol=0, rtol=0)


def test_three_mask_words():
    # NB = 130 blocks per row: three 64-bit mask words, ranks across words.
    values, coord, (rp, rs, rm), idx, off, w = case(5, N=40, NB=130, B=1, density=0.4)
    for mode in MODES:
        out, mi = BE.lookup(values, rp, rs, rm, idx, off, None, 130, mode, -1)
        ref_out, ref_mi = reference.lookup(values, rp, rs, rm, idx, off, None, 130, mode, -1)
        assert torch.equal(out, ref_out) and torch.equal(mi, ref_mi)
        g = torch.randn(out.shape)
        assert torch.equal(
            BE.lookup_backward(g, values, rp, rs, rm, idx, off, None, mi, None, 130, mode, -1,
                               True),
            reference.lookup_backward(g, values, rp, rs, rm, idx, off, None, ref_mi, None, 130,
                                      mode, -1, True))


def test_backward_deterministic_across_runs_and_threads():
    values, coord, (rp, rs, rm), idx, off, w = case(6, N=50, num_bags=2000, psw=True)
    g = torch.randn(off.numel() - 1, 20)
    args = (g, values, rp, rs, rm, idx, off, w, torch.empty(0, dtype=torch.int64), None, 5,
            reference.MODE_SUM, -1, False)
    first = BE.lookup_backward(*args)
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 3):
            torch.set_num_threads(n)
            for _ in range(2):
                assert torch.equal(BE.lookup_backward(*args), first)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------ grow_scores, rebuild_index


@pytest.mark.parametrize("mode", MODES)
def test_grow_scores_matches_reference(mode):
    values, coord, (rp, rs, rm), idx, off, w = case(7, pad=3, psw=mode != reference.MODE_MAX)
    out, mi = reference.lookup(values, rp, rs, rm, idx, off, w, 5, mode, 3)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    rows, scores = BE.grow_scores(g, rp, rs, rm, idx, off, w, mi, 5, mode, 3)
    ref_rows, ref_scores = reference.grow_scores(g, rp, rs, rm, idx, off, w, mi, 5, mode, 3)
    assert torch.equal(rows, ref_rows)
    assert 3 not in rows.tolist()
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-6)
    assert (scores > 0).any()


@pytest.mark.parametrize("NB", [1, 5, 64, 130])
def test_rebuild_index_matches_reference(NB):
    gen = torch.Generator().manual_seed(NB)
    _, coord = make_pool(37, NB, 1, 0.3, gen, free=11)
    got = BE.rebuild_index(coord, 37, NB)
    for a, b in zip(got, reference.rebuild_index(coord, 37, NB)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_rebuild_index_empty_and_all_free():
    rp, rs, rm = BE.rebuild_index(torch.full((4,), -1, dtype=torch.int64), 3, 2)
    assert rp.tolist() == [0, 0, 0, 0] and rs.tolist() == [-1] * 4 and not rm.any()
    rp, rs, rm = BE.rebuild_index(torch.empty(0, dtype=torch.int64), 0, 2)
    assert rp.tolist() == [0] and rs.numel() == 0 and rm.shape == (0, 1)


# --------------------------------------------------------------------------------- opcheck


def test_opcheck_dsl_ops_on_cpu_backend():
    """The dsl:: ops (schema, fake, autograd) with the C++ kernels behind them."""
    values, coord, (rp, rs, rm), idx, off, w = case(9, N=30, num_bags=6, psw=True)
    for mode in MODES:
        ww = w if mode == reference.MODE_SUM else None
        torch.library.opcheck(ops.lookup, (values, rp, rs, rm, idx, off, ww, None, 5, mode, -1,
                                           True, "cpu"))
        out, mi = BE.lookup(values, rp, rs, rm, idx, off, ww, 5, mode, -1)
        g = torch.randn(out.shape)
        torch.library.opcheck(ops.lookup_backward, (g, values, rp, rs, rm, idx, off, ww, mi,
                                                    None, 5, mode, -1, True, "cpu"))
        torch.library.opcheck(ops.grow_scores, (g, rp, rs, rm, idx, off, ww, mi, 5, mode, -1,
                                                "cpu"),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.rebuild_index, (coord, 30, 5, "cpu"))


# ------------------------------------------------------------------------ C++-side checks


def _call_lookup(values, rp, rs, rm, idx, off, w=None, nb=5, mode=0, pad=-1):
    return torch.ops.dsl_C.lookup(values, rp, rs, rm, idx, off, w, nb, mode, pad)


def test_bad_index_raises_and_writes_nothing():
    values, coord, (rp, rs, rm), idx, off, w = case(10, N=300)
    idx[5] = 300
    before = [t.clone() for t in (values, rp, rs, rm, idx, off)]
    with pytest.raises(IndexError, match=r"dsl_C::lookup: indices\[5\] = 300 is out of range"):
        _call_lookup(values, rp, rs, rm, idx, off)
    idx[5] = -2
    with pytest.raises(IndexError, match=r"indices\[5\] = -2"):
        _call_lookup(values, rp, rs, rm, idx, off)
    idx[5] = 300
    for a, b in zip(before, (values, rp, rs, rm, idx, off)):
        assert torch.equal(a, b)
    g = torch.randn(off.numel() - 1, 20)
    with pytest.raises(IndexError, match=r"dsl_C::lookup_backward: indices\[5\]"):
        torch.ops.dsl_C.lookup_backward(g, values, rp, rs, rm, idx, off, None,
                                        torch.empty(0, dtype=torch.int64), None, 5, 0, -1, True)


@pytest.mark.parametrize("bad, message", [
    ("offsets_start", r"offsets must start at 0"),
    ("offsets_order", r"offsets must be non-decreasing"),
    ("offsets_end", r"offsets point past the end of indices"),
    ("offsets_dtype", r"offsets dtype .* does not match indices dtype"),
    ("indices_float", r"indices must be int32 or int64"),
    ("mode", r"mode must be 0 \(sum\), 1 \(mean\) or 2 \(max\)"),
    ("padding", r"padding_idx must be -1 or in \[0, 300\)"),
    ("row_mask_shape", r"row_mask must be int64 of shape \[num_rows, ceil\(num_blocks / 64\)\]"),
    ("row_ptr_dtype", r"row_ptr must be a 1-D int32 tensor"),
    ("values_dtype", r"values must be float32, float16 or bfloat16"),
    ("values_slots", r"values has 7 slots but row_slots has"),
    ("psw_len", r"per_sample_weights has 3 entries but indices has"),
])
def test_lookup_argument_checks(bad, message):
    values, coord, (rp, rs, rm), idx, off, w = case(11, N=300)
    kw = dict(values=values, rp=rp, rs=rs, rm=rm, idx=idx, off=off)
    if bad == "offsets_start":
        kw["off"] = off + 1
    elif bad == "offsets_order":
        o = off.clone()
        o[3] = int(o[4]) + 2  # offsets[4] < offsets[3]
        kw["off"] = o
    elif bad == "offsets_end":
        o = off.clone()
        o[-1] = idx.numel() + 1
        kw["off"] = o
    elif bad == "offsets_dtype":
        kw["off"] = off.int()
    elif bad == "indices_float":
        kw["idx"] = idx.float()
    elif bad == "row_mask_shape":
        kw["rm"] = rm[:-1]
    elif bad == "row_ptr_dtype":
        kw["rp"] = rp.long()
    elif bad == "values_dtype":
        kw["values"] = values.double()
    elif bad == "values_slots":
        kw["values"] = values[:7]
    extra = {}
    if bad == "mode":
        extra["mode"] = 3
    if bad == "padding":
        extra["pad"] = 300
    if bad == "psw_len":
        extra["w"] = torch.ones(3)
    with pytest.raises((RuntimeError, IndexError), match=message):
        _call_lookup(**kw, **extra)


def test_backward_argument_checks():
    values, coord, (rp, rs, rm), idx, off, w = case(12, N=300)
    out, mi = BE.lookup(values, rp, rs, rm, idx, off, None, 5, reference.MODE_MAX, -1)
    g = torch.randn(out.shape)
    args = [g, values, rp, rs, rm, idx, off, None, mi, None, 5, reference.MODE_MAX, -1, True]
    bad = list(args)
    bad[0] = g[:, :-1]
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[num_bags"):
        torch.ops.dsl_C.lookup_backward(*bad)
    bad = list(args)
    mi2 = mi.clone()
    mi2[2, 3] = int(off[-1]) + 5  # not an entry of bag 2
    bad[8] = mi2
    with pytest.raises(IndexError, match=r"max_idx\[2, 3\] = .* is neither -1 nor an entry"):
        torch.ops.dsl_C.lookup_backward(*bad)
    bad = list(args)
    bad[9] = torch.zeros(values.shape[0], dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"frozen must be a 1-D bool tensor"):
        torch.ops.dsl_C.lookup_backward(*bad)


def test_rebuild_index_checks():
    with pytest.raises(IndexError, match=r"coord\[1\] = 20 is neither -1"):
        torch.ops.dsl_C.rebuild_index(torch.tensor([0, 20, -1]), 5, 4)
    with pytest.raises(IndexError, match=r"coord\[2\] = -3"):
        torch.ops.dsl_C.rebuild_index(torch.tensor([0, 1, -3]), 5, 4)
    with pytest.raises(RuntimeError, match=r"coord\[2\] = 7 names block \(row 1, col 3\)"):
        torch.ops.dsl_C.rebuild_index(torch.tensor([7, -1, 7]), 5, 4)
    with pytest.raises(RuntimeError, match=r"coord must be a 1-D int64 tensor"):
        torch.ops.dsl_C.rebuild_index(torch.tensor([0, 1], dtype=torch.int32), 5, 4)


def test_corrupt_index_is_reported():
    values, coord, (rp, rs, rm), idx, off, w = case(13, N=300)
    rs_bad = rs.clone()
    rs_bad[0] = values.shape[0] + 3  # a slot outside the pool
    idx[:] = int((coord[coord >= 0].min() // 5))  # every entry hits the row of that slot
    with pytest.raises(RuntimeError, match=r"row index .* is inconsistent"):
        _call_lookup(values, rp, rs_bad, rm, idx, off)


# ------------------------------------------------------------------------- module level


def test_auto_picks_cpu_backend():
    assert dispatch.resolve("auto", "cpu") == "cpu"
    assert dispatch.backends()["cpu"]["cpu"] is None


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_module_training_step_matches_reference(mode):
    torch.manual_seed(0)
    mods = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        m = SparseEmbeddingBag(500, 32, mode=mode, density=0.2, block_size=8, padding_idx=2,
                               backend=backend)
        mods[backend] = m
    assert torch.equal(mods["cpu"].coord, mods["reference"].coord)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 500, (64, 6), generator=gen)
    idx[::3, 0] = 2
    for backend, m in mods.items():
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            m(idx).square().sum().backward()
            opt.step()
    assert torch.equal(mods["cpu"].values, mods["reference"].values)


def test_auto_never_hides_a_broken_extension(monkeypatch):
    """A built extension that fails to load makes `auto` raise; only an extension that was
    never built falls back to the reference, and says so."""
    from dsl_kernels.backends import registry

    def entry(exc):
        def loader():
            raise exc
        return registry._Entry("cpu", ("cpu",), loader)

    monkeypatch.setitem(registry._REGISTRY, "cpu",
                        entry(registry.BrokenBackend("undefined symbol: _ZN2at4_ops")))
    with pytest.raises(RuntimeError, match="undefined symbol.*backend='reference' explicitly"):
        registry.resolve("auto", "cpu")
    monkeypatch.setitem(registry._REGISTRY, "cpu", entry(ImportError("not built")))
    monkeypatch.setattr(registry, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="falls back to 'reference'.*not built"):
        assert registry.resolve("auto", "cpu") == "reference"
