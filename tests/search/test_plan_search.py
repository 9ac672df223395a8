import json
import sqlite3

import pandas as pd
import pytest

from moa_search import load_plan
from moa_search.errors import MoaSearchError
from moa_search.search import SearchConfig, plan_search
from moa_search.search.synthetic import synthetic_identity

BUDGETS = ["memory=0.3", "bandwidth=0.4"]


def test_outputs_and_resume(profile_copy):
    result = plan_search(profile_copy, budgets=BUDGETS, trials=8, progress=False)
    out = profile_copy / "plans"
    assert result.out == out
    for name in (
        "best.yaml",
        "trials.parquet",
        "trials.csv",
        "pareto.png",
        "plan_map.png",
        "summary.json",
        "study.db",
    ):
        assert (out / name).is_file(), name
    frame = pd.read_parquet(out / "trials.parquet")
    assert len(frame) == 8 and frame["best"].sum() == 1
    assert set(pd.read_csv(out / "trials.csv")["number"]) == set(frame["number"])
    plans = sorted((out / "plans").glob("*.yaml"))
    assert len(plans) == frame["pareto"].sum() >= 1
    for path in plans:
        plan = load_plan(path)
        assert plan.lengths == [1024, 2048] and plan.budget == {"memory": 0.3, "bandwidth": 0.4}
        assert plan.memory_density(1024) <= 0.3 + 1e-9
        assert plan.read_density(2048) <= 0.4 + 1e-9
    best = load_plan(out / "best.yaml")
    row = frame[frame["best"]].iloc[0]
    pareto = frame[frame["pareto"] & frame["within_budget"]]
    assert row["loss"] == pareto["loss"].min()  # the documented rule
    assert best.metrics["trial"] == row["number"]
    summary = json.loads((out / "summary.json").read_text())
    assert {b["family"] for b in summary["baselines"]} <= {"window", "elastic", "sparq"}
    assert summary["baselines"], "uniform baselines within budget are drawn"
    assert summary["storage"] == "sqlite:///study.db (in this folder)"  # no machine path
    assert summary["config"]["budgets"] == BUDGETS and summary["config"]["trials"] == 8
    again = plan_search(
        profile_copy,
        SearchConfig(budgets=tuple(BUDGETS), trials=2),
        trials=11,  # a keyword overrides the config's field
        progress=False,
        model=synthetic_identity(4, 2, 2, 64),
    )  # same fingerprint, same result-shaping config: accepted
    assert len(again.trials) == 11  # resumed: 3 more, not 11 more
    assert again.study_name == result.study_name


def test_infeasible_budget_says_smallest(profile_copy):
    with pytest.raises(MoaSearchError) as err:
        plan_search(profile_copy, budgets=["memory=0.01"], trials=2, progress=False)
    message = str(err.value)
    assert "smallest feasible memory budget" in message and "\n" not in message
    smallest = float(message.split("memory=")[-1].split()[0])
    assert not (profile_copy / "plans").exists()
    plan_search(profile_copy, budgets=[f"memory={smallest + 1e-4:.4f}"], trials=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lengths": [4096]}, "4096 not profiled"),
        ({"patterns": ("dense", "quest")}, "unknown family 'quest'"),
        ({"budgets": ["memory=2"]}, r"fraction of dense must be in \(0, 1\]"),
        ({"model": synthetic_identity(4, 2, 2, 32)}, "model.fingerprint"),
        ({"objective": "measured"}, "needs a model"),
    ],
)
def test_bad_input_writes_nothing(profile_copy, kwargs, match):
    args = {"budgets": BUDGETS, "trials": 2, "progress": False, **kwargs}
    with pytest.raises(MoaSearchError, match=match) as err:
        plan_search(profile_copy, **args)
    assert "\n" not in str(err.value)
    assert not (profile_copy / "plans").exists()


def test_corrupt_storage(profile_copy):
    out = profile_copy / "plans"
    out.mkdir()
    (out / "study.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(MoaSearchError, match="storage sqlite:.*cannot open") as err:
        plan_search(profile_copy, budgets=BUDGETS, trials=2, progress=False)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["study.db"]


def test_locked_storage(profile_copy, monkeypatch):
    from moa_search.search import run

    monkeypatch.setattr(run, "SQLITE_TIMEOUT_S", 0.2)
    out = profile_copy / "plans"
    out.mkdir()
    holder = sqlite3.connect(out / "study.db")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(MoaSearchError, match="locked") as err:
            plan_search(profile_copy, budgets=BUDGETS, trials=2, progress=False)
        assert "\n" not in str(err.value)
    finally:
        holder.rollback()
        holder.close()
    assert sorted(p.name for p in out.iterdir()) == ["study.db"]


def test_named_study_with_other_settings_is_refused(profile_copy, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    plan_search(
        profile_copy,
        budgets=BUDGETS,
        trials=1,
        progress=False,
        storage=url,
        study_name="mine",
        out=tmp_path / "a",
    )
    with pytest.raises(MoaSearchError, match="other settings"):
        plan_search(
            profile_copy,
            budgets=["memory=0.5"],
            trials=2,
            progress=False,
            storage=url,
            study_name="mine",
            out=tmp_path / "b",
        )


def test_the_check_loads_the_model_where_it_is_told(profile_copy, monkeypatch):
    import moa_search.models as models
    from moa_search.search.check import CheckConfig

    placed = {}

    def fake_load(name, dtype=None, device=None, **_):
        placed.update(name=name, dtype=dtype, device=device)
        raise MoaSearchError("stop here")

    monkeypatch.setattr(models, "load_model", fake_load)
    check = CheckConfig(device="cuda:1", dtype="bfloat16")
    with pytest.raises(MoaSearchError, match="stop here"):
        plan_search(profile_copy, budgets=BUDGETS, trials=2, progress=False, model="m", check=check)
    assert placed == {"name": "m", "dtype": "bfloat16", "device": "cuda:1"}
