"""dsl-train --checkpoint / --resume: 2 epochs straight == 1 epoch, checkpoint, resume for 1 more
(bit-exact on the CPU: deterministic backends, global RNG + scheduler generator restored), and
--nproc 2 via torchrun on CPU (gloo)."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from dsl_train import data as D  # noqa: E402
from dsl_train import loop as L  # noqa: E402
from dsl_train.loop import TrainConfig, run_ctr, run_ranking  # noqa: E402
from dsl_train.methods import MethodConfig, engine_available  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
# Keys that legitimately differ between runs (wall-clock timings).
TIMING = {"time_s", "eval_time_s", "step_time_ms"}


def _method(method: str) -> MethodConfig:
    if method == "dsl" and not engine_available():
        pytest.skip("dsl_kernels.sparsity.DSLScheduler is not available")
    density = 1.0 if method == "dense" else 0.5
    # update_every=3 with a few steps per epoch: mask updates happen in both epochs, so the
    # scheduler's counters, scores and generator must survive the checkpoint.
    return MethodConfig(method, density, block_size=4, update_every=3, prune_fraction=0.3,
                        score_window=2, stop_fraction=0.9, backend="cpu"
                        if method != "dense" else "auto")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _compare(straight, resumed):
    with open(straight["files"]["json"]) as f:
        a = json.load(f)
    with open(resumed["files"]["json"]) as f:
        b = json.load(f)
    assert len(a["epochs"]) == len(b["epochs"]) == 2
    assert _strip(a["epochs"]) == _strip(b["epochs"])  # exact, not approx
    assert a["final"] == b["final"]
    assert a["memory"]["embedding_total_bytes"] == b["memory"]["embedding_total_bytes"]


class _Killed(Exception):
    pass


def _two_ways(run, tcfg_kw, tmp_path, monkeypatch):
    """The same 2-epoch run straight, and killed right after epoch 1's checkpoint, then resumed
    (the schedule depends on --epochs, so the interrupted run must be the same 2-epoch run)."""
    straight = run(TrainConfig(epochs=2, out=str(tmp_path / "a"), name="run", **tcfg_kw))
    ck = str(tmp_path / "ck.dsl")
    save = L._save_checkpoint

    def save_then_die(tcfg, mcfg, model, ctl, epoch, history, best=None):
        save(tcfg, mcfg, model, ctl, epoch, history, best)
        if epoch == 1:
            raise _Killed

    with monkeypatch.context() as mp:
        mp.setattr(L, "_save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            run(TrainConfig(epochs=2, out=str(tmp_path / "b"), name="run", checkpoint=ck,
                            **tcfg_kw))
    assert os.path.isfile(ck)
    resumed = run(TrainConfig(epochs=2, out=str(tmp_path / "c"), name="run", resume=ck,
                              checkpoint=ck, **tcfg_kw))
    return straight, resumed


@pytest.fixture(scope="module")
def tiny_ranking():
    return D.synthetic_implicit(num_users=60, num_items=40, per_user=8, rank=4, seed=0)


@pytest.mark.parametrize("model,method", [("mf", "dsl"), ("mf", "magnitude"),
                                          ("lightgcn", "dsl")])
def test_ranking_resume_equals_straight(model, method, tiny_ranking, tmp_path, monkeypatch):
    kw = dict(model=model, batch_size=64, lr=0.02, dim=16, layers=2, progress=False, plot=False,
              device="cpu")
    m = _method(method)
    straight, resumed = _two_ways(lambda t: run_ranking(tiny_ranking, t, m), kw, tmp_path,
                                  monkeypatch)
    _compare(straight, resumed)
    if method == "dsl":
        assert straight["epochs"][-1]["mask_updates"] > 0


@pytest.mark.parametrize("method,fused", [("dense_to_sparse", False), ("dsl", True),
                                          ("dense_to_sparse", True)],
                         ids=["dense_to_sparse", "dsl-fused", "dense_to_sparse-fused"])
def test_ranking_resume_dense_to_sparse_and_fused(method, fused, tiny_ranking, tmp_path,
                                                  monkeypatch):
    """The two paths the resume tests missed: a pool that shrank before the checkpoint, and the
    optimizer state living in the module (--fused), and both at once."""
    kw = dict(model="mf", batch_size=64, lr=0.02, dim=16, progress=False, plot=False,
              device="cpu", fused=fused)
    straight, resumed = _two_ways(lambda t: run_ranking(tiny_ranking, t, _method(method)), kw,
                                  tmp_path, monkeypatch)
    _compare(straight, resumed)
    if method == "dense_to_sparse":  # the pool had shrunk when the checkpoint was written
        e1 = straight["epochs"][0]
        assert e1["density"] < 1.0, e1


def test_ranking_resume_with_selection_protocol(tiny_ranking, tmp_path, monkeypatch):
    """The validation protocol's best snapshot travels in the checkpoint: a resumed run selects
    the same epoch and scores the same test numbers as a straight one."""
    kw = dict(model="mf", batch_size=64, lr=0.02, dim=16, progress=False, plot=False,
              device="cpu", loss="softmax", negatives=16, val_fraction=0.2)
    m = _method("dsl")
    straight, resumed = _two_ways(lambda t: run_ranking(tiny_ranking, t, m), kw, tmp_path,
                                  monkeypatch)
    _compare(straight, resumed)
    assert straight["selection"]["selected_epoch"] in (1, 2)
    assert straight["selection"] == {**resumed["selection"],
                                     "test_eval_time_s": straight["selection"][
                                         "test_eval_time_s"]}


def test_ctr_resume_equals_straight(tmp_path, monkeypatch):
    train, test = D.synthetic_ctr(num_rows=600, num_features=3, cardinality=50,
                                  seed=0).split(0.2)
    kw = dict(model="dlrm", batch_size=64, lr=0.01, reg=0.0, dim=8, progress=False, plot=False,
              device="cpu")
    m = _method("dsl")
    straight, resumed = _two_ways(lambda t: run_ctr(train, test, t, m), kw, tmp_path,
                                  monkeypatch)
    _compare(straight, resumed)


def test_resume_refuses_other_run(tiny_ranking, tmp_path):
    ck = str(tmp_path / "ck.dsl")
    kw = dict(model="mf", batch_size=64, dim=16, progress=False, plot=False, device="cpu")
    run_ranking(tiny_ranking, TrainConfig(epochs=1, out=str(tmp_path), checkpoint=ck, **kw),
                _method("static"))
    with pytest.raises(ValueError, match="method"):
        run_ranking(tiny_ranking, TrainConfig(epochs=2, out=str(tmp_path), resume=ck, **kw),
                    _method("dense"))


def test_help_documents_flags(capsys):
    from dsl_train import cli

    for cmd in ("mf", "lightgcn", "dlrm"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = capsys.readouterr().out
        for flag in ("--resume", "--checkpoint", "--nproc"):
            assert flag in out, (cmd, flag)
    a = cli.build_parser().parse_args(["mf", "--resume", "r.dsl", "--checkpoint", "c.dsl"])
    t = cli._train_cfg(a, "mf")
    assert (t.resume, t.checkpoint) == ("r.dsl", "c.dsl")


def test_nproc_2_cpu(tmp_path):
    """--nproc 2 re-launches under torchrun (gloo): rank 0 writes the JSON, the replicas (values,
    mask, optimizer state) end bit-identical, and the DSL mask did move."""
    if not engine_available():
        pytest.skip("dsl_kernels.sparsity.DSLScheduler is not available")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                         env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "dsl_train", "mf", "--nproc", "2", "--epochs", "2", "--dim",
           "16", "--batch-size", "512", "--update-every", "10", "--device", "cpu",
           "--threads", "1", "--no-progress", "--no-plot", "--out", str(tmp_path), "--name", "t"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "t.json") as f:
        rep = json.load(f)
    assert rep["world_size"] == 2
    assert rep["replica_mismatches"] == []
    assert rep["epochs"][-1]["mask_updates"] > 0
    assert 0.0 <= rep["final"]["recall@20"] <= 1.0
