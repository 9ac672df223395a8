"""Uniform baselines really sit at the plan's budget; scale_plan hits its target."""

from __future__ import annotations

import dataclasses

import pytest

from moa_search import MoaSearchError, parse, uniform_plan
from moa_search.evaluate.baselines import (
    build_methods,
    scale_plan,
    uniform_elastic,
    uniform_sparq,
    uniform_window,
)
from moa_search.patterns import SparQ
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


def _with_head_dim(plan, head_dim):
    return dataclasses.replace(plan, model=dataclasses.replace(plan.model, head_dim=head_dim))


@pytest.mark.parametrize("n", [256, 1000, 4096])
def test_baselines_match_plan_budget(plan, n):
    # head_dim 128: at the tiny model's 16, SparQ's step 1 reads whole K rows (one sector)
    plan = _with_head_dim(plan, 128)
    methods = {m.name: m for m in build_methods(plan, n, ("dense", "window", "elastic", "sparq"))}
    heads = 4
    one_entry = 1 / (n * heads)  # memory granularity: one KV entry on one head
    for name in ("window", "elastic"):
        assert abs(methods[name].memory_density - plan.memory_density(n)) <= heads * one_entry
    assert abs(methods["sparq"].read_density - plan.read_density(n)) <= 2 * heads * one_entry
    # SparQ saves reads, not memory: it keeps the full cache, an fp8 transposed copy of K
    # (a quarter of bf16 K + V) and an fp32 sum of V per head
    assert methods["sparq"].memory_density == pytest.approx(1.25 + 1 / n)
    assert methods["dense"].plan is None and methods["plan"].plan is plan
    assert "window:sink=" in methods["window"].description


def test_sparq_baseline_below_its_floor_says_so(plan):
    """At head_dim 16 one bf16 K row is one sector: SparQ reads at least all of K, so a
    plan reading less gets the least SparQ can, and the description says it is more."""
    n = 1000
    sparq = build_methods(plan, n, ("sparq",))[1]
    least = uniform_sparq(n, 1 / n, head_dim=16)  # r = 1, k = local
    assert sparq.read_density == pytest.approx(
        uniform_plan(tiny_llama(), least).read_density(n), abs=0.01
    )
    assert sparq.read_density > plan.read_density(n) + 0.01
    assert "the least SparQ moves per step" in sparq.description


def test_uniform_patterns_store_the_target():
    n = 2048
    assert uniform_window(n, 0.25).stored_entries(n) == 512
    e = uniform_elastic(n, 0.25)
    assert e.stored_entries(n) == pytest.approx(512, abs=1) and e.beta > 0
    assert uniform_elastic(n, 0.25, beta=0.0).beta == 0.0
    # the SparQ paper's split: at most half the reads on step 1 (side buffer and selection)
    s = uniform_sparq(n, 0.25, head_dim=64)
    scan = [SparQ(r=r, k=1).scan_entries(n, 64) for r in (s.r, s.r + 1)]
    assert scan[0] <= 256 < scan[1]
    assert s.read_entries(n, 64) == pytest.approx(512, abs=1.5)
    s = uniform_sparq(4096, 0.5, head_dim=128)
    step1 = [SparQ(r=r, k=1).scan_entries(4096, 128) for r in (s.r, s.r + 1)]
    assert step1[0] <= 1024 < step1[1]
    assert s.read_entries(4096, 128) == pytest.approx(2048, abs=1.5)
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
    identity = dataclasses.replace(identity, head_dim=128)  # SparQ can read 60% (not at 16)
    m = baseline_method(name, identity, 64, memory=0.5, read=0.6)
    got = m.read_density if name == "sparq" else m.memory_density
    assert abs(got - (0.6 if name == "sparq" else 0.5)) < 0.03
