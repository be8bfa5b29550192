"""dsl_kernels.save / load: atomic writes, verification before any change, bit-exact resume.

The fresh-process case launches this file as a script (``python test_checkpoint.py resume ...``)
so nothing of the first process (RNG, caches, autograd state) can leak into the resumed run.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dsl_kernels
from dsl_kernels import CheckpointError, SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig
from dsl_kernels import checkpoint as ck
from dsl_kernels.fused import fuse_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

try:
    from conftest import backend_device_params

    BACKEND_DEVICES = backend_device_params()
except Exception:  # when run as a script
    BACKEND_DEVICES = [("reference", "cpu")]


# ----------------------------------------------------------------------------- helpers


class Model(nn.Module):
    def __init__(self, backend="reference", density=0.3, block_size=2, N=60, device="cpu"):
        super().__init__()
        self.emb = SparseEmbeddingBag(N, 8, mode="sum", density=density, block_size=block_size,
                                      backend=backend, deterministic=True, device=device)
        self.head = nn.Linear(8, 1, device=device)

    def forward(self, idx, off):
        dev = self.head.weight.device
        return self.head(self.emb(idx.to(dev), off.to(dev))).squeeze(1)


def make(backend="reference", sched="steplr", seed=0, fused=False, **kw):
    """Model, optimizer, scheduler. ``fused``: the pool trains with the fused Adam (its state
    lives in the module), the torch optimizer trains the head only."""
    torch.manual_seed(seed)
    model = Model(backend, **kw)
    if fused:
        fuse_optimizer(model.emb, "adam", lr=0.05)
        opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    if sched == "steplr":
        s = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    elif sched == "dsl":
        from dsl_kernels.sparsity import DSLScheduler

        s = DSLScheduler(model.emb, opt, update_every=2, prune_fraction=0.3, stop_at=40,
                         grow="gradient", score_window=2)
    elif sched == "d2s":
        from dsl_kernels.sparsity import DSLScheduler

        s = DSLScheduler(model.emb, opt, update_every=2, prune_fraction=0.3, stop_at=40,
                         schedule="dense_to_sparse", t_start=0, t_end=6, target_density=0.3)
    else:
        s = None
    return model, opt, s


def train(model, opt, sched, steps):
    """Batches drawn from the global torch, Python and NumPy RNGs: resuming must restore all."""
    losses = []
    for _ in range(steps):
        nbags = 6 + random.randrange(4)
        lengths = torch.randint(0, 5, (nbags,))
        idx = torch.randint(0, model.emb.num_embeddings, (int(lengths.sum()),))
        off = torch.zeros(nbags, dtype=torch.int64)
        off[1:] = torch.cumsum(lengths, 0)[:-1]
        y = torch.from_numpy(np.random.rand(nbags).astype(np.float32))
        y = y.to(model.head.weight.device)
        opt.zero_grad()
        loss = ((model(idx, off) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses


def snapshot(model, opt=None):
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, dsl_kernels.BlockSparseBase):
            for b in ("row_ptr", "row_slots", "row_mask"):
                out[f"{name}.{b}"] = getattr(m, b).clone()
    if opt is not None:
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            for k, v in opt.state.get(p, {}).items():
                out[f"opt.{i}.{k}"] = v.clone() if torch.is_tensor(v) else v
    return out


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------------------- basics


def test_round_trip_and_extra(tmp_path):
    model, opt, sched = make()
    train(model, opt, sched, 4)
    path = tmp_path / "c.dsl"
    dsl_kernels.save(path, model, opt, sched, step=4, note="x", cfg={"lr": 0.05})
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.dsl"]  # no temp file left behind
    m2, o2, s2 = make(seed=1)
    extra = dsl_kernels.load(path, m2, o2, s2)
    assert extra == {"step": 4, "note": "x", "cfg": {"lr": 0.05}}
    assert_same(snapshot(model, opt), snapshot(m2, o2))
    assert s2.state_dict() == sched.state_dict()
    torch.testing.assert_close(m2.emb.to_dense(), model.emb.to_dense(), rtol=0, atol=0)
    payload = ck.read_payload(path)
    assert payload["pools"]["emb"]["budget"] == model.emb.budget
    assert payload["pools"]["emb"]["block_size"] == 2


def test_rng_states_restored(tmp_path):
    model, opt, _ = make()
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    dsl_kernels.save(tmp_path / "c.dsl", model, opt)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    dsl_kernels.load(tmp_path / "c.dsl", model, opt)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expect[0]) and got[1:] == expect[1:]
    # restore_rng=False leaves the generators alone.
    state = torch.get_rng_state()
    dsl_kernels.load(tmp_path / "c.dsl", model, opt, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_collection_round_trip(tmp_path):
    torch.manual_seed(0)
    tabs = [TableConfig("user", 30, 8), TableConfig("item", 50, 4)]
    ebc = SparseEmbeddingBagCollection(tabs, density=0.3, block_size=2)
    dsl_kernels.save(tmp_path / "c.dsl", ebc)
    torch.manual_seed(1)
    other = SparseEmbeddingBagCollection(tabs, density=0.3, block_size=2)
    dsl_kernels.load(tmp_path / "c.dsl", other)
    for t in ("user", "item"):
        assert torch.equal(other.to_dense(t), ebc.to_dense(t))
    renamed = SparseEmbeddingBagCollection([TableConfig("u", 30, 8), TableConfig("item", 50, 4)],
                                           density=0.3, block_size=2)
    before = snapshot(renamed)
    with pytest.raises(CheckpointError, match="tables"):
        dsl_kernels.load(tmp_path / "c.dsl", renamed)
    assert_same(before, snapshot(renamed))


# ------------------------------------------------------------------------------ atomic


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    model, opt, sched = make()
    path = tmp_path / "c.dsl"
    dsl_kernels.save(path, model, opt, sched, step=1)
    old = path.read_bytes()
    train(model, opt, sched, 2)
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])

    def boom(src, dst):
        calls.append("replace")
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        dsl_kernels.save(path, model, opt, sched, step=3)
    assert calls[:2] == ["fsync", "replace"]  # data flushed to disk before the rename
    assert path.read_bytes() == old  # the previous checkpoint is intact ...
    assert [p.name for p in tmp_path.iterdir()] == ["c.dsl"]  # ... and no temp file remains
    monkeypatch.undo()
    m2, o2, s2 = make(seed=5)
    assert dsl_kernels.load(path, m2, o2, s2) == {"step": 1}


def test_save_failing_while_serialising_keeps_old_file(tmp_path):
    model, opt, _ = make()
    path = tmp_path / "c.dsl"
    dsl_kernels.save(path, model, opt)
    old = path.read_bytes()

    class BadScheduler:
        def state_dict(self):
            raise RuntimeError("scheduler cannot serialise")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        dsl_kernels.save(path, model, opt, BadScheduler())
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["c.dsl"]


# ---------------------------------------------------------------- corrupt / mismatched


@pytest.fixture
def saved(tmp_path):
    model, opt, sched = make()
    train(model, opt, sched, 3)
    path = tmp_path / "c.dsl"
    dsl_kernels.save(path, model, opt, sched, step=3)
    m2, o2, s2 = make(seed=7)
    train(m2, o2, s2, 1)  # a target with optimizer state, so "unchanged" means something
    return path, m2, o2, s2


def _expect_unchanged(fn, model, opt, sched, match):
    before = snapshot(model, opt)
    sched_before = None if sched is None else sched.state_dict()
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=match):
        fn()
    assert_same(before, snapshot(model, opt))
    if sched is not None:
        assert sched.state_dict() == sched_before
    assert torch.equal(torch.get_rng_state(), rng)


def test_truncated_file(saved):
    path, m, o, s = saved
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 40, 9, 3, 0):
        path.write_bytes(data[:cut])
        _expect_unchanged(lambda: dsl_kernels.load(path, m, o, s), m, o, s,
                          "truncated|not a dsl_kernels checkpoint|header")


def test_corrupt_bytes(saved):
    path, m, o, s = saved
    data = bytearray(path.read_bytes())
    for pos in (len(data) - 5, len(data) // 2, len(data) - 2000):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        path.write_bytes(bytes(bad))
        _expect_unchanged(lambda: dsl_kernels.load(path, m, o, s), m, o, s, "corrupt")
    path.write_bytes(bytes(data) + b"junk")
    _expect_unchanged(lambda: dsl_kernels.load(path, m, o, s), m, o, s, "trailing")


def test_not_a_checkpoint_and_bad_header(saved, tmp_path):
    path, m, o, s = saved
    other = tmp_path / "plain.pt"
    torch.save(m.state_dict(), other)
    _expect_unchanged(lambda: dsl_kernels.load(other, m, o, s), m, o, s, "not a dsl_kernels")
    _expect_unchanged(lambda: dsl_kernels.load(tmp_path / "missing", m, o, s), m, o, s,
                      "does not exist")
    data = path.read_bytes()
    nl = data.index(b"\n", 8)
    header = json.loads(data[8:nl])
    header["format_version"] = 99
    path.write_bytes(data[:8] + json.dumps(header).encode() + data[nl:])
    _expect_unchanged(lambda: dsl_kernels.load(path, m, o, s), m, o, s, "version 99")
    path.write_bytes(data[:8] + b"{not json" + data[nl:])
    _expect_unchanged(lambda: dsl_kernels.load(path, m, o, s), m, o, s, "header is corrupt")


@pytest.mark.parametrize("change,match", [
    (dict(density=0.5), "budget"),
    (dict(block_size=4), "shape|block_size"),
    (dict(N=61), "num_rows|budget|shape"),
])
def test_mismatched_model(saved, change, match):
    path, _, _, _ = saved
    m, o, s = make(seed=8, **change)
    train(m, o, s, 1)
    _expect_unchanged(lambda: dsl_kernels.load(path, m, o, s), m, o, s, match)


def test_mismatched_dtype_and_structure(saved):
    path, _, _, _ = saved
    m, o, s = make(seed=8)
    m.head = nn.Linear(8, 2)  # different dense part
    _expect_unchanged(lambda: dsl_kernels.load(path, m, None, None), m, None, None, "head")
    m, o, s = make(seed=8)
    m.emb.values.data = m.emb.values.data.half()
    _expect_unchanged(lambda: dsl_kernels.load(path, m, None, None), m, None, None, "dtype")
    m, o, s = make(seed=8)
    m.extra = SparseEmbeddingBag(10, 4, density=0.5, block_size=2)
    _expect_unchanged(lambda: dsl_kernels.load(path, m, None, None), m, None, None,
                      "sparse modules|unexpected|missing")


def test_mismatched_optimizer(saved):
    path, m, _, _ = saved
    only_head = torch.optim.Adam(m.head.parameters(), lr=0.1)
    _expect_unchanged(lambda: dsl_kernels.load(path, m, only_head), m, only_head, None,
                      "parameters")
    two_groups = torch.optim.Adam([{"params": m.emb.parameters()},
                                   {"params": m.head.parameters()}])
    _expect_unchanged(lambda: dsl_kernels.load(path, m, two_groups), m, two_groups, None,
                      "param groups")


def test_checkpoint_without_optimizer_state(tmp_path):
    m, o, _ = make()
    dsl_kernels.save(tmp_path / "c.dsl", m)
    _expect_unchanged(lambda: dsl_kernels.load(tmp_path / "c.dsl", m, o), m, o, None,
                      "no optimizer state")


def _save_with_coord(path, model, coord):
    """A well-formed file (valid SHA) whose pool coord is bad."""
    real = model.emb.coord.clone()
    model.emb.coord.copy_(coord)
    try:
        dsl_kernels.save(path, model)
    finally:
        model.emb.coord.copy_(real)


def test_invalid_coord_rejected(tmp_path):
    m, o, s = make()
    target, _, _ = make(seed=3)
    total = m.emb.num_rows * m.emb.num_blocks
    act = torch.nonzero(m.emb.coord >= 0).squeeze(1)
    cases = []
    c = m.emb.coord.clone(); c[act[1]] = c[act[0]]; cases.append((c, "same block"))
    c = m.emb.coord.clone(); c[act[0]] = total; cases.append((c, "outside"))
    c = m.emb.coord.clone(); c[act[0]] = -5; cases.append((c, "outside"))
    for coord, match in cases:
        _save_with_coord(tmp_path / "c.dsl", m, coord)
        _expect_unchanged(lambda: dsl_kernels.load(tmp_path / "c.dsl", target), target, None,
                          None, match)


def test_failed_commit_is_rolled_back(saved):
    path, m, o, _ = saved

    class Sched(torch.optim.lr_scheduler.StepLR):
        def load_state_dict(self, sd):
            self.step_size = -1
            raise RuntimeError("scheduler refuses")

    s = Sched(o, step_size=3)
    before, sb = snapshot(m, o), s.state_dict()
    with pytest.raises(CheckpointError, match="rolled back"):
        dsl_kernels.load(path, m, o, s)
    assert_same(before, snapshot(m, o))  # model and optimizer had been loaded, then restored
    assert s.state_dict() == sb


def test_resize_pools_for_compacted_checkpoint(tmp_path):
    """A pool that shrank (dense-to-sparse) loads into a module built at the initial size only
    with resize_pools=True; the Parameter object is kept so the optimizer stays valid."""
    small, o_small, _ = make(density=0.25)
    train(small, o_small, None, 2)
    dsl_kernels.save(tmp_path / "c.dsl", small, o_small)
    big, o_big, _ = make(density=1.0, seed=2)
    train(big, o_big, None, 1)
    _expect_unchanged(lambda: dsl_kernels.load(tmp_path / "c.dsl", big, o_big), big, o_big,
                      None, "resize_pools=True")
    p = big.emb.values
    dsl_kernels.load(tmp_path / "c.dsl", big, o_big, resize_pools=True)
    assert big.emb.values is p and big.emb.budget == small.emb.budget
    assert_same(snapshot(small, o_small), snapshot(big, o_big))
    train(big, o_big, None, 1)  # and it trains on


# --------------------------------------------------------------------------- bit-exact


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_resume_is_bit_exact(tmp_path, backend, device):
    k = 2 if (backend, device) == ("triton", "cpu") else 4
    torch.manual_seed(11); random.seed(11); np.random.seed(11)
    ref_m, ref_o, ref_s = make(backend, device=device)
    ref_losses = train(ref_m, ref_o, ref_s, 2 * k)

    torch.manual_seed(11); random.seed(11); np.random.seed(11)
    m, o, s = make(backend, device=device)
    losses = train(m, o, s, k)
    dsl_kernels.save(tmp_path / "c.dsl", m, o, s, step=k)
    del m, o, s
    torch.manual_seed(1234); random.seed(1); np.random.seed(2)  # scramble: load must restore
    m, o, s = make(backend, seed=77, device=device)
    assert dsl_kernels.load(tmp_path / "c.dsl", m, o, s)["step"] == k
    assert m.emb.values.device.type == device and m.emb.row_ptr.device.type == device
    losses += train(m, o, s, k)
    assert losses == ref_losses
    assert_same(snapshot(ref_m, ref_o), snapshot(m, o))


def test_resume_with_sparsity_scheduler_is_bit_exact(tmp_path):
    torch.manual_seed(5); random.seed(5); np.random.seed(5)
    ref_m, ref_o, ref_s = make(sched="dsl")
    c0 = ref_m.emb.coord.clone()
    ref_losses = train(ref_m, ref_o, ref_s, 12)
    assert not torch.equal(ref_m.emb.coord, c0)  # the mask really moved during the run
    torch.manual_seed(5); random.seed(5); np.random.seed(5)
    m, o, s = make(sched="dsl")
    losses = train(m, o, s, 5)  # mid-window: the score accumulator must be saved too
    dsl_kernels.save(tmp_path / "c.dsl", m, o, s)
    m, o, s = make(sched="dsl", seed=9)
    dsl_kernels.load(tmp_path / "c.dsl", m, o, s)
    losses += train(m, o, s, 7)
    assert losses == ref_losses
    assert_same(snapshot(ref_m, ref_o), snapshot(m, o))


@pytest.mark.parametrize("sched", ["steplr", "dsl"])
def test_resume_in_fresh_process_is_bit_exact(tmp_path, sched):
    k = 4
    torch.manual_seed(21); random.seed(21); np.random.seed(21)
    ref_m, ref_o, ref_s = make(sched=sched)
    ref_losses = train(ref_m, ref_o, ref_s, 2 * k)

    torch.manual_seed(21); random.seed(21); np.random.seed(21)
    m, o, s = make(sched=sched)
    first = train(m, o, s, k)
    dsl_kernels.save(tmp_path / "c.dsl", m, o, s, step=k)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "resume",
                           str(tmp_path / "c.dsl"), str(k), str(tmp_path / "out.dsl"), sched],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    later = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first + later == ref_losses
    m2, o2, s2 = make(sched=sched, seed=3)
    dsl_kernels.load(tmp_path / "out.dsl", m2, o2, s2)
    assert_same(snapshot(ref_m, ref_o), snapshot(m2, o2))


def _resume_main(path, k, out, sched):
    m, o, s = make(sched=sched, seed=1000)
    step = dsl_kernels.load(path, m, o, s)["step"]
    losses = train(m, o, s, k)
    dsl_kernels.save(out, m, o, s, step=step + k)
    print(json.dumps(losses))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "resume":
    _resume_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])


@pytest.mark.parametrize("fused", [False, True], ids=["torch-adam", "fused-adam"])
def test_resume_dense_to_sparse_after_compaction_is_bit_exact(tmp_path, fused):
    """The pool shrank before the save; a fresh dense model + scheduler resumes bit-exactly
    (load resizes the pool because the scheduler is dense-to-sparse), with the optimizer state
    in a torch optimizer or in the module (fused: fused_state1/2 must be resized too)."""
    torch.manual_seed(6); random.seed(6); np.random.seed(6)
    ref_m, ref_o, ref_s = make(sched="d2s", density=1.0, fused=fused)
    full = ref_m.emb.budget
    ref_losses = train(ref_m, ref_o, ref_s, 12)
    torch.manual_seed(6); random.seed(6); np.random.seed(6)
    m, o, s = make(sched="d2s", density=1.0, fused=fused)
    losses = train(m, o, s, 7)
    assert m.emb.budget < full  # compacted before the save
    dsl_kernels.save(tmp_path / "c.dsl", m, o, s)
    m, o, s = make(sched="d2s", density=1.0, seed=9, fused=fused)
    p = m.emb.values
    dsl_kernels.load(tmp_path / "c.dsl", m, o, s)
    assert m.emb.values is p and m.emb.budget < full
    if fused:
        assert m.emb.fused_state1.shape == m.emb.values.shape
    losses += train(m, o, s, 5)
    assert losses == ref_losses
    assert_same(snapshot(ref_m, ref_o), snapshot(m, o))


def test_resume_with_fused_optimizer_is_bit_exact(tmp_path):
    """The fused optimizer keeps its state in module buffers: the model checkpoint carries it."""
    from dsl_kernels import fused

    def build(seed):
        torch.manual_seed(seed)
        emb = SparseEmbeddingBag(50, 8, mode="sum", density=0.3, block_size=2,
                                 deterministic=True)
        return emb, fused.fuse_optimizer(emb, "adam", lr=0.1)

    def run(emb, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            emb(torch.randint(0, 50, (20,), generator=g), torch.arange(0, 20, 4)).pow(2).sum() \
                .backward()

    ref, fo = build(0)
    run(ref, 3, 1)
    dsl_kernels.save(tmp_path / "c.dsl", ref)
    run(ref, 2, 2)
    emb, fo2 = build(5)
    dsl_kernels.load(tmp_path / "c.dsl", emb)
    run(emb, 2, 2)
    assert fo2.step_count == fo.step_count == 5
    assert_same(snapshot(ref), snapshot(emb))
