"""evaluate() end to end on a tiny random Llama with a character tokenizer (seconds, no download).

A random model retrieves nothing, so these tests check the machinery: budgets, outputs,
intervals, determinism, the decode path, and the one-line errors. Quality numbers come from
the real-model run (see the slow test and the README command).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from moa_search import MoaSearchError, parse, save_plan, uniform_plan
from moa_search.evaluate import evaluate
from moa_search.runtime import cache as cache_module
from tests.conftest import tiny_llama

ROWS = [
    ["dense", "window:sink=4,span=60"],
    ["window:sink=4,span=60", "elastic:sink=4,alpha=8,beta=0.1"],
]
SMALL = dict(depths=(0.5,), samples=1, progress=False)


def _plan(model, rows=ROWS, lengths=(512,)):
    plan = uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in rows]
    plan.lengths = list(lengths)
    return plan


def test_full_pipeline_writes_tables_and_plots(model, tokenizer, tmp_path):
    path = save_plan(_plan(model, lengths=(384,)), tmp_path / "plan.yaml")
    res = evaluate(
        model,
        path,
        tokenizer=tokenizer,
        tasks=("ppl", "passkey"),
        lengths=(384, 512),
        out=tmp_path / "out",
        depths=(0.5,),
        samples=1,
        progress=False,
    )
    names = {p.name for p in res.files}
    assert {"results.csv", "results.md", "trials.csv", "derived.csv", "run.json"} <= names
    assert {"accuracy_vs_length.png", "needle_heatmap.png"} <= names
    summary = pd.read_csv(tmp_path / "out" / "results.csv")
    main = summary[summary.depth.isna()]
    assert set(main.method) == {"plan", "dense", "window", "elastic", "sparq"}
    assert set(main.task) == {"ppl", "passkey"}
    assert set(summary[summary.depth.notna()].depth) == {0.5}  # heatmap rows
    assert main[["value", "n"]].notna().all().all() and (main.n >= 1).all()
    acc = main[main.metric == "accuracy"]
    assert ((acc.ci_low <= acc.value) & (acc.value <= acc.ci_high)).all()
    # every baseline holds the plan's KV memory (window, elastic) or reads (sparq) per length
    for _, g in main.groupby("length"):
        d = g.groupby("method").first()
        assert abs(d.memory_density["window"] - d.memory_density["plan"]) < 0.01
        assert abs(d.memory_density["elastic"] - d.memory_density["plan"]) < 0.01
        # or, below what SparQ can read (its scoring and selection keys), the least
        assert d.read_density["sparq"] > d.read_density["plan"] - 0.01
        if d.read_density["sparq"] > d.read_density["plan"] + 0.01:
            assert "the least SparQ moves per step" in d.description["sparq"]
    assert not ((main.method == "sparq") & (main.task == "ppl")).any()  # decode-only: skipped
    assert main.beyond_profiled.tolist() == [n > 384 for n in main.length]
    # a random model retrieves nothing: no accuracy cell has signal, so no mean ratio
    assert set(res.derived.metric) == {
        "effective_context",
        "effective_context_moa",
        "max_relative_drop",
    }
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Wilson" in md and "sparq: perplexity not measured" in md and "| 512* |" in md
    config = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert config["tasks"] == ["ppl", "passkey"] and config["samples"] == 1
    assert config["lengths"] == [384, 512] and config["lm_eval"] is None


def test_budget_sweep_rebuilds_baselines_per_point(model, tokenizer, tmp_path):
    res = evaluate(
        model,
        _plan(model),
        tokenizer=tokenizer,
        baselines=("dense", "window"),
        tasks=("passkey",),
        lengths=(400,),
        budgets=(0.4, 0.6),
        out=tmp_path,
        **SMALL,
    )
    sweep = res.summary[(res.summary.section == "sweep") & res.summary.depth.isna()]
    assert set(sweep.point) == {"memory=0.4", "memory=0.6", "dense"}
    for point, want in (("memory=0.4", 0.4), ("memory=0.6", 0.6)):
        d = sweep[sweep.point == point].set_index("method").memory_density
        assert d["plan"] == pytest.approx(want, abs=0.01)
        assert d["window"] == pytest.approx(d["plan"], abs=0.01)
    assert (tmp_path / "budget_curves.png").exists()
    # the dense cell at the sweep length is reused from the main section, not rerun
    dense = res.trials[res.trials.method == "dense"]
    assert set(dense.section) == {"main", "sweep"} and dense.output.nunique() == 1


def test_dense_plan_equals_dense_reference(model, tokenizer, tmp_path):
    """The runtime path with an all-dense plan must reproduce the model's own numbers."""
    res = evaluate(
        model,
        uniform_plan(model, "dense"),
        tokenizer=tokenizer,
        baselines=("dense",),
        lengths=(400,),
        out=tmp_path,
        plots=False,
        **SMALL,
    )
    t = res.trials.set_index(["method", "task", "sample"])
    plan, dense = t.loc["plan"], t.loc["dense"]
    assert (plan.nll - dense.nll).abs().max(skipna=True) < 1e-4
    assert plan.output.tolist() == dense.output.tolist()


def test_retrieval_decodes_through_the_plan_cache(model, tokenizer, tmp_path, monkeypatch):
    """Retrieval must run the per-head cache (real eviction), not only a masked prefill."""
    made = []
    original = cache_module.MoACache.__init__

    def spy(self, plan, *args, **kwargs):
        made.append(plan)
        original(self, plan, *args, **kwargs)

    monkeypatch.setattr(cache_module.MoACache, "__init__", spy)
    evaluate(
        model,
        _plan(model),
        tokenizer=tokenizer,
        baselines=(),
        tasks=("passkey",),
        lengths=(400,),
        out=tmp_path,
        plots=False,
        **SMALL,
    )
    assert made and made[0].heads[0][1].spec() == "window:sink=4,span=60"


def test_runs_are_reproducible(model, tokenizer, tmp_path):
    kw = dict(
        tokenizer=tokenizer,
        baselines=("window",),
        tasks=("ppl", "kv-retrieval"),
        lengths=(400,),
        plots=False,
        **SMALL,
    )
    a = evaluate(model, _plan(model), out=tmp_path / "a", **kw).trials
    b = evaluate(model, _plan(model), out=tmp_path / "b", **kw).trials
    cols = ["method", "task", "seed", "nll", "correct", "output"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tasks=("ppl", "sudoku")), "unknown task 'sudoku'"),
        (dict(baselines=("streaming",)), "unknown baseline 'streaming'"),
        (dict(lengths=(5000,)), "exceeds the model's context"),
        (dict(lengths=(512,), depths=(1.5,)), "depths must be in"),
        (dict(plan=None), "a plan is required"),
    ],
)
def test_bad_input_is_one_line_error(model, tokenizer, tmp_path, kwargs, message):
    args = {"plan": _plan(model), "tokenizer": tokenizer, "out": tmp_path, "progress": False}
    args.update(kwargs)
    with pytest.raises(MoaSearchError, match=message) as err:
        evaluate(model, **args)
    assert "\n" not in str(err.value)


def test_plan_for_another_model_is_refused(model, tokenizer, tmp_path):
    other = tiny_llama(layers=3)
    path = save_plan(uniform_plan(other, "window:sink=4,span=60"), tmp_path / "other.yaml")
    with pytest.raises(MoaSearchError, match="num_layers") as err:
        evaluate(model, path, tokenizer=tokenizer, out=tmp_path, progress=False)
    assert "\n" not in str(err.value) and "other.yaml" in str(err.value)


@pytest.mark.slow
def test_default_model_smoke(tmp_path):
    """The real default model at a short length: every method runs and dense retrieves."""
    from moa_search.models import default_model_dir, load_model, load_tokenizer

    if not default_model_dir().exists():
        pytest.skip("default model not converted yet")
    model = load_model()
    plan = uniform_plan(model, "window:sink=64,span=128")
    res = evaluate(
        model,
        plan,
        tokenizer=load_tokenizer(),
        lengths=(512,),
        depths=(0.5,),
        samples=2,
        out=tmp_path,
        progress=False,
    )
    dense = res.summary.query("method == 'dense' and task == 'passkey' and depth != depth")
    assert dense.value.iloc[0] > 0


def test_an_interrupted_run_resumes_its_finished_cells(model, tokenizer, tmp_path, monkeypatch):
    import moa_search.evaluate.run as run_module

    kw = dict(
        tokenizer=tokenizer, baselines=("window",), tasks=("ppl", "passkey"), lengths=(400,),
        plots=False, **SMALL,
    )  # fmt: skip
    whole = evaluate(model, _plan(model), out=tmp_path / "whole", **kw).trials
    real, calls = run_module.run_items, []

    def counted(net, tok, method, items):
        calls.extend([1] * len(items))
        if len(calls) == len(whole) - 1:
            raise KeyboardInterrupt  # cut off inside the last cells
        return real(net, tok, method, items)

    monkeypatch.setattr(run_module, "run_items", counted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, _plan(model), out=tmp_path / "cut", **kw)
    finished = len(pd.read_csv(tmp_path / "cut" / "trials.partial.csv"))
    assert 0 < finished < len(whole)
    calls.clear()
    resumed = evaluate(model, _plan(model), out=tmp_path / "cut", **kw).trials
    assert len(calls) == len(whole) - finished  # only the unfinished cells ran again
    cols = ["method", "task", "seed", "nll", "correct", "output"]
    pd.testing.assert_frame_equal(resumed[cols], whole[cols], check_dtype=False)
    assert not (tmp_path / "cut" / "trials.partial.csv").exists()
    # a partial run of other settings is never reused
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, _plan(model), out=tmp_path / "other", **kw)
    monkeypatch.setattr(
        run_module,
        "run_items",
        lambda n, t, m, items: calls.extend([1] * len(items)) or real(n, t, m, items),
    )
    calls.clear()
    evaluate(model, _plan(model), out=tmp_path / "other", **{**kw, "seed": 1})
    assert len(calls) == len(whole)


def test_prompts_generated_in_batches_equal_one_at_a_time(model, tokenizer, tmp_path):
    kw = dict(
        tokenizer=tokenizer, baselines=("window",), tasks=("passkey", "kv-retrieval"),
        lengths=(300, 400), depths=(0.2, 0.8), samples=3, plots=False, progress=False,
    )  # fmt: skip
    one = evaluate(model, _plan(model), out=tmp_path / "one", **kw).trials
    many = evaluate(model, _plan(model), out=tmp_path / "many", batch=4, **kw).trials
    cols = ["method", "task", "length", "depth", "sample", "correct", "output"]
    pd.testing.assert_frame_equal(many[cols], one[cols])
    assert one["output"].str.len().gt(0).any()  # something was generated to compare
    with pytest.raises(MoaSearchError, match="batch must be a positive integer"):
        evaluate(model, _plan(model), out=tmp_path / "bad", batch=0, **kw)


@pytest.mark.parametrize("with_plan", [False, True])
def test_a_left_padded_generate_batch_equals_each_prompt_alone(model, tokenizer, with_plan):
    import contextlib

    import torch

    from moa_search.data.retrieval import greedy_generate, greedy_generate_batch
    from moa_search.runtime import apply_plan

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 98, (n,), generator=g).tolist() for n in (50, 80, 65)]
    applied = apply_plan(model, _plan(model)) if with_plan else contextlib.nullcontext()
    with applied:
        together = greedy_generate_batch(model, tokenizer, prompts, max_new_tokens=8)
        alone = [greedy_generate(model, tokenizer, p, max_new_tokens=8) for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1  # distinct prompts, distinct answers: rows were not mixed up
