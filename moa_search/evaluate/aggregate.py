"""Trials -> summary rows with confidence intervals, and the derived headline numbers.

Why a separate step: trials.csv keeps every prompt's output, so any number in results.csv
can be recomputed (or re-aggregated differently) without rerunning a model.
"""

from __future__ import annotations

import math

import pandas as pd

from moa_search.evaluate.stats import perplexity_ci, wilson
from moa_search.evaluate.tasks import RETRIEVAL_TASKS

KEYS = ["section", "point", "method", "length"]
METHOD_COLS = ["description", "memory_density", "read_density"]
ECL_FRACTION = 0.9  # effective context: retrieval stays >= 90% of dense (MoA's threshold)


def summarize(trials: pd.DataFrame, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (section, point, method, task, length[, depth]) with value, CI and n.

    Passkey gets a pooled row (depth NaN) and one row per depth (for the heatmap); when both
    retrieval tasks ran, a pooled ``retrieval`` row (all their trials) is added as well.
    """
    rows: list[dict] = []
    retrieval = trials[trials.task.isin(RETRIEVAL_TASKS)]
    for keys, g in trials.groupby(KEYS + ["task"], sort=False, dropna=False):
        rows.append(_row(keys, g, math.nan, confidence, seed))
        if keys[-1] == "passkey":
            for depth, gd in g.groupby("depth", sort=True):
                rows.append(_row(keys, gd, float(depth), confidence, seed))
    if retrieval.task.nunique() > 1:
        for keys, g in retrieval.groupby(KEYS, sort=False, dropna=False):
            rows.append(_row((*keys, "retrieval"), g, math.nan, confidence, seed))
    return pd.DataFrame(rows)


def _row(keys: tuple, g: pd.DataFrame, depth: float, confidence: float, seed: int) -> dict:
    base = dict(zip(KEYS + ["task"], keys, strict=True))
    first = g.iloc[0]
    base.update({c: first[c] for c in METHOD_COLS})
    base["depth"] = depth
    if base["task"] == "ppl":
        value, lo, hi = perplexity_ci(g.nll.tolist(), g.tokens.tolist(), confidence, seed=seed)
        metric, tokens = "perplexity", int(g.tokens.sum())
    else:
        k, n = int(g.correct.sum()), len(g)
        value, (lo, hi) = k / n, wilson(k, n, confidence)
        metric, tokens = "accuracy", int(g.tokens.sum())
    base.update(metric=metric, value=value, ci_low=lo, ci_high=hi, n=len(g), tokens=tokens)
    base["seconds_per_trial"] = float(g.seconds.mean())
    return base


def pooled(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows pooled over depth (one per method, task, length)."""
    return summary[summary.depth.isna()]


def derived(summary: pd.DataFrame, reference: str = "dense") -> pd.DataFrame:
    """Effective context length and max relative drop vs ``reference`` (main section only).

    Effective context length: the longest eval length L such that at L and at every shorter
    eval length the method's retrieval accuracy is >= 90% of dense's (0 if the shortest
    fails). Max relative drop: the worst over (task, length) cells of (dense - method) / dense
    for accuracies and (method - dense) / dense for perplexity; cells where dense scores 0
    carry no information and are left out.
    """
    main = pooled(summary[summary.section == "main"])
    ref = main[main.method == reference].set_index(["task", "length"]).value
    if ref.empty:
        return pd.DataFrame()
    rows = []
    for method, g in main[main.method != reference].groupby("method", sort=False):
        cells = g.set_index(["task", "length"]).value
        for task in [t for t in (*RETRIEVAL_TASKS, "retrieval") if t in set(g.task)]:
            ecl, lengths = 0, sorted(g[g.task == task].length.unique())
            for n in lengths:
                if (task, n) not in ref or cells[(task, n)] < ECL_FRACTION * ref[(task, n)]:
                    break
                ecl = int(n)
            rows.append(
                dict(
                    method=method,
                    metric="effective_context",
                    task=task,
                    value=ecl,
                    note=f"over lengths {', '.join(map(str, lengths))}",
                )
            )
        worst, where = -math.inf, ""
        for (task, n), v in cells.items():
            if task == "retrieval" or (task, n) not in ref or ref[(task, n)] == 0:
                continue
            d = ref[(task, n)]
            drop = (v - d) / d if task == "ppl" else (d - v) / d
            if drop > worst:
                worst, where = drop, f"{task} @ {n}"
        if where:
            rows.append(
                dict(
                    method=method,
                    metric="max_relative_drop",
                    task="all",
                    value=worst,
                    note=f"worst cell: {where}",
                )
            )
    return pd.DataFrame(rows)
