"""``dsl::prune_regrow_(keep_first=True)``: a row's first (lowest-column) active block is never
pruned -- the op-level form of ``DSLScheduler(keep_rows=True)`` (the default), done without an
``int64[C]`` slot list. The cpu kernel equals the reference bit for bit; both equal the old
slot-list path (the scheduler's former ``_prunable``: every row's first CSR slot removed from the
prunable slots); no row ever loses its last block; bad input raises before anything is written."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsl_kernels
from dsl_kernels.backends.reference.prune_regrow import first_block_flags, prune_regrow_reference
from dsl_kernels.ops.prune_regrow import _unprotected_slots
from dsl_kernels.reference import rebuild_index
from dsl_kernels.sparsity import DSLScheduler, prune_regrow_

HAS_CPU = dsl_kernels.backends.has_impl("cpu", "prune_regrow_")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the C++ extension is not built")
BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])


def make_pool(seed, N, NB, B, C, dtype=torch.float32, free=0.2, singles=0.3, nan=False,
              ties=False):
    """A consistent pool: C slots holding distinct blocks (some free), the row mask of coord;
    about ``singles`` of the rows that have blocks hold exactly one."""
    g = torch.Generator().manual_seed(seed)
    n_act = max(0, min(C - int(free * C), N * NB))
    rows = torch.randint(0, N, (N,), generator=g)
    keys = set()
    # rows with a single block first (a random column, often > 63 when NB > 64)
    for r in rows[: int(singles * N)].tolist():
        if len(keys) < n_act:
            keys.add(r * NB + int(torch.randint(0, NB, (1,), generator=g)))
    single_rows = {k // NB for k in keys}
    perm = torch.randperm(N * NB, generator=g).tolist()
    for k in perm:
        if len(keys) >= n_act:
            break
        if k // NB not in single_rows:
            keys.add(k)
    keys = torch.tensor(sorted(keys), dtype=torch.int64)
    coord = torch.full((C,), -1, dtype=torch.int64)
    coord[torch.randperm(C, generator=g)[: keys.numel()]] = keys[torch.randperm(keys.numel(),
                                                                                  generator=g)]
    if ties:
        values = torch.randint(0, 3, (C, B), generator=g).float()
    else:
        values = torch.randn(C, B, generator=g)
    if nan and C > 0:
        values[torch.randint(0, C, (max(1, C // 10),), generator=g), 0] = float("nan")
    values = values.to(dtype)
    _, _, row_mask = rebuild_index(coord, N, NB)
    return values, coord, row_mask


def candidates(seed, N, NB, M, sorted_unique=False):
    g = torch.Generator().manual_seed(seed + 1000)
    if sorted_unique:
        keys = torch.randperm(N * NB, generator=g)[:M].sort().values
    else:
        keys = torch.randint(0, N * NB, (M,), generator=g)
    scores = torch.randint(0, 5, (keys.numel(),), generator=g).float()  # many ties
    if keys.numel() > 2:
        scores[0] = float("nan")
    return keys, scores


def old_prunable(coord, N, NB, slots=None):
    """The scheduler's former ``_prunable``: ``slots`` (None = all) less every row's first
    active block, from the CSR index (rows sorted by column) -- an int64 list."""
    row_ptr, row_slots, _ = rebuild_index(coord, N, NB)
    keep = coord >= 0 if slots is None else torch.zeros_like(coord, dtype=torch.bool)
    if slots is not None:
        keep[slots.long()] = coord[slots.long()] >= 0
    starts, ends = row_ptr[:-1].long(), row_ptr[1:].long()
    keep[row_slots.long()[starts[ends > starts]]] = False
    return torch.nonzero(keep).squeeze(1)


def row_counts(coord, N, NB):
    c = coord[coord >= 0]
    return torch.bincount(c // NB, minlength=N)


def run(fn, values, coord, row_mask, keys, scores, k, NB, ps, **kw):
    v, c = values.clone(), coord.clone()
    slots, pruned = fn(v, c, row_mask, keys, scores, k, NB, ps, **kw)
    return slots, pruned, v, c


def same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.is_floating_point():
            assert torch.equal(x.float().nan_to_num(7.0), y.float().nan_to_num(7.0))
            assert torch.equal(torch.isnan(x), torch.isnan(y))
        else:
            assert torch.equal(x, y)


# ------------------------------------------------------------------------ the flag itself


def test_first_block_flags_multi_word():
    NB = 130  # three mask words
    coord = torch.tensor([0 * NB + 70, 0 * NB + 129, 1 * NB + 5, 1 * NB + 64, 2 * NB + 128,
                          -1, 3 * NB + 63, 3 * NB + 64])
    _, _, rm = rebuild_index(coord, 4, NB)
    assert first_block_flags(coord, rm, NB).tolist() == [True, False, True, False, True, False,
                                                         True, False]


@needs_cpu
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10 ** 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       NB=st.sampled_from([1, 3, 8, 64, 65, 130]),
       N=st.integers(1, 40), B=st.integers(1, 5), C=st.integers(0, 120),
       subset=st.booleans(), k_big=st.booleans(), nan=st.booleans(), ties=st.booleans(),
       sorted_unique=st.booleans(), singles=st.sampled_from([0.0, 0.5, 1.0]))
def test_cpu_equals_reference_and_the_old_list_path(seed, dtype, NB, N, B, C, subset, k_big,
                                                     nan, ties, sorted_unique, singles):
    values, coord, rm = make_pool(seed, N, NB, B, C, dtype, nan=nan, ties=ties, singles=singles)
    M = int(torch.randint(0, 3 * C + 2, (1,), generator=torch.Generator().manual_seed(seed)))
    keys, scores = candidates(seed, N, NB, min(M, N * NB) if sorted_unique else M,
                              sorted_unique)
    ps = torch.randperm(C, generator=torch.Generator().manual_seed(seed))[: C // 2] \
        if subset else None
    k = 10 * C + 5 if k_big else C // 4 + 1
    ref = run(prune_regrow_reference, values, coord, rm, keys, scores, k, NB, ps,
              keep_first=True)
    cpu = run(torch.ops.dsl_C.prune_regrow_, values, coord, rm, keys, scores, k, NB, ps,
              tables=None, keep_first=True)
    same(ref, cpu)
    # The old path: the same op without the flag, given the slot list (ascending, like ps's
    # table slots) -- ps here is unordered, so compare against its sorted version.
    ps_sorted = None if ps is None else ps.sort().values
    ref_s = run(prune_regrow_reference, values, coord, rm, keys, scores, k, NB, ps_sorted,
                keep_first=True)
    old = run(prune_regrow_reference, values, coord, rm, keys, scores, k, NB,
              old_prunable(coord, N, NB, ps_sorted))
    same(ref_s, old)
    # The op's fallback for implementations without the flag gives the same list.
    assert torch.equal(_unprotected_slots(coord, rm, NB, ps_sorted),
                       old_prunable(coord, N, NB, ps_sorted))
    # No row that had blocks lost all of them; protected blocks are all still there.
    before, after = row_counts(coord, N, NB), row_counts(ref[3], N, NB)
    assert bool((after[before > 0] > 0).all())
    first = coord[first_block_flags(coord, rm, NB)]
    assert bool(torch.isin(first, ref[3]).all())
    assert int((ref[3] >= 0).sum()) == int((coord >= 0).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("subset", [False, True])
def test_k_is_the_unprotected_count_at_most(backend, subset):
    """Every row holds 1 or 2 blocks: with k huge, exactly the second blocks move."""
    N, NB, B = 30, 70, 2
    g = torch.Generator().manual_seed(3)
    keys = []
    for r in range(N):
        cols = torch.randperm(NB, generator=g)[: 1 + r % 2].tolist()
        keys += [r * NB + c for c in cols]
    coord = torch.tensor(keys + [-1] * 5)
    C = coord.numel()
    values = torch.randn(C, B, generator=g)
    _, _, rm = rebuild_index(coord, N, NB)
    cand = torch.tensor(sorted(set(range(0, N * NB, 7)) - set(keys)))
    ps = torch.arange(0, C, 2) if subset else None
    c0 = coord.clone()
    slots, pruned = prune_regrow_(values, coord, rm, cand, torch.rand(cand.numel(), generator=g),
                                  10 ** 6, NB, ps, backend, None, True)
    prot = first_block_flags(c0, rm, NB)
    allowed = (c0 >= 0) & ~prot
    if subset:
        sub = torch.zeros(C, dtype=torch.bool)
        sub[ps] = True
        allowed &= sub
    assert slots.tolist() == torch.nonzero(allowed).squeeze(1).tolist()
    assert torch.equal(coord[prot], c0[prot])
    assert bool((row_counts(coord, N, NB) > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_updates_never_empty_a_row(backend):
    """Tiny blocks in rows with one block are the magnitude prune's first victims."""
    N, NB, B, C = 60, 9, 4, 150
    values, coord, rm = make_pool(0, N, NB, B, C, singles=0.6, free=0.0)
    had = row_counts(coord, N, NB) > 0
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        with torch.no_grad():
            values.mul_(torch.rand(C, 1, generator=g))  # shuffle the magnitudes
        keys = torch.randint(0, N * NB, (400,), generator=g)
        prune_regrow_(values, coord, rm, keys, torch.rand(400, generator=g), C // 2, NB, None,
                      backend, None, True)
        values[coord >= 0] += torch.randn(int((coord >= 0).sum()), B, generator=g)
        _, _, rm = rebuild_index(coord, N, NB)
        assert bool((row_counts(coord, N, NB)[had] > 0).all()), step
    assert int((coord >= 0).sum()) == C


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_anything_is_written(backend):
    N, NB = 10, 6
    values, coord, rm = make_pool(0, N, NB, 3, 30)
    keys, scores = torch.tensor([1, 5, 7]), torch.tensor([0.3, 0.2, 0.9])
    for mutate, exc, match in [
            (lambda c: c.__setitem__(4, N * NB + 3), IndexError, r"is not a block of the"),
            (None, (IndexError, ValueError), r"prune_slots"),
            (None, (IndexError, ValueError), r"cand_keys")]:
        v, c = values.clone(), coord.clone()
        ps, ck = None, keys
        if mutate is not None:
            mutate(c)
        elif match == "prune_slots":
            ps = torch.tensor([0, 30])
        else:
            ck = torch.tensor([1, N * NB, 7])
        c0 = c.clone()
        with pytest.raises(exc, match=match):
            prune_regrow_(v, c, rm, ck, scores, 2, NB, ps, backend, None, True)
        assert torch.equal(v, values) and torch.equal(c, c0)


@needs_cpu
def test_kernel_checks_coord_itself():
    values, coord, rm = make_pool(0, 10, 6, 3, 30)
    coord[7] = 60
    c0, v0 = coord.clone(), values.clone()
    with pytest.raises(IndexError, match=r"coord\[7\] = 60 is not a block"):
        torch.ops.dsl_C.prune_regrow_(values, coord, rm, torch.tensor([1]), torch.tensor([1.0]),
                                      1, 6, None, None, True)
    assert torch.equal(coord, c0) and torch.equal(values, v0)
    # without the flag the kernel does not read coord's rows (unchanged behaviour)
    torch.ops.dsl_C.prune_regrow_(values.clone(), coord.clone(), rm, torch.tensor([1]),
                                  torch.tensor([1.0]), 0, 6, None, None, False)


# ----------------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_the_flag(backend):
    values, coord, rm = make_pool(0, 9, 70, 2, 40)
    args = (values, coord, rm, torch.tensor([1, 5, 300]), torch.tensor([0.3, 0.2, 0.9]), 2, 70,
            None, backend)
    torch.library.opcheck(torch.ops.dsl.prune_regrow_.default, args,
                          kwargs={"tables": None, "keep_first": True},
                          test_utils=("test_schema", "test_faketensor"))


def test_an_implementation_without_the_flag_gets_the_slot_list(monkeypatch):
    """A user backend written before keep_first: the op hands it the unprotected slots."""
    import dsl_kernels.ops.prune_regrow as op_mod

    seen = {}

    def old_impl(values, coord, row_mask, cand_keys, cand_scores, k, num_blocks, prune_slots):
        seen["ps"] = prune_slots
        return prune_regrow_reference(values, coord, row_mask, cand_keys, cand_scores, k,
                                      num_blocks, prune_slots)

    monkeypatch.setattr(op_mod, "implementation", lambda backend, op: old_impl)
    values, coord, rm = make_pool(5, 20, 70, 2, 60)
    keys, scores = candidates(5, 20, 70, 100)
    a = run(op_mod.prune_regrow_, values, coord, rm, keys, scores, 20, 70, None,
            backend="reference", keep_first=True)
    assert torch.equal(seen["ps"], old_prunable(coord, 20, 70))
    b = run(prune_regrow_reference, values, coord, rm, keys, scores, 20, 70, None,
            keep_first=True)
    same(a, b)


# ------------------------------------------------------------------------------ scheduler


def test_scheduler_default_is_keep_rows():
    emb = dsl_kernels.SparseEmbeddingBag(50, 16, mode="sum", density=0.25, block_size=4,
                                         backend="reference")
    opt = torch.optim.Adam(emb.parameters())
    assert DSLScheduler(emb, opt, stop_at=10).keep_rows
    assert not DSLScheduler(emb, opt, stop_at=10, keep_rows=False).keep_rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["global", "per_table"])
def test_scheduler_equals_the_old_list_path(backend, distribution, monkeypatch):
    """A whole scheduler run with keep_rows=True gives the coord of the former implementation
    (the list from _prunable passed as prune_slots, keep_first off)."""
    import dsl_kernels.sparsity.scheduler as sched_mod
    from dsl_kernels import SparseEmbeddingBagCollection, TableConfig

    def build(keep_rows=True):
        torch.manual_seed(0)
        ebc = SparseEmbeddingBagCollection([TableConfig("a", 60, 16), TableConfig("b", 40, 8)],
                                           density=0.4, block_size=2, backend=backend)
        opt = torch.optim.Adam(ebc.parameters(), lr=0.05)
        return ebc, opt, DSLScheduler(ebc, opt, update_every=2, prune_fraction=0.5, stop_at=40,
                                      distribution=distribution, keep_rows=keep_rows)

    def train(ebc, opt, sched):
        g = torch.Generator().manual_seed(1)
        for step in range(12):
            out = ebc({"a": torch.randint(0, 60, (32, 3), generator=g),
                       "b": torch.randint(0, 40, (32, 2), generator=g)})
            loss = (out["a"] - 1).pow(2).sum() + out["b"].pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return ebc.coord.clone(), ebc.values.detach().clone()

    new = train(*build())
    assert not torch.equal(train(*build(keep_rows=False))[0], new[0])  # the flag matters here
    real_op = sched_mod.prune_regrow_
    calls = []

    def list_path(values, coord, row_mask, keys, scores, k, nb, ps, backend, layout,
                  keep_first=False):
        assert keep_first  # the scheduler asks the op for it
        calls.append(k)
        N = row_mask.shape[0]
        return real_op(values, coord, row_mask, keys, scores, k, nb,
                       old_prunable(coord, N, nb, ps), backend, layout)

    monkeypatch.setattr(sched_mod, "prune_regrow_", list_path)
    old = train(*build())
    assert calls and torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
