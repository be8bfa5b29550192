"""dsl_kernels.torchrec: torchrec interop and sharding by DistributedModelParallel.

Single process: ``from_torchrec`` against torchrec's own ``EmbeddingBagCollection`` with the same
weights. Several processes (gloo on loopback; this file launched as ``python test_torchrec.py
worker SCENARIO RANK WORLD INIT_FILE OUT_DIR``): the sharded forward equals the unsharded model,
``full_state_dict`` round trips, per-rank pool sizes are the shares, and N steps of SGD with DSL
mask updates on the sharded model equal (≤ 1e-6 relative, identical masks) the same steps in one
process on the concatenated global batch, which the test runs itself. Skipped only when torchrec
is not installed (CI installs it: .ci/run).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER_TIMEOUT_S = 300  # cold torch + torchrec imports, 4 processes sharing 2 cores

from torchrec_support import HAVE_TORCHREC, needs_torchrec  # noqa: E402,F401

STEPS, BATCH, LR = 6, 4, 0.5
SCHED = dict(update_every=2, prune_fraction=0.5, stop_at=100, grow="gradient", score_window=2)


# ----------------------------------------------------------------------- shared helpers


def _tables(all_sum: bool = False):
    from torchrec import EmbeddingBagConfig, PoolingType

    tables = [
        EmbeddingBagConfig(name="t0", num_embeddings=22, embedding_dim=16,
                           feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="t1", num_embeddings=15, embedding_dim=8, feature_names=["f2"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t2", num_embeddings=13, embedding_dim=8, feature_names=["f3"]),
        EmbeddingBagConfig(name="t3", num_embeddings=18, embedding_dim=16,
                           feature_names=["f4", "f5"]),
    ]
    for t in tables if all_sum else []:  # per-sample weights need SUM pooling
        t.pooling = PoolingType.SUM
    return tables


class Model(torch.nn.Module):
    def __init__(self, seed: int = 0, all_sum: bool = False):
        super().__init__()
        import dsl_kernels

        torch.manual_seed(seed)
        self.ebc = dsl_kernels.SparseEmbeddingBagCollection.from_torchrec(
            _tables(all_sum), density=0.3, block_size=4)

    def forward(self, kjt):
        return self.ebc(kjt)


def _batch(step: int, rank: int, cover: bool):
    """One rank's KJT; ``cover``: every row of every table is in some bag (so every block gets
    a gradient and no two blocks tie in magnitude at a mask update)."""
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    keys, vals, lens = [], [], []
    for t in _tables():
        for f in t.feature_names:
            if cover:
                rows = torch.cat([torch.randperm(t.num_embeddings, generator=g),
                                  torch.randint(0, t.num_embeddings, (BATCH,), generator=g)])
                cut = torch.sort(torch.randperm(rows.numel() - 1, generator=g)[:BATCH - 1] + 1)
                bounds = [0] + cut.values.tolist() + [rows.numel()]
                ln = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])])
            else:
                ln = torch.randint(0, 4, (BATCH,), generator=g)
                rows = torch.randint(0, t.num_embeddings, (int(ln.sum()),), generator=g)
            keys.append(f)
            vals.append(rows)
            lens.append(ln)
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(vals), torch.cat(lens))


def _weights(step: int, rank: int, dim: int):
    g = torch.Generator().manual_seed(7919 * step + rank + 17)
    return torch.randn(BATCH, dim, generator=g)


def _concat(kjts):
    """The global batch: every rank's bags of a feature, in rank order."""
    from torchrec import KeyedJaggedTensor

    keys = kjts[0].keys()
    ds = [k.to_dict() for k in kjts]
    vals = [d[f].values() for f in keys for d in ds]
    lens = [d[f].lengths() for f in keys for d in ds]
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(vals), torch.cat(lens))


def _train_single(world: int, steps: int = STEPS):
    """The reference: one process, the concatenated global batch, loss = mean over ranks of
    each rank's loss (torchrec divides embedding gradients by the world size, like DDP)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: other tests may have changed it in this process
    try:
        return _train_single_1(world, steps)
    finally:
        torch.set_num_threads(threads)


def _train_single_1(world: int, steps: int):
    from dsl_kernels.sparsity import DSLScheduler

    model = Model(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = DSLScheduler(model, opt, **SCHED)
    dim = sum(model.ebc.feature_dims)
    for s in range(steps):
        out = model(_concat([_batch(s, r, True) for r in range(world)])).values()
        w = torch.cat([_weights(s, r, dim) for r in range(world)])
        loss = (out * w).sum() / world
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, sched


def _dense(ebc):
    return {t.name: ebc.to_dense(t.name) for t in ebc.tables}


# ----------------------------------------------------------------------- single process


@needs_torchrec
def test_from_torchrec_matches_torchrec_ebc():
    from torchrec import EmbeddingBagCollection

    model = Model(3)
    ref = EmbeddingBagCollection(_tables())
    for name, w in _dense(model.ebc).items():
        ref.embedding_bags[name].weight.data.copy_(w)
    for cover in (False, True):
        kjt = _batch(1, 0, cover)
        a, b = model(kjt), ref(kjt)
        assert a.keys() == b.keys() == ["f0", "f1", "f2", "f3", "f4", "f5"]
        assert a.length_per_key() == b.length_per_key()
        torch.testing.assert_close(a.values(), b.values(), rtol=1e-6, atol=1e-6)
    # gradients reach the pool only (no dense table)
    model(kjt).values().sum().backward()
    assert model.ebc.values.grad is not None and model.ebc.values.grad.abs().sum() > 0


@needs_torchrec
def test_from_torchrec_rejects_bad_tables():
    import dsl_kernels
    from torchrec import EmbeddingBagConfig, PoolingType

    mk = dsl_kernels.SparseEmbeddingBagCollection.from_torchrec
    with pytest.raises(ValueError, match="pooling"):
        mk([EmbeddingBagConfig(name="a", num_embeddings=8, embedding_dim=8, feature_names=["x"],
                               pooling=PoolingType.NONE)], block_size=4)
    with pytest.raises(ValueError, match="feature 'x'"):
        mk([EmbeddingBagConfig(name="a", num_embeddings=8, embedding_dim=8, feature_names=["x"]),
            EmbeddingBagConfig(name="b", num_embeddings=8, embedding_dim=8, feature_names=["x"])],
           block_size=4)
    with pytest.raises(ValueError, match="density has no entry"):
        mk([EmbeddingBagConfig(name="a", num_embeddings=8, embedding_dim=8, feature_names=["x"])],
           density={}, block_size=4)
    m = mk([EmbeddingBagConfig(name="a", num_embeddings=8, embedding_dim=8, feature_names=["x"])],
           block_size=4)
    from torchrec import KeyedJaggedTensor

    with pytest.raises(KeyError, match="lacks features"):
        m(KeyedJaggedTensor.from_lengths_sync(["y"], torch.tensor([1]), torch.tensor([1])))


def _cands(prune, grow):
    """One rank's gathered candidates as ShardPool sends them: (magnitude | -score, key)."""
    rows = [(v, k) for v, k in prune] + [(-sc, k) for sc, k in grow]
    return torch.tensor(rows, dtype=torch.float64), [len(prune), len(grow)]


@needs_torchrec
@pytest.mark.parametrize("free1,want_prune,want_grow", [
    (0, ([0, 1], []), ([0, 1], [])),   # rank 1 is full: its better candidates cannot grow
    (1, ([0, 1], []), ([0], [0])),     # one free slot on rank 1: budget moves there
])
def test_global_choice_respects_shard_capacity(free1, want_prune, want_grow):
    from dsl_kernels.torchrec.shard_pool import _choose

    p0, c0 = _cands([(0.1, 1), (0.2, 2)], [(1.0, 10), (0.5, 11)])
    p1, c1 = _cands([(0.9, 100), (1.0, 101)], [(9.0, 110), (8.0, 111)])
    stats = torch.tensor([[10, 10], [10, 10 + free1]])
    prune, grow = _choose([p0, p1], torch.tensor([c0, c1]), stats, 2)
    assert [x.tolist() for x in prune] == list(want_prune)
    assert [x.tolist() for x in grow] == list(want_grow)
    # fewer growable candidates than k: fewer blocks are pruned (the weakest first)
    p0, c0 = _cands([(0.1, 1), (0.2, 2)], [(1.0, 10)])
    p1, c1 = _cands([(0.9, 100)], [])
    prune, grow = _choose([p0, p1], torch.tensor([c0, c1]), torch.tensor([[10, 10], [10, 10]]),
                          2)
    assert [x.tolist() for x in prune] == [[0], []] and [x.tolist() for x in grow] == [[0], []]


@needs_torchrec
def test_shard_pool_maps_keys_and_refuses_compaction():
    from dsl_kernels.torchrec import Piece, ShardPool

    ebc = Model(4).ebc
    t1, t3 = ebc.table("t1"), ebc.table("t3")
    pieces = [Piece("t1", "t1", 0, 15, 8, "sum", 30, t1.row_start),
              Piece("t3", "t3", 9, 9, 16, "sum", 30, t3.row_start)]  # rows 9..17 of t3
    pool = ShardPool(pieces, 4, ebc.num_blocks, None)
    pool.load_unsharded_(ebc.values.detach(), ebc.coord)
    gk = pool.global_keys(pool.coord[pool.coord >= 0])
    lo3, hi3 = (t3.row_start + 9) * ebc.num_blocks, (t3.row_start + 18) * ebc.num_blocks
    lo1, hi1 = t1.row_start * ebc.num_blocks, (t1.row_start + 15) * ebc.num_blocks
    mine = ebc.coord[((ebc.coord >= lo1) & (ebc.coord < hi1))
                     | ((ebc.coord >= lo3) & (ebc.coord < hi3))]
    assert torch.equal(torch.sort(gk).values, torch.sort(mine).values)
    dense = pool.to_dense("t3")
    torch.testing.assert_close(dense, ebc.to_dense("t3")[9:], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="dense_to_sparse"):
        pool.compact_slots_(torch.arange(3))


def test_core_package_does_not_import_torchrec():
    code = ("import sys, dsl_kernels, dsl_kernels.sparsity, dsl_kernels.distributed; "
            "assert not any(m.startswith('torchrec') for m in sys.modules), 'torchrec imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------ several processes


def _run(tmp_path, scenario: str, world: int):
    init_file = tmp_path / "pg_init"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", scenario,
                               str(r), str(world), str(init_file), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"torchrec workers ({scenario}, {world}) did not finish in "
                        f"{WORKER_TIMEOUT_S}s")
        logs.append(out)
    for r, (p, out) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed ({scenario}):\n{out[-6000:]}"
    return [json.loads((tmp_path / f"{scenario}_{r}.json").read_text()) for r in range(world)]


@needs_torchrec
def test_sharded_forward_state_dict_and_pool_shares(tmp_path):
    res = _run(tmp_path, "forward", 2)
    for kind in ("table_wise", "row_wise", "planner"):
        for r in res:
            c = r[kind]
            assert c["forward_err"] <= 1e-6, (kind, c)
            assert c["full_equal"] and c["loaded_forward_err"] <= 1e-6, (kind, c)
            assert c["budget"] == c["share"], (kind, c)  # capacity_factor=1.0: exactly the share
            assert c["values_bytes"] == c["share"] * 4 * 4
            assert kind == "planner" or c["weighted_err"] <= 1e-6, (kind, c)
        assert sum(r[kind]["share"] for r in res) == res[0][kind]["global_budget"]
    assert res[0]["table_wise"]["plan"] != res[0]["row_wise"]["plan"]
    # one process loads the gathered state dict: same tables as the sharded model
    full = torch.load(tmp_path / "forward_full.pt")
    single = Model(5)
    single.load_state_dict(full)
    kjt = _batch(0, 0, False)
    ref = torch.load(tmp_path / "forward_out0.pt")
    torch.testing.assert_close(single(kjt).values(), ref, rtol=1e-6, atol=1e-6)


def _check_training(tmp_path, world):
    res = _run(tmp_path, "train", world)
    single, sched = _train_single(world)
    want = _dense(single.ebc)
    want_keys = torch.sort(single.ebc.coord[single.ebc.coord >= 0]).values
    assert sched.stats()["mask_updates"] == STEPS // SCHED["update_every"]
    for kind in ("row_wise", "table_wise"):
        full = torch.load(tmp_path / f"train_{kind}.pt")
        got = Model(9)
        got.load_state_dict(full)
        keys = torch.sort(got.ebc.coord[got.ebc.coord >= 0]).values
        assert torch.equal(keys, want_keys), f"{kind}: masks differ"
        for name, w in want.items():
            torch.testing.assert_close(_dense(got.ebc)[name], w, rtol=1e-6, atol=1e-6)
        assert sum(r[kind]["moved_blocks"] for r in res) > 0
        # the global threshold moved budget between ranks (a local update never does)
        assert any(len(set(r[kind]["active_per_step"])) > 1 for r in res), kind
        for r in res:
            c = r[kind]
            assert all(a <= b for a, b in zip(c["active_per_step"], c["capacity_per_step"]))
            assert all(n == c["global_budget"] for n in c["global_active_per_step"])
    return res


@needs_torchrec
def test_sharded_dsl_training_equals_single_process_2(tmp_path):
    res = _check_training(tmp_path, 2)
    for r in res:
        assert r["resume_equal"], "DCP resume is not bit-exact"
        assert r["fused_err"] <= 1e-6


@needs_torchrec
@pytest.mark.slow
def test_sharded_dsl_training_equals_single_process_4(tmp_path):
    _check_training(tmp_path, 4)


# --------------------------------------------------------------------------------- worker


def _dmp(model, kind: str, world: int, capacity_factor: float = 1.5):
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    from dsl_kernels.torchrec import SparseEmbeddingBagCollectionSharder

    sharder = SparseEmbeddingBagCollectionSharder(capacity_factor=capacity_factor)
    cons = (None if kind == "planner" else
            {t.name: ParameterConstraints(sharding_types=[kind]) for t in _tables()})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints=cons)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, sharders=[sharder], plan=plan,
                                    device=torch.device("cpu")), str(plan)


def _share(pieces, ebc):
    """A rank's share of the budget: the blocks the unsharded ``ebc`` holds in its pieces."""
    total = 0
    for p in pieces:
        t = ebc.table(p.table)
        lo = (t.row_start + p.row_offset) * ebc.num_blocks
        hi = (t.row_start + p.row_offset + p.num_rows) * ebc.num_blocks
        total += int(((ebc.coord >= lo) & (ebc.coord < hi)).sum())
    return total


def _worker_forward(rank, world, out):
    from dsl_kernels.torchrec import ShardedSparseEmbeddingBagCollection, full_state_dict

    res = {}
    for kind in ("table_wise", "row_wise", "planner"):
        model = Model(0)
        ref = copy.deepcopy(model)
        dmp, plan = _dmp(model, kind, world, capacity_factor=1.0)
        sh = dmp.module.ebc
        assert isinstance(sh, ShardedSparseEmbeddingBagCollection)
        kjt = _batch(0, rank, False)
        a = dmp(kjt).values()
        b = ref(kjt).values()
        full = full_state_dict(dmp)
        single = Model(1)
        single.load_state_dict(full)
        full_equal = all(torch.equal(x, y) for x, y in zip(_dense(single.ebc).values(),
                                                            _dense(ref.ebc).values()))
        other = Model(0)  # load an unsharded state dict into the sharded model (new values;
        with torch.no_grad():  # same mask: capacity_factor=1.0 leaves no room for another)
            other.ebc.values.mul_(-2.0).add_(0.5)
        dmp.load_state_dict(other.state_dict())
        c = dmp(kjt).values()
        share = _share(sh.pool.pieces, ref.ebc)
        res[kind] = {
            "plan": plan, "forward_err": float((a - b).abs().max()),
            "full_equal": full_equal,
            "loaded_forward_err": float((c - other(kjt).values()).abs().max()),
            "budget": sh.pool.budget, "share": share,
            "values_bytes": sh.pool.values.numel() * sh.pool.values.element_size(),
            "global_budget": ref.ebc.budget,
        }
        if kind != "planner":  # per-sample weights travel with the ids (all-SUM tables)
            model = Model(0, all_sum=True)
            ref = copy.deepcopy(model)
            dmp, _ = _dmp(model, kind, world)
            kjt = _batch(0, rank, False)
            kjt = type(kjt).from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths(),
                                              weights=torch.rand(kjt.values().numel()))
            res[kind]["weighted_err"] = float((dmp(kjt).values() - ref(kjt).values()).abs().max())
        if kind == "planner" and rank == 0:
            torch.save(full_state_dict(dmp), os.path.join(out, "forward_full.pt"))
            torch.save(other(_batch(0, 0, False)).values().detach(),
                       os.path.join(out, "forward_out0.pt"))
        elif kind == "planner":
            full_state_dict(dmp)  # the collective on every rank
    return res


def _train_sharded(rank, world, kind, steps=STEPS, fused=False, ckpt=None):
    import torch.distributed as dist

    from dsl_kernels.sparsity import DSLScheduler
    from dsl_kernels.torchrec import load_sharded, save_sharded

    dmp, _ = _dmp(Model(0), kind, world)
    pool = dmp.module.ebc.pool
    if fused:
        from dsl_kernels.fused import fuse_optimizer
        fuse_optimizer(pool, "sgd", lr=LR)
        opt = None
    else:
        opt = torch.optim.SGD(dmp.parameters(), lr=LR)
    sched = DSLScheduler(dmp, opt, **SCHED)
    dim = sum(len(t.feature_names) * t.embedding_dim for t in _tables())
    stats = {"active_per_step": [], "capacity_per_step": [], "global_active_per_step": []}
    start = 0
    if ckpt is not None and ckpt[0] == "load":
        start = load_sharded(ckpt[1], dmp, opt, sched)["step"]
    for s in range(start, steps):
        out = dmp(_batch(s, rank, True)).values()
        loss = (out * _weights(s, rank, dim)).sum()
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()
        sched.step()
        n = torch.tensor([pool.num_active_blocks])
        dist.all_reduce(n)
        stats["active_per_step"].append(pool.num_active_blocks)
        stats["capacity_per_step"].append(pool.budget)
        stats["global_active_per_step"].append(int(n))
        if ckpt is not None and ckpt[0] == "save" and s + 1 == ckpt[2]:
            save_sharded(ckpt[1], dmp, opt, sched, extra={"step": s + 1})
    stats["moved_blocks"] = int(torch.tensor(sched.stats()["moved_blocks"]))
    return dmp, stats


def _worker_train(rank, world, out):
    from dsl_kernels.torchrec import full_state_dict

    res = {}
    for kind in ("row_wise", "table_wise"):
        dmp, stats = _train_sharded(rank, world, kind)
        full = full_state_dict(dmp)
        stats["global_budget"] = Model(0).ebc.budget
        if rank == 0:
            torch.save(full, os.path.join(out, f"train_{kind}.pt"))
        res[kind] = stats
    if world == 2:
        # DCP: save at step 3, resume in a fresh model, optimizer and scheduler
        ck = os.path.join(out, "ckpt")
        _train_sharded(rank, world, "row_wise", steps=3, ckpt=("save", ck, 3))
        dmp, _ = _train_sharded(rank, world, "row_wise", ckpt=("load", ck))
        resumed = full_state_dict(dmp)
        straight = torch.load(os.path.join(out, "train_row_wise.pt")) if rank == 0 else None
        ok = torch.tensor([1])
        if rank == 0:
            ok[0] = int(all(torch.equal(resumed[k], straight[k]) for k in straight))
        import torch.distributed as dist
        dist.broadcast(ok, 0)
        res["resume_equal"] = bool(ok)
        dmp, _ = _train_sharded(rank, world, "row_wise", fused=True)
        fused = full_state_dict(dmp)
        ref = full_state_dict(_train_sharded(rank, world, "row_wise")[0])
        same_mask = torch.equal(fused["ebc.coord"], ref["ebc.coord"])
        res["fused_err"] = (float((fused["ebc.values"] - ref["ebc.values"]).abs().max())
                            if same_mask else float("inf"))
    return res


def _worker(scenario, rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        res = {"forward": _worker_forward, "train": _worker_train}[scenario](rank, world, out)
        with open(os.path.join(out, f"{scenario}_{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    torch.set_num_threads(1)
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    sys.stdout.flush()
    os._exit(0)  # skip gloo/torchrec teardown at interpreter exit
