"""Scale-out of a sharded SparseEmbeddingBagCollection (dsl_kernels.torchrec): per-rank memory
and step time at 1, 2, 4 processes.

    python -m bench.torchrec_scale                      # CPU, gloo, 1/2/4 processes
    python -m bench.torchrec_scale --backend nccl --device cuda --procs 1 2 4 8   # GPUs

A fixed global model (``--tables`` tables of ``--rows`` rows x ``--dim``, density ``--density``,
block ``--block-size``, two features per table, pooling ``--pooling``) and a fixed per-rank batch
(weak scaling in the data): each step is forward + backward + Adam + a DSLScheduler step (a
global prune/regrow every ``--update-every`` steps). Per rank it reports the pool bytes (values,
coord, row index), the optimizer state and the process's peak RSS; step time is the median over
``--steps`` steps after ``--warmup``, max over ranks. 1 process is sharded too (DMP over a world
of one), so the numbers differ only by the world size. Prints a markdown table; ``--json PATH``
writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--shard", nargs="+", default=["row_wise", "table_wise"],
                   choices=["row_wise", "table_wise"])
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024, help="samples per rank")
    p.add_argument("--pooling", type=int, default=20, help="ids per bag")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=int, default=900)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- worker


def _worker(a, shard: str, out: str) -> None:
    import torch.distributed as dist
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

    import dsl_kernels
    from dsl_kernels.sparsity import DSLScheduler
    from dsl_kernels.torchrec import shard_model

    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(a.device if a.device == "cpu" else f"cuda:{int(os.environ['LOCAL_RANK'])}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    cfgs = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=a.rows, embedding_dim=a.dim,
                               feature_names=[f"t{i}a", f"t{i}b"]) for i in range(a.tables)]
    model = torch.nn.Module()
    model.ebc = dsl_kernels.SparseEmbeddingBagCollection.from_torchrec(
        cfgs, density=a.density, block_size=a.block_size)
    dmp = shard_model(model, shard, device=dev)
    pool = dmp.module.ebc.pool
    opt = torch.optim.Adam(dmp.parameters(), lr=1e-3)
    sched = DSLScheduler(dmp, opt, update_every=a.update_every, prune_fraction=0.3,
                         stop_at=10 ** 9, score_window=1, keep_rows=False)  # as measured
    keys = [f for c in cfgs for f in c.feature_names]
    g = torch.Generator().manual_seed(rank)
    n = a.batch * a.pooling * len(keys)
    batches = [KeyedJaggedTensor.from_lengths_sync(
        keys, torch.randint(0, a.rows, (n,), generator=g).to(dev),
        torch.full((a.batch * len(keys),), a.pooling, dtype=torch.int32).to(dev))
        for _ in range(2)]
    times = []
    for s in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out_kt = dmp.module.ebc(batches[s % 2])
        loss = out_kt.values().float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
    state = opt.state.get(pool.values, {})
    row = {"rank": rank, "world": world, "shard": shard,
           "pool_bytes": pool.memory_bytes(),
           "values_bytes": pool.values.numel() * pool.values.element_size(),
           "optimizer_bytes": sum(v.numel() * v.element_size() for v in state.values()
                                  if isinstance(v, torch.Tensor)),
           "slots": pool.budget, "active": pool.num_active_blocks,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "step_ms": 1000 * sorted(times)[len(times) // 2],
           "mask_updates": sched.stats()["mask_updates"]}
    with open(os.path.join(out, f"{shard}_{world}_{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------- driver


def main(argv=None) -> list:
    a = _args(argv)
    rows = []
    dense = a.tables * a.rows * a.dim * 4
    with tempfile.TemporaryDirectory() as out:
        for shard in a.shard:
            for w in a.procs:
                if shard == "table_wise" and w > a.tables:
                    continue
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={w}", os.path.abspath(__file__), "--worker", shard,
                       out, *(argv if argv is not None else sys.argv[1:])]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                   timeout=a.timeout)
                if r.returncode:
                    raise RuntimeError(f"{shard} x {w} failed:\n{r.stderr[-3000:]}")
                per = [json.load(open(os.path.join(out, f"{shard}_{w}_{k}.json")))
                       for k in range(w)]
                rows.append({"shard": shard, "procs": w,
                             "pool_MB_per_rank": [round(p["pool_bytes"] / 2**20, 2) for p in per],
                             "optimizer_MB_per_rank": [round(p["optimizer_bytes"] / 2**20, 2)
                                                       for p in per],
                             "peak_rss_MB_max": round(max(p["peak_rss_bytes"] for p in per)
                                                      / 2**20),
                             "step_ms": round(max(p["step_ms"] for p in per), 1),
                             "mask_updates": per[0]["mask_updates"]})
                print(rows[-1], flush=True)
    print(f"\nglobal model: {a.tables} tables x {a.rows:,} rows x {a.dim}, density {a.density}, "
          f"B={a.block_size} (dense fp32 {dense / 2**20:.0f} MB); per rank {a.batch} samples x "
          f"{2 * a.tables} features x {a.pooling} ids; {a.backend} on {a.device}\n")
    print("| sharding | procs | pool MB per rank | Adam state MB per rank | peak RSS MB (max) | "
          "step ms (max over ranks) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shard']} | {r['procs']} | {' / '.join(map(str, r['pool_MB_per_rank']))} | "
              f"{' / '.join(map(str, r['optimizer_MB_per_rank']))} | {r['peak_rss_MB_max']} | "
              f"{r['step_ms']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        _worker(_args(sys.argv[4:]), sys.argv[2], sys.argv[3])
        os._exit(0)  # skip gloo/torchrec teardown at interpreter exit
    main()
