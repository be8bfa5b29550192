"""Property-based tests (hypothesis) of the lookup, its gradient and the growth scores on every
available backend: random table shapes, block sizes, densities, bag structures (all empty, one
huge bag, repeated indices, padding everywhere), modes and dtypes. Each example is compared
with the reference backend and with ``F.embedding_bag`` on ``to_dense()``.

Triton on CPU runs under the interpreter (slow), so it gets a handful of tiny examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance import TOL
from conftest import backend_device_params
from dsl_kernels import SparseEmbeddingBag, ops

PARAMS = backend_device_params()
KINDS = ("random", "all_empty", "one_huge", "repeated", "padding_everywhere", "no_bags")


def _slow(backend, device):
    return backend == "triton" and device == "cpu"


@dataclass
class Case:
    N: int
    NB: int
    B: int
    density: float
    mode: str
    value_dtype: torch.dtype
    index_dtype: torch.dtype
    padding_idx: Optional[int]
    include_last_offset: bool
    two_d: bool
    psw: bool
    kind: str
    num_bags: int
    seed: int
    deterministic: bool


@st.composite
def cases(draw, small=False):
    N = draw(st.integers(1, 12 if small else 60))
    NB = draw(st.integers(1, 3 if small else 6))
    B = draw(st.sampled_from([1, 2, 4] if small else [1, 2, 3, 4, 8]))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    padding_idx = draw(st.none() | st.integers(0, N - 1)) if N >= 2 else None
    two_d = draw(st.booleans())
    kind = draw(st.sampled_from(KINDS))
    if two_d and kind == "no_bags":
        kind = "all_empty"
    return Case(
        N=N, NB=NB, B=B,
        density=draw(st.floats(0.01, 1.0)),
        mode=mode,
        value_dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        padding_idx=padding_idx,
        include_last_offset=False if two_d else draw(st.booleans()),
        two_d=two_d,
        psw=mode == "sum" and draw(st.booleans()),
        kind=kind,
        num_bags=draw(st.integers(1, 4 if small else 12)),
        seed=draw(st.integers(0, 2**31 - 1)),
        deterministic=draw(st.booleans()),
    )


def _batch(c: Case, gen: torch.Generator, small: bool):
    """(indices, offsets or None) in the nn.EmbeddingBag convention for the case's bag kind."""
    nb = 0 if c.kind == "no_bags" else c.num_bags
    huge = 40 if small else 400
    if c.two_d:
        L = {"all_empty": 0, "one_huge": huge // max(nb, 1)}.get(c.kind, int(torch.randint(
            1, 6, (1,), generator=gen)))
        idx = torch.randint(0, c.N, (nb, L), generator=gen)
        if c.kind == "repeated" and L:
            idx[:] = idx[:, :1]
        if c.kind == "padding_everywhere" and c.padding_idx is not None:
            idx[:] = c.padding_idx
        return idx.to(c.index_dtype), None
    if c.kind == "all_empty":
        lengths = torch.zeros(nb, dtype=torch.int64)
    elif c.kind == "one_huge":
        lengths = torch.zeros(nb, dtype=torch.int64)
        if nb:
            lengths[int(torch.randint(nb, (1,), generator=gen))] = huge
    else:
        lengths = torch.randint(0, 7, (nb,), generator=gen)
    L = int(lengths.sum())
    idx = torch.randint(0, c.N, (L,), generator=gen)
    if c.kind == "repeated" and L:
        idx[:] = idx[int(torch.randint(L, (1,), generator=gen))]
    if c.kind == "padding_everywhere" and c.padding_idx is not None:
        idx[:] = c.padding_idx
    offsets = torch.zeros(nb + (1 if c.include_last_offset else 0), dtype=torch.int64)
    if nb:
        offsets[1:nb] = torch.cumsum(lengths, 0)[:-1]
    if c.include_last_offset:
        offsets[-1] = L
    return idx.to(c.index_dtype), offsets.to(c.index_dtype)


def _check(backend: str, device: str, c: Case, small: bool) -> None:
    gen = torch.Generator().manual_seed(c.seed)
    torch.manual_seed(c.seed)
    D = c.NB * c.B
    emb = SparseEmbeddingBag(c.N, D, mode=c.mode, density=c.density, block_size=c.B,
                             padding_idx=c.padding_idx, include_last_offset=c.include_last_offset,
                             dtype=c.value_dtype, device=device, backend=backend,
                             deterministic=c.deterministic)
    # The budget is fixed by density; the padding row holds no blocks, so it may stay unfilled.
    assert emb.budget == max(1, min(c.N * c.NB, round(c.density * c.N * c.NB)))
    usable = (c.N - (c.padding_idx is not None)) * c.NB
    assert emb.num_active_blocks == min(emb.budget, usable)
    idx, off = _batch(c, gen, small)
    idx = idx.to(device)
    off = None if off is None else off.to(device)
    w = None
    if c.psw:
        w = torch.randn(idx.shape, generator=gen).to(device=device, dtype=c.value_dtype)
    atol, rtol = TOL[c.value_dtype]
    if c.kind == "one_huge":  # long fp32 sums in a different order
        atol, rtol = atol * 4, rtol * 4

    out = emb(idx, off, w)
    nbags = out.shape[0]
    assert out.shape == (nbags, D) and out.dtype == c.value_dtype
    g = torch.randn(out.shape, generator=gen).to(device=device, dtype=c.value_dtype)
    out.backward(g)
    grad = emb.values.grad.detach().clone()

    # 1. Against F.embedding_bag on the dense image (fp32).
    dense = emb.to_dense().float().requires_grad_(True)
    no_bags = off is not None and off.numel() == (1 if c.include_last_offset else 0)
    if no_bags or (c.two_d and idx.shape[1] == 0):
        # Zero bags, or 2-D bags of length 0: torch's own kernel crashes or raises on these.
        ref = torch.zeros(nbags, D, device=device)
    else:
        ref = F.embedding_bag(idx.long(), dense, None if off is None else off.long(), mode=c.mode,
                              per_sample_weights=None if w is None else w.float(),
                              include_last_offset=c.include_last_offset,
                              padding_idx=c.padding_idx)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    if nbags and ref.requires_grad:
        ref.backward(g.float())
        act = emb.coord >= 0
        expect = torch.zeros(emb.values.shape, device=device)
        expect[act] = dense.grad.view(-1, c.B)[emb.coord[act]]
        torch.testing.assert_close(grad.float(), expect, atol=atol * 4, rtol=rtol * 4)
    if c.padding_idx is not None:  # the padding row never receives gradient
        pad = (emb.coord // emb.num_blocks == c.padding_idx) & (emb.coord >= 0)
        assert not bool(grad[pad].any())
    if c.kind == "padding_everywhere" and c.padding_idx is not None:
        assert not bool(out.any())
    if c.kind == "all_empty":
        assert not bool(out.any())

    # 2. Against the reference backend on the same pool and input (same fp32 math: tight).
    if backend != "reference":
        emb.backend = "reference"
        emb.values.grad = None
        out_ref = emb(idx, off, w)
        out_ref.backward(g)
        torch.testing.assert_close(out.float(), out_ref.float(), atol=atol, rtol=rtol)
        torch.testing.assert_close(grad.float(), emb.values.grad.float(), atol=atol * 4,
                                   rtol=rtol * 4)
        emb.backend = backend
        if c.deterministic:  # deterministic mode: the same call twice is bit-identical
            emb.values.grad = None
            emb(idx, off, w).backward(g)
            g1 = emb.values.grad.clone()
            emb.values.grad = None
            emb(idx, off, w).backward(g)
            assert torch.equal(g1, emb.values.grad)

    # 3. Growth scores: inactive blocks of touched rows only, equal to the reference's.
    if nbags and not c.two_d and off is not None:
        from dsl_kernels.validation import normalize_bags

        i, o, p = normalize_bags(idx, off, w, c.mode, c.include_last_offset, c.N,
                                 emb.values.device)
        pad = -1 if c.padding_idx is None else c.padding_idx
        m = {"sum": 0, "mean": 1, "max": 2}[c.mode]
        _, max_idx = ops.lookup(emb.values.detach(), emb.row_ptr, emb.row_slots, emb.row_mask,
                                i, o, p, None, emb.num_blocks, m, pad, False, "reference")
        rows_b, sc_b = ops.grow_scores(g, emb.row_ptr, emb.row_slots, emb.row_mask, i, o, p,
                                       max_idx, emb.num_blocks, m, pad, backend)
        rows_r, sc_r = ops.grow_scores(g, emb.row_ptr, emb.row_slots, emb.row_mask, i, o, p,
                                       max_idx, emb.num_blocks, m, pad, "reference")
        assert torch.equal(rows_b.cpu(), rows_r.cpu())
        torch.testing.assert_close(sc_b.float(), sc_r.float(), atol=atol * 4, rtol=rtol * 4)
        assert bool(torch.isfinite(sc_b).all()) and bool((sc_b >= 0).all())


@pytest.mark.parametrize("backend,device", PARAMS)
def test_fuzz_against_embedding_bag_and_reference(backend, device):
    slow = _slow(backend, device)

    @settings(max_examples=8 if slow else 60, deadline=None, database=None, derandomize=slow,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(c=cases(small=slow))
    def run(c):
        _check(backend, device, c, slow)

    run()


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_bag_kind_once(backend, device, kind):
    """Each bag structure at least once per backend, whatever hypothesis draws."""
    slow = _slow(backend, device)
    for mode, psw in (("sum", True), ("max", False)) if not slow else (("sum", True),):
        c = Case(N=9, NB=2, B=2, density=0.5, mode=mode, value_dtype=torch.float32,
                 index_dtype=torch.int64, padding_idx=3, include_last_offset=False, two_d=False,
                 psw=psw, kind=kind, num_bags=4, seed=1, deterministic=False)
        _check(backend, device, c, small=True)
