"""The search on a model whose own attention mostly slides (Gemma 3 style: three sliding
layers with a 256 window, one global layer): the budget goes to the global layer.

A sliding layer's dense head already holds only its window, so compressing it frees
little; the cost model must see that. Here the sliding heads are made the *cheaper* ones
to compress (predicted loss 0.1 against 1.0): a search that counted a sliding layer's
dense as the full sequence would compress them and leave the global layer dense, which
breaks the budget on the model's real cache.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest

from moa_search.patterns import Dense, Window
from moa_search.search.budget import parse_budgets
from moa_search.search.costs import build_problem
from moa_search.search.study import TrialRunner, user_caps
from moa_search.search.synthetic import make_synthetic_profile, synthetic_identity
from moa_search.search.table import load_profile

N, WINDOW, D = 4096, 256, 64
WINDOWS = (WINDOW, WINDOW, WINDOW, None)
CANDIDATES = [Dense(), Window(sink=4, span=128), Window(sink=4, span=512)]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    ident = dataclasses.replace(synthetic_identity(4, 2, 2, D), native_windows=WINDOWS)
    folder = make_synthetic_profile(
        tmp_path_factory.mktemp("native") / "p", ident, lengths=(N,), candidates=CANDIDATES
    )
    problem = build_problem(load_profile(folder), None, ("dense", "window"))
    assert problem.identity.native_windows == WINDOWS  # the profile carries the windows
    return problem


def test_costs_count_the_models_own_cache(problem):
    entries = [WINDOW] * 3 + [N]  # per KV head: what the model's own cache holds
    assert problem.dense_bytes(N) == sum(entries) * 2 * 2 * D * 2  # KV heads, K+V, bf16
    mem = problem.head_costs("memory", N)
    assert (mem[:6, 0] == 2 * WINDOW * D * 2).all() and (mem[6:, 0] == 2 * N * D * 2).all()
    wide = problem.specs.index(Window(sink=4, span=512).spec())
    # keeps the whole 256 window: only dense (clipped) on a sliding layer, so not offered
    assert np.isinf(problem.loss[:6, wide]).all() and np.isfinite(problem.loss[6:, wide]).all()


@pytest.mark.parametrize("budget", ["memory=0.5", "memory=0.25"])
def test_budget_goes_to_the_global_layer(problem, budget):
    p = dataclasses.replace(problem, loss=problem.loss.copy())
    sliding = p.layer_of() < 3
    finite = np.isfinite(p.loss)
    p.loss[finite] = 0.0
    compressed = finite.copy()
    compressed[:, 0] = False  # dense stays free
    p.loss[compressed & sliding[:, None, None]] = 0.1  # sliding heads: cheap to compress
    p.loss[compressed & ~sliding[:, None, None]] = 1.0
    caps = user_caps(p, parse_budgets([budget]))
    runner = TrialRunner(p, caps)
    trial = optuna.trial.FixedTrial(
        {"use_window": True, "share_memory": 1.0, "share_bandwidth": 1.0, "max_distinct": 0}
    )
    out = runner.run(trial)
    assert runner.within_budget(out.choice)
    assert (out.choice[~sliding] != 0).all(), "the global layer carries the budget"
    assert (out.choice[sliding] == 0).all(), "compressing a sliding head buys nothing needed"
    assert out.predicted == pytest.approx(2.0)
    plan = p.plan(out.choice)
    assert plan.memory_density(N) <= caps[0].budget.fraction + 1e-9
