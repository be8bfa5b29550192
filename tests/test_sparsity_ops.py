"""dsl::prune_regrow_ against a brute-force oracle, optimizer-state reset, compaction, growth-score
accumulation, and the budget invariant under many random updates."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsl_kernels
from dsl_kernels import SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig
from dsl_kernels.reference import rebuild_index
from dsl_kernels.sparsity import (DSLScheduler, cosine_update_fraction, cubic_density,
                                  prune_regrow_, register_optimizer_state, reset_optimizer_rows)
from dsl_kernels.sparsity.compaction import compact_
from dsl_kernels.sparsity.prune_regrow import smallest_k
from dsl_kernels.sparsity.scores import GrowthScoreAccumulator, sample_inactive_blocks


# ------------------------------------------------------------------------------ oracle


def brute_force(values, coord, cand_keys, cand_scores, k, prune_slots=None):
    """Python-loop oracle: sorted lists, no tensor tricks."""
    active = {int(c) for c in coord.tolist() if c >= 0}
    slots = range(len(coord)) if prune_slots is None else prune_slots.tolist()
    mags = []
    for s in slots:
        if coord[s] < 0:
            continue
        v = values[s].double()
        m = float(v.norm()) if bool(torch.isfinite(v).all()) else -math.inf
        mags.append((m, s))
    best = {}
    for key, sc in zip(cand_keys.tolist(), cand_scores.tolist()):
        if not math.isfinite(sc) or key in active:
            continue
        best[key] = max(best.get(key, -math.inf), sc)
    cands = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
    k = min(k, len(mags), len(cands))
    pruned_slots = sorted(s for _, s in sorted(mags)[:k])
    grown = sorted(key for key, _ in cands[:k])
    return pruned_slots, grown


def random_pool(N, NB, B, C, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(N * NB, generator=g)[:C]
    coord = keys.clone()
    n_free = C // 5
    coord[torch.randperm(C, generator=g)[:n_free]] = -1
    if ties:
        values = torch.randint(0, 3, (C, B), generator=g).float()
    else:
        values = torch.randn(C, B, generator=g)
    _, _, row_mask = rebuild_index(coord, N, NB)
    return values, coord, row_mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("subset", [False, True])
def test_prune_regrow_matches_brute_force(seed, subset):
    N, NB, B, C = 13, 5, 3, 30
    values, coord, row_mask = random_pool(N, NB, B, C, seed, ties=seed % 2 == 1)
    g = torch.Generator().manual_seed(100 + seed)
    nc = 25
    cand_keys = torch.randint(0, N * NB, (nc,), generator=g)
    cand_scores = torch.randint(0, 4, (nc,), generator=g).float()  # many ties
    cand_scores[0] = float("nan")
    cand_keys[1] = cand_keys[2]  # duplicate key
    if seed == 2:
        values[3, 0] = float("nan")  # a corrupt block is pruned first
    prune_slots = torch.arange(0, C, 2) if subset else None
    k = 7
    exp_slots, exp_grown = brute_force(values, coord, cand_keys, cand_scores, k, prune_slots)
    v0, c0 = values.clone(), coord.clone()
    slots, pruned = prune_regrow_(values, coord, row_mask, cand_keys, cand_scores, k, NB,
                                  prune_slots, "reference")
    assert slots.tolist() == exp_slots
    assert pruned.tolist() == c0[slots].tolist()
    assert coord[slots].tolist() == exp_grown  # freed slots ascending <- grown keys ascending
    assert torch.all(values[slots] == 0)
    others = torch.ones(C, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(coord[others], c0[others])
    assert torch.equal(values[others].nan_to_num(7.0), v0[others].nan_to_num(7.0))
    act = coord[coord >= 0]
    assert act.unique().numel() == act.numel()  # never the same block twice
    assert (c0 >= 0).sum() == (coord >= 0).sum()  # active count constant


def test_prune_regrow_nan_block_pruned_first_and_k_clamped():
    values = torch.tensor([[5.0], [float("inf")], [1.0], [2.0]])
    coord = torch.tensor([0, 1, 2, 3])
    _, _, row_mask = rebuild_index(coord, 2, 4)
    # Only one usable candidate (key 1 is active, key 6 has a NaN score): k shrinks to 1.
    slots, pruned = prune_regrow_(values, coord, row_mask, torch.tensor([1, 6, 7]),
                                  torch.tensor([9.0, float("nan"), 0.5]), 3, 4, None, "reference")
    assert slots.tolist() == [1] and pruned.tolist() == [1] and coord.tolist() == [0, 7, 2, 3]
    assert torch.isfinite(values).all()


def test_prune_regrow_bad_input_messages():
    values, coord = torch.zeros(4, 2), torch.arange(4)
    _, _, rm = rebuild_index(coord, 2, 4)
    with pytest.raises(ValueError, match="cand_keys must lie"):
        prune_regrow_(values, coord, rm, torch.tensor([8]), torch.tensor([1.0]), 1, 4, None,
                      "reference")
    with pytest.raises(ValueError, match="same length"):
        prune_regrow_(values, coord, rm, torch.tensor([5, 6]), torch.tensor([1.0]), 1, 4, None,
                      "reference")
    with pytest.raises(ValueError, match="k must be"):
        prune_regrow_(values, coord, rm, torch.tensor([5]), torch.tensor([1.0]), -1, 4, None,
                      "reference")


def test_prune_regrow_opcheck():
    values, coord, row_mask = random_pool(9, 4, 2, 12, 0)
    args = (values, coord, row_mask, torch.tensor([1, 5, 30]), torch.tensor([0.3, 0.2, 0.9]), 2,
            4, None, "reference")
    torch.library.opcheck(torch.ops.dsl.prune_regrow_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_smallest_k_ties_to_lower_position():
    mag = torch.tensor([1.0, 0.0, 1.0, 1.0, -math.inf, 2.0])
    assert smallest_k(mag, 3).tolist() == [0, 1, 4]
    assert smallest_k(mag, 0).tolist() == [] and smallest_k(mag, 9).tolist() == list(range(6))


# ---------------------------------------------------------------------- optimizer state


def _trained(opt_factory):
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(50, 8, mode="sum", density=0.5, block_size=2, backend="reference")
    opt = opt_factory(emb.parameters())
    for _ in range(3):
        opt.zero_grad()
        emb(torch.randint(0, 50, (20, 4))).pow(2).sum().backward()
        opt.step()
    return emb, opt


@pytest.mark.parametrize("name,factory,keys", [
    ("adam", lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True),
     ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.1), ["exp_avg", "exp_avg_sq"]),
    ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.25),
     ["sum"]),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["momentum_buffer"]),
])
def test_reassigned_optimizer_rows_reset_others_untouched(name, factory, keys):
    emb, opt = _trained(factory)
    st0 = {k: opt.state[emb.values][k].clone() for k in keys}
    sched = DSLScheduler(emb, opt, update_every=1, prune_fraction=0.5, stop_at=100,
                         grow="random")
    c0 = emb.coord.clone()
    sched.step()  # an update at step 1
    moved = torch.nonzero(emb.coord != c0).squeeze(1)
    assert moved.numel() > 0
    fresh = 0.25 if name == "adagrad" else 0.0
    keep = torch.ones(emb.budget, dtype=torch.bool)
    keep[moved] = False
    for k in keys:
        s = opt.state[emb.values][k]
        assert torch.all(s[moved] == fresh), k
        assert torch.equal(s[keep], st0[k][keep]), k
        assert (st0[k][moved] != fresh).any(), k  # the reset really changed something
    # Training goes on with the same optimizer.
    opt.zero_grad()
    emb(torch.randint(0, 50, (20, 4))).sum().backward()
    opt.step()


def test_unknown_optimizer_is_named():
    class Lion(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    emb = SparseEmbeddingBag(10, 4, density=0.5, block_size=2)
    with pytest.raises(TypeError, match="Lion"):
        DSLScheduler(emb, Lion(emb.parameters()), update_every=1, stop_at=10)
    register_optimizer_state(Lion, ["velocity"])
    opt = Lion(emb.parameters())
    opt.state[emb.values]["velocity"] = torch.ones_like(emb.values)
    assert reset_optimizer_rows(opt, emb.values, torch.tensor([0])) == 1
    assert opt.state[emb.values]["velocity"][0].sum() == 0


def test_optimizer_must_train_the_pool():
    emb = SparseEmbeddingBag(10, 4, density=0.5, block_size=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="does not train"):
        DSLScheduler(emb, opt, update_every=1, stop_at=10)


@pytest.mark.parametrize("kw,match", [
    (dict(grow="magic"), "grow"), (dict(distribution="x"), "distribution"),
    (dict(stop_at=None), "stop_at"), (dict(score_window=20), "score_window"),
    (dict(nan_policy="x"), "nan_policy"), (dict(schedule="dense_to_sparse"), "target_density"),
    (dict(prune_fraction=2.0), "prune_fraction"),
])
def test_scheduler_argument_errors(kw, match):
    emb = SparseEmbeddingBag(10, 4, density=0.5, block_size=2)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    args = dict(update_every=10, stop_at=100)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        DSLScheduler(emb, opt, **args)


# --------------------------------------------------------------------------- compaction


def test_compaction_shrinks_values_coord_and_state_keeping_the_parameter():
    emb, opt = _trained(lambda p: torch.optim.Adam(p, lr=0.1))
    p = emb.values
    dense0 = emb.to_dense().clone()
    keep = torch.arange(0, emb.budget, 3)
    exp_avg = opt.state[p]["exp_avg"][keep].clone()
    compact_(emb, keep, [opt])
    assert emb.values is p and emb.budget == keep.numel() == emb.coord.numel()
    assert torch.equal(opt.state[p]["exp_avg"], exp_avg)
    dense = emb.to_dense()
    kept = dense != 0
    assert torch.equal(dense[kept], dense0[kept])
    opt.zero_grad()
    emb(torch.randint(0, 50, (20, 4))).sum().backward()  # autograd sees the new shape
    opt.step()


# ------------------------------------------------------------------------- schedules


def test_schedules():
    assert cosine_update_fraction(0, 0.4, 10) == 0.4
    assert abs(cosine_update_fraction(5, 0.4, 10) - 0.2) < 1e-12
    assert cosine_update_fraction(10, 0.4, 10) == 0.0
    assert cubic_density(0, 10, 20, 1.0, 0.2) == 1.0
    assert cubic_density(20, 10, 20, 1.0, 0.2) == pytest.approx(0.2)
    assert cubic_density(15, 10, 20, 1.0, 0.2) == pytest.approx(0.2 + 0.8 * 0.125)


# ---------------------------------------------------------------------- score accumulator


def test_accumulator_sums_windows_and_drops_nonfinite():
    acc = GrowthScoreAccumulator()
    acc.add(torch.tensor([4, 1, 4]), torch.tensor([1.0, 2.0, float("nan")]))
    acc.add(torch.tensor([1, 2]), torch.tensor([0.5, float("inf")]))
    assert acc.nonfinite == 2 and acc.batches == 2
    k, s = acc.take()
    assert k.tolist() == [1, 4] and s.tolist() == [2.5, 1.0]
    assert len(acc) == 0 and acc.nonfinite == 0


def test_random_growth_samples_distinct_inactive_blocks():
    ebc = SparseEmbeddingBagCollection([TableConfig("a", 30, 8), TableConfig("b", 20, 4)],
                                       density=0.4, block_size=2)
    g = torch.Generator().manual_seed(0)
    keys = sample_inactive_blocks(ebc, ebc.tables, 80, g)
    assert keys.numel() == 80 and keys.unique().numel() == 80
    # Only 72 + 24 blocks are inactive: asking for more returns all of them, no more.
    assert sample_inactive_blocks(ebc, ebc.tables, 500, g).unique().numel() == 96
    active = set(ebc.coord[ebc.coord >= 0].tolist())
    assert not (set(keys.tolist()) & active)
    row, col = keys // ebc.num_blocks, keys % ebc.num_blocks
    b = ebc.table("b")
    in_b = row >= b.row_start
    assert (col[in_b] < b.num_blocks).all()  # table b has 2 blocks per row, the pool 4


# ------------------------------------------------------------------ budget invariant


def _check_pool(m, total0, per_table0=None):
    act = m.coord[m.coord >= 0]
    assert act.numel() == total0
    assert act.unique().numel() == act.numel()
    for t in m.tables:
        s = m.table_slots(t)
        key = m.coord[s]
        assert ((key % m.num_blocks) < t.num_blocks).all()
        if t.padding_idx is not None:
            assert not ((key // m.num_blocks) == t.row_start + t.padding_idx).any()
        if per_table0 is not None:
            assert s.numel() == per_table0[t.name]
    rp, rs, rm = rebuild_index(m.coord, m.num_rows, m.num_blocks)
    assert torch.equal(rp, m.row_ptr) and torch.equal(rs, m.row_slots)
    assert torch.equal(rm, m.row_mask)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.integers(3, 40), min_size=1, max_size=3),
       nb=st.lists(st.sampled_from([1, 2, 3, 8]), min_size=3, max_size=3),
       B=st.sampled_from([1, 2, 4]), density=st.floats(0.05, 0.9),
       frac=st.floats(0.05, 1.0), grow=st.sampled_from(["gradient", "random"]),
       dist=st.sampled_from(["global", "per_table"]), seed=st.integers(0, 100))
def test_budget_invariant_many_updates(rows, nb, B, density, frac, grow, dist, seed):
    torch.manual_seed(seed)
    cfgs = [TableConfig(f"t{i}", n, nb[i] * B) for i, n in enumerate(rows)]
    ebc = SparseEmbeddingBagCollection(cfgs, density=density, block_size=B, backend="reference")
    opt = torch.optim.SGD(ebc.parameters(), lr=0.1, momentum=0.9)
    sched = DSLScheduler(ebc, opt, update_every=1, prune_fraction=frac, stop_at=10 ** 6,
                         grow=grow, distribution=dist, seed=seed)
    total0 = ebc.num_active_blocks
    per0 = {t.name: ebc.table_slots(t).numel() for t in ebc.tables} if dist == "per_table" \
        else None
    assert sched.keep_rows  # the default: no row that has blocks loses all of them

    def blocks_per_row():
        c = ebc.coord[ebc.coord >= 0]
        return torch.bincount(c // ebc.num_blocks, minlength=ebc.row_mask.shape[0])

    had = blocks_per_row()
    for step in range(200):  # 6 examples x 200 = 1200 updates
        if step % 50 == 0:  # a few real backward passes feed gradient scores
            feats = {c.name: torch.randint(0, c.num_embeddings, (8, 3)) for c in cfgs}
            opt.zero_grad()
            sum(o.pow(2).sum() for o in ebc(feats).values()).backward()
            opt.step()
        sched.step()
        _check_pool(ebc, total0, per0)
    assert bool((blocks_per_row()[had > 0] > 0).all())
    # keep_rows: only blocks beyond a row's first are prunable (none when every row has <= 1).
    if grow == "random" and frac * total0 >= 2 and density < 0.5 and bool((had >= 2).any()):
        assert sched.stats()["moved_blocks"] > 0


def test_padding_row_never_grown():
    emb = SparseEmbeddingBag(6, 8, mode="sum", density=0.5, block_size=2, padding_idx=2,
                             backend="reference")
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    sched = DSLScheduler(emb, opt, update_every=1, prune_fraction=1.0, stop_at=10 ** 6,
                         grow="random")
    for _ in range(50):
        sched.step()
        assert not ((emb.coord // emb.num_blocks) == 2).any()


def test_prune_regrow_rejects_blocks_outside_their_table_and_padding_rows():
    """With the pool's table layout the op refuses candidates a module cannot hold (a column past
    a narrower table's width, the padding row), before writing anything."""
    ebc = SparseEmbeddingBagCollection([TableConfig("wide", 10, 16), TableConfig("narrow", 10, 8)],
                                       density=0.3, block_size=4)  # NB 4 and 2; pool NB = 4
    emb = SparseEmbeddingBag(10, 8, density=0.3, block_size=4, padding_idx=3)
    for m, bad_key in ((ebc, 10 * 4 + 3), (emb, 3 * 2 + 1)):  # narrow row 0 col 3; padding row
        layout = m.table_layout()
        assert layout.shape == (len(m.tables), 4)
        free = torch.nonzero(~torch.isin(torch.arange(m.num_rows * m.num_blocks), m.coord))[:, 0]
        c0, v0 = m.coord.clone(), m.values.detach().clone()
        with torch.no_grad(), pytest.raises(ValueError, match=r"cand_keys\[1\].*outside table"):
            prune_regrow_(m.values, m.coord, m.row_mask, torch.tensor([int(free[0]), bad_key]),
                          torch.tensor([1.0, 2.0]), 1, m.num_blocks, None, "reference", layout)
        assert torch.equal(m.coord, c0) and torch.equal(m.values, v0)
    # A valid candidate goes through, and the module still loads its own state.
    good = int(torch.nonzero(~torch.isin(torch.arange(40), ebc.coord))[0, 0])  # a "wide" block
    with torch.no_grad():
        prune_regrow_(ebc.values, ebc.coord, ebc.row_mask, torch.tensor([good]),
                      torch.tensor([1.0]), 1, ebc.num_blocks, None, "reference",
                      ebc.table_layout())
    assert good in ebc.coord.tolist()
    ebc.load_state_dict(ebc.state_dict())
