"""Training loops: ranking (MF / LightGCN), CTR (DLRM) and prequential streams.

Each ``run_*`` function trains one configuration, shows a tqdm bar with the live loss and the
last metric, writes ``<out>/<name>.json`` and ``<out>/<name>.png`` and returns the report dict.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import report as rpt
from .data import CTRData, EventStream, InteractionData, events_to_split, stream_windows
from .methods import (Controller, MethodConfig, backends_in_use, make_collection, make_table,
                      resolve_memory, sparse_pools)
from .metrics import auc, log_loss, ranking_metrics, to_csr
from .models import DLRM, LightGCN, MF
from .protocol import BestSnapshot, dense_bytes


# The ranking recipe dsl-train uses without flags (MF and LightGCN), chosen on Gowalla's
# validation split (docs/RESULTS.md §0). The learning rate decays to 0 over the planned epochs
# (cosine) and patience is 5 evaluations: with a constant rate the validation curve kept
# creeping up with ±0.001 wobbles, and patience 3 stopped runs several epochs early.
RANKING_DEFAULTS = dict(epochs=20, batch_size=2048, lr=5e-3, reg=0.0, loss="softmax", tau=0.1,
                        negatives=512, sampling="interaction", lr_schedule="cosine",
                        val_fraction=0.1, patience=5)


@dataclass
class TrainConfig:
    """Model- and loop-level settings (the method's are in :class:`MethodConfig`)."""

    model: str = "mf"              # mf | lightgcn | dlrm
    epochs: int = 10
    batch_size: int = 2048
    lr: float = 1e-3
    reg: float = 1e-4              # L2 on the batch's embeddings (LightGCN's convention)
    dim: int = 64
    layers: int = 3                # LightGCN propagation layers
    k: int = 20                    # Recall@k / NDCG@k
    eval_every: int = 1
    eval_users: Optional[int] = None  # users sampled for intermediate evaluations (final: all)
    optimizer: str = "adam"
    fused: bool = False            # sparse tables: optimizer fused into the backward (lazy)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    out: str = "runs"
    name: Optional[str] = None
    plot: bool = True
    checkpoint: Optional[str] = None  # mf/lightgcn/dlrm: written at the end of every epoch
    resume: Optional[str] = None      # mf/lightgcn/dlrm: continue from this checkpoint
    # Ranking recipe and protocol (see docs/RESULTS.md for how these defaults were chosen).
    loss: str = "bpr"              # ranking loss: "softmax" (sampled, cosine) or "bpr"
    tau: float = 0.1               # softmax temperature
    score: str = "masked"          # softmax: cosine over shared blocks ("masked") or "cosine"
    negatives: int = 1             # BPR: negatives per positive; softmax: shared per batch
    sampling: str = "interaction"  # batches of interactions, or "user": users drawn uniformly
    lr_schedule: str = "constant"  # or "cosine": lr decays to 0 over the planned steps
    val_fraction: float = 0.0      # share of each user's train items held out for selection
    patience: Optional[int] = None  # stop after this many evaluations without a better val
    memory: Optional[float] = None  # target share of the dense table's bytes (sets density/dim)
    shard: Optional[str] = None     # dlrm --nproc: "row_wise"/"table_wise" tables (torchrec)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return dev


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer_factory(tcfg: TrainConfig):
    """``model -> optimizer``. With ``tcfg.fused`` every sparse pool gets the fused
    backward+optimizer of ``dsl_kernels.fused`` (lazy Adam / Adagrad / SGD on the touched slots,
    no ``values.grad``) and the torch optimizer covers the other parameters only."""
    def make(model: nn.Module) -> torch.optim.Optimizer:
        skip = set()
        if tcfg.fused:
            from dsl_kernels.fused import fuse_optimizer

            for pool in sparse_pools(model):
                if getattr(pool, "fused_optimizer", None) is None:
                    fuse_optimizer(pool, tcfg.optimizer, lr=tcfg.lr)
                skip.add(id(pool.values))
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        if not params:
            # Everything is fused (MF / LightGCN): the loop still calls step(); a stateless
            # optimizer over a dummy parameter keeps that uniform.
            params = [nn.Parameter(torch.zeros(1))]
            return torch.optim.SGD(params, lr=0.0)
        if tcfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=tcfg.lr)
        if tcfg.optimizer == "adagrad":
            return torch.optim.Adagrad(params, lr=tcfg.lr)
        if tcfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=tcfg.lr)
        raise ValueError(f"--optimizer must be adam, adagrad or sgd, got {tcfg.optimizer!r}")
    return make


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _NoBar:
    """Stand-in when tqdm is not installed or the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety: never fail a run for it
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class NegativeSampler:
    """Uniform negative items, resampled (a few rounds) when they hit a user's positives."""

    def __init__(self, users: Tensor, items: Tensor, num_items: int, device: torch.device):
        self.num_items = num_items
        self.keys = torch.sort(users.to(device) * num_items + items.to(device)).values

    def _is_pos(self, users: Tensor, items: Tensor) -> Tensor:
        if self.keys.numel() == 0:
            return torch.zeros_like(users, dtype=torch.bool)
        q = users * self.num_items + items
        pos = torch.searchsorted(self.keys, q).clamp(max=self.keys.numel() - 1)
        return self.keys[pos] == q

    def sample(self, users: Tensor, n: int = 1) -> Tensor:
        """``[B]`` negatives (``n == 1``) or ``[B, n]``."""
        if n > 1:
            users = users.unsqueeze(1).expand(-1, n)
        neg = torch.randint(self.num_items, users.shape, device=users.device)
        for _ in range(8):
            bad = self._is_pos(users, neg)
            if not bool(bad.any()):
                break
            neg[bad] = torch.randint(self.num_items, (int(bad.sum()),), device=users.device)
        return neg


# ----------------------------------------------------------------------------- distributed


def dist_world() -> Tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LossModule(nn.Module):
    """``forward`` = ``model.loss``: DistributedDataParallel only all-reduces gradients of
    computations that go through ``forward``, and the ranking models train through ``loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model.loss(*args)


def _wrap_ddp(model: nn.Module, ctl: Controller, mcfg: MethodConfig, tcfg: TrainConfig,
              loss_module: bool) -> nn.Module:
    """Under torchrun: one rank's mask and optimizer state everywhere, then DDP (the pool's index
    buffers are excluded: they are derived from ``coord`` and rebuilt locally). Returns the
    module the training step calls (``model`` itself on one process)."""
    rank, world = dist_world()
    step = _LossModule(model) if loss_module else model
    if world == 1:
        return step
    if mcfg.method == "magnitude":
        raise ValueError("--nproc > 1: --method magnitude replaces the tables mid-run, which DDP "
                         "cannot follow; use dsl, static, dense or dense_to_sparse")
    if tcfg.fused:
        raise ValueError("--nproc > 1: --fused updates the tables inside the backward, before "
                         "DDP averages the gradients; drop --fused")
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dsl_kernels.distributed import ddp_ignore_pool_buffers, sync_mask_

    sync_mask_(model, 0, ctl.optimizer)
    ddp_ignore_pool_buffers(step)
    dev = next(model.parameters()).device
    return DDP(step, device_ids=[dev.index if dev.index is not None
                                 else torch.cuda.current_device()] if dev.type == "cuda" else None)


def _replica_check(model: nn.Module, ctl: Controller) -> list:
    """Names of the parameters, buffers and optimizer states that differ from rank 0's at the
    end of the run (expected: none). One broadcast of the state: once per run, not per step."""
    from dsl_kernels.distributed import check_replicas_in_sync

    return check_replicas_in_sync(model, ctl.optimizer, raise_error=False)


def _shard(num_batches: int) -> list:
    """Batch numbers this rank trains on: every world-th batch, the same count on every rank
    (DDP's collectives need equal step counts), wrapping around when there are fewer batches
    than ranks."""
    rank, world = dist_world()
    if world == 1:
        return list(range(num_batches))
    steps = max(1, num_batches // world)
    return [(rank + world * i) % num_batches for i in range(steps)]


# ----------------------------------------------------------------------------- checkpoints



def _end_epoch(rep, row, trained_bytes, note, tcfg, mcfg, model, ctl, ep, best=None) -> None:
    """Record one finished epoch (shared by the ranking and CTR loops) and checkpoint it
    (``best``: the selection protocol's snapshot state, resumed with the run)."""
    row["embedding_total_bytes"] = trained_bytes  # what this epoch trained with
    if note:
        row["note"] = note
    rep["epochs"].append(row)
    _save_checkpoint(tcfg, mcfg, model, ctl, ep + 1, rep["epochs"], best)


def _end_run(rep, t_run, world, model, ctl) -> None:
    """Wall time and, for data-parallel runs, the replica check of a finished run."""
    rep["wall_time_s"] = time.perf_counter() - t_run
    if world > 1:
        rep["world_size"] = world
        rep["replica_mismatches"] = _replica_check(model, ctl)

def _save_checkpoint(tcfg: TrainConfig, mcfg: MethodConfig, model: nn.Module, ctl: Controller,
                     epoch: int, history: list, best=None) -> None:
    """Write ``tcfg.checkpoint`` after ``epoch`` completed epochs (atomic: a crash mid-write
    keeps the previous file). Global RNG states go in through ``dsl_kernels.save``; the
    scheduler's own generator is in its state dict; everything else the loop needs to go on is
    in ``extra``."""
    if tcfg.checkpoint and tcfg.shard:
        return _save_sharded_checkpoint(tcfg, mcfg, model, ctl, epoch, history)
    if not tcfg.checkpoint or dist_world()[0] != 0:
        return
    import dsl_kernels

    dsl_kernels.save(tcfg.checkpoint, model, ctl.optimizer, ctl.scheduler, epoch=epoch,
                     history=history, model_kind=tcfg.model, method=mcfg.method,
                     pruned=ctl.pruned, best=best)


def _load_checkpoint(tcfg: TrainConfig, mcfg: MethodConfig, model: nn.Module,
                     ctl: Controller) -> Tuple[int, list, dict]:
    """Restore ``tcfg.resume`` into ``model`` / ``ctl``; returns (epochs done, history rows,
    the checkpoint's ``extra``)."""
    import dsl_kernels
    from dsl_kernels.checkpoint import read_payload

    if tcfg.shard:
        return _load_sharded_checkpoint(tcfg, mcfg, model, ctl)
    meta = read_payload(tcfg.resume).get("extra", {})
    for key, want in (("model_kind", tcfg.model), ("method", mcfg.method)):
        if key in meta and meta[key] != want:
            raise ValueError(f"--resume {tcfg.resume}: the checkpoint is a {key.split('_')[0]} "
                             f"{meta[key]!r} run, this run is {want!r}")
    if meta.get("pruned") and not ctl.pruned:
        # Magnitude runs change the tables at the prune epoch: rebuild that structure first so
        # the checkpoint's state dict fits, then overwrite it.
        ctl.end_epoch(ctl.prune_epoch - 1)
    extra = dsl_kernels.load(tcfg.resume, model, ctl.optimizer, ctl.scheduler)
    epoch = int(extra["epoch"])
    if epoch > tcfg.epochs:
        raise ValueError(f"--resume {tcfg.resume}: the checkpoint has {epoch} epochs done, "
                         f"more than --epochs {tcfg.epochs}")
    return epoch, [dict(r) for r in extra.get("history", [])], extra


# Options that never change a run's result (where it writes, how it shows progress).
_NAME_IGNORES = {"name", "out", "progress", "plot", "checkpoint", "resume", "device", "seed"}


def _run_name(tcfg: TrainConfig, mcfg: MethodConfig, data_name: str) -> str:
    """``<model>-<data>-<method>[-d<density>|-dim<dim>][-<mask>]-<hash>-s<seed>``: readable
    parts plus a short hash of every option that can change the result, so two runs that differ
    in any of them (dim, lr, epochs, ...) never share a name and overwrite each other's JSON."""
    if tcfg.name:
        return tcfg.name
    import hashlib
    import json

    d = f"-d{mcfg.density:.4g}" if mcfg.sparse else ""
    if mcfg.method == "dense_small" and mcfg.dim is not None:
        d = f"-dim{mcfg.dim}"
    if mcfg.sparse and mcfg.mask_init != "random":
        d += f"-{mcfg.mask_init}"
    opts = {k: v for k, v in asdict(tcfg).items() if k not in _NAME_IGNORES}
    opts.update({f"m.{k}": v for k, v in mcfg.to_dict().items()})
    h = hashlib.sha1(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{tcfg.model}-{data_name}-{mcfg.method}{d}-{h}-s{tcfg.seed}"


def _base_report(task: str, tcfg: TrainConfig, mcfg: MethodConfig, data_summary: str,
                 dev: torch.device) -> dict:
    return {"task": task, "data": data_summary, "device": str(dev),
            "torch": torch.__version__, "train_config": asdict(tcfg),
            "method_config": mcfg.to_dict(), "epochs": []}


def _ranking_batches(users: Tensor, items: Tensor, bs: int, sampling: str,
                     train_csr=None, epoch: int = 0, seed: int = 0):
    """Yield ``(users, positives)`` batches of one epoch (``ceil(n / bs)`` batches).

    ``sampling="interaction"``: a shuffled pass over the interactions (heavy users get more
    steps). ``"user"``: users drawn uniformly, each with one of its items (LightGCN's sampler; it
    weights users as Recall@K does). Under torchrun each rank takes its shard of the batches."""
    n = users.numel()
    rank, world = dist_world()
    if world > 1:
        # Every rank must shuffle alike to shard the same permutation, but the global RNG
        # drifts apart across ranks (negative sampling): a per-epoch generator.
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).to(users.device)
    else:
        perm = torch.randperm(n, device=users.device)
    if sampling == "user":
        ptr, cols = (t.to(users.device) for t in train_csr)
        active = torch.nonzero(ptr[1:] > ptr[:-1]).squeeze(1)
    for bi in _shard(math.ceil(n / bs)):
        if sampling == "user":
            m = min(bs, n - bi * bs)
            u = active[torch.randint(active.numel(), (m,), device=users.device)]
            start, cnt = ptr[u], ptr[u + 1] - ptr[u]
            off = (torch.rand(m, device=users.device) * cnt).long().clamp(max=cnt - 1)
            yield u, cols[start + off]
        else:
            idx = perm[bi * bs:bi * bs + bs]
            yield users[idx], items[idx]


def _set_lr(ctl: "Controller", model: nn.Module, lr: float) -> None:
    """Set the learning rate of the torch optimizer and of every fused pool optimizer."""
    for g in ctl.optimizer.param_groups:
        g["lr"] = lr
    for pool in sparse_pools(model):
        fo = getattr(pool, "fused_optimizer", None)
        if fo is None:
            continue
        if hasattr(fo, "set_learning_rate"):
            fo.set_learning_rate(lr)
        elif hasattr(fo, "lr"):
            fo.lr = lr


def _ranking_epoch(model, ctl, users, items, sampler, bs, reg, bar,
                   step_fn=None, epoch: int = 0, seed: int = 0, tcfg: TrainConfig = None,
                   train_csr=None, lr_at=None) -> Tuple[float, float]:
    """One BPR pass. ``step_fn(u, p, q, reg) -> (loss, bpr)`` defaults to ``model.loss`` (the
    DDP-wrapped loss under torchrun, where each rank trains its shard of the batches).
    ``lr_at(step) -> lr`` (optional) sets the learning rate before every step."""
    negatives = tcfg.negatives if tcfg is not None else 1
    sampling = tcfg.sampling if tcfg is not None else "interaction"
    step_fn = step_fn or model.loss
    tot = tot_b = 0.0
    steps = 0
    softmax = tcfg is not None and tcfg.loss == "softmax"
    for u, p in _ranking_batches(users, items, bs, sampling, train_csr, epoch, seed):
        # Softmax: one set of uniform negatives for the whole batch (a positive drawn among
        # them costs a little signal, no bias worth a rejection pass); BPR: per positive.
        q = (torch.randint(sampler.num_items, (negatives,), device=u.device) if softmax
             else sampler.sample(u, negatives))
        loss, b = step_fn(u, p, q, reg)
        ctl.zero_grad()
        loss.backward()
        if lr_at is not None:
            _set_lr(ctl, model, lr_at())
        ctl.step()
        steps += 1
        tot += float(loss.detach())
        tot_b += float(b.detach())
        bar.update(1)
        bar.set_postfix_str(f"loss={tot / steps:.4f}" + getattr(bar, "_metric", ""))
    return tot / max(1, steps), tot_b / max(1, steps)


def _eval_ranking(model, train_csr, test_csr, num_items, k, users=None) -> Dict[str, float]:
    model.eval()
    model.prepare_eval()
    try:
        m = ranking_metrics(model.score_users, train_csr, test_csr, num_items, k=k, users=users)
    finally:
        model.end_eval()
        model.train()
    return {f"recall@{k}": m["recall"], f"ndcg@{k}": m["ndcg"], "eval_users": m["users"]}


def build_ranking_model(tcfg: TrainConfig, mcfg: MethodConfig, num_users: int, num_items: int,
                        train_users: Tensor, train_items: Tensor, dev: torch.device) -> nn.Module:
    # Training occurrences of every row (users, then items): the frequency mask layout.
    counts = torch.cat([torch.bincount(train_users, minlength=num_users),
                        torch.bincount(train_items, minlength=num_items)])
    emb = make_table(mcfg, num_users + num_items, tcfg.dim, device=dev, row_counts=counts)
    if tcfg.model == "mf":
        return MF(num_users, num_items, emb, tcfg.loss, tcfg.tau, tcfg.score)
    if tcfg.model == "lightgcn":
        return LightGCN(num_users, num_items, emb, train_users, train_items, tcfg.layers,
                        tcfg.loss, tcfg.tau)
    raise ValueError(f"ranking model must be mf or lightgcn, got {tcfg.model!r}")


def _lr_fn(tcfg: TrainConfig, total_steps: int, counter: list):
    """``() -> lr`` for the next step (``counter[0]`` steps done so far), or None when the
    learning rate is constant."""
    if tcfg.lr_schedule == "constant":
        return None
    if tcfg.lr_schedule != "cosine":
        raise ValueError(f"--lr-schedule must be constant or cosine, got {tcfg.lr_schedule!r}")

    def lr_at() -> float:
        t = counter[0]
        counter[0] += 1
        return tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    return lr_at


def run_ranking(data: InteractionData, tcfg: TrainConfig, mcfg: MethodConfig) -> dict:
    """Train MF or LightGCN with BPR on ``data``; Recall/NDCG@k on the test split.

    With ``tcfg.val_fraction > 0`` the run follows the selection protocol: a validation split is
    carved out of train (the same split for every seed), evaluations during training score it,
    the epoch with the best validation Recall@k (among epochs trained at the final memory) is
    kept, and the test split is scored once, on that epoch's model. ``tcfg.patience`` stops the
    run early after that many evaluations without a better validation score."""
    if data.num_train == 0:
        raise ValueError(f"{data.name}: no training interactions")
    protocol = tcfg.val_fraction > 0
    full_train = (data.train_users, data.train_items)
    if protocol and data.val_users is None:
        data = data.with_validation(tcfg.val_fraction, seed=0)
    seed_all(tcfg.seed)
    dev = pick_device(tcfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tu, ti = data.train_users.to(dev), data.train_items.to(dev)
    mcfg = resolve_memory(mcfg, tcfg, data.num_users + data.num_items)
    model = build_ranking_model(tcfg, mcfg, data.num_users, data.num_items, data.train_users,
                                data.train_items, dev)
    steps_per_epoch = len(_shard(math.ceil(data.num_train / tcfg.batch_size)))
    total_steps = steps_per_epoch * tcfg.epochs
    ctl = Controller(mcfg, model, make_optimizer_factory(tcfg), total_steps, tcfg.epochs)
    rank, world = dist_world()
    step_fn = _wrap_ddp(model, ctl, mcfg, tcfg, loss_module=True) if world > 1 else None
    sampler = NegativeSampler(tu, ti, data.num_items, dev)
    train_csr = to_csr(data.train_users, data.train_items, data.num_users)
    test_csr = to_csr(data.test_users, data.test_items, data.num_users)
    if protocol:
        val_csr = to_csr(data.val_users, data.val_items, data.num_users)
        test_excl = to_csr(*full_train, data.num_users)   # rank test against the whole train
    eval_sample = None
    if tcfg.eval_users and tcfg.eval_users < data.num_users:
        g = torch.Generator().manual_seed(tcfg.seed + 7)
        eval_sample = torch.randperm(data.num_users, generator=g)[:tcfg.eval_users]
    name = _run_name(tcfg, mcfg, data.name)
    rep = _base_report(tcfg.model, tcfg, mcfg, data.summary(), dev)
    rep["name"] = name
    rep["backends"] = backends_in_use(model)
    k = tcfg.k
    t_run = time.perf_counter()
    start = 0
    last = {}
    best = BestSnapshot()
    if tcfg.resume:
        start, rep["epochs"], extra = _load_checkpoint(tcfg, mcfg, model, ctl)
        if extra.get("best") is not None:
            best.load_state_dict(extra["best"])
        evals = [r for r in rep["epochs"] if f"recall@{k}" in r]
        if evals:
            last = {key: evals[-1][key] for key in (f"recall@{k}", f"ndcg@{k}", "eval_users")}
    lr_counter = [start * steps_per_epoch]
    lr_at = _lr_fn(tcfg, total_steps, lr_counter)
    bar = _bar(steps_per_epoch * (tcfg.epochs - start), name, tcfg.progress and rank == 0)
    bar._metric = ""
    stale_evals = 0
    for ep in range(start, tcfg.epochs):
        _sync(dev)
        t0 = time.perf_counter()
        loss, b = _ranking_epoch(model, ctl, tu, ti, sampler, tcfg.batch_size, tcfg.reg, bar,
                                 step_fn, ep, tcfg.seed, tcfg, train_csr, lr_at)
        trained_bytes = rpt.memory_report(model, ctl.optimizer)["embedding_total_bytes"]
        note = ctl.end_epoch(ep)
        _sync(dev)
        row = {"epoch": ep + 1, "loss": loss, "bpr": b, "time_s": time.perf_counter() - t0}
        final = ep + 1 == tcfg.epochs
        stop = False
        if rank == 0 and (final or (tcfg.eval_every and (ep + 1) % tcfg.eval_every == 0)):
            t1 = time.perf_counter()
            if protocol:
                # Validation drives the selection: same users (the sample, if any) every time.
                m = _eval_ranking(model, train_csr, val_csr, data.num_items, k, eval_sample)
                row.update({f"val_{key}": v for key, v in m.items()})
                if ctl.at_budget():
                    if best.offer(model, ep + 1, m[f"recall@{k}"], row):
                        stale_evals = 0
                    else:
                        stale_evals += 1
                stop = tcfg.patience is not None and stale_evals >= tcfg.patience
                bar._metric = f" val R@{k}={m[f'recall@{k}']:.4f}"
            else:
                last = _eval_ranking(model, train_csr, test_csr, data.num_items, k,
                                     None if final else eval_sample)
                row.update(last)
                bar._metric = f" R@{k}={last[f'recall@{k}']:.4f}"
            row["eval_time_s"] = time.perf_counter() - t1
        row.update(ctl.stats())
        _end_epoch(rep, row, trained_bytes, note, tcfg, mcfg, model, ctl, ep,
                   best.state_dict() if protocol else None)
        if not tcfg.progress and rank == 0:  # no bar: one line per epoch for logs
            shown = {key: round(v, 4) for key, v in row.items() if isinstance(v, float)
                     and ("recall" in key or "ndcg" in key or key in ("loss", "time_s"))}
            print(f"{name} epoch {ep + 1}/{tcfg.epochs}: {shown}", flush=True)
        if stop:
            rep["stopped_early_after_epoch"] = ep + 1
            break
    bar.close()
    _end_run(rep, t_run, world, model, ctl)
    if protocol and rank == 0:
        # The selected epoch's model, scored once on test.
        final_model_stats = ctl.stats()
        best.restore(model)
        t1 = time.perf_counter()
        last = _eval_ranking(model, test_excl, test_csr, data.num_items, k)
        rep["selection"] = {"metric": f"val_recall@{k}", "selected_epoch": best.epoch,
                            f"val_recall@{k}": best.metric,
                            f"val_ndcg@{k}": best.row.get(f"val_ndcg@{k}"),
                            "test_eval_time_s": time.perf_counter() - t1,
                            "epochs_run": len(rep["epochs"])}
        del final_model_stats
    rep["final"] = {key: last.get(key) for key in (f"recall@{k}", f"ndcg@{k}")}
    if protocol:
        rep["final"][f"val_recall@{k}"] = best.metric if best.epoch else None
        rep["final"]["selected_epoch"] = best.epoch
    rep["final"]["density"] = ctl.stats()["density"]
    rep["memory"] = rpt.memory_report(model, ctl.optimizer, ctl.scheduler, dev)
    rep["memory"]["max_embedding_total_bytes"] = max(r["embedding_total_bytes"]
                                                     for r in rep["epochs"])
    rep["memory"]["share_of_full_dense"] = rep["memory"]["embedding_total_bytes"] / max(
        1, dense_bytes(data.num_users + data.num_items, tcfg.dim, tcfg.optimizer))
    key = f"val_recall@{k}" if protocol else f"recall@{k}"
    return _save(rep, tcfg, {f"{mcfg.method}": [r.get(key) for r in rep["epochs"]]}, key)


def _save(rep: dict, tcfg: TrainConfig, curves: Dict[str, Sequence], metric: str) -> dict:
    if dist_world()[0] != 0:  # under torchrun only rank 0 reports
        rep["files"] = {}
        return rep
    os.makedirs(tcfg.out, exist_ok=True)
    base = os.path.join(tcfg.out, rep["name"])
    rep["files"] = {"json": base + ".json"}
    if tcfg.plot and rpt.can_plot():
        rep["files"]["plot"] = rpt.plot_curves(base + ".png", curves, metric,
                                               title=rep["name"])
    rpt.write_json(base + ".json", rep)
    return rep


# ----------------------------------------------------------------------------- CTR


@torch.no_grad()
def _eval_ctr(model, data: CTRData, dev, bs: int = 8192) -> Dict[str, float]:
    model.eval()
    probs = []
    for lo in range(0, len(data), bs):
        logit = model(data.dense[lo:lo + bs].to(dev), data.sparse[lo:lo + bs].to(dev))
        probs.append(torch.sigmoid(logit).float().cpu())
    model.train()
    p = torch.cat(probs) if probs else torch.zeros(0)
    return {"auc": auc(p, data.labels), "logloss": log_loss(p, data.labels)}


def run_ctr(train: CTRData, test: CTRData, tcfg: TrainConfig, mcfg: MethodConfig) -> dict:
    """Train the DLRM-style model with BCE; AUC and log-loss on ``test`` after every epoch.
    Rows are visited in order (a stream), one pass per epoch."""
    if len(train) == 0:
        raise ValueError(f"{train.name}: no training rows")
    seed_all(tcfg.seed)
    dev = pick_device(tcfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if tcfg.shard:
        model = _sharded_dlrm(train, tcfg, mcfg, dev)  # DistributedModelParallel
        # whole batches only: the ranks' batches must be equal for the row-wise collectives
        batches = _shard(max(1, len(train) // tcfg.batch_size))
    else:
        tables = make_collection(mcfg, train.table_sizes, train.feature_names, tcfg.dim,
                                 device=dev)
        model = DLRM(train.dense.shape[1], tables, tcfg.dim).to(dev)
        batches = _shard(math.ceil(len(train) / tcfg.batch_size))
    steps_per_epoch = len(batches)
    ctl = Controller(mcfg, model, make_optimizer_factory(tcfg), steps_per_epoch * tcfg.epochs,
                     tcfg.epochs)
    rank, world = dist_world()
    step_model = model if tcfg.shard else _wrap_ddp(model, ctl, mcfg, tcfg, loss_module=False)
    name = tcfg.name or (_run_name(tcfg, mcfg, train.name) + ("-skip" if mcfg.skip_stale else ""))
    rep = _base_report("dlrm", tcfg, mcfg, f"{train.name}: {len(train):,} train / "
                       f"{len(test):,} test rows, {len(train.table_sizes)} tables, "
                       f"{sum(train.table_sizes):,} rows in all", dev)
    rep["name"] = name
    rep["backends"] = backends_in_use(model)
    dense, sparse, labels = train.dense.to(dev), train.sparse.to(dev), train.labels.to(dev)
    bce = nn.BCEWithLogitsLoss()
    start = 0
    last = {}
    if tcfg.resume:
        start, rep["epochs"], _ = _load_checkpoint(tcfg, mcfg, model, ctl)
        if rep["epochs"]:
            last = {key: rep["epochs"][-1][key] for key in ("auc", "logloss")}
    bar = _bar(steps_per_epoch * (tcfg.epochs - start), name, tcfg.progress and rank == 0)
    metric = ""
    t_run = time.perf_counter()
    for ep in range(start, tcfg.epochs):
        _sync(dev)
        t0 = time.perf_counter()
        tot, steps = 0.0, 0
        for bi in batches:
            sl = slice(bi * tcfg.batch_size, (bi + 1) * tcfg.batch_size)
            logit = step_model(dense[sl], sparse[sl])
            loss = bce(logit, labels[sl])
            ctl.zero_grad()
            loss.backward()
            ctl.step()
            tot += float(loss.detach())
            steps += 1
            bar.update(1)
            bar.set_postfix_str(f"loss={tot / steps:.4f}{metric}")
        trained_bytes = rpt.memory_report(model, ctl.optimizer)["embedding_total_bytes"]
        note = ctl.end_epoch(ep)
        _sync(dev)
        dt = time.perf_counter() - t0
        if rank == 0 or tcfg.shard:  # rank 0 evaluates (sharded: every rank, collectives)
            last = _eval_ctr(model, test, dev)
            metric = f" auc={last['auc']:.4f}"
        else:
            last = {"auc": float("nan"), "logloss": float("nan")}
        row = {"epoch": ep + 1, "loss": tot / max(1, steps), "time_s": dt,
               "step_time_ms": 1000 * dt / max(1, steps), **last, **ctl.stats()}
        _end_epoch(rep, row, trained_bytes, note, tcfg, mcfg, model, ctl, ep)
    bar.close()
    _end_run(rep, t_run, world, model, ctl)
    rep["final"] = dict(last)
    rep["final"].update({k: v for k, v in ctl.stats().items()})
    rep["memory"] = rpt.memory_report(model, ctl.optimizer, ctl.scheduler, dev)
    rep["memory"]["max_embedding_total_bytes"] = max(r["embedding_total_bytes"]
                                                     for r in rep["epochs"])
    return _save(rep, tcfg, {mcfg.method: [r["auc"] for r in rep["epochs"]]}, "auc")


# ----------------------------------------------------------------------------- sharded CTR


class _KJTTables(nn.Module):
    """DLRM's tables as one torchrec collection (sharded by DMP): ``[B, F]`` ids -> ``[B, F, D]``."""

    def __init__(self, collection: nn.Module, names: Sequence[str], dim: int):
        super().__init__()
        self.collection, self.names, self.dim = collection, list(names), dim

    def forward(self, x: Tensor) -> Tensor:
        from dsl_kernels.torchrec import ids_to_kjt

        kt = self.collection(ids_to_kjt(x, self.names))
        return kt.values().view(x.shape[0], len(self.names), self.dim)


def _sharded_dlrm(train: CTRData, tcfg: TrainConfig, mcfg: MethodConfig, dev) -> nn.Module:
    """``--shard``: the DLRM with its tables sharded by torchrec (``dsl_kernels.torchrec``), the
    same initial tables and mask as the one-process model; the MLPs data-parallel."""
    if mcfg.method not in ("dsl", "static"):
        raise ValueError(f"--shard: --method dsl or static (sparse from the first step), got "
                         f"{mcfg.method!r}")
    import dsl_kernels
    from dsl_kernels.torchrec import shard_model
    from torchrec import EmbeddingBagConfig

    names, sizes = train.feature_names, train.table_sizes
    base = make_collection(mcfg, sizes, names, tcfg.dim, device=dev).collection
    ebc = dsl_kernels.SparseEmbeddingBagCollection.from_torchrec(
        [EmbeddingBagConfig(name=n, num_embeddings=s, embedding_dim=tcfg.dim, feature_names=[n])
         for n, s in zip(names, sizes)], density=mcfg.density, block_size=mcfg.block_size,
        backend=mcfg.backend, device=dev)
    ebc.load_state_dict(base.state_dict())
    model = DLRM(train.dense.shape[1], _KJTTables(ebc, names, tcfg.dim), tcfg.dim).to(dev)
    dmp = shard_model(model, tcfg.shard, device=dev)
    dmp.embedding_modules = model.embedding_modules  # the reports find the (sharded) tables
    return dmp


def _save_sharded_checkpoint(tcfg, mcfg, model, ctl, epoch: int, history: list) -> None:
    """Every rank writes its shards (torch.distributed.checkpoint) into a fresh folder that
    then replaces ``tcfg.checkpoint``: a crash mid-write keeps the previous checkpoint."""
    import shutil

    import torch.distributed as dist
    from dsl_kernels.torchrec import save_sharded

    tmp, old = tcfg.checkpoint + ".writing", tcfg.checkpoint + ".old"
    if dist.get_rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    save_sharded(tmp, model, ctl.optimizer, ctl.scheduler,
                 extra={"epoch": epoch, "history": history, "model_kind": tcfg.model,
                        "method": mcfg.method, "shard": tcfg.shard})
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(tcfg.checkpoint):
            os.replace(tcfg.checkpoint, old)
        os.replace(tmp, tcfg.checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_sharded_checkpoint(tcfg, mcfg, model, ctl) -> Tuple[int, list, dict]:
    from dsl_kernels.torchrec import load_sharded

    extra = load_sharded(tcfg.resume, model, ctl.optimizer, ctl.scheduler)
    for key, want in (("model_kind", tcfg.model), ("method", mcfg.method),
                      ("shard", tcfg.shard)):
        if extra.get(key) != want:
            raise ValueError(f"--resume {tcfg.resume}: the checkpoint has {key}="
                             f"{extra.get(key)!r}, this run {want!r}")
    epoch = int(extra["epoch"])
    if epoch > tcfg.epochs:
        raise ValueError(f"--resume {tcfg.resume}: the checkpoint has {epoch} epochs done, "
                         f"more than --epochs {tcfg.epochs}")
    return epoch, [dict(r) for r in extra["history"]], extra


# ----------------------------------------------------------------------------- streams

STREAM_VARIANTS = ("dense", "adaptive", "frozen", "static")


def stream_method(variant: str, mcfg: MethodConfig) -> MethodConfig:
    """The method config of a stream variant: ``dense``; ``adaptive`` (DSL mask updates continue
    over the whole stream); ``frozen`` (DSL mask updates during the first window only, then the
    mask is frozen); ``static`` (random mask, never updated)."""
    d = mcfg.to_dict()
    if variant == "dense":
        d.update(method="dense", density=1.0)
    elif variant in ("adaptive", "frozen"):
        d.update(method="dsl")
    elif variant == "static":
        d.update(method="static")
    else:
        raise ValueError(f"stream variants are {', '.join(STREAM_VARIANTS)}, got {variant!r}")
    return MethodConfig(**d)


def run_stream(stream: EventStream, num_windows: int, variant: str, tcfg: TrainConfig,
               mcfg: MethodConfig) -> dict:
    """Prequential MF-BPR on a time-ordered stream: for each window ``t`` train ``epochs``
    passes on it, then rank all items the user has not interacted with so far and score the
    user's new items of window ``t + 1`` (Recall/NDCG@k)."""
    windows = stream_windows(stream, num_windows)
    seed_all(tcfg.seed)
    dev = pick_device(tcfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    m = stream_method(variant, mcfg)
    nu, ni = stream.num_users, stream.num_items
    model = MF(nu, ni, make_table(m, nu + ni, tcfg.dim, device=dev))
    steps = [tcfg.epochs * math.ceil(len(events_to_split(*w)[0]) / tcfg.batch_size)
             for w in windows[:-1]]
    total = sum(steps)
    stop = steps[0] if variant == "frozen" else total
    ctl = Controller(m, model, make_optimizer_factory(tcfg), total, tcfg.epochs, stop_step=stop)
    k = tcfg.k
    name = tcfg.name or f"stream-{stream.name}-{variant}" + (
        f"-d{m.density:g}" if m.sparse else "") + f"-s{tcfg.seed}"
    rep = _base_report("stream", tcfg, m, f"{stream.name}: {len(stream):,} events, {nu:,} users, "
                       f"{ni:,} items, {num_windows} windows", dev)
    rep.update(name=name, variant=variant, backends=backends_in_use(model))
    seen_u = torch.zeros(0, dtype=torch.int64)
    seen_i = torch.zeros(0, dtype=torch.int64)
    bar = _bar(total, name, tcfg.progress)
    bar._metric = ""
    t_run = time.perf_counter()
    for t in range(num_windows - 1):
        wu, wi = events_to_split(*windows[t])
        seen_u, seen_i = events_to_split(torch.cat([seen_u, wu]), torch.cat([seen_i, wi]))
        sampler = NegativeSampler(seen_u, seen_i, ni, dev)
        _sync(dev)
        t0 = time.perf_counter()
        loss = float("nan")
        for _ in range(tcfg.epochs):
            loss, _ = _ranking_epoch(model, ctl, wu.to(dev), wi.to(dev), sampler,
                                     tcfg.batch_size, tcfg.reg, bar)
        _sync(dev)
        dt = time.perf_counter() - t0
        # Next window's new interactions are the test set; everything seen so far is excluded.
        nu_, ni_ = events_to_split(*windows[t + 1])
        seen_keys = seen_u * ni + seen_i
        new = ~torch.isin(nu_ * ni + ni_, seen_keys)
        met = _eval_ranking(model, to_csr(seen_u, seen_i, nu), to_csr(nu_[new], ni_[new], nu),
                            ni, k)
        bar._metric = f" R@{k}={met[f'recall@{k}']:.4f}"
        rep["epochs"].append({"window": t + 1, "loss": loss, "time_s": dt, **met, **ctl.stats()})
    bar.close()
    rep["wall_time_s"] = time.perf_counter() - t_run
    recs = [r[f"recall@{k}"] for r in rep["epochs"] if r[f"recall@{k}"] == r[f"recall@{k}"]]
    ndcgs = [r[f"ndcg@{k}"] for r in rep["epochs"] if r[f"ndcg@{k}"] == r[f"ndcg@{k}"]]
    rep["final"] = {f"prequential_recall@{k}": sum(recs) / max(1, len(recs)),
                    f"prequential_ndcg@{k}": sum(ndcgs) / max(1, len(ndcgs)),
                    "density": ctl.stats()["density"]}
    rep["memory"] = rpt.memory_report(model, ctl.optimizer, ctl.scheduler, dev)
    return _save(rep, tcfg, {variant: [r[f"recall@{k}"] for r in rep["epochs"]]}, f"recall@{k}")
