"""Run reports: memory measured from the live tensors, a JSON file per run, PNG plots.

Memory numbers are measured, not computed from the config: the bytes of every tensor the
embedding modules hold (``BlockSparseBase.memory_bytes()`` for sparse pools: values, coord,
index, frozen flags; the weight for stock modules), the bytes of every optimizer state tensor, and
the peak memory of the process (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from dsl_kernels import BlockSparseBase


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _embedding_tensors(model: nn.Module):
    """(bytes held by the embedding modules, ids of their parameters, dense-equivalent bytes,
    number of trainable embedding values)."""
    held, ids, dense_eq, numel = 0, set(), 0, 0
    for mod in model.embedding_modules().values():
        pools = [m for m in mod.modules() if isinstance(m, BlockSparseBase)]
        if pools:
            for p in pools:
                held += p.memory_bytes()
                ids.add(id(p.values))
                numel += p.values.numel()
                es = p.values.element_size()
                dense_eq += sum(t.num_rows * t.num_blocks * p.block_size for t in p.tables) * es
        else:
            for prm in mod.parameters():
                held += _tensor_bytes(prm)
                ids.add(id(prm))
                numel += prm.numel()
                dense_eq += _tensor_bytes(prm)
    return held, ids, dense_eq, numel


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, param_ids=None) -> int:
    """Bytes of the optimizer's state tensors (all params, or only those in ``param_ids``)."""
    total = 0
    for p, st in optimizer.state.items():
        if param_ids is not None and id(p) not in param_ids:
            continue
        total += sum(_tensor_bytes(v) for v in st.values())
    return total


def fused_state_bytes(model: nn.Module) -> int:
    """Optimizer state held by sparse pools trained with a fused optimizer (module buffers)."""
    total = 0
    for m in model.modules():
        if isinstance(m, BlockSparseBase) and getattr(m, "fused_optimizer", None) is not None:
            total += sum(_tensor_bytes(getattr(m, n, None))
                         for n in ("fused_state1", "fused_state2", "fused_step"))
    return total


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                  device: Optional[torch.device] = None) -> Dict[str, int]:
    """Measured memory of a model + optimizer (+ scheduler) at this moment.

    ``embedding_bytes`` + ``embedding_optimizer_bytes`` is what the tables cost;
    ``dense_equivalent_*`` is what stock dense tables of the same shapes would cost with the same
    optimizer (its state per value measured on the live run, e.g. 2 x 4 bytes for Adam)."""
    held, ids, dense_eq, numel = _embedding_tensors(model)
    emb_opt = optimizer_state_bytes(optimizer, ids) + fused_state_bytes(model)
    all_opt = optimizer_state_bytes(optimizer) + fused_state_bytes(model)
    other_params = sum(_tensor_bytes(p) for p in model.parameters() if id(p) not in ids)
    dense_vals = dense_eq
    per_value = emb_opt / numel if numel else 0.0
    elem = 4
    for mod in model.embedding_modules().values():
        for p in mod.parameters():
            elem = p.element_size()
            break
    dense_opt = int(round(per_value * dense_vals / elem))
    sched = 0
    if scheduler is not None and hasattr(scheduler, "memory_bytes"):
        try:
            sched = int(scheduler.memory_bytes())
        except Exception:  # a stats helper must never break a run
            sched = 0
    out = {
        "embedding_bytes": int(held),
        "embedding_optimizer_bytes": int(emb_opt),
        "embedding_total_bytes": int(held + emb_opt),
        "scheduler_bytes": sched,
        "other_param_bytes": int(other_params),
        "other_optimizer_bytes": int(all_opt - emb_opt),
        "dense_equivalent_embedding_bytes": int(dense_vals),
        "dense_equivalent_optimizer_bytes": dense_opt,
        "dense_equivalent_total_bytes": int(dense_vals + dense_opt),
    }
    out["embedding_share_of_dense"] = (out["embedding_total_bytes"] + sched) / max(
        1, out["dense_equivalent_total_bytes"])
    if device is not None:
        out["peak_memory_bytes"] = peak_memory_bytes(device)
        out["peak_memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_rss"
    return out


def _clean(o):
    """JSON-safe copy (NaN/inf -> None, tensors -> lists)."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if torch.is_tensor(o):
        return _clean(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str, report: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(report), f, indent=2)
    return path


def can_plot() -> bool:
    """True when matplotlib is importable (plots are skipped with a warning otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no PNG plots", stacklevel=2)
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_figure(plt, fig, path: str) -> str:
    """Lay out, save (creating the folder) and close a figure; returns ``path``."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(path: str, curves: Dict[str, Sequence], metric: str, xlabel: str = "epoch",
                title: str = "", xs: Optional[Dict[str, Sequence]] = None) -> str:
    """One line per run: ``curves[label] = values`` (NaN/None skipped)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in curves.items():
        x = list(xs[label]) if xs else list(range(1, len(ys) + 1))
        pts = [(a, b) for a, b in zip(x, ys) if b is not None and math.isfinite(b)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _write_figure(plt, fig, path)


def plot_sweep(path: str, rows: List[dict], metric: str, title: str = "") -> str:
    """Two panels: ``metric`` vs density and embedding memory vs density, one line per method
    (``rows``: dicts with method, density, metric, embedding_total_bytes)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["density"])
        a1.plot([r["density"] for r in rs], [r[metric] for r in rs], marker="o", label=m)
        a2.plot([r["density"] for r in rs], [r["embedding_total_bytes"] / 2**20 for r in rs],
                marker="o", label=m)
    for ax, yl in ((a1, metric), (a2, "embedding + optimizer state (MiB)")):
        ax.set_xlabel("density")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend()
    a1.set_title(title)
    return _write_figure(plt, fig, path)


def plot_pareto(path: str, points: List[dict], metric: str, dense: Optional[dict] = None,
                 title: str = "") -> str:
    """Quality against measured memory, one line per method: ``points`` are dicts with method,
    ``share`` (embedding + optimizer bytes / the dense table's), ``metric`` and optionally
    ``{metric}_std`` (error bars over seeds); ``dense`` (same keys) is drawn as a reference
    line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({r["method"] for r in points}):
        rs = sorted((r for r in points if r["method"] == m), key=lambda r: r["share"])
        ax.errorbar([100 * r["share"] for r in rs], [r[metric] for r in rs],
                    yerr=[r.get(f"{metric}_std") or 0.0 for r in rs], marker="o", capsize=3,
                    label=m)
    if dense is not None:
        ax.axhline(dense[metric], color="k", ls="--", lw=1,
                   label=f"dense (100 % memory): {dense[metric]:.4f}")
    ax.set_xscale("log")
    ticks = sorted({float(round(100 * r["share"])) for r in points})  # whole percents: no overlap
    if ticks:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g} %" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("memory: embedding + optimizer state, % of the dense table (log)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _write_figure(plt, fig, path)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def table(rows: List[dict], cols: List[str], headers: Optional[List[str]] = None) -> str:
    """A plain-text (and markdown-compatible) table."""
    headers = headers or cols
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
