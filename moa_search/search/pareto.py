"""Pareto selection, the documented pick of ``best.yaml``, and uniform baselines.

Rule for best.yaml: among Pareto-optimal trials whose plan meets every user budget, the
lowest loss (measured validation loss in measured mode, predicted loss otherwise); ties go
to less KV memory, then fewer bytes read, then the lower trial number.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from moa_search.patterns import PATTERNS
from moa_search.plan import Plan
from moa_search.search.costs import Problem
from moa_search.search.study import UserCap

OBJECTIVES = ("loss", "memory_density", "read_density")


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for rows no other row beats (<= in every column, < in one); all minimised."""
    points = np.asarray(points, float)
    keep = np.ones(len(points), bool)
    for i, p in enumerate(points):
        if not np.isfinite(p).all():
            keep[i] = False
            continue
        others = points[np.isfinite(points).all(axis=1)]
        beats = (others <= p).all(axis=1) & (others < p).any(axis=1)
        keep[i] = not beats.any()
    return keep


def pick_best(trials: pd.DataFrame) -> int | None:
    """Row label of best.yaml's trial by the rule above; None if no trial qualifies."""
    pool = trials[trials["pareto"] & trials["within_budget"]]
    if pool.empty:
        return None
    order = pool.sort_values(["loss", "memory_density", "read_density", "number"])
    return order.index[0]


def uniform_baselines(
    problem: Problem, caps: list[UserCap], measure: Callable[[Plan], float] | None = None
) -> list[dict]:
    """Best uniform plan of each family within the budgets (predicted loss decides)."""
    n = max(problem.lengths)
    li = problem.lengths.index(n)
    heads = problem.num_heads
    rows = []
    for family in (name for name, cls in PATTERNS.items() if cls.uniform_baseline):
        best = None
        for c in np.flatnonzero(problem.families == family):
            loss = problem.loss[:, c, li]
            if not np.isfinite(loss).all():
                continue
            fits = all(
                problem.uniform_bytes(u.kind, u.length, c) <= u.limit * (1 + 1e-9) for u in caps
            )
            if fits and (best is None or loss.sum() < best[1]):
                best = (c, float(loss.sum()))
        if best is None:
            continue
        c, predicted = best
        choice = np.full(heads, c)
        measured = measure(problem.plan(choice)) if measure is not None else None
        dense = problem.dense_bytes(n)
        rows.append(
            {
                "family": family,
                "pattern": problem.specs[c],
                "predicted_loss": predicted,
                "measured_loss": measured,
                "loss": measured if measured is not None else predicted,
                "memory_density": problem.uniform_bytes("memory", n, c) / dense,
                "read_density": problem.uniform_bytes("bandwidth", n, c) / dense,
            }
        )
    return rows
