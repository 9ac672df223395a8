"""benchmarks/long_context.py on a tiny CPU model, so the GPU script cannot rot: rows for
every config and shape, ratios, CSV + markdown, OOM as a row status, no-CUDA as one line."""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "long_context.py"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT))


def test_smoke_run_writes_rows_and_ratios(script, tmp_path: Path):
    rows = script["main"](["--smoke", "--out", str(tmp_path)])
    assert {(r["config"], r["batch"]) for r in rows} == {
        (c, b) for c in ("dense-moa", "plan", "dense-sdpa") for b in (1, 2)
    }
    assert all(r["status"] == "ok" for r in rows)
    plan = [r for r in rows if r["config"] == "plan"]
    assert all(r["x_prefill"] > 0 and r["x_decode"] > 0 and r["x_decode_sdpa"] > 0 for r in plan)
    assert all("chunk:" in r["paths"] for r in plan)  # later chunks took cached_prefill
    with open(tmp_path / "long_context.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert "| x_prefill |" in (tmp_path / "long_context.md").read_text()


def test_out_of_memory_is_a_row_status(script, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    run_all = script["run_all"]
    monkeypatch.setitem(run_all.__globals__, "measure", boom)
    model = torch.nn.Linear(1, 1)
    rows = run_all(model, [(1, 8)], script["Settings"](device="cpu"), ("dense-moa", "plan"))
    assert [r["status"] for r in rows] == ["OOM", "OOM"]


def test_without_cuda_one_line_error(script, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU") as info:
        script["main"](["--out", str(tmp_path)])
    assert "\n" not in str(info.value)


def test_bad_chunk_one_line_error(script, tmp_path: Path):
    with pytest.raises(SystemExit, match="positive number of tokens"):
        script["main"](["--smoke", "--chunk", "0", "--out", str(tmp_path)])
