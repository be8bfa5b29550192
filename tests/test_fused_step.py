"""The CPU fused step (``dsl_C::fused_lookup`` + ``dsl_C::fused_apply``, csrc/cpu/fused_step.cpp):
the forward equals ``dsl::lookup``, forward + apply equals ``dsl::fused_update`` of the
reference (and, bit for bit, of the cpu backend's other path), frozen slots are left alone,
bad input raises naming the argument with nothing written, and nothing is written outside the
pool. The module-level behaviour (fused training == torch optimizers) is in test_fused.py, which
runs this path for every sum/mean case of the cpu backend."""
import pytest
import torch

import dsl_kernels
from dsl_kernels import fused
from test_fused import OP_CASES, _op_case, _run_op

pytestmark = pytest.mark.skipif(
    not dsl_kernels.backends.has_impl("cpu", "lookup")
    or not torch._C._dispatch_has_kernel_for_dispatch_key("dsl_C::fused_lookup", "CPU"),
    reason="the C++ extension (with csrc/cpu/fused_step.cpp) is not built")

SUM_MEAN_CASES = [c for c in OP_CASES if c[0] != 2]


def _plan_step(emb, case, opt, values=None, s1=None, s2=None, step=3):
    """forward with plan + apply, the states drawn as test_fused._run_op draws them."""
    values = emb.values.detach().clone() if values is None else values
    C, B = values.shape
    gen = torch.Generator().manual_seed(9)
    if s1 is None:
        s1 = (torch.rand(C, generator=gen) if opt == fused.ROWWISE_ADAGRAD else
              torch.empty(0) if opt == fused.SGD else torch.rand(C, B, generator=gen))
        s2 = (torch.rand(C, B, generator=gen) if opt in (fused.ADAM, fused.ADAMW)
              else torch.empty(0))
    out, plan, scale = torch.ops.dsl_C.fused_lookup(
        values, emb.row_ptr, emb.row_slots, emb.row_mask, case["indices"], case["offsets"],
        case["per_sample_weights"], case["frozen"], emb.num_blocks, case["mode"],
        case["padding_idx"])
    skipped = torch.ops.dsl_C.fused_apply(
        case["grad_out"], values, s1, s2, plan, scale, opt, 0.1, 0.8, 0.9, 1e-6, 0.01,
        fused.adam_step_size(0.1, 0.8, 0.9, step), fused.NAN_SKIP)
    return out, (values, s1, s2, skipped), plan, scale


# B = 8 takes the kernels' compile-time block-size path (with_block_size), B = 3 the generic one.
@pytest.mark.parametrize("B", [3, 8])
@pytest.mark.parametrize("case", SUM_MEAN_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("opt", list(fused.OPTIMIZERS.values()),
                         ids=list(fused.OPTIMIZERS.keys()))
def test_matches_lookup_and_fused_update(case, opt, B):
    emb, c = _op_case(*case, D=4 * B, B=B)
    out, got, _, _ = _plan_step(emb, c, opt)
    want_out, _ = torch.ops.dsl_C.lookup(emb.values.detach(), emb.row_ptr, emb.row_slots,
                                         emb.row_mask, c["indices"], c["offsets"],
                                         c["per_sample_weights"], emb.num_blocks, c["mode"],
                                         c["padding_idx"])
    assert torch.equal(out, want_out)
    tol = dict(atol=1e-2, rtol=1e-2) if case[4] == torch.float16 else dict(atol=1e-5, rtol=1e-4)
    for a, b in zip(got, _run_op("reference", emb, c, opt)):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got, _run_op("cpu", emb, c, opt)):  # the other C++ path: same bits
        assert torch.equal(a, b)
    frozen = c["frozen"]
    assert torch.equal(got[0][frozen], emb.values.detach()[frozen])


def test_two_mask_words_and_thread_counts():
    # D / B = 70 blocks per row (two mask words); results independent of the thread count.
    emb, c = _op_case(0, False, False, torch.int64, torch.float32, N=10, D=70, B=1, density=0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _plan_step(emb, c, fused.ADAM)[1]
        torch.set_num_threads(2)
        two = _plan_step(emb, c, fused.ADAM)[1]
    finally:
        torch.set_num_threads(threads)
    want = _run_op("reference", emb, c, fused.ADAM)
    for a, b, w in zip(one, two, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-4)


def test_plan_is_batch_sized_and_skips_frozen():
    emb, c = _op_case(0, False, False, torch.int64, torch.float32)
    _, _, plan, scale = _plan_step(emb, c, fused.SGD)
    assert plan.dtype == torch.int32 and plan.shape[1] == 2 and scale.numel() == 0  # sum: no scales
    assert plan.shape[0] <= c["indices"].numel() * emb.num_blocks
    assert not c["frozen"][plan[:, 0].long()].any()


def test_bad_input_raises_and_writes_nothing():
    emb, c = _op_case(0, False, False, torch.int64, torch.float32)
    values = emb.values.detach().clone()
    s1 = torch.zeros(values.shape[0])
    _, plan, scale = torch.ops.dsl_C.fused_lookup(
        values, emb.row_ptr, emb.row_slots, emb.row_mask, c["indices"], c["offsets"], None,
        None, emb.num_blocks, 0, -1)
    before = values.clone()

    def apply(grad=c["grad_out"], p=plan, sc=scale, st=s1, opt=fused.ROWWISE_ADAGRAD):
        torch.ops.dsl_C.fused_apply(grad, values, st, torch.empty(0), p, sc, opt, 0.1, 0.9,
                                    0.99, 1e-8, 0.0, 0.0, fused.NAN_SKIP)

    bad_slot = plan.clone()
    bad_slot[-1, 0] = values.shape[0]  # one past the pool
    bad_gofs = plan.clone()
    bad_gofs[0, 1] = -1
    with pytest.raises(IndexError, match=r"plan\[.*, 0\]"):
        apply(p=bad_slot)
    with pytest.raises(IndexError, match=r"plan\[.*, 1\]"):
        apply(p=bad_gofs)
    with pytest.raises(RuntimeError, match="plan must be"):
        apply(p=plan.long())
    with pytest.raises(RuntimeError, match="plan_scale"):
        apply(sc=torch.ones(3))
    with pytest.raises(RuntimeError, match="state1"):
        apply(st=torch.zeros(5))
    with pytest.raises(RuntimeError, match="grad_out dtype"):
        apply(grad=c["grad_out"].double())
    with pytest.raises(RuntimeError, match="unknown optimizer"):
        apply(opt=7)
    assert torch.equal(values, before) and not s1.any()
    bad_idx = c["indices"].clone()
    bad_idx[3] = emb.num_embeddings
    with pytest.raises(IndexError, match=r"indices\[3\]"):
        torch.ops.dsl_C.fused_lookup(values, emb.row_ptr, emb.row_slots, emb.row_mask, bad_idx,
                                     c["offsets"], None, None, emb.num_blocks, 0, -1)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        torch.ops.dsl_C.fused_lookup(values, emb.row_ptr, emb.row_slots, emb.row_mask,
                                     c["indices"], c["offsets"], None, None, emb.num_blocks, 2,
                                     -1)


def test_no_write_outside_the_pool():
    # The pool is a view into a larger buffer with guard rows on both sides; the step must
    # leave the guards bit-identical.
    emb, c = _op_case(1, True, True, torch.int32, torch.float32)
    C, B = emb.values.shape
    buf = torch.full((C + 8, B), 7.0)
    buf[4:4 + C] = emb.values.detach()
    s1buf = torch.full((C + 8,), 5.0)
    s1buf[4:4 + C] = 0.0
    values, s1 = buf[4:4 + C], s1buf[4:4 + C]
    _plan_step(emb, c, fused.ROWWISE_ADAGRAD, values=values, s1=s1, s2=torch.empty(0))
    assert (buf[:4] == 7.0).all() and (buf[4 + C:] == 7.0).all()
    assert (s1buf[:4] == 5.0).all() and (s1buf[4 + C:] == 5.0).all()


def _kernels_run(fn):
    """Names of the dsl_C kernels that ran inside ``fn()`` (whatever Python wiring led there)."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("dsl_C::")}


def test_module_uses_the_plan_path_and_matches_reference():
    torch.manual_seed(0)
    kw = dict(mode="sum", density=0.3, block_size=4)
    a = dsl_kernels.SparseEmbeddingBag(500, 16, backend="cpu", **kw)
    b = dsl_kernels.SparseEmbeddingBag(500, 16, backend="reference", **kw)
    b.load_state_dict(a.state_dict())
    fa = fused.fuse_optimizer(a, "rowwise_adagrad", lr=0.1)
    fused.fuse_optimizer(b, "rowwise_adagrad", lr=0.1)
    idx = torch.randint(0, 500, (400,))
    off = torch.arange(0, 400, 8)
    for _ in range(3):
        b(idx, off).square().sum().backward()
    ran = set()
    for _ in range(3):
        ran |= _kernels_run(lambda: a(idx, off).square().sum().backward())
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    assert fa.step_count == 3
    assert {"dsl_C::fused_lookup", "dsl_C::fused_apply"} <= ran
    assert not ran & {"dsl_C::fused_plan", "dsl_C::fused_update_rows"}
