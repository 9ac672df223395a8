"""Trials -> summary rows with confidence intervals, and the derived headline numbers.

Why a separate step: trials.csv keeps every prompt's output, so any number in results.csv
can be recomputed (or re-aggregated differently) without rerunning a model.

"No signal": a (task, length) cell where dense itself scores below 50% says little about a
sparse method (a method cannot lose what dense never had, and 0.1 vs 0.2 is noise at
these sample counts). Such cells keep their rows (``signal`` False) but are left out of
every headline ratio (max relative drop, mean ratio, relative effective context).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moa_search.data import ruler as _ruler
from moa_search.evaluate.stats import mean_of_means_ci, perplexity_ci, score_ci
from moa_search.evaluate.tasks import DEPTH_TASKS, RETRIEVAL_TASKS, RULER_TASKS

KEYS = ["section", "point", "method", "length"]
METHOD_COLS = ["description", "memory_density", "read_density"]
ECL_FRACTION = 0.9  # relative effective context: >= 90% of dense at every length up to L
ECL_ACCURACY = 0.9  # MoA's effective context: accuracy >= 90% at every length up to L
SIGNAL_THRESHOLD = 0.5  # dense below this: "no signal"
POOLED = ("retrieval", "ruler")  # summary rows that pool several tasks
HARNESS_PREFIX = "lm-eval:"  # tasks run by lm-evaluation-harness (summarised in harness.py)


def _is_partial(task: str) -> bool:
    spec = _ruler.TASKS.get(task)
    return spec is not None and (spec.values > 1 or spec.queries > 1 or spec.family != "niah")


# tasks whose per-sample score is a fraction of expected answers (RULER's partial credit)
PARTIAL = tuple(t for t in RULER_TASKS if _is_partial(t))


def summarize(trials: pd.DataFrame, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (section, point, method, task, length[, depth]) with value, CI and n.

    Needle tasks with a depth grid (passkey, single-needle RULER tasks) get a pooled row
    (depth NaN) and one row per depth (for the heatmaps). When both retrieval tasks ran, a
    pooled ``retrieval`` row (all their trials) is added; when two or more RULER tasks ran,
    a ``ruler`` row: the unweighted mean of the task means (RULER's average), with a
    stratified bootstrap interval. Adds ``dense_value`` and ``signal`` (see module doc).
    """
    rows: list[dict] = []
    own = trials[~trials.task.astype(str).str.startswith(HARNESS_PREFIX)]
    for keys, g in own.groupby(KEYS + ["task"], sort=False, dropna=False):
        rows.append(_row(keys, g, math.nan, confidence, seed))
        if keys[-1] in DEPTH_TASKS:
            for depth, gd in g.groupby("depth", sort=True):
                rows.append(_row(keys, gd, float(depth), confidence, seed))
    retrieval = own[own.task.isin(RETRIEVAL_TASKS)]
    if retrieval.task.nunique() > 1:
        for keys, g in retrieval.groupby(KEYS, sort=False, dropna=False):
            rows.append(_row((*keys, "retrieval"), g, math.nan, confidence, seed))
    suite = own[own.task.isin(RULER_TASKS)]
    if suite.task.nunique() > 1:
        for keys, g in suite.groupby(KEYS, sort=False, dropna=False):
            rows.append(_suite_row(keys, g, confidence, seed))
    return mark_signal(pd.DataFrame(rows))


def _base(keys: tuple, g: pd.DataFrame, depth: float) -> dict:
    base = dict(zip(KEYS + ["task"], keys, strict=True))
    first = g.iloc[0]
    base.update({c: first[c] for c in METHOD_COLS})
    base["depth"] = depth
    return base


def _row(keys: tuple, g: pd.DataFrame, depth: float, confidence: float, seed: int) -> dict:
    base = _base(keys, g, depth)
    if base["task"] == "ppl":
        value, lo, hi = perplexity_ci(g.nll.tolist(), g.tokens.tolist(), confidence, seed=seed)
        metric, how = "perplexity", "bootstrap over windows"
    else:
        value, lo, hi, how = score_ci(g.correct.tolist(), confidence, seed)
        metric = "score" if base["task"] in PARTIAL else "accuracy"
    base.update(metric=metric, value=value, ci_low=lo, ci_high=hi, n=len(g))
    base.update(tokens=int(g.tokens.sum()), ci_method=how)
    base["seconds_per_trial"] = float(g.seconds.mean())
    return base


def _suite_row(keys: tuple, g: pd.DataFrame, confidence: float, seed: int) -> dict:
    base = _base((*keys, "ruler"), g, math.nan)
    groups = [gt.correct.tolist() for _, gt in g.groupby("task", sort=False)]
    value, lo, hi = mean_of_means_ci(groups, confidence, seed=seed)
    base.update(metric="score", value=value, ci_low=lo, ci_high=hi, n=len(g))
    base.update(tokens=int(g.tokens.sum()), ci_method=f"stratified bootstrap, {len(groups)} tasks")
    base["seconds_per_trial"] = float(g.seconds.mean())
    return base


def mark_signal(summary: pd.DataFrame, reference: str = "dense") -> pd.DataFrame:
    """Add ``dense_value`` (the reference's value in the same task/length/depth cell) and
    ``signal``: False where that is below SIGNAL_THRESHOLD, True for perplexity rows, NA
    where no reference ran."""
    if summary.empty:
        return summary
    out = summary.copy()
    acc = out.metric.isin(["accuracy", "score"]).to_numpy()

    def key(df: pd.DataFrame) -> list[tuple]:
        return list(zip(df.task, df.length, df.depth.fillna(-1.0), strict=True))

    ref_rows = out[(out.method == reference) & acc]
    ref = dict(zip(key(ref_rows), ref_rows.value, strict=True))
    dense = np.array([ref.get(k, math.nan) for k in key(out)], dtype=float)
    out["dense_value"] = np.where(acc, dense, math.nan)
    out["signal"] = [
        (bool(d >= SIGNAL_THRESHOLD) if not math.isnan(d) else pd.NA) if a else True
        for a, d in zip(acc, dense, strict=True)
    ]
    return out


def pooled(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows pooled over depth (one per method, task, length)."""
    return summary[summary.depth.isna()]


def _prefix_length(lengths: list[int], ok) -> tuple[int, str]:
    """Longest L such that ``ok(n)`` holds at L and every shorter length; why it stopped."""
    ecl = 0
    for n in lengths:
        passed, why = ok(n)
        if not passed:
            return ecl, f"stops at {n}: {why}"
        ecl = int(n)
    return ecl, "passes at every length"


def _relative(cells: pd.Series, ref: pd.Series, task: str):
    def ok(n: int) -> tuple[bool, str]:
        if (task, n) not in ref:
            return False, "no dense cell"
        d, v = ref[(task, n)], cells[(task, n)]
        if d < SIGNAL_THRESHOLD:
            return False, f"dense {d:.2f} < {SIGNAL_THRESHOLD:.0%} (no signal)"
        return v >= ECL_FRACTION * d, f"{v:.2f} < {ECL_FRACTION:.0%} of dense {d:.2f}"

    return ok


def _absolute(cells: pd.Series, task: str):
    def ok(n: int) -> tuple[bool, str]:
        v = cells[(task, n)]
        return v >= ECL_ACCURACY, f"{v:.2f} < {ECL_ACCURACY:.2f}"

    return ok


def derived(summary: pd.DataFrame, reference: str = "dense") -> pd.DataFrame:
    """Headline numbers per method (main section only, pooled over depth).

    - ``effective_context_moa``: MoA's effective context length (Fu et al. 2024: the
      longest input length at which retrieval accuracy stays above 90%), here the longest
      eval length L such that the method scores >= 0.9 at L and at every shorter eval
      length (0 if the shortest fails). Absolute, so dense gets one too.
    - ``effective_context``: the same relative to dense: >= 90% of dense's value at every
      length up to L; a length where dense has no signal ends it (nothing to keep there).
    - ``max_relative_drop``: worst (task, length) cell of (dense - method) / dense for
      accuracies, (method - dense) / dense for perplexity; no-signal cells left out.
    - ``mean_ratio``: mean of method / dense over the accuracy cells with signal.
    Pooled rows (``retrieval``, ``ruler``) get effective contexts but no drop or ratio.
    """
    main = pooled(summary[summary.section == "main"])
    if main.empty:
        return pd.DataFrame()
    refs = main[main.method == reference]
    ref = refs.set_index(["task", "length"]).value
    rows: list[dict] = []
    acc_tasks = list(dict.fromkeys(main[main.metric != "perplexity"].task))
    for method, g in main.groupby("method", sort=False):
        cells = g.set_index(["task", "length"]).value
        is_ref = method == reference
        for task in acc_tasks:
            lengths = sorted(g[g.task == task].length.unique())
            if not lengths:
                continue
            over = f"over lengths {', '.join(map(str, lengths))}"
            if not is_ref and not ref.empty:
                ecl, why = _prefix_length(lengths, _relative(cells, ref, task))
                rows.append(_drow(method, "effective_context", task, ecl, f"{over}; {why}"))
            ecl, why = _prefix_length(lengths, _absolute(cells, task))
            rows.append(_drow(method, "effective_context_moa", task, ecl, f"{over}; {why}"))
        if is_ref or ref.empty:
            continue
        worst, where, ratios, skipped = -math.inf, "", [], 0
        for (task, n), v in cells.items():
            if task in POOLED or (task, n) not in ref:
                continue
            d = ref[(task, n)]
            if task == "ppl":
                drop = (v - d) / d
            elif d < SIGNAL_THRESHOLD:
                skipped += 1
                continue
            else:
                drop = (d - v) / d
                ratios.append(v / d)
            if drop > worst:
                worst, where = drop, f"{task} @ {n}"
        left = f"; {skipped} no-signal cells left out" if skipped else ""
        if where:
            rows.append(
                _drow(method, "max_relative_drop", "all", worst, f"worst cell: {where}{left}")
            )
        if ratios:
            note = f"over {len(ratios)} accuracy cells with signal{left}"
            rows.append(_drow(method, "mean_ratio", "all", float(np.mean(ratios)), note))
    return pd.DataFrame(rows)


def _drow(method: str, metric: str, task: str, value: float, note: str) -> dict:
    return dict(method=method, metric=metric, task=task, value=value, note=note)
