"""DSLScheduler end to end on the reference backend: gradient growth against a dense brute force,
global redistribution, dense-to-sparse, stale skipping, NaN policies, bit-exact resume, memory."""
import io

import pytest
import torch
import torch.nn.functional as F

from dsl_kernels import SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig
from dsl_kernels.sparsity import (DSLScheduler, cosine_update_fraction, cubic_density,
                                  load_checkpoint, prune_regrow_)
from dsl_kernels.sparsity.scores import sample_inactive_blocks
from conftest import available_backends
from memcheck import AllocationRecorder, allocator_peak_bytes, assert_no_dense_allocation


def _opt_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------- gradient growth oracle


@pytest.mark.parametrize("window", [1, 3])
def test_gradient_growth_picks_largest_window_scores_and_prunes_smallest(window):
    torch.manual_seed(0)
    N, D, B = 20, 8, 2
    NB = D // B
    emb = SparseEmbeddingBag(N, D, mode="sum", density=0.3, block_size=B, backend="reference")
    opt = torch.optim.SGD(emb.parameters(), lr=0.05)
    # The oracle is plain DSL (any active block may be pruned): keep_rows off.
    sched = DSLScheduler(emb, opt, update_every=4, prune_fraction=0.5, stop_at=100,
                         grow="gradient", score_window=window, keep_rows=False)
    score = torch.zeros(N, NB, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        idx = torch.randint(0, N, (6, 3), generator=g)
        w = torch.randn(6, D, generator=g)
        # Brute force: dense gradient of the same loss on the dense image.
        dense = emb.to_dense().clone().requires_grad_(True)
        (F.embedding_bag(idx, dense, mode="sum") * w).sum().backward()
        if step > 4 - window:
            score += dense.grad.view(N, NB, B).double().norm(dim=2)
        opt.zero_grad()
        (emb(idx) * w).sum().backward()
        opt.step()
        if step == 4:  # the state the update sees
            coord0 = emb.coord.clone()
            mags = emb.values.detach().norm(dim=1)
        sched.step()
    active = torch.zeros(N * NB, dtype=torch.bool)
    active[coord0] = True
    k = int(round(cosine_update_fraction(4, 0.5, 100) * emb.budget))
    cand = [(float(s), key) for key, s in enumerate(score.view(-1).tolist())
            if not active[key] and s > 0]
    exp_grown = sorted(key for _, key in sorted(cand, key=lambda c: (-c[0], c[1]))[:k])
    exp_pruned = sorted(torch.argsort(mags, stable=True)[:k].tolist())
    assert k > 0 and len(cand) >= k
    moved = torch.nonzero(emb.coord != coord0).squeeze(1)
    assert moved.tolist() == exp_pruned
    assert sorted(emb.coord[moved].tolist()) == exp_grown
    assert torch.all(emb.values[moved] == 0)


def test_score_window_counts_batches():
    emb = SparseEmbeddingBag(30, 8, mode="sum", density=0.3, block_size=2, backend="reference")
    opt = torch.optim.SGD(emb.parameters(), lr=0.05)
    sched = DSLScheduler(emb, opt, update_every=5, stop_at=100, score_window=2)
    seen = []
    acc = sched.pools[0].acc
    take = acc.take
    acc.take = lambda: (seen.append(acc.batches), take())[1]
    for _ in range(10):
        opt.zero_grad()
        emb(torch.randint(0, 30, (4, 2))).sum().backward()
        opt.step()
        sched.step()
    assert seen == [2, 2]


# ------------------------------------------------------------------ global distribution


def _two_table_run(distribution, steps=40):
    torch.manual_seed(0)
    ebc = SparseEmbeddingBagCollection([TableConfig("a", 60, 8), TableConfig("b", 60, 8)],
                                       density=0.25, block_size=2, backend="reference")
    opt = torch.optim.SGD(ebc.parameters(), lr=0.5)
    # One block per row (aligned, 1 of 4): with keep_rows (the default) nothing is prunable.
    sched = DSLScheduler(ebc, opt, update_every=5, prune_fraction=0.5, stop_at=200,
                         distribution=distribution, score_window=5, keep_rows=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        feats = {"a": torch.randint(0, 60, (16, 3), generator=g),
                 "b": torch.randint(0, 60, (16, 3), generator=g)}
        out = ebc(feats)
        # Table a's gradients dominate (and grow its magnitudes); b barely trains.
        loss = -out["a"].sum() - 1e-4 * out["b"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return ebc, sched


def test_global_distribution_moves_budget_to_the_dominant_table():
    ebc, sched = _two_table_run("global")
    dens = ebc.table_density()
    assert ebc.num_active_blocks == ebc.budget
    assert dens["a"] > 0.35 and dens["b"] < 0.15, dens
    assert sched.stats()["table_density"] == dens


def test_per_table_distribution_keeps_each_tables_count():
    ebc, sched = _two_table_run("per_table")
    assert ebc.table_density() == {"a": 0.25, "b": 0.25}
    assert sched.stats()["moved_blocks"] > 0


def test_separate_modules_keep_their_budgets():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "u": SparseEmbeddingBag(40, 8, mode="sum", density=0.25, block_size=2),
        "i": SparseEmbeddingBag(40, 8, mode="sum", density=0.5, block_size=2)})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = DSLScheduler(model, opt, update_every=2, prune_fraction=0.5, stop_at=100)
    assert len(sched.pools) == 2
    for _ in range(10):
        idx = torch.randint(0, 40, (8, 2))
        loss = -model["u"](idx).sum() - 1e-4 * model["i"](idx).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert model["u"].num_active_blocks == 40 and model["i"].num_active_blocks == 80
    assert sched.stats()["moved_blocks"] > 0


# ---------------------------------------------------------------------- dense to sparse


def test_dense_to_sparse_reaches_target_on_schedule_and_memory_falls():
    torch.manual_seed(0)
    N, D, B = 200, 16, 4
    emb = SparseEmbeddingBag(N, D, mode="sum", density=1.0, block_size=B, backend="reference")
    opt = torch.optim.Adam(emb.parameters(), lr=0.01)
    p = emb.values
    sched = DSLScheduler(emb, opt, update_every=10, schedule="dense_to_sparse", t_start=5,
                         t_end=45, target_density=0.1, adapt_every=5, prune_fraction=0.2)
    total = N * D // B
    mem = []
    for t in range(1, 71):
        opt.zero_grad()
        emb(torch.randint(0, N, (32, 3))).pow(2).sum().backward()
        opt.step()
        budget0 = emb.budget
        sched.step()
        if t in (15, 25, 35, 45):
            assert emb.budget == round(cubic_density(t, 5, 45, 1.0, 0.1) * total)
            mem.append(emb.memory_bytes() + _opt_bytes(opt))
        elif t < 45:
            assert emb.budget == budget0
        assert emb.num_active_blocks == emb.budget
        assert opt.state[p]["exp_avg"].shape[0] == emb.budget
    assert emb.values is p
    assert emb.budget == round(0.1 * total) and emb.density == pytest.approx(0.1)
    assert all(a > b for a, b in zip(mem, mem[1:])), mem
    dense_bytes = N * D * 4 * 3  # values + Adam's two states when dense
    assert mem[-1] < 0.2 * dense_bytes
    # Adaptation continues after t_end at constant budget.
    assert sched.stats()["moved_blocks"] > 0 and sched.stats()["mask_updates"] == 5


def test_dense_to_sparse_global_criterion_learns_per_table_sparsity():
    torch.manual_seed(0)
    ebc = SparseEmbeddingBagCollection([TableConfig("big", 50, 8), TableConfig("small", 50, 8)],
                                       density=1.0, block_size=2, backend="reference")
    with torch.no_grad():  # table "small" holds small weights: the global criterion prunes it
        ebc.values[ebc.table_slots(ebc.table("small"))] *= 0.01
    opt = torch.optim.SGD(ebc.parameters(), lr=0.0)
    sched = DSLScheduler(ebc, opt, update_every=2, schedule="dense_to_sparse", t_start=0,
                         t_end=10, target_density=0.3, stop_at=10)  # stop_at ends adaptation only
    for _ in range(10):
        sched.step()
    dens = ebc.table_density()
    assert ebc.density == pytest.approx(0.3)
    assert dens["big"] == pytest.approx(0.6) and dens["small"] == pytest.approx(0.0)


def test_dense_to_sparse_from_dense_checkpoint_per_table():
    w = torch.randn(100, 8)
    emb = SparseEmbeddingBag.from_dense(w, density=0.5, block_size=2, mode="sum")
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    sched = DSLScheduler(emb, opt, update_every=1, schedule="dense_to_sparse", t_start=0,
                         t_end=4, target_density=0.2, distribution="per_table")
    for _ in range(4):
        sched.step()
    assert emb.budget == 80
    # The kept blocks are the largest blocks of w.
    norms = w.view(400, 2).norm(dim=1)
    assert set(emb.coord.tolist()) == set(torch.topk(norms, 80).indices.tolist())


# ---------------------------------------------------------------------- stale skipping


def test_stale_skipping_freezes_unchanged_rows_and_unfreezes_drifting_ones():
    torch.manual_seed(0)
    N, D = 40, 8
    emb = SparseEmbeddingBag(N, D, mode="sum", density=1.0, block_size=4, backend="reference")
    opt = torch.optim.SGD(emb.parameters(), lr=0.05)
    sched = DSLScheduler(emb, opt, update_every=10 ** 6, stop_at=10 ** 6, skip_stale=True,
                         stale_window=5, target_skip=0.5, max_stale_change=1e-6,
                         hot_fraction=1.0)
    target = emb.to_dense().detach().clone()  # rows < 20 sit at their target: converged
    target[20:] += 5.0  # rows >= 20 keep moving
    idx = torch.arange(N)

    def rows_frozen():
        if emb.frozen is None:
            return set()
        s = torch.nonzero(emb.frozen).squeeze(1)
        return set((emb.coord[s] // emb.num_blocks).tolist())

    for t in range(1, 21):
        out = emb(idx.view(-1, 1))
        opt.zero_grad()
        (out - target).pow(2).sum().backward()
        opt.step()
        sched.step()
        if t == 10:  # second check: the unchanged rows are frozen, the moving ones are not
            assert rows_frozen() == set(range(20))
    target[:20] -= 5.0  # drift: the frozen rows' data moves
    before = emb.to_dense().detach().clone()
    for t in range(21, 41):
        out = emb(idx.view(-1, 1))
        opt.zero_grad()
        (out - target).pow(2).sum().backward()
        opt.step()
        sched.step()
    assert not (rows_frozen() & set(range(20)))
    assert (emb.to_dense()[:20] - before[:20]).abs().max() > 0.1  # they trained again
    s = sched.stats()
    assert 0.1 < s["skipped_update_ratio"] < 0.6


def test_frozen_slots_hold_value_and_momentum():
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(20, 8, mode="sum", density=1.0, block_size=4, backend="reference")
    opt = torch.optim.Adam(emb.parameters(), lr=0.1, weight_decay=0.1)
    sched = DSLScheduler(emb, opt, update_every=10 ** 6, stop_at=10 ** 6, skip_stale=True,
                         stale_window=10 ** 6)
    idx = torch.arange(20).view(-1, 1)
    for _ in range(3):  # build up momentum everywhere
        opt.zero_grad()
        emb(idx).pow(2).sum().backward()
        opt.step()
        sched.step()
    frozen = torch.tensor([0, 5, 7])
    sched.pools[0].tracker._set_frozen(frozen, torch.zeros(3, dtype=torch.int64))
    v0 = emb.values.detach().clone()
    st0 = {k: v.clone() for k, v in opt.state[emb.values].items() if k != "step"}
    opt.zero_grad()
    emb(idx).pow(2).sum().backward()
    assert torch.all(emb.values.grad[frozen] == 0)  # the backward skipped them
    opt.step()
    sched.step()
    others = torch.ones(emb.budget, dtype=torch.bool)
    others[frozen] = False
    assert torch.equal(emb.values[frozen], v0[frozen])
    assert not torch.equal(emb.values[others], v0[others])
    for k, v in st0.items():
        assert torch.equal(opt.state[emb.values][k][frozen], v[frozen]), k


# ---------------------------------------------------------------------------- NaN policy


def _nan_setup(policy):
    emb = SparseEmbeddingBag(30, 8, mode="sum", density=0.3, block_size=2, backend="reference")
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    # keep_rows off: the corrupt block may be its row's only one (which keep_rows would keep).
    sched = DSLScheduler(emb, opt, update_every=2, prune_fraction=0.3, stop_at=100,
                         nan_policy=policy, grow="random", keep_rows=False)
    with torch.no_grad():
        emb.values[3, 0] = float("nan")
    return emb, opt, sched


def test_nan_policy_raise():
    emb, opt, sched = _nan_setup("raise")
    sched.step()
    with pytest.raises(FloatingPointError, match="NaN"):
        sched.step()


def test_nan_policy_skip_leaves_everything():
    emb, opt, sched = _nan_setup("skip")
    c0 = emb.coord.clone()
    sched.step()
    sched.step()
    assert torch.equal(emb.coord, c0) and sched.stats()["nonfinite_skips"] == 1


def test_nan_policy_ignore_prunes_the_corrupt_block():
    emb, opt, sched = _nan_setup("ignore")
    sched.step()
    sched.step()
    assert torch.isfinite(emb.values).all()


def test_nan_gradient_scores_raise():
    emb = SparseEmbeddingBag(30, 8, mode="sum", density=0.3, block_size=2, backend="reference")
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    sched = DSLScheduler(emb, opt, update_every=1, stop_at=100)
    opt.zero_grad()
    (emb(torch.tensor([[1, 2]])) * float("nan")).sum().backward()
    with pytest.raises(FloatingPointError, match="growth scores"):
        sched.step()


# ------------------------------------------------------------------------------- resume


def _batch(step, tables):
    g = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randint(0, n, (16, 3), generator=g) for name, n in tables}


def _build(cfg, seed):
    torch.manual_seed(seed)
    tables = [("a", 80), ("b", 50)]
    d0 = 1.0 if cfg.get("schedule") == "dense_to_sparse" else 0.25
    ebc = SparseEmbeddingBagCollection([TableConfig(n, r, 8) for n, r in tables], density=d0,
                                       block_size=2, backend="reference")
    opt = torch.optim.Adam(ebc.parameters(), lr=0.05)
    sched = DSLScheduler(ebc, opt, **cfg)
    return ebc, opt, sched, tables


def _train(ebc, opt, sched, tables, start, stop):
    for step in range(start, stop):
        out = ebc(_batch(step, tables))
        loss = (out["a"] - 1).pow(2).sum() + 0.1 * out["b"].pow(3).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


# keep_rows=False where the pools start with one block per row (density 0.25 of 4 blocks):
# with keep_rows (the default) nothing would move; dense_to_sparse runs with the default.
RESUME_CFGS = {
    "gradient_window": dict(update_every=4, prune_fraction=0.4, stop_at=40, score_window=3,
                            keep_rows=False),
    "random_stale": dict(update_every=4, prune_fraction=0.4, stop_at=40, grow="random",
                         skip_stale=True, stale_window=3, target_skip=0.3, grow_init=0.01,
                         keep_rows=False),
    "dense_to_sparse": dict(update_every=3, schedule="dense_to_sparse", t_start=2, t_end=14,
                            target_density=0.3, adapt_every=4, score_window=2),
}


@pytest.mark.parametrize("name", sorted(RESUME_CFGS))
def test_resume_is_bit_exact(name):
    cfg = RESUME_CFGS[name]
    k = 11  # mid-window, mid-decay, with a non-empty score accumulator
    ebc, opt, sched, tables = _build(cfg, 0)
    _train(ebc, opt, sched, tables, 0, 2 * k)

    ebc1, opt1, sched1, _ = _build(cfg, 0)
    _train(ebc1, opt1, sched1, tables, 0, k)
    buf = io.BytesIO()
    torch.save({"model": ebc1.state_dict(), "optimizer": opt1.state_dict(),
                "scheduler": sched1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    ebc2, opt2, sched2, _ = _build(cfg, 123)  # a fresh model, different init
    load_checkpoint(ck, ebc2, opt2, sched2)
    _train(ebc2, opt2, sched2, tables, k, 2 * k)

    assert torch.equal(ebc.coord, ebc2.coord)
    assert torch.equal(ebc.values, ebc2.values)
    for key, v in opt.state[ebc.values].items():
        assert torch.equal(v, opt2.state[ebc2.values][key]), key
    s1, s2 = sched.stats(), sched2.stats()
    assert s1 == s2 and s1["moved_blocks"] > 0


def _pool_snapshot(ebc, opt):
    return ([ebc.values.detach().clone(), ebc.coord.clone(), ebc.row_ptr.clone()]
            + [v.clone() for v in opt.state[ebc.values].values()])


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_scheduler_load_state_dict_is_all_or_nothing():
    """A state the scheduler cannot take leaves pool, optimizer and scheduler as they were (it
    used to empty a dense-to-sparse pool and drop its optimizer state before failing)."""
    cfg = RESUME_CFGS["dense_to_sparse"]
    ebc, opt, sched, tables = _build(cfg, 0)
    _train(ebc, opt, sched, tables, 0, 11)  # compacted: the saved budget is smaller
    good = sched.state_dict()
    fresh, fopt, fsched, _ = _build(dict(cfg, skip_stale=True), 1)
    _train(fresh, fopt, fsched, tables, 0, 1)
    before, step0 = _pool_snapshot(fresh, fopt), fsched.step_count
    with pytest.raises(ValueError, match="without skip_stale"):
        fsched.load_state_dict(good)  # fails after the budget check
    assert _same(_pool_snapshot(fresh, fopt), before) and fsched.step_count == step0
    # load_checkpoint: a model state that does not load rolls the scheduler's resize back too.
    bad_model = ebc.state_dict()
    bad_model["coord"] = bad_model["coord"].clone()
    bad_model["coord"][0] = bad_model["coord"][1]  # a block twice
    fresh2, fopt2, fsched2, _ = _build(cfg, 2)
    _train(fresh2, fopt2, fsched2, tables, 0, 1)
    before, step0 = _pool_snapshot(fresh2, fopt2), fsched2.step_count
    with pytest.raises(ValueError, match="twice"):
        load_checkpoint({"model": bad_model, "optimizer": opt.state_dict(), "scheduler": good},
                        fresh2, fopt2, fsched2)
    assert _same(_pool_snapshot(fresh2, fopt2), before) and fsched2.step_count == step0


def test_stats_report_requested_and_actual_moves():
    """Growth with too few candidates moves fewer blocks than scheduled: stats() says both."""
    emb = SparseEmbeddingBag(50, 8, mode="sum", density=0.5, block_size=2, backend="reference")
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    sched = DSLScheduler(emb, opt, update_every=1, prune_fraction=0.5, stop_at=100)
    opt.zero_grad()
    emb(torch.tensor([[1, 2]])).sum().backward()  # two rows: at most 2 * 4 inactive candidates
    opt.step()
    sched.step()
    s = sched.stats()
    assert s["requested_moves"] == int(round(cosine_update_fraction(1, 0.5, 100) * emb.budget))
    assert 0 < s["moved_blocks"] <= 8 < s["requested_moves"]


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("keep_rows, density", [(True, 0.2), (False, 0.1)])
def test_mask_update_never_allocates_dense_size(keep_rows, density):
    N, D, B = 200_000, 64, 8
    NB = D // B
    torch.manual_seed(0)
    # Random columns: the bag sums then cover every column, so the growth candidates (and the
    # update's temporaries) are at their largest; an aligned mask leaves fewer. keep_rows (the
    # default) at density 0.2: at 0.1 most rows hold one block, which it never prunes.
    emb = SparseEmbeddingBag(N, D, mode="sum", density=density, block_size=B,
                             backend="reference", mask_init="random")
    opt = torch.optim.Adam(emb.parameters(), lr=0.01)
    sched = DSLScheduler(emb, opt, update_every=2, prune_fraction=0.3, stop_at=1000,
                         score_window=2, keep_rows=keep_rows)
    idx = torch.randint(0, N, (512, 8))
    for _ in range(2):  # backward passes feed the scores; the second step updates
        opt.zero_grad()
        emb(idx).pow(2).sum().backward()
        opt.step()
        if sched.step_count == 1:
            c0 = emb.coord.clone()
            with AllocationRecorder() as rec:
                rec.watch(emb.row_ptr, emb.row_slots, emb.row_mask)  # dropped before rebuild
                sched.step()
        else:
            sched.step()
    moved = int((emb.coord != c0).sum())
    assert moved > 1000
    # Nothing of N*NB (let alone N*D) size: the largest temporaries are pool-sized [C] or the
    # rebuilt row index (row_ptr, N + 1 entries).
    assert rec.max_numel <= max(emb.budget, N + 1), (rec.max_numel, rec.max_op)
    assert rec.max_numel < N * NB // 4
    steady = emb.memory_bytes() + _opt_bytes(opt) + emb.values.numel() * 4  # + grad
    # The whole update (net: the old index is dropped before the new one is built; the
    # reference rebuild_index keeps ~9 [C]-sized int64 temporaries alive at once, the C++/CUDA
    # rebuilds do not) stays well below doubling the memory ...
    assert rec.peak_bytes < 0.6 * steady, (rec.peak_bytes, steady)
    # ... and the prune/regrow op itself needs a few [C]/candidate-sized temporaries only.
    keys = sample_inactive_blocks(emb, emb.tables, moved, torch.Generator().manual_seed(0))
    with torch.no_grad(), AllocationRecorder() as rec_op:
        prune_regrow_(emb.values, emb.coord, emb.row_mask, keys, torch.rand(keys.numel()), moved,
                      NB, None, "reference", None, keep_rows)
    assert rec_op.peak_bytes < 0.1 * steady, (rec_op.peak_bytes, steady)
    emb.rebuild_index()
    # The same update, seen by the profiler (sees allocations inside C++ kernels too).
    for _ in range(1):
        opt.zero_grad()
        emb(idx).pow(2).sum().backward()
        opt.step()
    assert_no_dense_allocation(sched.step, N, D, fraction=0.05)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="C++ cpu backend not built")
@pytest.mark.parametrize("keep_rows, density", [(True, 0.3), (False, 0.1)])
def test_mask_update_peak_within_5_percent_with_cpu_backend(keep_rows, density):
    """The issue's target: peak memory during an update <= 1.05 x steady state (values, grad,
    Adam state, coord, index), with the C++ index rebuild (its internal temporaries are not
    visible to the recorder; its outputs are). keep_rows=True (the default) is done inside the
    op (keep_first), without a slot list; at density 0.1 the random mask gives most rows one
    block (nothing prunable then), so that case runs at 0.3 (2.4 blocks per row)."""
    N, D, B = 200_000, 64, 8
    torch.manual_seed(0)
    # Random columns: every column gets a gradient, so the update moves the most (see above).
    emb = SparseEmbeddingBag(N, D, mode="sum", density=density, block_size=B, backend="cpu",
                             mask_init="random")
    opt = torch.optim.Adam(emb.parameters(), lr=0.01)
    kw = {} if keep_rows else {"keep_rows": False}  # keep_rows=True: the default
    sched = DSLScheduler(emb, opt, update_every=1, prune_fraction=0.1, stop_at=10 ** 9, **kw)
    assert sched.keep_rows == keep_rows
    had = torch.bincount(emb.coord[emb.coord >= 0] // emb.num_blocks, minlength=N) > 0
    for i in range(2):
        opt.zero_grad()
        emb(torch.randint(0, N, (512, 8))).pow(2).sum().backward()
        opt.step()
        if i == 1:
            c0 = emb.coord.clone()
            with AllocationRecorder() as rec:
                rec.watch(emb.row_ptr, emb.row_slots, emb.row_mask)
                sched.step()
        else:
            sched.step()
    assert int((emb.coord != c0).sum()) > 1000
    steady = emb.memory_bytes() + _opt_bytes(opt) + emb.values.numel() * 4
    assert rec.peak_bytes <= 0.05 * steady, (rec.peak_bytes, steady)
    # The same bound at the allocator (the profiler's records): it also sees the temporaries
    # made inside C++ and aten kernels (the in-place index update's scratch, a widening .sum()).
    opt.zero_grad()
    emb(torch.randint(0, N, (512, 8))).pow(2).sum().backward()
    opt.step()
    c1 = emb.coord.clone()
    alloc_peak = allocator_peak_bytes(sched.step)
    assert int((emb.coord != c1).sum()) > 1000
    assert alloc_peak <= 0.05 * steady, (alloc_peak, steady)
    if keep_rows:  # no row that had blocks lost all of them
        still = torch.bincount(emb.coord[emb.coord >= 0] // emb.num_blocks, minlength=N) > 0
        assert bool(still[had].all())


# -------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prune_regrow_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    N, NB, B, C = 5000, 8, 8, 4000
    coord = torch.randperm(N * NB, generator=g)[:C]
    values = torch.randn(C, B, generator=g)
    _, _, row_mask = torch.ops.dsl.rebuild_index(coord, N, NB, "reference")
    keys = torch.randint(0, N * NB, (3000,), generator=g)
    scores = torch.rand(3000, generator=g)
    outs = []
    for dev in ("cpu", "cuda"):
        v, c = values.clone().to(dev), coord.clone().to(dev)
        slots, pruned = prune_regrow_(v, c, row_mask.to(dev), keys.to(dev), scores.to(dev), 500,
                                      NB, None, "reference")
        outs.append((slots.cpu(), pruned.cpu(), c.cpu(), v.cpu()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(RESUME_CFGS))
def test_scheduler_on_cuda(backend, name):
    """The whole engine on CUDA tensors (every mechanism of RESUME_CFGS), and resume on CUDA."""
    cfg = RESUME_CFGS[name]
    tables = [("a", 80), ("b", 50)]

    def build(seed):
        torch.manual_seed(seed)
        d0 = 1.0 if cfg.get("schedule") == "dense_to_sparse" else 0.25
        ebc = SparseEmbeddingBagCollection([TableConfig(n, r, 8) for n, r in tables],
                                           density=d0, block_size=2, device="cuda",
                                           backend=backend, deterministic=True)
        opt = torch.optim.Adam(ebc.parameters(), lr=0.05)
        return ebc, opt, DSLScheduler(ebc, opt, **cfg)

    def train(ebc, opt, sched, a, b):
        for step in range(a, b):
            out = ebc({k: v.cuda() for k, v in _batch(step, tables).items()})
            loss = (out["a"] - 1).pow(2).sum() + 0.1 * out["b"].pow(3).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    ebc, opt, sched = build(0)
    n0 = ebc.num_active_blocks
    train(ebc, opt, sched, 0, 11)
    act = ebc.coord[ebc.coord >= 0]
    assert act.unique().numel() == act.numel() == ebc.num_active_blocks == ebc.budget
    if cfg.get("schedule") == "dense_to_sparse":
        assert ebc.budget < n0
    else:
        assert ebc.budget == n0 and sched.stats()["moved_blocks"] > 0
    buf = io.BytesIO()  # a copy: state dicts share storage with the live tensors
    torch.save({"model": ebc.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    train(ebc, opt, sched, 11, 22)
    ebc2, opt2, sched2 = build(1)
    load_checkpoint(ck, ebc2, opt2, sched2)
    train(ebc2, opt2, sched2, 11, 22)
    # The reference backend's forward sums bags with index_add_, which uses atomics on CUDA, so
    # on a GPU it is not bit-deterministic (bit-exact resume is tested on CPU): same mask,
    # values equal to fp32 rounding.
    assert torch.equal(ebc.coord, ebc2.coord)
    assert torch.allclose(ebc.values, ebc2.values, atol=1e-4)
