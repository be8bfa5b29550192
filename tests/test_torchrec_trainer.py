"""``dsl-train dlrm --nproc 2 [--shard row_wise|table_wise]``: the tables sharded by torchrec
(dsl_kernels.torchrec), DSL mask updates across shards, and ``--resume`` with ``--nproc 2`` (a
sharded torch.distributed.checkpoint, or the data-parallel run's checkpoint) equal to the
uninterrupted run. The sharded tests skip only when torchrec is not installed (CI installs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from torchrec_support import HAVE_TORCHREC, needs_torchrec  # noqa: E402,F401


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _args(tmp_path, name, shard, epochs, *extra):
    # 4 blocks per row at density 0.5: prunable even when each row keeps its last block
    sharding = ["--shard", shard] if shard else []
    return ["dlrm", *sharding, "--rows", "2000", "--epochs", str(epochs), "--dim", "16",
            "--block-size", "4", "--density", "0.5", "--batch-size", "64", "--update-every", "10", "--device", "cpu", "--threads", "1",
            "--no-progress", "--no-plot", "--out", str(tmp_path), "--name", name, *extra]


def _train(tmp_path, name, shard, epochs, *extra):
    args = _args(tmp_path, name, shard, epochs, *extra)
    cmd = [sys.executable, "-m", "dsl_train", args[0], "--nproc", "2", *args[1:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / f"{name}.json") as f:
        return json.load(f)


def _curve(rep):
    return [(e["loss"], e["auc"], e["logloss"], e["mask_updates"], e["moved_blocks"])
            for e in rep["epochs"]]


def _check_run(rep):
    assert rep["world_size"] == 2 and rep["replica_mismatches"] == []
    assert rep["epochs"][-1]["mask_updates"] > 0 and rep["epochs"][-1]["moved_blocks"] > 0
    assert 0.0 <= rep["final"]["auc"] <= 1.0
    assert rep["epochs"][1]["loss"] < rep["epochs"][0]["loss"]


@needs_torchrec
def test_dlrm_table_wise_trains_with_dsl(tmp_path):
    _check_run(_train(tmp_path, "s", "table_wise", 2))


@pytest.mark.parametrize("shard", [pytest.param("row_wise", marks=needs_torchrec), None],
                         ids=["row_wise", "data_parallel"])
def test_dlrm_nproc_resume_equals_straight(tmp_path, shard):
    """The same 2-epoch run straight, and killed right after epoch 1's checkpoint (both ranks),
    then resumed with --nproc 2 (the schedule depends on --epochs, so the interrupted run must
    be the same 2-epoch run)."""
    straight = _train(tmp_path, "straight", shard, 2)
    if shard:
        _check_run(straight)
    ck = str(tmp_path / "ck")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), "die-after-epoch-1",
           *_args(tmp_path, "killed", shard, 2, "--checkpoint", ck)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "killed after epoch 1" in r.stdout + r.stderr, r.stderr[-3000:]
    assert os.path.exists(os.path.join(ck, ".metadata") if shard else ck)
    resumed = _train(tmp_path, "resumed", shard, 2, "--resume", ck, "--checkpoint", ck)
    assert len(resumed["epochs"]) == 2 and resumed["epochs"][-1]["mask_updates"] > 0
    assert _curve(resumed) == _curve(straight)
    assert resumed["final"] == straight["final"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "die-after-epoch-1":
    # A torchrun worker that dies right after writing epoch 1's checkpoint, like a crash.
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    from dsl_train import cli
    from dsl_train import loop as L

    save = L._save_checkpoint

    def save_then_die(tcfg, mcfg, model, ctl, epoch, history, best=None):
        save(tcfg, mcfg, model, ctl, epoch, history, best)
        if epoch == 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 alone writes the data-parallel checkpoint: let it finish
            print("killed after epoch 1", flush=True)
            os._exit(3)

    L._save_checkpoint = save_then_die
    cli.main(sys.argv[2:])
