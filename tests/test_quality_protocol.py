"""The quality protocol: validation split, epoch selection, equal-memory baselines, mask layouts,
method recipes and run names (issue 12)."""
import json
import os
import sys

import pytest
import torch

import dsl_kernels
from dsl_kernels.sparsity import DSLScheduler, align_, allocate_by_frequency_

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from dsl_train import cli  # noqa: E402
from dsl_train import data as D  # noqa: E402
from dsl_train.loop import TrainConfig, _run_name, run_ranking  # noqa: E402
from dsl_train.methods import MethodConfig, preset, resolve_memory  # noqa: E402
from dsl_train.protocol import (BestSnapshot, carve_validation, density_for_memory,  # noqa: E402
                                dim_for_memory)
from dsl_train.report import memory_report  # noqa: E402


# ----------------------------------------------------------------------------- validation split


def test_carve_validation_per_user_shares_and_partition():
    g = torch.Generator().manual_seed(0)
    users = torch.repeat_interleave(torch.arange(50), torch.randint(1, 30, (50,), generator=g))
    items = torch.randint(0, 1000, (users.numel(),), generator=g)
    tu, ti, vu, vi = carve_validation(users, items, 0.1, seed=3)
    assert tu.numel() + vu.numel() == users.numel()
    n = torch.bincount(users, minlength=50)
    nv = torch.bincount(vu, minlength=50)
    assert torch.equal(nv, torch.round(n.double() * 0.1).long().clamp(max=n - 1))
    assert bool((torch.bincount(tu, minlength=50) >= 1).all())  # every user keeps a train item
    # the two parts are exactly the original multiset of (user, item) pairs
    key = lambda u, i: torch.sort(u * 1000 + i).values  # noqa: E731
    assert torch.equal(key(torch.cat([tu, vu]), torch.cat([ti, vi])), key(users, items))
    again = carve_validation(users, items, 0.1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, (tu, ti, vu, vi)))
    with pytest.raises(ValueError, match="val_fraction"):
        carve_validation(users, items, 1.0)


def test_best_snapshot_restores_the_selected_state():
    m = torch.nn.Linear(2, 2)
    snap = BestSnapshot()
    assert snap.offer(m, 1, 0.5, {"epoch": 1})
    w1 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not snap.offer(m, 2, 0.4, {"epoch": 2})    # worse: kept the first
    assert not snap.offer(m, 3, float("nan"), {})      # NaN never wins
    snap.restore(m)
    assert torch.equal(m.weight, w1) and snap.epoch == 1


# ----------------------------------------------------------------------------- equal memory


@pytest.mark.parametrize("share,block", [(0.2, 8), (0.1, 8), (0.05, 4), (0.1, 1)])
def test_density_for_memory_matches_measured_bytes(share, block):
    """The density solved for a memory share gives that share in the trainer's measured report
    (values + index + Adam state), within rounding of the slot count."""
    from dsl_train.models import MF

    nu, ni, dim = 300, 200, 64
    d = density_for_memory(share, nu + ni, dim, block)
    emb = dsl_kernels.SparseEmbedding(nu + ni, dim, density=d, block_size=block)
    model = MF(nu, ni, emb)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.loss(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 3]), 0.0)[0].backward()
    opt.step()
    mem = memory_report(model, opt)
    assert mem["embedding_share_of_dense"] == pytest.approx(share, rel=0.02)


def test_dim_for_memory_and_resolve():
    assert dim_for_memory(0.1, 64) == 6 and dim_for_memory(0.001, 64) == 1
    t = TrainConfig(dim=64, memory=0.2)
    small = resolve_memory(MethodConfig("dense_small"), t, 1000)
    assert small.dim == 13 and small.density == 1.0
    sparse = resolve_memory(MethodConfig("dsl", 0.5), t, 1000)
    assert sparse.density == pytest.approx(density_for_memory(0.2, 1000, 64, 8))
    with pytest.raises(ValueError, match="dense_small needs --memory"):
        resolve_memory(MethodConfig("dense_small"), TrainConfig(), 1000)
    with pytest.raises(ValueError, match="--method dense"):
        resolve_memory(MethodConfig("dense"), t, 1000)


# ----------------------------------------------------------------------------- layouts


def _row_blocks(e, rows, nb):
    return (e.coord[e.coord >= 0] // nb).bincount(minlength=rows)


def test_allocate_by_frequency_budget_prefix_and_order():
    rows, dim, b = 40, 32, 8                      # 4 blocks per row
    e = dsl_kernels.SparseEmbedding(rows, dim, density=0.25, block_size=b, padding_idx=3)
    counts = torch.arange(rows) ** 2              # row 0 never occurs
    per_row = allocate_by_frequency_(e, counts, power=0.5)
    assert e.num_active_blocks == e.budget == int(per_row.sum())
    assert torch.equal(_row_blocks(e, rows, 4), per_row)
    assert per_row[0] == 0 and per_row[3] == 0    # unseen row and padding row get nothing
    assert bool((per_row <= 4).all())
    # more frequent rows never get fewer blocks (ignoring the padding row)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[3] = False
    pr = per_row[keep]
    assert bool((pr[1:] >= pr[:-1]).all())
    # first columns: a row with k blocks holds columns 0..k-1
    dense = (e.to_dense() != 0).view(rows, 4, b).any(2) | False
    cols = e.coord[e.coord >= 0] % 4
    rws = e.coord[e.coord >= 0] // 4
    assert bool((cols < per_row[rws]).all())
    del dense
    with pytest.raises(ValueError, match="row_counts"):
        allocate_by_frequency_(e, torch.ones(rows + 1))


def test_frequency_floor_gives_every_seen_row_a_block():
    from dsl_kernels.sparsity.layout import frequency_counts

    counts = torch.tensor([1000, 500, 3, 1, 1, 0, 7, 2])
    lim = torch.full((8,), 4)
    per = frequency_counts(counts, 12, lim, power=0.5, min_blocks=1)
    assert int(per.sum()) == 12 and per[5] == 0
    assert bool((per[counts > 0] >= 1).all())
    assert per[0] >= per[1] >= per[6] >= per[2]
    # a budget below the seen rows: the most frequent rows first, one block each
    per = frequency_counts(counts, 3, lim, power=0.5, min_blocks=1)
    assert per.tolist() == [1, 1, 0, 0, 0, 0, 1, 0]


def test_frequency_rounding_remainder_goes_to_the_most_frequent_rows():
    # power 0: every seen row weighs the same, so the rounding remainder is a pure tie; it
    # goes to the most frequent rows (it went wherever topk put equal keys, often the last rows).
    from dsl_kernels.sparsity.layout import frequency_counts

    counts = torch.tensor([1, 9, 3, 7, 5, 0])
    lim = torch.full((6,), 4)
    assert frequency_counts(counts, 7, lim, power=0.0).tolist() == [1, 2, 1, 2, 1, 0]
    assert frequency_counts(counts, 8, lim, power=0.0).tolist() == [1, 2, 1, 2, 2, 0]
    # equal counts: the lowest rows first, whatever the order topk would give
    same = torch.tensor([4, 4, 4, 4, 4, 4])
    assert frequency_counts(same, 8, lim, power=0.5).tolist() == [2, 2, 1, 1, 1, 1]
    # the total is exact at every budget and no row passes its limit
    for budget in range(0, 25):
        per = frequency_counts(counts, budget, lim, power=0.5)
        assert int(per.sum()) == min(budget, 20) and bool((per <= lim).all())


def test_align_keeps_counts_and_moves_to_first_columns():
    torch.manual_seed(0)
    e = dsl_kernels.SparseEmbedding(30, 32, density=0.3, block_size=8)
    before = _row_blocks(e, 30, 4)
    align_(e)
    assert torch.equal(_row_blocks(e, 30, 4), before)
    cols, rws = e.coord[e.coord >= 0] % 4, e.coord[e.coord >= 0] // 4
    assert bool((cols < before[rws]).all())
    assert e.num_active_blocks == e.budget


# ----------------------------------------------------------------------------- recipes


def test_presets_and_dsl_paper_keeps_optimizer_state():
    base = MethodConfig("dsl", 0.3)
    paper = preset("dsl_paper", base)
    assert (paper.block_size, paper.mask_init, paper.reset_optimizer, paper.score_window,
            paper.prune_fraction) == (1, "random", False, 1, 0.5)
    assert preset("static_aligned", base).mask_init == "aligned"
    with pytest.raises(ValueError, match="unknown method"):
        preset("bogus", base)

    def run(reset):
        torch.manual_seed(0)
        e = dsl_kernels.SparseEmbedding(50, 8, density=0.3, block_size=2, backend="reference")
        opt = torch.optim.Adam(e.parameters(), lr=1e-2)
        s = DSLScheduler(e, opt, update_every=2, prune_fraction=0.5, stop_at=10,
                         reset_optimizer=reset)
        for _ in range(2):
            # (x - 1)^2: inactive blocks (reading 0) get a gradient, so growth has scores
            (e(torch.randint(0, 50, (64,))) - 1).pow(2).sum().backward()
            opt.step()
            after_step = opt.state[e.values]["exp_avg"].clone()
            s.step()
            opt.zero_grad()
        moved = (opt.state[e.values]["exp_avg"] != after_step).any(1)
        return moved.sum().item(), s.stats()["moved_blocks"]

    moved_reset, n1 = run(True)
    moved_kept, n2 = run(False)
    assert n1 > 0 and n2 > 0
    assert moved_reset > 0      # the default zeroes the moments of reassigned slots
    assert moved_kept == 0      # the paper's recipe keeps them


@pytest.mark.parametrize("keep", [True, False])
def test_keep_rows_never_empties_a_row(keep):
    """Rows holding one tiny block are the magnitude prune's first victims; ``keep_rows``
    protects every row's first block, so no row that had blocks ends with none."""
    torch.manual_seed(0)
    rows, nb = 40, 4
    e = dsl_kernels.SparseEmbedding(rows, 4 * nb, density=0.5, block_size=4, backend="reference")
    allocate_by_frequency_(e, torch.arange(1, rows + 1) ** 3, power=1.0)  # tail rows: 1 block
    with torch.no_grad():
        e.values.mul_(torch.where(torch.arange(e.budget) % 2 == 0, 1e-3, 1.0).unsqueeze(1))
    had = _row_blocks(e, rows, nb) > 0
    opt = torch.optim.Adam(e.parameters(), lr=1e-3)
    s = DSLScheduler(e, opt, update_every=1, prune_fraction=0.6, stop_at=100, keep_rows=keep)
    (e(torch.randint(0, rows, (256,))) - 1).pow(2).sum().backward()
    opt.step()
    s.step()
    assert s.stats()["moved_blocks"] > 0
    still = _row_blocks(e, rows, nb) > 0
    assert e.num_active_blocks == e.budget
    if keep:
        assert bool(still[had].all())
    else:
        assert not bool(still[had].all())   # without it, the prune empties some rows


@pytest.mark.parametrize("keep", [True, False])
def test_keep_rows_default_warns_when_one_block_per_row_cannot_move(keep):
    """With the default keep_rows=True a pool of one block per row has nothing to prune: the
    scheduler says so once instead of silently training a static mask; keep_rows=False moves."""
    import warnings

    torch.manual_seed(0)
    rows, nb = 64, 4
    e = dsl_kernels.SparseEmbedding(rows, 4 * nb, density=1 / nb, block_size=4,
                                    backend="reference")
    assert bool((_row_blocks(e, rows, nb) <= 1).all())
    opt = torch.optim.Adam(e.parameters(), lr=1e-3)
    kw = {} if keep else {"keep_rows": False}
    s = DSLScheduler(e, opt, update_every=1, prune_fraction=0.3, stop_at=100, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            (e(torch.randint(0, rows, (256,))) - 1).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            s.step()
    static = [w for w in caught if "keep_rows" in str(w.message)]
    if keep:
        assert s.stats()["moved_blocks"] == 0 and len(static) == 1   # warned once, not twice
    else:
        assert s.stats()["moved_blocks"] > 0 and not static


def test_masked_cosine_is_the_cosine_for_full_rows_and_ignores_unshared_columns():
    from dsl_train.models import MF

    torch.manual_seed(0)
    full = dsl_kernels.SparseEmbedding(10, 16, density=1.0, block_size=4, backend="reference")
    dense = torch.nn.Embedding(10, 16)
    with torch.no_grad():
        dense.weight.copy_(full.to_dense())
    for emb in (full, dense):
        m = MF(4, 6, emb, loss="softmax")
        m.prepare_eval()
        got = m.score_users(torch.arange(4))
        w = torch.nn.functional.normalize(dense.weight.detach(), dim=1)
        assert torch.allclose(got, w[:4] @ w[4:].T, atol=1e-6)
    # a narrow user (block 0 only) scores a wide item by the columns it shares with it
    sp = dsl_kernels.SparseEmbedding(2, 8, density=0.75, block_size=4, backend="reference")
    with torch.no_grad():
        sp.coord.copy_(torch.tensor([0, 2, 3]))   # row 0: block 0; row 1: blocks 0 and 1
        sp.values.copy_(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 7.0, 7.0, 0]]))
    sp.rebuild_index()
    m = MF(1, 1, sp, loss="softmax")
    assert m.score_users(torch.tensor([0])).item() == pytest.approx(1.0)
    assert MF(1, 1, sp, loss="softmax", score="cosine").score_users(
        torch.tensor([0])).item() == pytest.approx(1 / 99 ** 0.5)


def test_run_names_tell_options_apart():
    m = MethodConfig("dense")
    a = _run_name(TrainConfig(dim=64), m, "g")
    b = _run_name(TrainConfig(dim=16), m, "g")
    c = _run_name(TrainConfig(dim=64, lr=0.5), m, "g")
    assert len({a, b, c}) == 3
    assert _run_name(TrainConfig(dim=64, out="elsewhere", progress=False), m, "g") == a
    assert _run_name(TrainConfig(dim=64, seed=1), m, "g").endswith("-s1")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny():
    return D.synthetic_implicit(num_users=80, num_items=60, per_user=12, rank=4, seed=0)


def test_protocol_selects_on_validation_and_scores_test_once(tiny, tmp_path):
    tcfg = TrainConfig(model="mf", epochs=3, batch_size=64, lr=0.02, dim=16, progress=False,
                       out=str(tmp_path), loss="softmax", negatives=16, val_fraction=0.2)
    rep = run_ranking(tiny, tcfg, MethodConfig("dsl", 0.5, block_size=4, update_every=3,
                                               score_window=2,
                                               mask_init="frequency"))
    vals = [e["val_recall@20"] for e in rep["epochs"]]
    best = max(range(len(vals)), key=lambda i: (vals[i], -i)) + 1
    assert rep["final"]["selected_epoch"] == rep["selection"]["selected_epoch"] == best
    assert all("recall@20" not in e for e in rep["epochs"])   # test never seen during training
    assert 0.0 <= rep["final"]["recall@20"] <= 1.0
    assert "validation" in rep["data"]


def test_patience_stops_early(tiny, tmp_path):
    tcfg = TrainConfig(model="mf", epochs=30, batch_size=64, lr=0.5, dim=16, progress=False,
                       out=str(tmp_path), val_fraction=0.2, patience=1, plot=False)
    rep = run_ranking(tiny, tcfg, MethodConfig("dense"))
    assert len(rep["epochs"]) < 30
    assert rep["stopped_early_after_epoch"] == len(rep["epochs"])


def test_sweep_at_equal_memory_table_and_plot(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["sweep", "--model", "mf", "--data", "synthetic", "--memory-points", "0.25",
            "--methods", "dense_small,static_aligned,dsl", "--seeds", "0,1", "--epochs", "1",
            "--dim", "16", "--block-size", "4", "--negatives", "16", "--no-progress",
            "--out", out, "--name", "sw"]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "sw.json")) as f:
        rep = json.load(f)
    assert len(rep["runs"]) == 8                  # (dense + 3 methods) x 2 seeds
    for pt in rep["points"]:
        assert pt["seeds"] == 2
        assert pt["share"] == pytest.approx(0.25, abs=0.02), pt
    assert os.path.isfile(os.path.join(out, "sw-sweep.png"))
    capsys.readouterr()
    # --reuse gathers the finished runs instead of training them again
    assert cli.main(argv + ["--reuse"]) == 0
    assert capsys.readouterr().out.count("reusing") == 8


def test_gather_keeps_models_apart(tmp_path, capsys):
    """MF and LightGCN runs in one folder: one table per model, each with its own dense."""
    out = str(tmp_path)
    common = ["--data", "synthetic", "--memory-points", "0.25", "--methods", "dense_small",
              "--epochs", "1", "--dim", "16", "--block-size", "4", "--negatives", "16",
              "--no-progress", "--out", out]
    for model in ("mf", "lightgcn"):
        assert cli.main(["sweep", "--model", model, "--name", model] + common) == 0
    assert cli.main(["sweep", "--gather", "--out", out, "--name", "g"]) == 0
    for model in ("mf", "lightgcn"):
        with open(os.path.join(out, f"g-{model}.json")) as f:
            rep = json.load(f)
        assert {r["train_config"]["model"] for r in rep["runs"]} == {model}
        assert rep["dense"]["seeds"] == 1 and len(rep["points"]) == 1
