"""What a plan file may hold: numeric ranges, YAML size / depth / aliases, duplicate keys.

Each case used to pass load_plan (or hang in it) and fail later; now load_plan refuses it
with one line naming the file and the field, fast.
"""

from __future__ import annotations

import time

import pytest
import yaml
from typer.testing import CliRunner

from moa_search import MoaSearchError, load_plan, uniform_plan, validate
from moa_search.patterns import Elastic, Window, parse
from tests.conftest import tiny_llama

MAX_PARAM = 2**31 - 1  # moa_search.patterns.MAX_PARAM


@pytest.fixture
def base(model):
    return uniform_plan(model, "window:sink=4,span=16").to_dict()


def _write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _refused(path, *fragments):
    start = time.perf_counter()
    with pytest.raises(MoaSearchError) as err:
        load_plan(path)
    seconds = time.perf_counter() - start
    msg = str(err.value)
    assert seconds < 5, f"took {seconds:.1f} s"
    assert "\n" not in msg and str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# --- 3: integer ranges -----------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, field",
    [
        ("window:sink=4,span=1e30", "span"),
        ("window:sink=1e30,span=8", "sink"),
        ("elastic:sink=0,alpha=1e30,beta=0.5", "alpha"),
        ("sparq:r=4,k=1e30,local=4", "k"),
        ("window:span=2147483648", "span"),
    ],
)
def test_huge_numbers_are_refused_at_load(tmp_path, base, spec, field):
    base["default"] = spec
    _refused(_write(tmp_path, base), "default:", f"{field} must be at most {MAX_PARAM}")
    with pytest.raises(MoaSearchError, match=f"{field} must be at most"):
        parse(spec)


def test_max_param_is_the_runtime_limit():
    from moa_search import patterns

    assert patterns.MAX_PARAM == MAX_PARAM


def test_largest_allowed_values_still_load_and_run_costs(tmp_path, base):
    base["default"] = f"window:sink=4,span={MAX_PARAM}"
    plan = load_plan(_write(tmp_path, base))
    assert plan.memory_density(4096) == 1.0


def test_show_refuses_huge_span(tmp_path, base):
    from cli import app

    base["default"] = "window:sink=4,span=1e30"
    result = CliRunner().invoke(app, ["show", str(_write(tmp_path, base))])
    assert result.exit_code != 0
    assert isinstance(result.exception, MoaSearchError)
    assert "span must be at most" in str(result.exception)


def test_plan_objects_with_huge_numbers_are_refused(model):
    plan = uniform_plan(model, "dense")
    plan.heads[0] = [Window(sink=4, span=10**30), Elastic(alpha=1e30)]
    with pytest.raises(MoaSearchError, match=r"layers\.0\[0\]: span must be at most"):
        validate(plan)


def test_model_shape_is_bounded(tmp_path, base):
    base["model"]["num_layers"] = 10**9
    _refused(_write(tmp_path, base), "model.num_layers", "at most")
    base["model"]["num_layers"] = 2
    base["made_for"]["lengths"] = [10**30]
    _refused(_write(tmp_path, base, "q.yaml"), "made_for.lengths")


# --- 4: alias bombs, depth, recursion, size ---------------------------------------------
def _bomb(levels: int = 9, width: int = 9) -> list[str]:
    """Anchors a0..a9, each a list of ``width`` aliases of the previous: 9**9 leaves."""
    items = ['&a0 "window:sink=4,span=16"']
    for i in range(1, levels + 1):
        items.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return items


def _bomb_in(base, field):
    text = yaml.safe_dump(base, sort_keys=False)
    if field == "default":  # a list of patterns where a pattern string belongs
        value = "[" + ", ".join(_bomb()) + "]"
        return text.replace("default: window:sink=4,span=16", f"default: {value}")
    value = "{" + ", ".join(f"a{i}: {item}" for i, item in enumerate(_bomb())) + "}"
    return text.replace("metrics: {}", f"metrics: {value}")


@pytest.mark.parametrize("field", ["default", "metrics"])
def test_alias_bomb_is_refused_fast(tmp_path, base, field):
    _refused(_write(tmp_path, _bomb_in(base, field)), f"{field}: YAML expands to more than")


def test_show_refuses_alias_bomb_in_metrics(tmp_path, base):
    from cli import app

    path = _write(tmp_path, _bomb_in(base, "metrics"))
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["show", str(path)])
    assert time.perf_counter() - start < 5
    assert isinstance(result.exception, MoaSearchError)
    assert "YAML expands to more than" in str(result.exception)


def test_deep_nesting_and_recursive_aliases_are_refused(tmp_path, base):
    base["metrics"] = {"deep": "X"}
    deep = yaml.safe_dump(base, sort_keys=False).replace("X", "[" * 5000 + "]" * 5000)
    _refused(_write(tmp_path, deep), "YAML nested deeper than")
    text = yaml.safe_dump(base, sort_keys=False).replace("deep: X", "loop: &r [*r]")
    _refused(_write(tmp_path, text, "r.yaml"), "recursive alias")


def test_too_many_aliases_and_too_large_files_are_refused(tmp_path, base, monkeypatch):
    from moa_search import plan as plan_mod

    text = yaml.safe_dump(base, sort_keys=False).replace("metrics: {}\n", "")
    refs = ", ".join(["*x"] * (getattr(plan_mod, "MAX_YAML_ALIASES", 4096) + 1))
    _refused(_write(tmp_path, f"{text}metrics: {{v: &x 1, l: [{refs}]}}\n"), "aliases")
    monkeypatch.setattr(plan_mod, "MAX_PLAN_BYTES", 100, raising=False)
    _refused(_write(tmp_path, base, "big.yaml"), "more than the 100 allowed")


def test_ordinary_aliases_still_work(tmp_path, model):
    plan = uniform_plan(model, "dense")
    data = plan.to_dict()
    text = yaml.safe_dump(data, sort_keys=False).replace(
        "layers: {}\n",
        "layers:\n  0: &row [dense, 'window:sink=1,span=4']\n  1: *row\n",
    )
    loaded = load_plan(_write(tmp_path, text))
    assert [p.spec() for p in loaded.heads[1]] == ["dense", "window:sink=1,span=4"]


# --- 5: duplicate keys --------------------------------------------------------------------
def test_duplicate_layer_keys_are_refused(tmp_path, base):
    text = yaml.safe_dump(base, sort_keys=False).replace(
        "layers: {}\n", "layers:\n  0: dense\n  1: dense\n  0: 'window:span=8'\n"
    )
    _refused(_write(tmp_path, text), "layers.0: duplicate key (lines", "each key may appear once")


def test_duplicate_keys_anywhere_are_refused(tmp_path, base):
    text = yaml.safe_dump(base, sort_keys=False) + "default: dense\n"
    _refused(_write(tmp_path, text), "default: duplicate key")
    text = yaml.safe_dump(base, sort_keys=False).replace(
        "metrics: {}", "metrics: {a: 1, b: 2, a: 3}"
    )
    _refused(_write(tmp_path, text, "m.yaml"), "metrics.a: duplicate key")
    text = yaml.safe_dump(base, sort_keys=False).replace("  head_dim: 16\n", "  head_dim: 16\n" * 2)
    _refused(_write(tmp_path, text, "h.yaml"), "model.head_dim: duplicate key")


@pytest.mark.parametrize(
    "spec, key",
    [
        ("window:span=256,span=8", "span"),
        ("sparq:r=4,k=8,r=2", "r"),
        ("elastic:beta=0.5,beta=1", "beta"),
    ],
)
def test_duplicate_pattern_parameters_are_refused(tmp_path, base, spec, key):
    with pytest.raises(MoaSearchError, match=f"parameter '{key}' given twice"):
        parse(spec)
    base["default"] = spec
    _refused(_write(tmp_path, base), "default:", "given twice")


def test_other_model_still_checked_after_limits(tmp_path, model):
    plan = uniform_plan(model, "dense")
    with pytest.raises(MoaSearchError, match="num_layers"):
        validate(plan, tiny_llama(layers=3))
