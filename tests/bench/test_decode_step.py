"""benchmarks/decode_step.py on a tiny CPU model, so the GPU script cannot rot: every
variant runs for each point, and a variant's settings are undone afterwards. (The kernels
are not imported here: tests/kernels sets Triton's interpreter up first.)"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_step.py"


def test_smoke_run_times_every_variant(tmp_path: Path):
    script = runpy.run_path(str(SCRIPT))
    rows = script["main"](["--smoke", "--out", str(tmp_path)])
    assert {(r["config"], r["variant"]) for r in rows} == {
        (c, v) for c in ("dense", "plan") for v in script["VARIANTS"]
    }
    assert all(r["ms"] > 0 and r["x_neither"] > 0 for r in rows)
    assert "| x_neither |" in (tmp_path / "decode_step.md").read_text()


def test_variant_settings_are_undone_even_on_error():
    variant_tuning = runpy.run_path(str(SCRIPT))["variant_tuning"]
    tuning = {"pdl": 1, "work_items": 1, "block_n": 64}
    with pytest.raises(RuntimeError), variant_tuning(tuning, {"pdl": 0, "work_items": 0}):
        assert tuning == {"pdl": 0, "work_items": 0, "block_n": 64}
        raise RuntimeError
    assert tuning == {"pdl": 1, "work_items": 1, "block_n": 64}


def test_points_parse_and_refuse_bad_input():
    parse = runpy.run_path(str(SCRIPT))["parse_points"]
    assert parse("dense:11x32768, plan:44x32768") == [("dense", 11, 32768), ("plan", 44, 32768)]
    for bad in ("sparq:8x1024", "plan:8", "plan:ax10", ""):
        with pytest.raises(SystemExit):
            parse(bad)
