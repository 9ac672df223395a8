"""benchmarks/decode_step.py on a tiny CPU model, so the GPU script cannot rot: every
variant runs for each point, and the kernels' settings are back afterwards."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from moa_search.kernels import decode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_step.py"


def test_smoke_run_times_every_variant_and_restores_tuning(tmp_path: Path):
    before = dict(decode.TUNING)
    script = runpy.run_path(str(SCRIPT))
    rows = script["main"](["--smoke", "--out", str(tmp_path)])
    assert {(r["config"], r["variant"]) for r in rows} == {
        (c, v) for c in ("dense", "plan") for v in script["VARIANTS"]
    }
    assert all(r["ms"] > 0 and r["x_neither"] > 0 for r in rows)
    assert "| x_neither |" in (tmp_path / "decode_step.md").read_text()
    assert before == decode.TUNING


def test_points_parse_and_refuse_bad_input():
    parse = runpy.run_path(str(SCRIPT))["parse_points"]
    assert parse("dense:11x32768, plan:44x32768") == [("dense", 11, 32768), ("plan", 44, 32768)]
    for bad in ("sparq:8x1024", "plan:8", "plan:ax10", ""):
        with pytest.raises(SystemExit):
            parse(bad)
