"""Refusing to resume a profile names the argument that changed, not a derived field."""

from __future__ import annotations

import pytest

from moa_search.errors import MoaSearchError
from moa_search.profile import profile, store
from tests.profile.test_run import KW, _run, random_tokens


def _refusal(call) -> str:
    with pytest.raises(MoaSearchError, match="other arguments") as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and "--overwrite" in msg
    return msg


def test_changed_samples_is_named(model, tmp_path):
    _run(model, tmp_path)  # samples=2
    msg = _refusal(lambda: _run(model, tmp_path, samples=3))
    assert "samples (--samples): was" in msg, msg
    assert "calibration_hash" not in msg, msg


def test_changed_seed_is_named(model, tmp_path):
    _run(model, tmp_path)
    assert "seed (--seed): was 0, now 1" in _refusal(lambda: _run(model, tmp_path, seed=1))


def test_changed_calibration_data_is_said_plainly(model, tmp_path):
    _run(model, tmp_path)
    other = random_tokens(3, 128, seed=7)
    msg = _refusal(lambda: profile(model, calib=other, out=tmp_path / "p", **KW))
    assert "calibration_hash: the calibration tokens differ (--calib" in msg, msg


def test_user_options_come_before_derived_fields():
    old = {"calibration_hash": "a", "samples": {"64": 2}, "method_version": "x", "seed": 0}
    new = {"calibration_hash": "b", "samples": {"64": 3}, "method_version": "y", "seed": 0}
    assert store._first_difference(old, new).startswith("samples (--samples)")
    assert store._first_difference({**old, "samples": {"64": 3}}, new).startswith(
        "calibration_hash:"
    )
