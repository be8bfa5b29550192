"""dsl-train end to end: two-epoch runs of every model with every method on tiny data (the loss
falls, the JSON report and the plot exist, memory matches the modules), the stream and sweep
commands, and the CLI (errors, --help, the demo wiring)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from dsl_train import cli  # noqa: E402
from dsl_train import data as D  # noqa: E402
from dsl_train.loop import TrainConfig, run_ctr, run_ranking, run_stream  # noqa: E402
from dsl_train.methods import METHODS, MethodConfig, engine_available  # noqa: E402

NEEDS_ENGINE = {"dsl", "dense_to_sparse"}


def _method(method: str, **kw) -> MethodConfig:
    if method in NEEDS_ENGINE and not engine_available():
        pytest.skip("dsl_kernels.sparsity.DSLScheduler is not available")
    density = 1.0 if method in ("dense", "dense_small") else 0.5
    return MethodConfig(method, density, block_size=4, update_every=3, prune_fraction=0.3,
                        score_window=2, stop_fraction=0.8, **kw)


@pytest.fixture(scope="module")
def tiny_ranking():
    return D.synthetic_implicit(num_users=80, num_items=60, per_user=10, rank=4, seed=0)


def _check_files(rep):
    assert os.path.isfile(rep["files"]["json"]) and os.path.isfile(rep["files"]["plot"])
    with open(rep["files"]["json"]) as f:
        saved = json.load(f)
    assert saved["name"] == rep["name"] and len(saved["epochs"]) == len(rep["epochs"])
    for e in saved["epochs"]:
        assert e["time_s"] > 0
    assert saved["memory"]["embedding_total_bytes"] > 0
    assert saved["memory"]["peak_memory_bytes"] > 0
    return saved


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_ranking_two_epochs(model, method, tiny_ranking, tmp_path):
    tcfg = TrainConfig(model=model, epochs=2, batch_size=64, lr=0.02, dim=16, layers=2,
                       progress=False, out=str(tmp_path),
                       memory=0.5 if method == "dense_small" else None)
    rep = run_ranking(tiny_ranking, tcfg, _method(method))
    e1, e2 = rep["epochs"]
    assert e2["loss"] < e1["loss"], (e1["loss"], e2["loss"])
    assert 0.0 <= rep["final"]["recall@20"] <= 1.0 and 0.0 <= rep["final"]["ndcg@20"] <= 1.0
    saved = _check_files(rep)
    mem = saved["memory"]
    if method == "dense":
        assert mem["embedding_share_of_dense"] == pytest.approx(1.0, rel=0.01)
    elif method == "dense_small":  # dim 8 of 16: half the bytes of the full dense table
        assert mem["share_of_full_dense"] == pytest.approx(0.5, rel=0.01)
    else:
        # values at half density + index, Adam states at half density: well below dense
        assert mem["embedding_total_bytes"] < 0.8 * mem["dense_equivalent_total_bytes"]
        assert rep["final"]["density"] == pytest.approx(0.5, abs=0.02)
    if method == "magnitude":
        assert "note" in e1 and mem["max_embedding_total_bytes"] > mem["embedding_total_bytes"]
    if method == "dsl":
        assert e2.get("mask_updates", 0) >= 1


@pytest.mark.parametrize("method", METHODS)
def test_dlrm_two_epochs(method, tmp_path):
    data = D.synthetic_ctr(num_rows=1500, num_features=4, cardinality=60, num_dense=3, seed=0)
    train, test = data.split(0.2)
    tcfg = TrainConfig(model="dlrm", epochs=2, batch_size=128, lr=0.01, reg=0.0, dim=8,
                       progress=False, out=str(tmp_path))
    rep = run_ctr(train, test, tcfg, _method(method))
    e1, e2 = rep["epochs"]
    assert e2["loss"] < e1["loss"]
    assert 0.0 <= rep["final"]["auc"] <= 1.0 and rep["final"]["logloss"] > 0
    _check_files(rep)


def test_dlrm_stale_skipping_reports_skips(tmp_path):
    data = D.synthetic_ctr(num_rows=3000, num_features=4, cardinality=60, num_dense=3, seed=0)
    train, test = data.split(0.2)
    tcfg = TrainConfig(model="dlrm", epochs=2, batch_size=64, lr=0.01, reg=0.0, dim=8,
                       progress=False, out=str(tmp_path))
    rep = run_ctr(train, test, tcfg, _method("dsl", skip_stale=True, target_skip=0.3))
    assert rep["name"].endswith("-skip")
    assert "skipped_update_ratio" in rep["final"]
    # The tracker's threshold is chosen to skip target_skip of the updates: it must get there
    # (0 would mean nothing was skipped; any number in [0, 1] passed before).
    assert rep["final"]["skipped_update_ratio"] == pytest.approx(0.3, abs=0.1)


def test_criteo_sample_dlrm_runs(shared_data, tmp_path):
    d = D.load_criteo(os.path.join(shared_data, "criteo-sample"))
    train, test = d.split(0.25)
    tcfg = TrainConfig(model="dlrm", epochs=2, batch_size=32, lr=0.01, reg=0.0, dim=8,
                       progress=False, out=str(tmp_path))
    rep = run_ctr(train, test, tcfg, MethodConfig("static", 0.25, block_size=4))
    assert rep["epochs"][1]["loss"] < rep["epochs"][0]["loss"]
    _check_files(rep)


def test_stream_variants(tmp_path):
    if not engine_available():
        pytest.skip("dsl_kernels.sparsity.DSLScheduler is not available")
    s = D.synthetic_stream(120, 80, num_windows=4, per_user=6, drift=0.5, seed=0)
    tcfg = TrainConfig(model="mf", epochs=2, batch_size=64, lr=0.02, dim=16, progress=False,
                       out=str(tmp_path))
    base = MethodConfig("dsl", 0.25, block_size=4, update_every=3, prune_fraction=0.3,
                        score_window=2)
    reps = {v: run_stream(s, 4, v, tcfg, base) for v in ("dense", "adaptive", "frozen")}
    for v, r in reps.items():
        assert len(r["epochs"]) == 3  # windows 1..3 each evaluated on the next one
        assert 0 <= r["final"]["prequential_recall@20"] <= 1
        _check_files(r)
    upd = lambda r: [e.get("mask_updates", 0) for e in r["epochs"]]
    fr, ad = upd(reps["frozen"]), upd(reps["adaptive"])
    assert fr[0] >= 1 and fr[-1] == fr[0]  # frozen: no mask update after the first window
    assert ad[-1] > ad[0]  # adaptive: updates continue
    assert reps["dense"]["final"]["density"] == 1.0


def test_cli_train_sweep_and_errors(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    d = D.synthetic_implicit(num_users=60, num_items=40, per_user=8, seed=1)
    for split, (u, i) in {"train": (d.train_users, d.train_items),
                          "test": (d.test_users, d.test_items)}.items():
        lines = {}
        for a, b in zip(u.tolist(), i.tolist()):
            lines.setdefault(a, []).append(b)
        (folder / f"{split}.txt").write_text(
            "".join(f"{a} {' '.join(map(str, bs))}\n" for a, bs in sorted(lines.items())))
    out = str(tmp_path / "runs")
    common = ["--epochs", "2", "--dim", "16", "--block-size", "4", "--batch-size", "64",
              "--out", out, "--no-progress"]
    assert cli.main(["mf", "--data", str(folder), "--method", "static", "--density", "0.5",
                     "--name", "r1", *common]) == 0
    assert os.path.isfile(os.path.join(out, "r1.json"))
    assert "recall@20" in capsys.readouterr().out
    assert cli.main(["sweep", "--model", "mf", "--data", str(folder), "--densities", "0.25,0.5",
                     "--methods", "static,magnitude", "--name", "sw", *common]) == 0
    with open(os.path.join(out, "sw.json")) as f:
        assert len(json.load(f)["runs"]) == 5  # dense + 2 densities x 2 methods
    assert os.path.isfile(os.path.join(out, "sw-sweep.png"))
    (folder / "train.txt").write_text("0 1 2\n1 oops\n")
    assert cli.main(["mf", "--data", str(folder), *common]) == 2
    err = capsys.readouterr().err
    assert "train.txt, line 2" in err and "oops" in err
    assert cli.main(["mf", "--data", str(tmp_path / "missing"), *common]) == 2
    with pytest.raises(SystemExit) as ex:
        cli.main(["--help"])
    assert ex.value.code == 0
    assert "dsl-train" in capsys.readouterr().out


def test_demo_wiring(tmp_path, capsys):
    reps = cli.cmd_demo(out=str(tmp_path), progress=False, epochs=1, scale=0.1)
    methods = [r["method_config"]["method"] for r in reps]
    assert methods[:2] == ["dense", "dense_small"]
    if engine_available():
        assert methods[2] == "dsl"
        # dense-small and DSL at the same measured memory, a tenth of dense
        shares = [r["memory"]["share_of_full_dense"] for r in reps]
        assert shares[0] == pytest.approx(1.0, rel=1e-3)
        assert shares[2] == pytest.approx(0.1, rel=0.05)
        assert abs(shares[1] - shares[2]) < 0.04
    text = capsys.readouterr().out
    assert "| run" in text and "% of dense" in text and "DSL at 10% memory" in text
    assert os.path.isfile(os.path.join(str(tmp_path), "demo-sweep.png"))


@pytest.mark.parametrize("model", ["mf", "dlrm"])
def test_fused_optimizer_training(model, tiny_ranking, tmp_path):
    """--fused: the sparse pools are updated inside the backward (no values.grad) and the memory
    report counts the fused state held by the module."""
    from dsl_train.methods import sparse_pools
    from dsl_train.models import DLRM, MF
    import dsl_train.loop as L

    seen = {}
    orig = L.Controller

    class Spy(orig):  # keep a handle on the trained model
        def __init__(self, cfg, model, *a, **k):
            super().__init__(cfg, model, *a, **k)
            seen["model"] = model

    L.Controller = Spy
    try:
        if model == "mf":
            tcfg = TrainConfig(model="mf", epochs=2, batch_size=64, lr=0.02, dim=16,
                               fused=True, progress=False, out=str(tmp_path))
            rep = run_ranking(tiny_ranking, tcfg, _method("dsl"))
        else:
            data = D.synthetic_ctr(num_rows=1500, num_features=4, cardinality=60, num_dense=3)
            train, test = data.split(0.2)
            tcfg = TrainConfig(model="dlrm", epochs=2, batch_size=128, lr=0.01, reg=0.0, dim=8,
                               fused=True, progress=False, out=str(tmp_path))
            rep = run_ctr(train, test, tcfg, _method("static"))
    finally:
        L.Controller = orig
    m = seen["model"]
    assert isinstance(m, (MF, DLRM))
    pools = sparse_pools(m)
    assert pools and all(p.values.grad is None for p in pools)
    assert rep["epochs"][1]["loss"] < rep["epochs"][0]["loss"]
    fused = sum(getattr(p, n).numel() * getattr(p, n).element_size() for p in pools
                for n in ("fused_state1", "fused_state2", "fused_step"))
    assert rep["memory"]["embedding_optimizer_bytes"] == fused
    assert rep["memory"]["embedding_bytes"] == sum(p.memory_bytes() for p in pools)
