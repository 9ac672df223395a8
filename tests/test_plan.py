"""Plan YAML: round trips, validation with field paths, refusal of other models, fuzzing."""

from __future__ import annotations

import random

import pytest
import yaml

from moa_search import MoaSearchError, load_plan, save_plan, uniform_plan, validate
from moa_search.patterns import Window, parse
from moa_search.plan import plan_from_dict
from tests.conftest import tiny_llama


@pytest.fixture
def mixed_plan(model):
    plan = uniform_plan(model, "window:sink=4,span=16")
    plan.heads[1] = [parse("dense"), parse("sparq:r=8,k=16,local=4")]
    plan.lengths = [64, 128]
    plan.budget = {"memory": 0.5}
    return plan


def test_round_trip(tmp_path, mixed_plan):
    path = save_plan(mixed_plan, tmp_path / "p.yaml")
    loaded = load_plan(path)
    assert loaded.heads == mixed_plan.heads
    assert loaded.model == mixed_plan.model
    assert loaded.lengths == [64, 128] and loaded.budget == {"memory": 0.5}
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_compact_yaml_uses_default_plus_overrides(tmp_path, mixed_plan):
    data = yaml.safe_load(save_plan(mixed_plan, tmp_path / "p.yaml").read_text())
    assert data["moa_search_plan"] == 1
    assert data["default"] == "window:sink=4,span=16"
    assert list(data["layers"]) == [1]


def test_uniform_plan_costs(model):
    plan = uniform_plan(model, Window(sink=4, span=12))
    n = 100
    assert plan.kv_bytes(n) == plan.dense_kv_bytes(n) * 16 // 100
    assert plan.memory_density(n) == pytest.approx(0.16)


def test_other_model_is_refused(mixed_plan):
    other = tiny_llama(layers=2, heads=4, kv_heads=2, vocab=256)
    with pytest.raises(MoaSearchError, match="fingerprint"):
        validate(mixed_plan, other)
    with pytest.raises(MoaSearchError, match="num_layers"):
        validate(mixed_plan, tiny_llama(layers=3))


def _dump(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(moa_search_plan=2), "moa_search_plan: expected 1"),
        (lambda d: d["model"].update(num_layers=0), "model.num_layers"),
        (lambda d: d["model"].pop("head_dim"), "model.head_dim"),
        (lambda d: d.update(default="bogus"), "default: unknown pattern"),
        (lambda d: d["layers"].update({1: ["dense"]}), "layers.1: expected 2 patterns"),
        (lambda d: d["layers"].update({7: "dense"}), "layers.7: layer index out of range"),
        (lambda d: d["layers"].update({1: ["dense", "window:span=0"]}), "layers.1[1]"),
        (lambda d: d["layers"].update({1: ["dense", "sparq:r=99,k=4"]}), "r must be <= head_dim"),
        (lambda d: d.update(extra=1), "extra: unknown field"),
        (lambda d: d["made_for"].update(lengths=["x"]), "made_for.lengths"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mixed_plan, mutate, fragment):
    data = mixed_plan.to_dict()
    mutate(data)
    path = _dump(tmp_path, data)
    with pytest.raises(MoaSearchError) as err:
        load_plan(path)
    message = str(err.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(MoaSearchError, match="malformed YAML"):
        load_plan(_dump(tmp_path, "a: [1, 2\n"))
    with pytest.raises(MoaSearchError, match="not found"):
        load_plan(tmp_path / "missing.yaml")
    with pytest.raises(MoaSearchError, match="expected a mapping"):
        load_plan(_dump(tmp_path, "- 1\n- 2\n"))


def _mutations(value, rng):
    choices = [None, -1, 0, 3.5, "x", [], {}, True, "window:span=-3", 10**9]
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        out = dict(value)
        if rng.random() < 0.3:
            out.pop(key)
        else:
            out[key] = _mutations(value[key], rng)
        return out
    if isinstance(value, list) and value:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutations(out[i], rng)
        return out
    return rng.choice(choices)


def test_fuzzed_plans_fail_cleanly(mixed_plan):
    rng = random.Random(0)
    base = mixed_plan.to_dict()
    failures = 0
    for _ in range(400):
        data = _mutations(base, rng)
        try:
            plan_from_dict(data, "fuzz.yaml")
        except MoaSearchError as exc:
            failures += 1
            assert str(exc).startswith("fuzz.yaml: ") and "\n" not in str(exc)
    assert failures > 100, "the fuzzer should mostly produce invalid plans"


def _gemma_plan():
    from tests.families import tiny_family_model

    model = tiny_family_model("gemma3_text")
    return model, uniform_plan(model, "window:sink=4,span=16")


def test_native_windows_are_recorded_only_for_sliding_models(model):
    _, plan = _gemma_plan()
    assert plan.model.native_windows == (8, None, 8)
    assert plan.model.to_dict()["native_windows"] == [8, None, 8]
    assert "native_windows" not in uniform_plan(model, "dense").to_dict()["model"]


@pytest.mark.parametrize(
    ("windows", "field"),
    [
        ([8, None], "model.native_windows:"),
        ([8, None, 0], "model.native_windows[2]"),
        ([8, "x", 8], "model.native_windows[1]"),
        ("8", "model.native_windows:"),
    ],
)
def test_bad_native_windows_are_one_line_errors(windows, field):
    _, plan = _gemma_plan()
    data = plan.to_dict()
    data["model"]["native_windows"] = windows
    with pytest.raises(MoaSearchError, match=field.replace("[", r"\[").replace("]", r"\]")) as err:
        plan_from_dict(data, "p.yaml")
    assert "\n" not in str(err.value)


def test_plan_for_other_windows_is_refused():
    from tests.families import tiny_family_model

    model, plan = _gemma_plan()
    plan = plan_from_dict(plan.to_dict())
    validate(plan, model)
    other = tiny_family_model("gemma3_text")
    other.config.sliding_window = 16
    with pytest.raises(MoaSearchError, match="native_windows"):
        validate(plan, other)
