"""Fused backward + optimizer (``dsl::fused_update``, ``dsl_kernels.fused``).

The fused path must equal the unfused one followed by the matching torch optimizer: SGD and
Adagrad against ``torch.optim.SGD`` / ``Adagrad``, lazy Adam against ``torch.optim.SparseAdam``
on an ``nn.EmbeddingBag(sparse=True)`` whose weight is ``to_dense()``, AdamW against
``torch.optim.AdamW`` (every row touched each step, where lazy == dense). The dense twin's
inactive entries are re-zeroed after every step so both models see the same forward; the
comparison is on the active entries. Every backend available here runs the same checks
(Triton under the interpreter on tiny shapes).
"""
import copy

import pytest
import torch
from torch import nn

import dsl_kernels
from conftest import available_backends
from dsl_kernels import fused
from dsl_kernels.fused import fuse_optimizer, reset_optimizer_state

# Backends with a fused implementation of their own, plus the reference (the oracle).
BACKENDS = [b for b in available_backends("cpu") if b in ("reference", "cpu", "triton")]
ATOL, RTOL = 1e-5, 1e-4


def _active_mask(emb) -> torch.Tensor:
    """[N, D] float mask of the active entries (tests only)."""
    N, NB, B = emb.num_embeddings, emb.num_blocks, emb.block_size
    m = torch.zeros(N * NB)
    act = emb.coord[emb.coord >= 0]
    m[act] = 1.0
    return m.view(N, NB).repeat_interleave(B, dim=1)


def _batch(gen, N, bags, per_bag, cover_all=False):
    idx = torch.randint(0, N, (bags * per_bag,), generator=gen)
    if cover_all:
        idx[:N] = torch.randperm(N, generator=gen)
    lengths = torch.randint(0, 2 * per_bag, (bags,), generator=gen)
    lengths = (lengths * (idx.numel() / max(1, int(lengths.sum())))).long()
    lengths[-1] = idx.numel() - int(lengths[:-1].sum())
    if int(lengths[-1]) < 0:
        lengths = torch.full((bags,), per_bag)
    offsets = torch.zeros(bags, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)[:-1]
    return idx, offsets


def _torch_opt(name, params, lr, wd):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-10, weight_decay=wd)
    if name == "adam":
        return torch.optim.SparseAdam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, eps=1e-8)
    raise AssertionError(name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mode", [("sgd", "sum"), ("adagrad", "mean"), ("adam", "sum"),
                                       ("adam", "mean"), ("adamw", "sum")])
def test_matches_torch_optimizer(backend, name, mode):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    N, D, B = 40, 16, 4
    emb = dsl_kernels.SparseEmbeddingBag(N, D, mode=mode, density=0.5, block_size=B,
                                         backend=backend)
    wd = 0.1 if name == "adamw" else 0.0
    lr = 0.05
    fuse_optimizer(emb, name, lr=lr, weight_decay=wd)
    dense = nn.EmbeddingBag(N, D, mode=mode, sparse=(name == "adam"))
    with torch.no_grad():
        dense.weight.copy_(emb.to_dense())
    mask = _active_mask(emb)
    opt = _torch_opt(name, dense.parameters(), lr, wd)
    for step in range(4):
        bags = 9 if name == "adamw" else 6  # adamw: every row in every batch (lazy == dense)
        idx, off = _batch(gen, N, bags, 5, cover_all=(name == "adamw"))
        target = torch.randn(bags, D, generator=gen)
        out = emb(idx, off)
        ((out - target) ** 2).sum().backward()
        assert emb.values.grad is None
        opt.zero_grad()
        ((dense(idx, off) - target) ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            dense.weight.mul_(mask)
        torch.testing.assert_close(emb.to_dense(), dense.weight.detach(), atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"step {step}: {m}")
    assert int(emb.fused_step) == 4


def _unfused_grad(emb, idx, off, psw=None, frozen=None):
    twin = copy.deepcopy(emb)
    fused.unfuse_optimizer(twin)
    twin.frozen = frozen
    out = twin(idx, off, psw)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    return twin.values.grad, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
def test_one_step_formula_from_unfused_grad(backend, name):
    """One fused step == the optimizer formula applied to the unfused ``values.grad`` (slots
    with a zero gradient do not move for these optimizers), with frozen slots skipped."""
    torch.manual_seed(2)
    emb = dsl_kernels.SparseEmbeddingBag(30, 12, mode="sum", density=0.6, block_size=3,
                                         backend=backend)
    frozen = torch.zeros(emb.budget, dtype=torch.bool)
    frozen[::3] = True
    emb.frozen = frozen
    idx = torch.randint(0, 30, (25,))
    off = torch.tensor([0, 5, 5, 12, 20])
    psw = torch.rand(25)
    G, w = _unfused_grad(emb, idx, off, psw, frozen)
    assert G is not None and bool((G[frozen] == 0).all())
    lr, eps = 0.3, 1e-8
    fo = fuse_optimizer(emb, name, lr=lr, eps=eps, initial_accumulator_value=0.1)
    p0 = emb.values.detach().clone()
    (emb(idx, off, psw) * w).sum().backward()
    if name == "sgd":
        want = p0 - lr * G
    elif name == "adagrad":
        want = p0 - lr * G / ((0.1 + G * G).sqrt() + eps)
    else:
        s = 0.1 + (G * G).mean(1, keepdim=True)
        want = p0 - lr * G / (s.sqrt() + eps)
    torch.testing.assert_close(emb.values.detach(), want, atol=ATOL, rtol=RTOL)
    assert torch.equal(emb.values.detach()[frozen], p0[frozen])
    assert fo.num_skipped() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_weights_grad_and_collection_step(backend):
    """psw still gets its gradient (pre-update values); one collection call = one step even
    with two lookup groups (two embedding dims)."""
    torch.manual_seed(3)
    ebc = dsl_kernels.SparseEmbeddingBagCollection(
        [dsl_kernels.TableConfig("a", 20, 8), dsl_kernels.TableConfig("b", 30, 16)],
        density=0.5, block_size=4, backend=backend)
    ref = copy.deepcopy(ebc)
    fuse_optimizer(ebc, "adam", lr=0.1)
    psw = torch.rand(6, requires_grad=True)
    psw_ref = psw.detach().clone().requires_grad_(True)
    feats = lambda p: {"a": (torch.tensor([1, 2, 3, 1, 4, 5]), torch.tensor([0, 2]), p),
                       "b": (torch.tensor([7, 8, 9]), torch.tensor([0, 1]))}
    before = ebc.values.detach().clone()
    out = ebc(feats(psw))
    (out["a"].sum() + out["b"].pow(2).sum()).backward()
    out_r = ref(feats(psw_ref))
    (out_r["a"].sum() + out_r["b"].pow(2).sum()).backward()
    torch.testing.assert_close(psw.grad, psw_ref.grad, atol=ATOL, rtol=RTOL)
    assert int(ebc.fused_step) == 1
    moved = (ebc.values.detach() != before).any(1)
    for t in ebc.tables:
        assert bool(moved[ebc.table_slots(t)].any()), t.name
    # SparseAdam on the unfused gradient gives the same values.
    opt = torch.optim.SparseAdam([ref.values], lr=0.1)
    touched = (ref.values.grad != 0).any(1) | moved
    g = ref.values.grad
    ref.values.grad = torch.sparse_coo_tensor(torch.nonzero(touched).T, g[touched], g.shape,
                                              check_invariants=True)
    opt.step()
    torch.testing.assert_close(ebc.values.detach(), ref.values.detach(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad", "adam"])
def test_reset_state_and_state_dict_round_trip(name):
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    emb = dsl_kernels.SparseEmbeddingBag(40, 8, mode="sum", density=0.5, block_size=4)
    fo = fuse_optimizer(emb, name, lr=0.05, initial_accumulator_value=0.5)
    for _ in range(2):
        idx, off = _batch(gen, 40, 4, 6)
        emb(idx, off).pow(2).sum().backward()
    sd = copy.deepcopy(emb.state_dict())
    assert {"fused_state1", "fused_step"} <= set(sd)
    assert int(sd["fused_step"]) == 2
    twin = dsl_kernels.SparseEmbeddingBag(40, 8, mode="sum", density=0.5, block_size=4)
    fuse_optimizer(twin, name, lr=0.05, initial_accumulator_value=0.5)
    twin.load_state_dict(sd)
    assert twin.fused_optimizer.step_count == 2
    for _ in range(2):
        idx, off = _batch(gen, 40, 4, 6)
        emb(idx, off).pow(2).sum().backward()
        twin(idx, off).pow(2).sum().backward()
    assert torch.equal(emb.values, twin.values)
    assert torch.equal(emb.fused_state1, twin.fused_state1)
    # Reset: the given slots go back to the initial state, the others keep theirs.
    slots = torch.tensor([0, 3, 5])
    other = emb.fused_state1[6:].clone()
    reset_optimizer_state(emb, slots)
    init = 0.0 if name == "adam" else 0.5
    assert bool((emb.fused_state1[slots] == init).all())
    assert torch.equal(emb.fused_state1[6:], other)
    if name == "adam":
        assert bool((emb.fused_state2[slots] == 0).all())
        assert fo.state_bytes() == 2 * emb.budget * 4 * 4
    reset_optimizer_state(dsl_kernels.SparseEmbeddingBag(10, 4, block_size=2), slots)  # no-op


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy(backend):
    torch.manual_seed(6)
    idx = torch.tensor([1, 2, 3, 10, 11])
    off = torch.tensor([0, 3])
    w = torch.ones(2, 8)
    w[0, 0] = float("nan")  # bag 0 (rows 1, 2, 3) gets a NaN gradient in its first block

    def make(policy):
        emb = dsl_kernels.SparseEmbeddingBag(20, 8, mode="sum", density=1.0, block_size=4,
                                             backend=backend)
        return emb, fuse_optimizer(emb, "adam", lr=0.1, nan_policy=policy)

    emb, fo = make("raise")
    before = emb.values.detach().clone()
    with pytest.raises(FloatingPointError):
        (emb(idx, off) * w).sum().backward()
    assert torch.equal(emb.values.detach(), before)
    assert bool((emb.fused_state1 == 0).all())

    emb, fo = make("skip")
    before = emb.values.detach().clone()
    (emb(idx, off) * w).sum().backward()
    v = emb.values.detach()
    assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(emb.fused_state1).all())
    assert bool(torch.isfinite(emb.fused_state2).all())
    bad = emb.row_slots[emb.row_ptr[torch.tensor([1, 2, 3])].long()].long()  # block 0 of rows 1-3
    assert torch.equal(v[bad], before[bad])
    good = emb.row_slots[emb.row_ptr[torch.tensor([10, 11])].long()].long()
    assert bool((v[good] != before[good]).all())
    assert fo.num_skipped() == 3

    emb, fo = make("ignore")
    (emb(idx, off) * w).sum().backward()
    assert not bool(torch.isfinite(emb.values.detach()).all())


def test_bad_arguments_raise():
    emb = dsl_kernels.SparseEmbeddingBag(10, 4, block_size=2)
    with pytest.raises(ValueError, match="optimizer"):
        fuse_optimizer(emb, "lamb")
    with pytest.raises(ValueError, match="nan_policy"):
        fuse_optimizer(emb, "sgd", nan_policy="maybe")
    with pytest.raises(ValueError, match="lr"):
        fuse_optimizer(emb, "sgd", lr=-1.0)
    with pytest.raises(TypeError, match="module"):
        fuse_optimizer(nn.Linear(2, 2), "sgd")
    fuse_optimizer(emb, "sgd")
    with pytest.raises(RuntimeError, match="already"):
        fuse_optimizer(emb, "sgd")
    fused.unfuse_optimizer(emb)
    emb(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    assert emb.values.grad is not None  # back on the unfused path


# ------------------------------------------------------------------ op level, all backends


def _op_case(mode, psw, pad, index_dtype, value_dtype, N=24, D=12, B=3, density=0.6, seed=0,
             L=30, hot=5):
    g = torch.Generator().manual_seed(seed)
    emb = dsl_kernels.SparseEmbeddingBag(N, D, mode=["sum", "mean", "max"][mode], density=density,
                                         block_size=B, padding_idx=(2 if pad else None),
                                         dtype=value_dtype, backend="reference")
    idx = torch.randint(0, N, (L,), generator=g)
    idx[::hot] = 2  # hot row (and the padding row when pad)
    idx[1::hot] = 3  # another hot row
    if L == 30:
        off = torch.tensor([0, 3, 3, 9, 15, 22, 26, L])  # CSR, one empty bag
    else:
        off = torch.cat([torch.arange(0, L, 7), torch.tensor([L])])
    bags = off.numel() - 1
    w = torch.rand(L, generator=g) if psw else None
    out, max_idx = dsl_kernels.ops.lookup(emb.values, emb.row_ptr, emb.row_slots, emb.row_mask,
                                          idx.to(index_dtype), off.to(index_dtype), w, None,
                                          emb.num_blocks, mode, 2 if pad else -1, False,
                                          "reference")
    grad_out = torch.randn(bags, D, generator=g).to(value_dtype)
    frozen = torch.zeros(emb.budget, dtype=torch.bool)
    frozen[1::4] = True
    return emb, dict(grad_out=grad_out, indices=idx.to(index_dtype), offsets=off.to(index_dtype),
                     per_sample_weights=w, max_idx=max_idx, frozen=frozen,
                     padding_idx=2 if pad else -1, mode=mode)


def _run_op(backend, emb, case, opt, step=3, device="cpu"):
    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    values = emb.values.detach().clone().to(device)
    C, B = values.shape
    gen = torch.Generator().manual_seed(9)
    if opt == fused.ROWWISE_ADAGRAD:
        s1 = torch.rand(C, generator=gen)
    elif opt == fused.SGD:
        s1 = torch.empty(0)
    else:
        s1 = torch.rand(C, B, generator=gen)
    s2 = torch.rand(C, B, generator=gen) if opt in (fused.ADAM, fused.ADAMW) else torch.empty(0)
    s1, s2 = s1.to(device), s2.to(device)
    skipped = fused.fused_update(dev(case["grad_out"]), values, dev(emb.row_ptr),
                                 dev(emb.row_slots), dev(emb.row_mask), dev(case["indices"]),
                                 dev(case["offsets"]), dev(case["per_sample_weights"]),
                                 dev(case["max_idx"]), dev(case["frozen"]), s1, s2,
                                 emb.num_blocks, case["mode"], case["padding_idx"], opt,
                                 0.1, 0.8, 0.9, 1e-6, 0.01, step, fused.NAN_SKIP, backend)
    return tuple(t.cpu() for t in (values, s1, s2, skipped))


OP_CASES = [  # mode, psw, padding, index dtype, value dtype
    (0, False, False, torch.int64, torch.float32),
    (0, True, True, torch.int32, torch.float32),
    (1, False, True, torch.int64, torch.float32),
    (2, False, False, torch.int32, torch.float32),
    (0, False, False, torch.int64, torch.float16),
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("opt", list(fused.OPTIMIZERS.values()),
                         ids=list(fused.OPTIMIZERS.keys()))
def test_backend_matches_reference(backend, case, opt):
    emb, c = _op_case(*case)
    got = _run_op(backend, emb, c, opt)
    want = _run_op("reference", emb, c, opt)
    tol = dict(atol=1e-2, rtol=1e-2) if case[4] == torch.float16 else dict(atol=ATOL, rtol=RTOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    frozen = c["frozen"]
    assert torch.equal(got[0][frozen], emb.values.detach()[frozen])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backend_two_mask_words(backend):
    # D / B = 70 blocks per row: two 64-bit mask words.
    emb, c = _op_case(0, False, False, torch.int64, torch.float32, N=10, D=70, B=1, density=0.5)
    for opt in (fused.ADAM, fused.ROWWISE_ADAGRAD):
        got = _run_op(backend, emb, c, opt)
        want = _run_op("reference", emb, c, opt)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_plan_groups_entries_by_row():
    idx = torch.tensor([5, 1, 5, 2, 1, 9, 5])
    off = torch.tensor([0, 2, 6])  # entry 6 is past offsets[-1]: dropped
    perm, start, rows, bag, scale = fused.touched_rows_plan(idx, off, None, 1, 9)
    assert rows.tolist() == [1, 2, 5]  # 9 is padding
    assert start.tolist() == [0, 2, 3, 5]
    assert perm[: int(start[-1])].tolist() == [1, 4, 3, 0, 2]  # dropped entries sort last
    assert bag[:6].tolist() == [0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(scale[:6], torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_opcheck_reference():
    emb, c = _op_case(0, True, False, torch.int64, torch.float32)
    C, B = emb.values.shape
    args = (c["grad_out"], emb.values.detach().clone(), emb.row_ptr, emb.row_slots, emb.row_mask,
            c["indices"], c["offsets"], c["per_sample_weights"], c["max_idx"], c["frozen"],
            torch.zeros(C, B), torch.zeros(C, B), emb.num_blocks, 0, -1, fused.ADAM, 0.1, 0.9,
            0.99, 1e-8, 0.0, 1, fused.NAN_SKIP, "reference")
    torch.library.opcheck(torch.ops.dsl.fused_update.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not available here")
@pytest.mark.parametrize("mode", [0, 2])
def test_triton_hot_row_split(monkeypatch, mode):
    """Hot rows go through the two-level (chunk partial sums) path: same result."""
    from dsl_kernels.backends.triton import fused_update as tfu

    monkeypatch.setattr(tfu, "CHUNK", 2)
    emb, c = _op_case(mode, False, False, torch.int64, torch.float32)
    for opt in (fused.ADAM, fused.ROWWISE_ADAGRAD):
        got = _run_op("triton", emb, c, opt)
        want = _run_op("reference", emb, c, opt)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ GPU (skipped without CUDA)

CUDA_BACKENDS = ([b for b in available_backends("cuda") if b in ("cuda", "triton")]
                 if torch.cuda.is_available() else [])


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["none"])
@pytest.mark.parametrize("case", OP_CASES + [(0, False, False, torch.int64, torch.bfloat16)],
                         ids=lambda c: str(c))
@pytest.mark.parametrize("opt", list(fused.OPTIMIZERS.values()),
                         ids=list(fused.OPTIMIZERS.keys()))
@pytest.mark.parametrize("big", [False, True], ids=["small", "hot"])
def test_cuda_backend_matches_reference(backend, case, opt, big):
    kw = dict(N=3000, D=64, B=8, L=6000, hot=2, density=0.3) if big else {}
    emb, c = _op_case(*case, **kw)  # big: rows 2 and 3 get 3000 entries (split into chunks)
    got = _run_op(backend, emb, c, opt, device="cuda")
    want = _run_op("reference", emb, c, opt)
    lowp = case[4] != torch.float32
    tol = dict(atol=2e-2, rtol=2e-2) if lowp else dict(atol=1e-4 if big else ATOL, rtol=RTOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["none"])
def test_cuda_module_matches_sparse_adam(backend):
    torch.manual_seed(0)
    N, D = 500, 32
    emb = dsl_kernels.SparseEmbeddingBag(N, D, mode="sum", density=0.3, block_size=8,
                                         device="cuda", backend=backend)
    fuse_optimizer(emb, "adam", lr=0.01)
    dense = nn.EmbeddingBag(N, D, mode="sum", sparse=True).cuda()
    with torch.no_grad():
        dense.weight.copy_(emb.to_dense())
    act = torch.zeros(N * emb.num_blocks, device="cuda")
    act[emb.coord[emb.coord >= 0]] = 1.0
    mask = act.view(N, -1).repeat_interleave(8, dim=1)
    opt = torch.optim.SparseAdam(dense.parameters(), lr=0.01)
    for _ in range(3):
        idx = torch.randint(0, N, (400,), device="cuda")
        idx[::3] = 7  # hot row
        off = torch.arange(0, 400, 4, device="cuda")
        target = torch.randn(100, D, device="cuda")
        ((emb(idx, off) - target) ** 2).sum().backward()
        opt.zero_grad()
        ((dense(idx, off) - target) ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            dense.weight.mul_(mask)
    torch.testing.assert_close(emb.to_dense(), dense.weight.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_rows", [20, 10_000])  # counting sort / pair-sort fallback
@pytest.mark.parametrize("mode,psw", [(0, True), (1, False), (2, False)])
def test_cpu_plan_matches_torch_plan(num_rows, mode, psw):
    from dsl_kernels.backends.cpu.fused_update import has_compiled_op

    assert dsl_kernels.backends.why_not("cpu", "cpu") is None  # loads the extension
    assert has_compiled_op("dsl_C::fused_plan", "CPU")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 20, (50,), generator=g) * (num_rows // 20)
    off = torch.tensor([0, 4, 4, 17, 30, 45])  # entries past 45 dropped
    w = torch.rand(50, generator=g) if psw else None
    want = fused.touched_rows_plan(idx, off, w, mode, 0)
    got = torch.ops.dsl_C.fused_plan(idx.int(), off.int(), w, mode, 0, num_rows)
    n = int(want[1][-1])
    assert torch.equal(got[0], want[0][:n])
    for a, b in zip(got[1:4], want[1:4]):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[4], want[4])


def test_deepcopy_drives_the_copy():
    """A deep copy of a fused module updates itself, never the original (and unfuses cleanly)."""
    emb = dsl_kernels.SparseEmbeddingBag(30, 8, mode="sum", density=0.5, block_size=4)
    fuse_optimizer(emb, "sgd", lr=0.5)
    twin = copy.deepcopy(emb)
    before = emb.values.detach().clone()
    twin(torch.tensor([1, 2, 3]), torch.tensor([0])).sum().backward()
    assert torch.equal(emb.values.detach(), before)
    assert not torch.equal(twin.values.detach(), before)
    assert twin.fused_optimizer.module is twin and int(twin.fused_step) == 1
    fused.unfuse_optimizer(twin)
    twin(torch.tensor([1, 2, 3]), torch.tensor([0])).sum().backward()
    assert twin.values.grad is not None and emb.values.grad is None


def test_fbgemm_style_accessors():
    emb = dsl_kernels.SparseEmbeddingBag(30, 8, mode="sum", density=0.5, block_size=4)
    fo = fuse_optimizer(emb, "adam", lr=0.5)
    fo.set_learning_rate(0.25)
    assert fo.get_learning_rate() == 0.25 and fo.lr == 0.25
    m, v = fo.split_optimizer_states()
    assert m.shape == v.shape == emb.values.shape and m.data_ptr() == emb.fused_state1.data_ptr()
    with pytest.raises(ValueError, match="lr"):
        fo.set_learning_rate(-1.0)
    assert fo.lr == 0.25
