"""Latency costs: the cost model reads a calibration table, budgets cap it, plans obey it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moa_search.bench.calibrate as calibrate
from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Elastic, SparQ, Window, parse
from moa_search.plan import Plan, load_plan
from moa_search.search import plan_search
from moa_search.search.budget import Budget, parse_budget
from moa_search.search.latency import load_costs, plan_latency
from moa_search.search.synthetic import synthetic_identity
from moa_search.search.table import load_profile
from moa_search.show import describe_plan

IDENT = synthetic_identity(4, 2, 2, 64)  # the shape of conftest's small_profile
CONTEXTS = (512, 1024, 2048, 4096)
BATCHES = (1, 4, 8)


def fake_us(pattern, batch, n, kv) -> float:
    """A made-up layer time: a launch floor plus a cost convex in the entries read, higher
    for SparQ's extra passes (deterministic, so the table is exact and noise-free)."""
    read = pattern.read_entries(n, IDENT.head_dim, 4)
    extra = 30.0 if isinstance(pattern, SparQ) else 0.0
    return kv * (5.0 + extra + 0.002 * batch * read + 1e-6 * (batch * read) ** 1.5)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory) -> Path:
    """A table written by calibrate_costs itself, with its timer replaced by ``fake_us``."""
    path = tmp_path_factory.mktemp("costs") / "costs.csv"
    config = calibrate.CalibrateConfig(
        batches=BATCHES, contexts=CONTEXTS, stored=(64, 256, 1024), device="cpu", dtype="float32"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibrate, "time_cell", lambda p, b, n, kv, *_: fake_us(p, b, n, kv))
        return calibrate.calibrate_costs(IDENT, path, config, progress=False)


@pytest.fixture(scope="module")
def table(table_path):
    return load_costs(table_path)


def uniform_plan(identity, pattern) -> Plan:
    return Plan(identity, [[pattern] * identity.num_key_value_heads] * identity.num_layers)


def one_line_error(fn, *args, match: str | None = None) -> str:
    with pytest.raises(MoaSearchError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- the cost model ---------------------------------------------------------------------
def test_exact_at_every_table_point(table, table_path) -> None:
    rows = pd.read_csv(table_path)
    assert len(rows) > 40
    for row in rows.itertuples():
        predicted = table.head_us(parse(row.pattern, 64), row.batch, row.n)
        assert predicted == pytest.approx(row.us_per_head, rel=1e-12)


def test_monotone_between_points_in_length_and_batch(table) -> None:
    for pattern in (Dense(), Window(sink=32, span=480), Elastic(4, 0.0, 0.25), parse_sparq()):
        ns = np.linspace(512, 4096, 97).round().astype(int)
        for b in BATCHES:
            us = [table.head_us(pattern, b, int(n)) for n in ns]
            assert np.all(np.diff(us) >= -1e-12), pattern
        bs = range(1, 9)
        us = [table.head_us(pattern, b, 3000) for b in bs]
        assert np.all(np.diff(us) >= -1e-12)
    # between two table points, strictly between their values (linear, not a step)
    lo, hi, mid = (table.head_us(Dense(), 1, n) for n in (1024, 2048, 1536))
    assert lo < mid < hi and mid == pytest.approx((lo + hi) / 2)


def parse_sparq() -> SparQ:
    return SparQ(r=8, k_ratio=1 / 16, local=16)


def test_timing_noise_never_makes_more_entries_cheaper(tmp_path, table_path) -> None:
    rows = pd.read_csv(table_path)
    dip = (rows["family"] == "dense") & (rows["n"] == 2048) & (rows["batch"] == 1)
    low = float(rows.loc[(rows["family"] == "dense") & (rows["n"] == 1024) & (rows["batch"] == 1),
                         "us_per_head"].iloc[0])  # fmt: skip
    rows.loc[dip, "us_per_head"] = low / 2  # a noisy cell: faster at 2048 than at 1024
    rows.to_csv(tmp_path / "noisy.csv", index=False)
    noisy = load_costs(tmp_path / "noisy.csv")
    assert noisy.head_us(Dense(), 1, 2048) >= noisy.head_us(Dense(), 1, 1024) == low


def test_small_windows_are_priced_at_the_kernel_floor(table) -> None:
    tiny = Window(sink=4, span=28)  # 32 entries, below the smallest calibrated 64
    assert table.head_us(tiny, 1, 4096) == table.head_us(Window(sink=32, span=32), 1, 4096)


def test_plan_latency_sums_heads_and_counts_native_windows(table) -> None:
    dense = uniform_plan(IDENT, Dense())
    per_head = table.head_us(Dense(), 8, 2048)
    assert plan_latency(table, dense, 8, 2048) == pytest.approx(8 * per_head)
    sliding = dataclasses.replace(IDENT, native_windows=(512, None, None, None))
    slid = uniform_plan(sliding, Dense())
    expect = 2 * table.head_us(Dense(), 8, 512) + 6 * per_head
    assert plan_latency(table, slid, 8, 2048) == pytest.approx(expect)


# --- bad input --------------------------------------------------------------------------
def test_bad_tables_and_lookups_are_one_line_errors(table, tmp_path) -> None:
    one_line_error(load_costs, tmp_path / "none.csv", match="no such file")
    (tmp_path / "cols.csv").write_text("batch,n\n1,2\n")
    one_line_error(load_costs, tmp_path / "cols.csv", match="missing column")
    other = synthetic_identity(4, 2, 4, 128)
    one_line_error(table.check_geometry, other, match="head_dim")
    one_line_error(table.head_us, Dense(), 1, 8192, match="outside the table's contexts")
    one_line_error(table.head_us, Dense(), 1, 256, match="outside the table's contexts")
    one_line_error(table.head_us, Dense(), 16, 1024, match="outside the table's batches")
    one_line_error(table.head_us, SparQ(r=4, k=8), 1, 1024, match="no rows for sparq:r=4")


# --- budgets ----------------------------------------------------------------------------
def test_latency_budget_grammar() -> None:
    assert parse_budget("latency=0.5") == [Budget("latency", fraction=0.5)]
    (b,) = parse_budget("latency=300us@32k,batch=8")
    assert (b.total_us, b.length, b.batch) == (300.0, 32768, 8) and b.cap(1e9) == 300.0
    assert parse_budget(b.text()) == [b]
    (f,) = parse_budget("latency=40%,batch=4")
    assert (f.fraction, f.batch) == (0.4, 4) and parse_budget(f.text()) == [f]
    assert parse_budget("latency=1.5ms@4k")[0].total_us == 1500.0
    assert f.to_plan_field() == {"fraction": 0.4, "batch": 4}
    for bad in ("latency=300", "latency=300GiB@4k", "latency=-1us", "memory=300us"):
        one_line_error(parse_budget, bad)


# --- the search -------------------------------------------------------------------------
def dense_us(table, batch: int, n: int) -> float:
    return plan_latency(table, uniform_plan(IDENT, Dense()), batch, n)


@pytest.mark.parametrize(
    ("budget", "batch", "cap_at"),
    [("latency=0.55,batch=4", 4, None), ("latency=175us@2048,batch=8", 8, 175.0)],
)
def test_plans_searched_under_a_latency_budget_stay_within_it(
    profile_copy, table_path, table, budget, batch, cap_at
) -> None:
    lengths = load_profile(profile_copy).lengths
    caps = {n: 0.55 * dense_us(table, batch, n) for n in lengths} if cap_at is None else {
        2048: cap_at}  # fmt: skip
    # the budget binds: the least-loss plan without it (dense) is far slower
    assert all(dense_us(table, batch, n) > 1.5 * cap for n, cap in caps.items())
    result = plan_search(
        profile_copy, budgets=[budget], costs=str(table_path), trials=12, progress=False
    )
    assert result.pareto_plans and result.best is not None
    for path in [*result.pareto_plans, result.best]:
        plan = load_plan(path)
        for n, cap in caps.items():
            assert plan_latency(table, plan, batch, n) <= cap * (1 + 1e-9), (path, n)
    assert load_plan(result.best).budget["latency"]


def test_latency_budget_errors(profile_copy, table_path, tmp_path) -> None:
    run = lambda **kw: plan_search(profile_copy, trials=2, progress=False, **kw)  # noqa: E731
    one_line_error(lambda: run(budgets=["latency=0.5"]), match="needs a cost table")
    one_line_error(lambda: run(budgets=["latency=0.5"], costs=str(tmp_path / "x.csv")),
                   match="no such file")  # fmt: skip
    one_line_error(lambda: run(budgets=["latency=1us@2048"], costs=str(table_path)),
                   match="smallest feasible latency budget")  # fmt: skip
    one_line_error(lambda: run(budgets=["latency=0.5,batch=64"], costs=str(table_path)),
                   match="outside the table's batches")  # fmt: skip
    other = synthetic_identity(4, 2, 4, 64)
    rows = pd.read_csv(table_path).assign(group=4)
    rows.to_csv(tmp_path / "other.csv", index=False)
    assert load_costs(tmp_path / "other.csv").group == other.num_attention_heads // 2
    one_line_error(lambda: run(budgets=["latency=0.5"], costs=str(tmp_path / "other.csv")),
                   match="group: table was measured")  # fmt: skip
    assert not (profile_copy / "plans").exists()  # nothing written before the checks


def test_show_prints_predicted_latency(table) -> None:
    plan = uniform_plan(IDENT, Window(sink=32, span=224))
    text = describe_plan(plan, [1024, 2048], table, batch=4)
    assert "us@1024" in text and "predicted attention per decode step at batch 4" in text
    per_layer = 2 * table.head_us(Window(sink=32, span=224), 4, 2048)
    assert f"{per_layer:.1f}" in text
