"""Confidence intervals for the numbers evaluate reports.

Why these two: retrieval accuracies are proportions from a handful of trials (often 0 or
all correct), where the normal interval collapses to a point; the Wilson score interval
stays inside [0, 1] and is honest at 0/n and n/n. Perplexity is exp(mean NLL) over a few
text windows whose NLLs are not normal; a seeded percentile bootstrap over windows (not
tokens: tokens of one window are correlated) gives an interval without a shape assumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

NAN = float("nan")


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (nan, nan) when there are no trials."""
    if trials <= 0:
        return NAN, NAN
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    z = _z(confidence)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return lo, hi


def bootstrap_mean(
    values: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean; (nan, nan) for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def perplexity_ci(
    nll_per_window: Sequence[float],
    tokens_per_window: Sequence[int],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Perplexity exp(token-weighted mean NLL) and a bootstrap interval over windows.

    ``nll_per_window`` holds each window's mean NLL per token; windows are resampled with
    their token counts so the interval matches the token-weighted point estimate.
    """
    nll = np.asarray(nll_per_window, dtype=np.float64)
    tok = np.asarray(tokens_per_window, dtype=np.float64)
    if nll.size == 0:
        return NAN, NAN, NAN
    point = float(np.exp((nll * tok).sum() / tok.sum()))
    if nll.size < 2:
        return point, NAN, NAN
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, nll.size, size=(resamples, nll.size))
    means = (nll[idx] * tok[idx]).sum(1) / tok[idx].sum(1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(np.exp(means), [tail, 100 - tail])
    return point, float(lo), float(hi)


def score_ci(
    values: Sequence[float], confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float, str]:
    """Mean of per-sample scores in [0, 1] with an interval, and the interval's name.

    All 0/1 (accuracy): the Wilson interval. Partial credit (e.g. 3 of 4 values found): a
    percentile bootstrap over samples, which is (nan, nan) for fewer than two samples.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return NAN, NAN, NAN, ""
    if np.isin(x, (0.0, 1.0)).all():
        k = int(x.sum())
        lo, hi = wilson(k, int(x.size), confidence)
        return k / x.size, lo, hi, "wilson"
    lo, hi = bootstrap_mean(x, confidence, seed=seed)
    return float(x.mean()), lo, hi, "bootstrap"


def mean_of_means_ci(
    groups: Sequence[Sequence[float]],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Unweighted mean of group means (a suite average) with a stratified bootstrap interval.

    Why stratified: each task keeps its own sample count in every resample, so a task with
    many samples (one per depth) does not outweigh the others, as in RULER's average.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not arrays:
        return NAN, NAN, NAN
    point = float(np.mean([a.mean() for a in arrays]))
    if all(a.size < 2 for a in arrays):
        return point, NAN, NAN
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for a in arrays:
        means += a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    means /= len(arrays)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return point, float(lo), float(hi)
