"""A fused CUDA training step with no host synchronisation (issue 14, point 4).

With ``validate=False`` and the bounds-check mode ``"device"`` or ``"off"``
(:mod:`dsl_kernels.bounds`), forward + loss + backward (the fused optimizer step) runs under
``torch.cuda.set_sync_debug_mode("error")``, gives the same bits as the default ``"raise"``
mode, records bad input on the device for :func:`dsl_kernels.check_bounds`, and captures in a
CUDA graph. The padded device-side plan (csrc/cuda/fused_plan.cu) matches the CPU plan. The
mode API itself is tested on every machine; the rest needs a GPU and the CUDA extension.
"""
from __future__ import annotations

import copy

import pytest
import torch

import dsl_kernels
from dsl_kernels.fused import fuse_optimizer

HAS_EXT = False
if torch.cuda.is_available():
    from dsl_kernels.backends import why_not

    HAS_EXT = why_not("cuda", "cuda") is None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="needs a GPU and the CUDA extension")


def test_mode_api_round_trips_and_rejects_unknown_modes():
    before = dsl_kernels.get_bounds_check_mode()
    assert before == "raise"
    assert dsl_kernels.set_bounds_check_mode("device") == "raise"
    assert dsl_kernels.get_bounds_check_mode() == "device"
    with dsl_kernels.bounds_check_mode("off"):
        assert dsl_kernels.get_bounds_check_mode() == "off"
    assert dsl_kernels.get_bounds_check_mode() == "device"
    assert dsl_kernels.set_bounds_check_mode("raise") == "device"
    with pytest.raises(ValueError, match="mode must be one of"):
        dsl_kernels.set_bounds_check_mode("warn")
    assert dsl_kernels.get_bounds_check_mode() == "raise"


# ----------------------------------------------------------------------------- GPU

N, D, B = 4000, 64, 8


def _module(optimizer: str, **kw):
    torch.manual_seed(0)
    emb = dsl_kernels.SparseEmbeddingBag(N, D, mode=kw.pop("mode", "sum"), density=0.25,
                                         block_size=B, device="cuda", backend="cuda",
                                         validate=False, **kw)
    fuse_optimizer(emb, optimizer, lr=0.05)
    return emb


def _batches(n: int, bags: int = 512, per_bag: int = 20, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, N, (bags * per_bag,), device="cuda", generator=g)
        idx[::3] = 5  # a hot row: 3,400 entries per batch, split into aligned chunks
        off = torch.arange(0, bags * per_bag, per_bag, device="cuda")
        target = torch.randn(bags, D, device="cuda", generator=g)
        out.append((idx, off, target))
    return out


def _step(emb, idx, off, target):
    ((emb(idx, off) - target) ** 2).mean().backward()


@needs_ext
@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("mode", ["device", "off"])
def test_fused_step_reads_nothing_back_and_matches_raise_mode(optimizer, mode):
    batches = _batches(4)
    want = _module(optimizer)
    for b in batches:
        _step(want, *b)
    emb = _module(optimizer)
    with dsl_kernels.bounds_check_mode(mode):
        _step(emb, *batches[0])  # warm-up: lazy allocations, the device record
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for b in batches[1:]:
                _step(emb, *b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(emb.values, want.values)
    for name in ("fused_state1", "fused_state2"):
        assert torch.equal(getattr(emb, name), getattr(want, name))
    dsl_kernels.check_bounds()  # nothing recorded


@needs_ext
def test_raise_mode_synchronises():
    """The positive control of the test above: the default mode reads the check back."""
    emb = _module("sgd")
    idx, off, target = _batches(1)[0]
    _step(emb, idx, off, target)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            _step(emb, idx, off, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_ext
def test_device_mode_records_a_bad_index_and_skips_it():
    emb = _module("sgd")
    idx = torch.tensor([1, 2, N + 7, 3], device="cuda")
    off = torch.tensor([0, 1, 2, 3], device="cuda")
    with dsl_kernels.bounds_check_mode("device"):
        out = emb(idx, off)
        dense = emb.to_dense()
        assert torch.equal(out[2], torch.zeros(D, device="cuda"))  # the bad entry reads nothing
        assert torch.equal(out[[0, 1, 3]], dense[[1, 2, 3]])
        with pytest.raises(IndexError, match=rf"indices\[2\] = {N + 7} is out of range"):
            dsl_kernels.check_bounds()
        dsl_kernels.check_bounds()  # cleared
        bad_off = torch.tensor([0, 3, 1, 4], device="cuda")
        emb(idx, bad_off)
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            dsl_kernels.check_bounds()


@needs_ext
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_off_mode_survives_garbage_input(optimizer):
    """Offsets past the end, decreasing offsets and rows outside the table neither crash nor
    touch the pool outside the rows the good entries name."""
    emb = _module(optimizer)
    before = emb.values.clone()
    idx = torch.tensor([-5, N, 2 ** 40, 7], device="cuda")
    off = torch.tensor([0, 3, 1, 50], device="cuda")  # decreasing, then past the end
    with dsl_kernels.bounds_check_mode("off"):
        _step(emb, idx, off, torch.randn(4, D, device="cuda"))
        torch.cuda.synchronize()
    changed = (emb.values != before).any(1)
    rows = emb.coord[changed] // emb.num_blocks
    assert set(rows.tolist()) <= {7}


@needs_ext
@pytest.mark.parametrize("mode,psw,pad", [(0, True, -1), (0, False, 5), (1, False, 5),
                                          (2, False, -1)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_padded_cuda_plan_matches_cpu_plan(mode, psw, pad, index_dtype):
    g = torch.Generator().manual_seed(0)
    L = 3000
    idx = torch.randint(0, 200, (L,), generator=g)
    idx[::4] = 5
    idx[1::4] = 9
    off = torch.cat([torch.tensor([0, 0]), torch.sort(torch.randint(0, L - 100, (60,),
                                                                    generator=g)).values])
    w = torch.rand(L, generator=g) if psw else None
    want = torch.ops.dsl_C.fused_plan(idx.to(index_dtype), off.to(index_dtype), w, mode, pad, 200)
    got = torch.ops.dsl_C.fused_plan(idx.to(index_dtype).cuda(), off.to(index_dtype).cuda(),
                                     None if w is None else w.cuda(), mode, pad, 200)
    got = [t.cpu() for t in got]
    R, kept = want[2].numel(), int(want[1][-1])
    assert torch.equal(got[0][:kept], want[0])
    assert torch.equal(got[1][:R + 1], want[1])
    assert torch.equal(got[1][R + 1:], torch.full((L - R,), kept))  # empty padding runs
    assert torch.equal(got[2][:R], want[2])
    assert torch.equal(got[2][R:], torch.full((L - R,), -1))
    assert torch.equal(got[3], want[3])
    assert torch.equal(got[4], want[4])


@needs_ext
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_whole_fused_step_captures_in_a_cuda_graph(optimizer):
    """Forward + loss + backward (the optimizer step) captured once, replayed on new batches,
    gives the bits of the eager steps. (Adam is left out: its bias correction is computed on
    the host from the step count, which a replayed graph does not advance.)"""
    batches = _batches(5)
    eager = _module(optimizer)
    graphed = copy.deepcopy(eager)
    with dsl_kernels.bounds_check_mode("off"):
        static_idx, static_off, static_target = (t.clone() for t in batches[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch's docs ask
            _step(graphed, static_idx, static_off, static_target)
            _step(eager, *batches[0])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _step(graphed, static_idx, static_off, static_target)
        for idx, off, target in batches[1:]:
            static_idx.copy_(idx)
            static_off.copy_(off)
            static_target.copy_(target)
            graph.replay()
            _step(eager, idx, off, target)
        torch.cuda.synchronize()
    assert torch.equal(graphed.values, eager.values)
    if optimizer == "rowwise_adagrad":
        assert torch.equal(graphed.fused_state1, eager.fused_state1)


@needs_ext
def test_collection_jagged_fused_step_reads_nothing_back():
    """Two table groups (block counts differ), jagged input: no sync after the first call
    (which builds the collection's small constant tensors once)."""
    torch.manual_seed(0)
    ebc = dsl_kernels.SparseEmbeddingBagCollection(
        [dsl_kernels.TableConfig("a", 500, 16), dsl_kernels.TableConfig("b", 300, 32),
         dsl_kernels.TableConfig("c", 200, 16)],
        density=0.5, block_size=8, device="cuda", backend="cuda", validate=False)
    fuse_optimizer(ebc, "rowwise_adagrad", lr=0.1)
    keys, batch = ["a", "b", "c"], 64
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.randint(0, 5, (3 * batch,), device="cuda", generator=g)
    values = torch.randint(0, 200, (int(lengths.sum()),), device="cuda", generator=g)

    def step():
        out = ebc.forward_jagged(keys, values, lengths)
        sum(o.pow(2).sum() for o in out.values()).backward()

    with dsl_kernels.bounds_check_mode("device"):
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        dsl_kernels.check_bounds()
