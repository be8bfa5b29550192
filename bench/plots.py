"""Plots of the end-to-end benchmark (``bench/e2e_step.py``): step time vs density and training
memory vs density for the dsl variants, with the dense baselines drawn as horizontal lines.

Usage::

    python -m bench.plots bench/results/e2e_cuda.csv     # writes e2e_cuda_time.png, _memory.png
"""
from __future__ import annotations

import csv
import os
import sys
from typing import Dict, List


def _read(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _f(r: Dict[str, str], key: str):
    v = r.get(key)
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


SERIES = [("dsl", "dsl (unfused, Adam)", "o-"), ("fused", "dsl fused Adam", "s-"),
          ("fused_stale", "dsl fused + stale skipping", "^-")]
# Distinct dash patterns: the baselines often coincide (same memory), all must stay visible.
BASELINES = [("dense", "dense + Adam", "k", "--"),
             ("sparse", "sparse=True + SparseAdam", "tab:red", ":"),
             ("compiled", "torch.compile dense + Adam", "tab:gray", "-.")]


def plot_e2e(csv_path: str) -> List[str]:
    """Draw the two figures next to ``csv_path``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(csv_path)
    stem = os.path.splitext(csv_path)[0]
    device = os.path.basename(stem).replace("e2e_", "")
    out = []
    for metric, ylabel, suffix in (("step_ms", "step time (ms)", "time"),
                                   ("mem", "params + optimizer state (GB)", "memory")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))

        def value(r):
            if metric == "mem":
                p, s = _f(r, "params_GB"), _f(r, "opt_state_GB")
                return None if p is None else p + (s or 0.0)
            return _f(r, metric)

        for kind, label, style in SERIES:
            pts = sorted((_f(r, "density"), value(r)) for r in rows
                         if r.get("kind") == kind and value(r) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for kind, label, color, ls in BASELINES:
            vals = [value(r) for r in rows if r.get("kind") == kind and value(r) is not None]
            if vals:
                ax.axhline(vals[0], color=color, ls=ls, lw=1.5, label=label)
        ax.set_xlabel("density (share of blocks stored)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(f"DLRM-like embedding layer, training step ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{stem}_{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m bench.plots bench/results/e2e_<device>.csv", file=sys.stderr)
        return 2
    for p in argv:
        for out in plot_e2e(p):
            print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
