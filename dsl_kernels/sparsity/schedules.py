"""Schedules of the sparsity engine: how much of the mask moves, and how dense the pool is.

Both are pure functions of the step, so a resumed run recomputes them exactly.
"""
from __future__ import annotations

import math


def cosine_update_fraction(step: int, prune_fraction: float, stop_at: int) -> float:
    """DSL / RigL update fraction ``alpha_t = alpha_0 / 2 * (1 + cos(pi * t / T_end))``;
    0 from ``stop_at`` on (nothing moves after ``T_end``).

    >>> cosine_update_fraction(0, 0.5, 100), cosine_update_fraction(50, 0.5, 100)
    (0.5, 0.25)
    >>> cosine_update_fraction(100, 0.5, 100), cosine_update_fraction(150, 0.5, 100)
    (0.0, 0.0)
    """
    if stop_at <= 0:
        raise ValueError(f"stop_at must be positive, got {stop_at}")
    if step >= stop_at:
        return 0.0
    a = prune_fraction / 2.0 * (1.0 + math.cos(math.pi * max(step, 0) / stop_at))
    return round(a, 12)  # 0.25 not 0.25000000000000006: k = round(a * n) must not flicker


def cubic_density(step: int, t_start: int, t_end: int, initial_density: float,
                  target_density: float) -> float:
    """Gradual-pruning density (Zhu & Gupta 2017, used by arXiv 2010.08655):
    ``d_t = d_f + (d_i - d_f) * (1 - p)^3`` with ``p = (t - t_start) / (t_end - t_start)``
    clamped to [0, 1]: fast pruning early while the weights are redundant, slow near the target.

    >>> cubic_density(0, 0, 100, 1.0, 0.1), cubic_density(100, 0, 100, 1.0, 0.1)
    (1.0, 0.1)
    >>> round(cubic_density(50, 0, 100, 1.0, 0.1), 4)
    0.2125
    """
    if t_end <= t_start:
        raise ValueError(f"t_end ({t_end}) must be larger than t_start ({t_start})")
    p = min(1.0, max(0.0, (step - t_start) / (t_end - t_start)))
    return target_density + (initial_density - target_density) * (1.0 - p) ** 3
