"""Confidence intervals against textbook values and their edge cases."""

from __future__ import annotations

import math

import pytest

from moa_search.evaluate.stats import bootstrap_mean, perplexity_ci, wilson


def test_wilson_matches_textbook_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)  # stays informative at 0/n, unlike the normal interval
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    a, b = bootstrap_mean(values, seed=1), bootstrap_mean(values, seed=1)
    assert a == b and a[0] < sum(values) / len(values) < a[1]
    assert all(math.isnan(v) for v in bootstrap_mean([1.0]))


def test_perplexity_is_token_weighted():
    ppl, lo, hi = perplexity_ci([1.0, 2.0], [300, 100])
    assert ppl == pytest.approx(math.exp(1.25))
    assert math.exp(1.0) <= lo <= ppl <= hi <= math.exp(2.0)
    ppl, lo, hi = perplexity_ci([1.5], [10])
    assert ppl == pytest.approx(math.exp(1.5)) and math.isnan(lo)
