"""``dsl-train``: train recommendation models with sparse embedding tables at a fixed budget.

Run ``dsl-train --help`` (or ``dsl-train COMMAND --help``) for the options.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .methods import MASK_INITS, METHODS, PRESETS, MethodConfig, engine_available
from .loop import RANKING_DEFAULTS, STREAM_VARIANTS, TrainConfig
from .models import LOSSES

DESCRIPTION = """\
Train recommendation models whose embedding tables are block-sparse from the first step
(Dynamic Sparse Learning), and compare them with dense tables and other sparse baselines.

Without a command, dsl-train runs a ~1 minute demo on synthetic data: matrix factorisation
trained dense, with DSL at 90 % sparsity (density 0.1) and with a static random mask, then
prints quality (Recall@20, NDCG@20), memory and time side by side.

Every run writes <out>/<name>.json (config, per-epoch metrics and times, measured memory)
and <out>/<name>.png (metric per epoch).
"""

EPILOG = """\
methods (--method):
  dense            stock torch nn.Embedding / nn.EmbeddingBag (density 1.0)
  dsl              sparse from scratch; the mask moves by prune (magnitude) + regrow (gradient)
  static           sparse with a random mask that never changes
  magnitude        dense training, one-shot prune to the budget, sparse fine-tuning
  dense_to_sparse  start dense, shrink to --density on a cubic schedule, keep adapting

examples:
  dsl-train                                               # the demo
  dsl-train mf --data ../shared/data/gowalla --method dsl --density 0.1 --epochs 5
  dsl-train lightgcn --data ../shared/data/gowalla --method dense --epochs 20
  dsl-train dlrm --data ../shared/data/criteo-sample --method dsl --density 0.2
  dsl-train dlrm --data synthetic --method dsl --density 0.2 --skip-stale
  dsl-train stream --data ../shared/data/ml-100k --windows 6 --density 0.1
  dsl-train sweep --model mf --data synthetic --densities 0.05,0.1,0.2 --methods dsl,static
"""


def _add_common(p: argparse.ArgumentParser, model: str) -> None:
    g = p.add_argument_group("data and model")
    if model == "dlrm":
        g.add_argument("--data", default="synthetic",
                       help="Criteo-style CSV/TSV file or folder, or 'synthetic' (a skewed CTR "
                            "stream; default)")
    else:
        g.add_argument("--data", default="synthetic",
                       help="folder with LightGCN train.txt/test.txt (.gz ok, e.g. "
                            "../shared/data/gowalla), a RecBole .inter file/folder (split by "
                            "time), or 'synthetic' (default)"
                            + ("; for --model dlrm: a Criteo-style CSV/TSV file"
                               if model == "sweep" else ""))
    if model in ("dlrm", "sweep"):
        g.add_argument("--hash-size", type=int, default=100_000,
                       help="rows per categorical table (values are hashed; default 100000)")
        g.add_argument("--rows", type=int, default=20_000,
                       help="CTR: rows of synthetic data / max rows read from a file")
    g.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    if model in ("lightgcn", "sweep"):
        g.add_argument("--layers", type=int, default=3, help="LightGCN layers (default 3)")
    g = p.add_argument_group("sparsity")
    g.add_argument("--method", default=None, choices=METHODS,
                   help="how the tables are trained (default: dsl, or dense at --density 1)")
    g.add_argument("--memory", type=float, default=None,
                   help="target share of the dense table's bytes (values + index + optimizer "
                        "state); sets --density of sparse methods and the dimension of "
                        "dense_small (e.g. 0.1)")
    g.add_argument("--density", type=float, default=0.1,
                   help="share of the table kept, 1.0 = dense (default 0.1 = 90%% sparse)")
    g.add_argument("--block-size", type=int, default=8,
                   help="columns per sparse block; divides --dim (default 8)")
    g.add_argument("--mask-init", default="frequency", choices=MASK_INITS,
                   help="initial mask of sparse tables: frequency (default: blocks per row ~ "
                        "training count ** --frequency-power, in the first columns; CTR tables "
                        "fall back to aligned), aligned (random per-row counts, first columns) "
                        "or random (random columns)")
    g.add_argument("--frequency-power", type=float, default=0.5,
                   help="mask-init frequency: blocks per row ~ count ** this (default 0.5)")
    g.add_argument("--update-every", type=int, default=100,
                   help="DSL: steps between mask updates (default 100)")
    g.add_argument("--prune-fraction", type=float, default=0.3,
                   help="DSL: share of blocks moved at the first update, cosine-decayed "
                        "(default 0.3)")
    g.add_argument("--stop-fraction", type=float, default=0.75,
                   help="DSL: mask updates stop after this share of training (default 0.75)")
    g.add_argument("--grow", default="gradient", choices=("gradient", "random"),
                   help="DSL regrowth criterion (default gradient)")
    g.add_argument("--distribution", default="global", choices=("global", "per_table"),
                   help="DSL: rank blocks across all tables (global) or per table")
    g.add_argument("--dense-fraction", type=float, default=0.5,
                   help="magnitude: share of epochs trained dense before pruning (default 0.5)")
    g.add_argument("--skip-stale", action="store_true",
                   help="skip updates of embeddings that stopped changing (Slipstream)")
    g.add_argument("--target-skip", type=float, default=0.3,
                   help="with --skip-stale: target share of skipped updates (default 0.3)")
    g.add_argument("--backend", default="auto",
                   help="kernel backend: auto, reference, cpu, cuda, triton (default auto)")
    _add_loop(p, model)


def _add_loop(p: argparse.ArgumentParser, model: str) -> None:
    g = p.add_argument_group("training")
    ctr = model == "dlrm"
    R = RANKING_DEFAULTS
    g.add_argument("--epochs", type=int, default=3 if ctr else R["epochs"],
                   help="passes over the training data (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=1024 if ctr else R["batch_size"],
                   help="(default %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3 if ctr else R["lr"],
                   help="learning rate (default %(default)s)")
    g.add_argument("--reg", type=float, default=0.0 if ctr else R["reg"],
                   help="L2 weight on the batch's embeddings (default %(default)s)")
    if not ctr:
        g.add_argument("--loss", default=R["loss"], choices=LOSSES,
                       help="ranking loss: softmax (sampled softmax over cosine similarities "
                            "with --negatives shared negatives per batch) or bpr (default "
                            "%(default)s)")
        g.add_argument("--tau", type=float, default=R["tau"],
                       help="softmax temperature (default %(default)s)")
        g.add_argument("--score", default="masked", choices=("masked", "cosine"),
                       help="softmax, MF: cosine over the blocks both rows hold (masked, "
                            "default; the plain cosine for dense tables) or the plain cosine")
        g.add_argument("--negatives", type=int, default=R["negatives"],
                       help="softmax: negatives shared by a batch; bpr: negatives per positive "
                            "(default %(default)s)")
        g.add_argument("--sampling", default=R["sampling"], choices=("interaction", "user"),
                       help="batches of interactions, or users drawn uniformly with one of "
                            "their items (default %(default)s)")
        g.add_argument("--lr-schedule", default=R["lr_schedule"], choices=("constant", "cosine"),
                       help="(default %(default)s)")
        g.add_argument("--val-fraction", type=float, default=R["val_fraction"],
                       help="share of each user's train items held out as a validation split; "
                            "the epoch with the best validation Recall@20 is selected and test "
                            "is scored once on it; 0 = no validation, test after every "
                            "evaluation (default %(default)s)")
        g.add_argument("--patience", type=int, default=R["patience"],
                       help="stop after this many evaluations without a better validation "
                            "score (default %(default)s; 0 = never)")
    g.add_argument("--optimizer", default="adam", choices=("adam", "adagrad", "sgd"))
    g.add_argument("--fused", action="store_true",
                   help="sparse tables: fuse the optimizer into the backward (lazy, touched "
                        "slots only, no gradient tensor; dsl_kernels.fused)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    g.add_argument("--eval-users", type=int, default=None,
                   help="users sampled for intermediate evaluations (the last one uses all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on "
                        "a busy machine)")
    g.add_argument("--out", default="runs", help="output folder (default runs/)")
    g.add_argument("--name", default=None, help="run name (default: derived from the options)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no PNG")
    if model in ("mf", "lightgcn", "dlrm"):
        g.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="write a checkpoint (model, optimizer, mask schedule, RNG states, "
                            "per-epoch history) to PATH at the end of every epoch")
        g.add_argument("--resume", default=None, metavar="PATH",
                       help="continue from the checkpoint at PATH (same options as the run that "
                            "wrote it); on CPU the result equals an uninterrupted run")
        g.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="data-parallel processes: N > 1 re-launches this command under "
                            "torchrun (python -m torch.distributed.run --standalone "
                            "--nproc_per_node N); each rank trains every N-th batch, gradients "
                            "are averaged by DDP (gloo on CPU, nccl on CUDA), rank 0's mask is "
                            "broadcast after every update, and rank 0 alone evaluates and writes "
                            "the JSON/plot. Not with --method magnitude or --fused")
    if model == "dlrm":
        g.add_argument("--shard", default=None, choices=("row_wise", "table_wise"),
                       help="with --nproc N >= 2: shard the tables over the N processes with "
                            "torchrec's DistributedModelParallel (dsl_kernels.torchrec, the "
                            "[torchrec] extra) instead of replicating them; the MLPs stay "
                            "data-parallel, DSL masks use one global threshold, --checkpoint "
                            "writes a folder with torch.distributed.checkpoint")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsl-train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter
    for name, hlp in (("mf", "matrix factorisation with BPR loss (Recall@20, NDCG@20)"),
                      ("lightgcn", "LightGCN with BPR loss (Recall@20, NDCG@20)"),
                      ("dlrm", "DLRM-style click-through-rate model (AUC, log-loss)")):
        sp = sub.add_parser(name, help=hlp, description=hlp, formatter_class=fmt)
        _add_common(sp, name)
    sp = sub.add_parser("stream", formatter_class=fmt,
                        help="prequential MF on a time-ordered stream: adaptive mask vs frozen "
                             "mask vs dense",
                        description="Prequential evaluation on a time-ordered stream (train on "
                                    "window t, test on the new interactions of window t+1). "
                                    "Variants: dense; adaptive (DSL mask updates all along); "
                                    "frozen (mask updates in the first window only); static.")
    _add_common(sp, "mf")
    sp.add_argument("--windows", type=int, default=6, help="time windows (default 6)")
    sp.add_argument("--variants", default="dense,adaptive,frozen",
                    help=f"comma list of {', '.join(STREAM_VARIANTS)} (default dense,adaptive,"
                         "frozen)")
    sp.add_argument("--drift", type=float, default=0.3,
                    help="synthetic data only: drift of tastes/popularity per window (0-1)")
    sp = sub.add_parser("sweep", formatter_class=fmt,
                        help="quality and memory across densities and methods (+ dense)",
                        description="Run --model at every density of --densities with every "
                                    "method of --methods, plus one dense run; writes a table, a "
                                    "JSON summary and sweep.png (metric and memory vs density).")
    sp.add_argument("--model", default="mf", choices=("mf", "lightgcn", "dlrm"))
    sp.add_argument("--memory-points", default=None,
                    help="comma list of memory shares of the dense table (values + index + "
                         "optimizer state), e.g. 0.2,0.1,0.05: every method is sized to each "
                         "(replaces --densities)")
    sp.add_argument("--densities", default="0.05,0.1,0.2", help="comma list (default "
                    "0.05,0.1,0.2), used without --memory-points")
    sp.add_argument("--methods", default="dsl,static,magnitude",
                    help="comma list of method recipes: " + ", ".join(PRESETS) +
                         " (default dsl,static,magnitude)")
    sp.add_argument("--seeds", default="0", help="comma list of seeds (default 0)")
    sp.add_argument("--reuse", action="store_true",
                    help="reuse finished runs found in --out (same options = same name), so "
                         "a sweep can be split over several processes and gathered at the end")
    sp.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    sp.add_argument("--gather", action="store_true",
                    help="train nothing: build the table and plot from every finished run in "
                         "--out (e.g. cells of one sweep run as separate processes)")
    _add_common(sp, "sweep")
    return p


# ----------------------------------------------------------------------------- helpers


def _method_cfg(a, method: Optional[str] = None, density: Optional[float] = None) -> MethodConfig:
    d = a.density if density is None else density
    m = method or a.method or ("dense" if d >= 1.0 else "dsl")
    if m in ("dense", "dense_small"):
        d = 1.0
    return MethodConfig(method=m, density=d, block_size=a.block_size, backend=a.backend,
                        update_every=a.update_every, prune_fraction=a.prune_fraction,
                        stop_fraction=a.stop_fraction, grow=a.grow, distribution=a.distribution,
                        dense_fraction=a.dense_fraction, skip_stale=a.skip_stale,
                        target_skip=a.target_skip, mask_init=a.mask_init,
                        frequency_power=a.frequency_power)


def _train_cfg(a, model: str) -> TrainConfig:
    return TrainConfig(model=model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, reg=a.reg,
                       dim=a.dim, layers=getattr(a, "layers", 3), eval_every=a.eval_every,
                       eval_users=a.eval_users, optimizer=a.optimizer, fused=a.fused,
                       seed=a.seed,
                       device=a.device, progress=not a.no_progress, out=a.out, name=a.name,
                       plot=not a.no_plot, checkpoint=getattr(a, "checkpoint", None),
                       resume=getattr(a, "resume", None), memory=getattr(a, "memory", None),
                       shard=getattr(a, "shard", None),
                       **{k: getattr(a, k) for k in ("loss", "tau", "score", "negatives",
                                                     "sampling",
                                                     "lr_schedule", "val_fraction")
                          if hasattr(a, k)},
                       patience=(getattr(a, "patience", None) or None))


def load_ranking_data(path: str, seed: int = 0):
    from . import data as D

    if path == "synthetic":
        return D.synthetic_implicit(seed=seed)
    if os.path.isdir(path) and (D._find(path, "train.txt") or D._find(path, "test.txt")):
        return D.load_lightgcn(path)
    if path.endswith((".inter", ".inter.gz")) or os.path.isdir(path):
        return temporal_split(D.load_inter(path))
    if os.path.isfile(path) and os.path.basename(path).startswith(("train.txt", "test.txt")):
        return D.load_lightgcn(path)
    raise D.DataError(f"--data {path!r}: expected a folder with train.txt/test.txt, a .inter "
                      f"file or folder, or 'synthetic'")


def temporal_split(stream, test_fraction: float = 0.2):
    """Global time split of a stream: the last ``test_fraction`` of events are the test set
    (test pairs already seen in training are dropped)."""
    import torch

    from .data import InteractionData, events_to_split

    cut = int(round(len(stream) * (1 - test_fraction)))
    tu, ti = events_to_split(stream.users[:cut], stream.items[:cut])
    su, si = events_to_split(stream.users[cut:], stream.items[cut:])
    new = ~torch.isin(su * stream.num_items + si, tu * stream.num_items + ti)
    return InteractionData(stream.name, stream.num_users, stream.num_items, tu, ti, su[new],
                           si[new])


def load_ctr_data(a):
    from . import data as D

    if a.data == "synthetic":
        d = D.synthetic_ctr(num_rows=a.rows, seed=a.seed)
    else:
        d = D.load_criteo(a.data, hash_size=a.hash_size, max_rows=a.rows)
    return d.split(0.2)


SUMMARY_KEYS = ("recall@20", "ndcg@20", "auc", "logloss", "prequential_recall@20",
                "prequential_ndcg@20", "mask_updates", "skipped_update_ratio")


def _summary_row(rep: dict) -> dict:
    mem = rep["memory"]
    row = {"run": rep["name"], "method": rep["method_config"]["method"],
           "density": rep["final"].get("density", rep["method_config"]["density"])}
    row.update({k: rep["final"][k] for k in SUMMARY_KEYS if k in rep["final"]})
    if rep["task"] == "dlrm":
        row["step_ms"] = sum(e["step_time_ms"] for e in rep["epochs"]) / len(rep["epochs"])
    row["emb+opt"] = _fmt(mem["embedding_total_bytes"])
    row["% of dense"] = f"{100 * mem['embedding_share_of_dense']:.1f}%"
    row["time_s"] = f"{rep['wall_time_s']:.1f}"
    return row


def _fmt(n):
    from .report import fmt_bytes

    return fmt_bytes(n)


def _print_table(rows: List[dict]) -> None:
    from .report import table

    cols = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    print(table(rows, cols))


# ----------------------------------------------------------------------------- commands


DEMO_MEMORY = 0.1  # the demo compares dense, dense-small and DSL at 10 % of dense memory


def cmd_demo(out: str = "runs", progress: bool = True, epochs: int = 12,
             scale: float = 1.0, memory: float = DEMO_MEMORY) -> List[dict]:
    """Synthetic MF at equal memory: the full dense table, a dense table whose dimension gives
    ``memory`` of its bytes (dense-small), and DSL at the same measured memory (this project's
    recipe: frequency layout + prune/regrow). ``scale`` shrinks the data set (tests use a tiny
    one)."""
    from .data import synthetic_implicit
    from .loop import run_ranking

    nu, ni = max(20, int(1500 * scale)), max(20, int(1000 * scale))
    data = synthetic_implicit(num_users=nu, num_items=ni, per_user=max(5, int(30 * scale)),
                              seed=0)
    print(f"dsl-train demo: {data.summary()}; MF (sampled softmax), dim 32, up to {epochs} "
          f"epochs, Adam; dense vs dense-small vs DSL at {memory:.0%} of dense memory",
          flush=True)
    runs = [(MethodConfig("dense", 1.0, block_size=4), None),
            (MethodConfig("dense_small", 1.0, block_size=4), memory),
            (MethodConfig("dsl", 1.0, block_size=4, update_every=20, mask_init="frequency"),
             memory)]
    if not engine_available():
        print("note: dsl_kernels.sparsity is not available here; skipping the DSL run",
              file=sys.stderr)
        runs = [r for r in runs if r[0].method != "dsl"]
    reps = []
    for m, share in runs:
        tcfg = TrainConfig(model="mf", epochs=epochs, batch_size=1024, lr=5e-3, reg=0.0,
                           dim=32, loss="softmax", negatives=256, val_fraction=0.1,
                           # 12 epochs leave every method far from converged: a cosine
                           # decay would stop their climb (dense 0.45 -> 0.35), so the demo
                           # keeps a constant rate.
                           lr_schedule="constant",
                           patience=RANKING_DEFAULTS["patience"], device="auto",
                           progress=progress, out=out,
                           memory=share, name=f"demo-mf-{m.method}")
        reps.append(run_ranking(data, tcfg, m))
        print(f"  {tcfg.name}: Recall@20={reps[-1]['final']['recall@20']:.4f} "
              f"({reps[-1]['wall_time_s']:.1f} s)", flush=True)
    print()
    rows = []
    for r in reps:
        row = _summary_row(r)
        row["% of dense"] = f"{100 * r['memory']['share_of_full_dense']:.1f}%"
        rows.append(row)
    _print_table(rows)
    if len(reps) == 3 and reps[0]["final"]["recall@20"]:
        d, small, dsl = (r["final"]["recall@20"] for r in reps)
        print(f"\nDSL at {memory:.0%} memory: {100 * dsl / d:.1f} % of dense Recall@20, "
              f"{'ahead of' if dsl > small else 'behind'} dense-small "
              f"({100 * small / d:.1f} % of dense)")
    _sweep_plot(out, "demo", reps, "recall@20")
    print(f"\nJSON and plots in {out}/")
    return reps


def _sweep_plot(out: str, name: str, reps: List[dict], metric: str) -> str:
    from .report import can_plot, plot_sweep

    if not can_plot():
        return "(no plot: matplotlib missing)"

    rows = []
    for r in reps:
        rows.append({"method": r["method_config"]["method"],
                     "density": r["method_config"]["density"],
                     metric: r["final"].get(metric),
                     "embedding_total_bytes": r["memory"]["embedding_total_bytes"]})
    dense = [r for r in rows if r["method"] == "dense"]
    # The dense point belongs on every method's curve (density 1.0).
    for m in {r["method"] for r in rows} - {"dense"}:
        rows += [dict(d, method=m) for d in dense]
    return plot_sweep(os.path.join(out, f"{name}-sweep.png"), rows, metric, title=name)


def _relaunch(argv: List[str], nproc: int) -> int:
    """Run ``dsl-train argv`` (less ``--nproc``) under torchrun with ``nproc`` processes."""
    import subprocess

    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            rest.append(x)
    env = dict(os.environ)
    # The workers import dsl_train with -m: make sure they find this copy of it.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [x for x in env.get("PYTHONPATH", "").split(
        os.pathsep) if x])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "dsl_train"] + rest
    print("dsl-train: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, env=env)


def _init_distributed(device: str) -> None:
    """Under torchrun (LOCAL_RANK set): the process group, gloo on CPU and nccl on CUDA."""
    import torch
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")


def cmd_train(a) -> dict:
    from .loop import dist_world, run_ctr, run_ranking

    _init_distributed(a.device)
    rank = dist_world()[0]
    tcfg = _train_cfg(a, a.command)
    mcfg = _method_cfg(a)
    if a.command == "dlrm":
        train, test = load_ctr_data(a)
        rep = run_ctr(train, test, tcfg, mcfg)
    else:
        data = load_ranking_data(a.data, a.seed)
        if rank == 0:
            print(data.summary(), flush=True)
        rep = run_ranking(data, tcfg, mcfg)
    if rank != 0:
        return rep
    _print_table([_summary_row(rep)])
    print(f"\n{rep['files']['json']}")
    return rep


def cmd_stream(a) -> List[dict]:
    from . import data as D
    from .loop import run_stream

    if a.data == "synthetic":
        stream = D.synthetic_stream(num_windows=a.windows, drift=a.drift, seed=a.seed)
    else:
        stream = D.load_inter(a.data)
    tcfg = _train_cfg(a, "mf")
    base = _method_cfg(a, method="dsl" if a.density < 1 else "dense")
    reps = []
    for v in [s.strip() for s in a.variants.split(",") if s.strip()]:
        tcfg.name = None if a.name is None else f"{a.name}-{v}"
        reps.append(run_stream(stream, a.windows, v, tcfg, base))
    rows = []
    for r in reps:
        row = {"variant": r["variant"], "density": r["final"]["density"]}
        row.update({k: v for k, v in r["final"].items() if k != "density"})
        row["emb+opt"] = _fmt(r["memory"]["embedding_total_bytes"])
        row["time_s"] = f"{r['wall_time_s']:.1f}"
        rows.append(row)
    _print_table(rows)
    from .report import can_plot, plot_curves

    k = tcfg.k
    if not can_plot():
        return reps
    p = plot_curves(os.path.join(a.out, f"stream-{stream.name}.png"),
                    {r["variant"]: [e[f"recall@{k}"] for e in r["epochs"]] for r in reps},
                    f"prequential recall@{k}", xlabel="window", title=stream.name)
    print(f"\n{p}")
    return reps


def _sweep_configs(a) -> List[tuple]:
    """(label, memory share or None, MethodConfig) of every sparse/dense-small run of a sweep.
    ``--memory`` points size every method to the same measured bytes; without it the methods
    run at each of ``--densities`` (dense_small needs --memory)."""
    from .methods import preset

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    base = _method_cfg(a, "dsl", 0.5)
    out = []
    if a.memory_points:
        for share in [float(x) for x in a.memory_points.split(",") if x.strip()]:
            out += [(m, share, preset(m, base)) for m in methods]
    else:
        for d in [float(x) for x in a.densities.split(",") if x.strip()]:
            for m in methods:
                c = preset(m, base)
                if c.method == "dense_small":
                    raise ValueError("sweep: dense_small is sized by memory: use --memory-points")
                out.append((m, None, MethodConfig(**dict(c.to_dict(), density=d))))
    return out


def _reuse_or_run(run, tcfg, mcfg, reuse: bool):
    """A finished run's report when ``reuse`` and ``<out>/<name>.json`` exists (the name hashes
    every option that changes the result), else train it."""
    import json

    from .loop import _run_name

    if reuse:
        data_name = getattr(run, "data_name", None)
        if data_name is not None:
            path = os.path.join(tcfg.out, _run_name(tcfg, mcfg, data_name) + ".json")
            if os.path.isfile(path):
                with open(path) as f:
                    rep = json.load(f)
                if "final" in rep and "memory" in rep:
                    print(f"  reusing {path}", flush=True)
                    return rep
    return run(mcfg)


def _mean_std(xs: List[float]):
    import statistics

    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _report_sweep(groups: dict, metric: str, out: str, name: str, title: str) -> dict:
    """Table (mean ± std over seeds, measured memory, % of dense), JSON and Pareto plot of
    ``groups``: ``{(method label, memory target or density): [run reports]}``."""
    from .report import plot_pareto, write_json

    other = "ndcg@20" if metric != "auc" else "logloss"
    rows, points, dense_pt = [], [], None
    for (label, x), reps in groups.items():
        mem = [r["memory"].get("share_of_full_dense", r["memory"]["embedding_share_of_dense"])
               for r in reps]
        mu, sd = _mean_std([r["final"].get(metric) for r in reps])
        mu2, sd2 = _mean_std([r["final"].get(other) for r in reps])
        pt = {"method": label, "target": x, "share": sum(mem) / len(mem), metric: mu,
              f"{metric}_std": sd, other: mu2, f"{other}_std": sd2, "seeds": len(reps),
              "runs": [r["name"] for r in reps]}
        if label == "dense":
            dense_pt = pt
        else:
            points.append(pt)
    for pt in ([dense_pt] if dense_pt else []) + points:
        row = {"method": pt["method"],
               "memory target": "-" if pt["method"] == "dense" else f"{pt['target']:g}",
               "measured memory": f"{100 * pt['share']:.1f}%"}
        for key in (metric, other):
            if pt[key] is None:
                row[key] = "-"
            else:
                row[key] = f"{pt[key]:.4f} ± {pt[f'{key}_std']:.4f}"
        if dense_pt and pt[metric] is not None and dense_pt[metric]:
            row["% of dense"] = f"{100 * pt[metric] / dense_pt[metric]:.1f}%"
        row["seeds"] = pt["seeds"]
        rows.append(row)
    _print_table(rows)
    write_json(os.path.join(out, name + ".json"),
               {"metric": metric, "dense": dense_pt, "points": points, "table": rows,
                "runs": [{k: r[k] for k in ("name", "method_config", "train_config", "final",
                                            "memory", "wall_time_s") if k in r}
                         for reps in groups.values() for r in reps]})
    from .report import can_plot

    if can_plot():
        p = plot_pareto(os.path.join(out, name + "-sweep.png"), points, metric, dense_pt,
                        title=f"{title}: {metric} at equal memory")
        print(f"\n{p}")
    return {"dense": dense_pt, "points": points}


def recipe_label(rep: dict) -> str:
    """The :data:`~dsl_train.methods.PRESETS` name a finished run's method config matches
    (``dsl`` with a non-default block size reads ``dsl (B=4)``)."""
    from .methods import PRESETS

    mc = rep["method_config"]
    base = MethodConfig(**{k: v for k, v in mc.items()
                           if k in MethodConfig.__dataclass_fields__}).to_dict()
    for name, fields in PRESETS.items():
        if name != "dsl" and all(base.get(k) == v for k, v in fields.items()):
            if name.startswith("static") and fields.get("mask_init") != base["mask_init"]:
                continue
            return name
    label = mc["method"]
    if label == "dsl" and mc["block_size"] != MethodConfig.block_size:
        label += f" (B={mc['block_size']})"
    return label


def cmd_gather(out: str, name: str) -> List[dict]:
    """The sweep table and plot of every finished run found in ``out`` (``<run>.json`` files
    written by ``dsl-train mf|lightgcn|sweep``), grouped by recipe and memory target: sweeps
    split over several processes (``--reuse``) are gathered in one place. Runs of different
    models (MF and LightGCN in one folder) get one table each, ``<name>-<model>``."""
    import glob
    import json

    by_task: dict = {}
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(path) as f:
            rep = json.load(f)
        if not isinstance(rep, dict) or "method_config" not in rep or "final" not in rep:
            continue  # a sweep summary, not a run
        by_task.setdefault(rep.get("task", "mf"), []).append(rep)
    if not by_task:
        raise ValueError(f"--gather: no run reports (*.json) in {out}")
    found = []
    for task, reps in sorted(by_task.items()):
        tag = name if len(by_task) == 1 else f"{name}-{task}"
        if len(by_task) > 1:
            print(f"\n{task}:")
        found += _gather_one(reps, out, tag)
    return found


def _gather_one(reps: List[dict], out: str, name: str) -> List[dict]:
    """:func:`cmd_gather` for the runs of one model."""
    groups: dict = {}
    metric = "auc" if reps[0].get("task") == "dlrm" else "recall@20"
    for rep in reps:
        share = rep.get("train_config", {}).get("memory")
        x = share if share is not None else rep["method_config"]["density"]
        groups.setdefault((recipe_label(rep), x), []).append(rep)
    groups = dict(sorted(groups.items(), key=lambda kv: (kv[0][0] != "dense", -kv[0][1],
                                                         kv[0][0])))
    _report_sweep(groups, metric, out, name, os.path.basename(os.path.abspath(out)))
    from .report import can_plot, plot_curves

    curves = {}
    for (label, x), group in groups.items():
        key = f"val_{metric}" if any(f"val_{metric}" in e for e in group[0]["epochs"]) else metric
        tag = label if label == "dense" else f"{label} @ {x:g}"
        curves[tag] = [e.get(key) for e in group[0]["epochs"]]
    if can_plot() and curves:
        p = plot_curves(os.path.join(out, name + "-curves.png"), curves,
                        f"validation {metric}", title="epochs to quality (seed of the first run)")
        print(p)
    return [r for group in groups.values() for r in group]


def cmd_sweep(a) -> List[dict]:
    """Quality at equal measured memory: every method of ``--methods`` at every point of
    ``--memory-points`` (or ``--densities``), each over ``--seeds``, plus dense; a table with
    mean ± std and a Pareto plot (metric against measured memory, dense as a reference)."""
    from .loop import resolve_memory, run_ctr, run_ranking

    if a.gather:
        return cmd_gather(a.out, a.name or "sweep-gathered")
    model = a.model
    seeds = [int(x) for x in str(a.seeds).split(",") if x.strip()]
    if model == "dlrm":
        train, test = load_ctr_data(a)
        run = lambda m: run_ctr(train, test, tcfg, m)
        metric, dname = "auc", train.name
        rows_total = sum(train.table_sizes)
    else:
        data = load_ranking_data(a.data, 0)
        print(data.summary(), flush=True)
        run = lambda m: run_ranking(data, tcfg, m)
        metric, dname = "recall@20", data.name
        rows_total = data.num_users + data.num_items
    run.data_name = dname
    configs = [] if a.no_dense else [("dense", None, _method_cfg(a, "dense", 1.0))]
    configs += _sweep_configs(a)
    groups: dict = {}
    for label, share, mcfg in configs:
        for seed in seeds:
            tcfg = _train_cfg(a, model)
            tcfg.seed, tcfg.name, tcfg.memory = seed, None, share
            if model != "dlrm":
                mcfg_r = resolve_memory(mcfg, tcfg, rows_total)
            else:
                mcfg_r = mcfg
            rep = _reuse_or_run(run, tcfg, mcfg_r, a.reuse)
            groups.setdefault((label, share if share is not None else mcfg_r.density),
                              []).append(rep)
    name = a.name or f"sweep-{model}-{dname}"
    _report_sweep(groups, metric, a.out, name, f"{model} on {dname}")
    return [r for reps in groups.values() for r in reps]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    from .data import DataError

    nproc = getattr(a, "nproc", 1)
    if nproc < 1:
        parser.error("--nproc must be >= 1")
    if getattr(a, "shard", None) and max(nproc, int(os.environ.get("WORLD_SIZE", "1"))) < 2:
        parser.error("--shard needs --nproc >= 2")
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(argv, nproc)

    t0 = time.perf_counter()
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    try:
        if a.command is None:
            cmd_demo()
        elif a.command in ("mf", "lightgcn", "dlrm"):
            cmd_train(a)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank()
                dist.barrier()
                dist.destroy_process_group()
                if rank == 0:
                    print(f"done in {time.perf_counter() - t0:.1f} s")
                # Worker processes end here without running C++ static destructors: gloo/DDP
                # background threads torn down at interpreter exit can abort() ("terminate
                # called without an active exception") after all work is done and saved.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        elif a.command == "stream":
            cmd_stream(a)
        elif a.command == "sweep":
            cmd_sweep(a)
    except (DataError, ValueError, RuntimeError) as e:
        print(f"dsl-train: error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
