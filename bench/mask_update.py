"""Cost of one DSL mask update (prune + regrow + optimizer-state reset + index rebuild) against one
training step, and the memory it needs on top of the steady state.

Usage::

    python -m bench.mask_update            # CPU here, CUDA when a GPU is visible
    python -m bench.mask_update --quick    # smaller tables (smoke)

Setup per row: ``SparseEmbeddingBag(N, 64, mode="sum", block_size=8, density=0.1,
mask_init="random")``, Adam,
``--bags`` bags of ``--bag-size`` uniform indices, loss ``out.pow(2).sum()``;
``DSLScheduler(update_every=1, score_window=1, grow=..., keep_rows=False)`` so every step is an
update, the gradient scores of the step's batch feed it and any block may be pruned (with the
library's default ``keep_rows=True`` each row's first block is protected, which at this density
would leave few blocks to move; ``dsl::prune_regrow_`` with ``keep_first`` took ~22 ms against
~11 ms without at 1e6 slots, k = 1e5, random columns, one thread on the loaded dev box).

Columns:

* ``train ms``: one training step (zero_grad, forward, backward, Adam step) WITHOUT the
  scheduler; ``optimizer``: ``torch Adam`` or ``fused adam`` (``dsl_kernels.fused``, cpu
  backend only: the issue's yardstick is one update against one fused step); ``+scores ms``:
  the same step while the scheduler collects gradient scores (the
  ``dsl::grow_scores`` observer runs in the backward; only the ``score_window`` batches before an
  update pay it);
* ``update ms``: ``scheduler.step()`` at an update (the update itself); ``update/train``: ratio;
* ``moved``: blocks moved by the update (``k``, capped by the number of scored candidates);
* ``steady MB``: values + gradient + Adam state + coord + row index;
* ``update peak MB``: net extra memory alive at once during the update (on CUDA the old row
  index is dropped before the new one is built, which counts; on the cpu backend the index is
  updated in place), ``peak/steady``: ``(steady + update peak) / steady`` (the issue's target
  is <= 1.05); ``recorder MB``: the same seen by the dispatch-mode recorder (CPU only, see
  below); ``op peak MB``: the peak of ``dsl::prune_regrow_`` alone (without the index update
  and optimizer reset).

Memory on CUDA: ``torch.cuda.max_memory_allocated`` (exact). On CPU: the torch profiler's
allocation records (``tests/memcheck.py::allocator_peak_bytes``): every torch allocation,
including the scratch of the C++ kernels (all of it is ``at::empty``) and temporaries inside
aten kernels; frees of tensors allocated before the update are not recorded, so it is an upper
bound where the update drops such tensors (the reference backend's index rebuild). ``recorder
MB``: the dispatch-mode recorder, which sees only the tensors ops return but credits the freed
old index.

A second table times stale-slot skipping: the hottest slots receiving half of the slot updates
(Zipf(1.05) indices) frozen vs none frozen, with the scheduler's hold/restore included; with a
torch optimizer (the dense step still sweeps every slot) and with the fused optimizer of
``dsl_kernels.fused`` (which skips frozen slots itself).

Writes ``bench/results/mask_update_<device>.md`` and prints the tables.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from bench.common import device_tag, env_header, markdown_table, write_report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _ms(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _opt_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _peak_extra(fn, device: str, watch=None, allocator: bool = True) -> int:
    """Net bytes alive at once on top of what existed before ``fn``. CUDA: the caching
    allocator's peak. CPU, ``allocator=True``: the torch profiler's allocation records (every
    torch allocation, inside C++ and aten kernels too; frees of tensors allocated before ``fn``
    are not recorded, so an upper bound where ``fn`` drops such tensors); ``allocator=False``:
    the dispatch-mode recorder (only the tensors ops return, but ``watch()`` names pre-existing
    tensors whose freeing inside ``fn`` counts, e.g. the old row index)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from memcheck import AllocationRecorder, allocator_peak_bytes

    if allocator:
        return allocator_peak_bytes(fn)
    with AllocationRecorder() as rec:
        if watch is not None:
            rec.watch(*watch())
        fn()
    return rec.peak_bytes


def run_case(N: int, D: int, B: int, density: float, frac: float, grow: str, backend: str,
             device: str, bags: int, bag_size: int, iters: int, fused: bool = False) -> dict:
    from dsl_kernels import SparseEmbeddingBag
    from dsl_kernels.sparsity import DSLScheduler
    from dsl_kernels.sparsity.prune_regrow import prune_regrow_
    from dsl_kernels.sparsity.scores import sample_inactive_blocks

    torch.manual_seed(0)
    # Random columns (the workload of issue 14): with the default aligned mask (each row's
    # blocks in its first columns) this loss has no gradient outside those columns, so gradient
    # growth finds ~16,000 candidates at N = 1e6 and moves a fifth of the requested blocks.
    emb = SparseEmbeddingBag(N, D, mode="sum", density=density, block_size=B, device=device,
                             backend=backend, mask_init="random")
    if fused:  # dsl_kernels.fused: Adam inside the backward, state on the module
        from dsl_kernels.fused import fuse_optimizer

        fo = fuse_optimizer(emb, "adam", lr=1e-3)
        opt = None
    else:
        opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)

    def batch():
        return torch.randint(0, N, (bags, bag_size), device=device, generator=g)

    def train():
        if opt is not None:
            opt.zero_grad()
        emb(batch()).pow(2).sum().backward()
        if opt is not None:
            opt.step()

    for _ in range(2):
        train()
    t_train = statistics.median(_ms(train, device) for _ in range(iters))
    if fused:  # no values.grad; the state lives on the module
        steady = emb.memory_bytes() + fo.state_bytes()
    else:
        steady = (emb.memory_bytes() + _opt_bytes(opt)
                  + emb.values.numel() * emb.values.element_size())

    # keep_rows=False: the workload prunes any 10 % of the blocks (random columns, most
    # rows at one block, which the default keep_rows=True would protect: little would move).
    sched = DSLScheduler(emb, opt, update_every=1, prune_fraction=frac, stop_at=10 ** 9,
                         score_window=1, grow=grow, keep_rows=False)
    t_scores, t_update, moved, peak, peak_rec = [], [], [], 0, 0
    for i in range(iters + 2):
        t_s = _ms(train, device)
        m0 = sched.stats()["moved_blocks"]
        if i == 0:  # warm-up update, and the memory measurements on the next two
            sched.step()
            continue
        if i == 1:
            peak = _peak_extra(sched.step, device)
        elif i == 2:
            peak_rec = _peak_extra(sched.step, device,
                                   lambda: (emb.row_ptr, emb.row_slots, emb.row_mask),
                                   allocator=False)
        else:
            t_scores.append(t_s)
            t_update.append(_ms(sched.step, device))
        moved.append(sched.stats()["moved_blocks"] - m0)

    # prune_regrow_ alone, with as many random candidates as the update moved.
    k = int(statistics.median(moved))
    keys = sample_inactive_blocks(emb, emb.tables, k, torch.Generator().manual_seed(1))
    scores = torch.rand(keys.numel(), device=device)
    with torch.no_grad():
        op_peak = _peak_extra(lambda: prune_regrow_(emb.values, emb.coord, emb.row_mask, keys,
                                                    scores, k, emb.num_blocks, None, backend),
                              device)
    emb.rebuild_index()
    sched.close()
    upd = statistics.median(t_update)
    return {"N": N, "D": D, "B": B, "density": density, "alpha": frac, "grow": grow,
            "backend": backend, "optimizer": "fused adam" if fused else "torch Adam",
            "train ms": t_train, "+scores ms": statistics.median(t_scores),
            "update ms": upd, "update/train": upd / t_train, "moved": k,
            "steady MB": steady / 2 ** 20, "update peak MB": peak / 2 ** 20,
            "peak/steady": (steady + peak) / steady, "recorder MB": peak_rec / 2 ** 20,
            "op peak MB": op_peak / 2 ** 20}


def run_stale_case(N: int, backend: str, device: str, bags: int, bag_size: int, iters: int,
                   share: float = 0.5, fused: bool = False) -> dict:
    """Slipstream: time of a training step when the hottest slots, receiving ``share`` of the
    slot updates, are frozen, against none frozen (same scheduler, same Zipf(1.05) batches).
    Detection is bypassed (the frozen set is imposed) to time the mechanism itself: the masked
    backward scatter plus the scheduler's hold/restore around ``optimizer.step()``."""
    from dsl_kernels import SparseEmbeddingBag
    from dsl_kernels.sparsity import DSLScheduler

    torch.manual_seed(0)
    emb = SparseEmbeddingBag(N, 64, mode="sum", density=0.1, block_size=8, device=device,
                             backend=backend)
    if fused:  # dsl_kernels.fused: the fused update itself skips frozen slots
        from dsl_kernels.fused import fuse_optimizer

        fuse_optimizer(emb, "adam", lr=1e-3)
        opt = None
    else:
        opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    sched = DSLScheduler(emb, opt, update_every=10 ** 9, stop_at=10 ** 9 + 1, skip_stale=True,
                         stale_window=10 ** 9)
    tr = sched.pools[0].tracker
    w = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.05
    perm = torch.randperm(N)
    g = torch.Generator().manual_seed(0)
    batches = [perm[torch.multinomial(w, bags * bag_size, replacement=True, generator=g)]
               .view(bags, bag_size).to(device) for _ in range(4)]
    it = [0]

    def train():
        if opt is not None:
            opt.zero_grad()
        emb(batches[it[0] % 4]).pow(2).sum().backward()
        if opt is not None:
            opt.step()
        sched.step()
        it[0] += 1

    for _ in range(4):
        train()
    t_none = statistics.median(_ms(train, device) for _ in range(iters))
    counts = tr.counts.double()
    order = torch.sort(counts, descending=True, stable=True).indices
    cum = torch.cumsum(counts[order], 0) / counts.sum()
    n_frozen = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype,
                                                         device=cum.device))) + 1
    tr._set_frozen(order[:n_frozen], torch.zeros(n_frozen, dtype=torch.int64, device=device))
    train()
    s0, t0 = tr.skipped, tr.touches
    t_frozen = statistics.median(_ms(train, device) for _ in range(iters))
    skipped = (tr.skipped - s0) / max(1, tr.touches - t0)
    sched.close()
    return {"N": N, "backend": backend, "optimizer": "fused adam" if fused else "torch Adam",
            "frozen slots %": 100.0 * n_frozen / emb.budget,
            "skipped updates %": 100.0 * skipped, "train ms (none frozen)": t_none,
            "train ms (frozen)": t_frozen, "saved %": 100.0 * (1 - t_frozen / t_none)}


STALE_COLUMNS = ["N", "backend", "optimizer", "frozen slots %", "skipped updates %",
                 "train ms (none frozen)", "train ms (frozen)", "saved %"]

COLUMNS = ["N", "B", "density", "alpha", "grow", "backend", "optimizer", "train ms", "+scores ms",
           "update ms", "update/train", "moved", "steady MB", "update peak MB", "peak/steady",
           "recorder MB", "op peak MB"]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: every non-interpreted backend for the device)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--bags", type=int, default=4096)
    ap.add_argument("--bag-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the issue's yardstick; OpenMP threads on a "
                         "shared, loaded machine make every time unstable)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dsl_kernels import dispatch

    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in dispatch.BACKEND_NAMES
                    if dispatch._why_not(b, args.device) is None]
    sizes = [100_000] if args.quick else ([1_000_000, 10_000_000] if args.device == "cuda"
                                          else [200_000, 1_000_000])
    rows = []
    for N in sizes:
        for backend in backends:
            cases = [(0.1, "gradient", False), (0.3, "gradient", False), (0.1, "random", False)]
            if backend == "cpu":  # the yardstick: one update vs one fused step
                cases.append((0.1, "gradient", True))
            for frac, grow, fz in cases:
                try:
                    r = run_case(N, 64, 8, 0.1, frac, grow, backend, args.device, args.bags,
                                 args.bag_size, args.iters, fused=fz)
                except Exception as e:  # report and go on
                    r = {"N": N, "backend": backend, "alpha": frac, "grow": grow,
                         "train ms": None, "moved": f"error: {type(e).__name__}: {e}"[:120]}
                rows.append(r)
                print(markdown_table([r], COLUMNS).splitlines()[-1], flush=True)
    table = markdown_table(rows, COLUMNS)
    stale_rows = []
    for N in sizes:
        for backend in backends:
            for fz in (False, True):
                try:
                    r = run_stale_case(N, backend, args.device, args.bags, args.bag_size,
                                       args.iters, fused=fz)
                except Exception as e:
                    r = {"N": N, "backend": backend,
                         "saved %": f"error: {type(e).__name__}: {e}"[:120]}
                stale_rows.append(r)
                print(markdown_table([r], STALE_COLUMNS).splitlines()[-1], flush=True)
    table += ("\n\n## Stale-slot skipping (Slipstream)\n\nHottest slots holding half of the "
              "slot updates frozen (Zipf(1.05) indices), against none frozen; includes the "
              "scheduler's hold/restore of frozen slots around optimizer.step().\n\n"
              + markdown_table(stale_rows, STALE_COLUMNS))
    how = ("torch.cuda.max_memory_allocated" if args.device == "cuda"
           else "the torch profiler's allocation records (tests/memcheck.py "
                "allocator_peak_bytes: every torch allocation, inside C++ kernels too; "
                "'recorder MB': the dispatch-mode recorder, which sees only op outputs)")
    head = (f"# Mask update vs training step\n\n{env_header(args.device)}\n\n"
            f"D=64, block 8, density 0.1, Adam, {args.bags} bags x {args.bag_size} uniform "
            f"indices, torch threads {torch.get_num_threads()}. Memory: {how}.\n\n")
    text = head + table + "\n"
    write_report(args.out, f"mask_update_{device_tag(args.device)}.md", text)
    return text


if __name__ == "__main__":
    main()
