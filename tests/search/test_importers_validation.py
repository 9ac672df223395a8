"""Importers check what they write: a plan is written only when load_plan would accept it,
and bad values in a peer's files are one-line errors naming the file and the field."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app
from moa_search import load_plan
from moa_search.errors import MoaSearchError
from moa_search.patterns import Window
from moa_search.search import importers
from moa_search.search.importers import import_duo, import_moa, import_plan
from moa_search.search.synthetic import synthetic_identity

IDENT = synthetic_identity(num_layers=2, num_kv_heads=2, group=2, head_dim=64)


@pytest.fixture
def moa_file(tmp_path):
    src = tmp_path / "moa.json"
    src.write_text(json.dumps({"alphas": [[0, 8], [4, 4]], "betas": [[0.5, 0.25], [0.1, 0.2]]}))
    return src


@pytest.fixture
def duo_tsv(tmp_path):
    src = tmp_path / "full_attention_heads.tsv"
    src.write_text("1\t0\n0\t1\n")
    return src


@pytest.fixture
def cli_model(monkeypatch):
    """The CLI's --model resolved to the synthetic identity (no model files needed)."""
    real = importers.model_identity
    monkeypatch.setattr(importers, "model_identity", lambda m: IDENT if m == "tiny" else real(m))
    return "tiny"


def _cli(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("sink", ["-5", "-1"])
def test_cli_import_moa_with_negative_sink_writes_nothing(tmp_path, moa_file, cli_model, sink):
    out = tmp_path / "plan.yaml"
    result = _cli(
        "import", "moa", str(moa_file), "--model", cli_model, "--sink", sink, "--out", str(out)
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, MoaSearchError)
    msg = str(result.exception)
    assert "sink" in msg and sink in msg and "\n" not in msg
    assert not out.exists()


def test_import_moa_refuses_bad_sink_values(moa_file):
    for bad in (-5, 2**40, 2.5, "64", True):
        with pytest.raises(MoaSearchError, match="sink: expected an integer"):
            import_moa(moa_file, IDENT, sink=bad)


def test_import_plan_validates_before_writing(tmp_path, moa_file, monkeypatch):
    """Whatever an importer builds, a plan load_plan would refuse is never written."""
    real = importers.import_moa

    def broken(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.heads[1][0] = Window(sink=0, span=0)  # invalid: span must be > 0
        return plan

    monkeypatch.setattr(importers, "import_moa", broken)
    out = tmp_path / "plan.yaml"
    with pytest.raises(MoaSearchError, match=r"layers\.1\[0\].*span must be > 0") as err:
        import_plan("moa", moa_file, IDENT, out)
    assert str(moa_file) in str(err.value)
    assert not out.exists()


def test_imported_plan_round_trips(tmp_path, moa_file):
    out = import_plan("moa", moa_file, IDENT, tmp_path / "plan.yaml", sink=0)
    assert load_plan(out).heads == import_moa(moa_file, IDENT, sink=0).heads


@pytest.mark.parametrize(
    "config, field",
    [
        ({"sink_size": "abc"}, "sink_size"),
        ({"sink_size": 64, "recent_size": "x"}, "recent_size"),
        ({"deploy_sink_size": -3}, "deploy_sink_size"),
        ({"recent_size": 0}, "recent_size"),
        ({"sink_size": [64]}, "sink_size"),
        ({"sink_size": 1e30}, "sink_size"),
        ({"recent_size": True}, "recent_size"),
    ],
)
def test_duo_config_values_are_checked(tmp_path, duo_tsv, config, field):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoaSearchError) as err:
        import_duo(duo_tsv, IDENT)
    msg = str(err.value)
    assert str(tmp_path / "config.json") in msg and f"{field}: expected an integer" in msg
    assert "\n" not in msg


def test_cli_import_duo_with_bad_config_is_one_line(tmp_path, duo_tsv, cli_model):
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": "abc"}))
    out = tmp_path / "plan.yaml"
    result = _cli("import", "duo", str(duo_tsv), "--model", cli_model, "--out", str(out))
    assert isinstance(result.exception, MoaSearchError)
    assert "sink_size: expected an integer" in str(result.exception)
    assert not out.exists()


def test_duo_config_zero_sink_is_kept_and_integral_floats_accepted(tmp_path, duo_tsv):
    (tmp_path / "config.json").write_text(
        json.dumps({"deploy_sink_size": 0, "sink_size": 64, "recent_size": 128.0})
    )
    plan = import_duo(duo_tsv, IDENT)
    assert plan.heads[0][1] == Window(sink=0, span=128)
