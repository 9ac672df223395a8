"""benchmarks/decode_spans.py on a tiny CPU model, so the GPU script cannot rot: both span
paths run the same floored plan, and the per-head path really is the one the cache takes
when a pattern has no affine span."""

from __future__ import annotations

import runpy
from pathlib import Path

from moa_search.patterns import Elastic
from moa_search.runtime.cache import _span_affine

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_spans.py"


def test_smoke_run_writes_both_modes(tmp_path: Path):
    script = runpy.run_path(str(SCRIPT))
    rows = script["main"](["--smoke", "--out", str(tmp_path)])
    assert [r["mode"] for r in rows] == ["fused", "per-head"]
    assert all(r["ms_per_step"] > 0 and r["elastic_heads"] > 0 for r in rows)
    assert "| x_per_head |" in (tmp_path / "decode_spans.md").read_text()
    floored = Elastic(sink=2, alpha=0.0, beta=0.25, floor=8)
    assert _span_affine([floored], "cpu") is not None, "floored twins take the fused path"
    with script["span_path"]("per-head"):
        assert _span_affine([floored], "cpu") is None
    assert Elastic.span_affine(floored) == (0.0, 0.25), "the patch is undone"
