"""benchmarks/sparq_decode.py --tiny on the CPU interpreter, so the script cannot rot."""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparq_decode.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="--tiny runs on the CPU interpreter")
def test_sparq_benchmark_tiny_runs(tmp_path: Path) -> None:
    main = runpy.run_path(str(SCRIPT))["main"]
    main(["--tiny", "--out", str(tmp_path)])
    with open(tmp_path / "sparq_decode.csv") as fh:
        rows = list(csv.DictReader(fh))
    methods = {r["method"] for r in rows}
    assert {"sdpa", "topk_gather", "radix_fp8", "radix_gather"} <= methods
    assert {"plan_sparq_window", "plan_dense_window"} <= methods
    for r in rows:
        if r["method"] == "radix_fp8":  # the kernels' byte count is the pattern's, per stage
            for stage in ("score", "select", "attend"):
                assert r[f"{stage}_bytes"] == r[f"{stage}_declared"]
            assert float(r["max_err_vs_ref"]) <= 2e-2
        if r["method"] == "radix_gather":  # same keys as the old pipeline: same rows
            assert float(r["max_diff_vs_topk"]) <= 2e-2
    assert "| score_us |" in (tmp_path / "sparq_decode.md").read_text()
