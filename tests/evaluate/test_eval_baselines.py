"""Uniform baselines really sit at the plan's budget; scale_plan hits its target."""

from __future__ import annotations

import pytest

from moa_search import MoaSearchError, parse, uniform_plan
from moa_search.evaluate.baselines import (
    build_methods,
    scale_plan,
    uniform_elastic,
    uniform_sparq,
    uniform_window,
)
from tests.conftest import tiny_llama

ROWS = [
    ["dense", "window:sink=4,span=60"],
    ["window:sink=4,span=60", "elastic:sink=4,alpha=8,beta=0.1"],
]


@pytest.fixture(scope="module")
def plan():
    p = uniform_plan(tiny_llama(), "dense")
    p.heads = [[parse(s) for s in row] for row in ROWS]
    return p


@pytest.mark.parametrize("n", [256, 1000, 4096])
def test_baselines_match_plan_budget(plan, n):
    methods = {m.name: m for m in build_methods(plan, n, ("dense", "window", "elastic", "sparq"))}
    heads = 4
    one_entry = 1 / (n * heads)  # memory granularity: one KV entry on one head
    for name in ("window", "elastic"):
        assert abs(methods[name].memory_density - plan.memory_density(n)) <= heads * one_entry
    assert abs(methods["sparq"].read_density - plan.read_density(n)) <= 2 * heads * one_entry
    # SparQ saves reads, not memory: it keeps the full cache and an fp32 sum of V per head
    assert methods["sparq"].memory_density == pytest.approx(1 + 1 / n)
    assert methods["dense"].plan is None and methods["plan"].plan is plan
    assert "window:sink=" in methods["window"].description


def test_uniform_patterns_store_the_target():
    n = 2048
    assert uniform_window(n, 0.25).stored_entries(n) == 512
    e = uniform_elastic(n, 0.25)
    assert e.stored_entries(n) == pytest.approx(512, abs=1) and e.beta > 0
    assert uniform_elastic(n, 0.25, beta=0.0).beta == 0.0
    s = uniform_sparq(n, 0.25, head_dim=64)
    assert s.r == 16  # the SparQ paper's split: half the reads on r columns
    assert s.read_entries(n, 64) == pytest.approx(512, abs=1.5)
    assert uniform_window(100, 1.0).span == 100


def test_scale_plan_hits_target_and_keeps_dense_heads(plan):
    n = 1024
    scaled = scale_plan(plan, n, 0.4)
    assert scaled.memory_density(n) == pytest.approx(0.4, abs=0.01)
    assert scaled.heads[0][0].spec() == "dense"
    with pytest.raises(MoaSearchError, match="dense/SparQ heads alone"):
        scale_plan(plan, n, 0.1)  # one of four heads is dense: floor is 25%


@pytest.mark.parametrize("name", ["window", "elastic", "sparq"])
def test_baselines_match_density_on_a_model_with_sliding_layers(name):
    """Gemma-like: 2 of 3 layers slide (window 8): a uniform pattern at a fraction of n
    is clipped there, so the baseline is fitted to the density the runtime really has."""
    from moa_search.evaluate.baselines import baseline_method
    from moa_search.plan import ModelIdentity
    from tests.families import tiny_config

    identity = ModelIdentity.from_config(tiny_config("gemma3_text"))
    assert identity.native_windows == (8, None, 8)
    m = baseline_method(name, identity, 64, memory=0.5, read=0.6)
    got = m.read_density if name == "sparq" else m.memory_density
    assert abs(got - (0.6 if name == "sparq" else 0.5)) < 0.03
