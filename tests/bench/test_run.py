"""bench() end to end on CPU with the tiny config-only shape: rows per config, run.json."""

from __future__ import annotations

import json

from moa_search.bench.run import BenchConfig, bench


def test_bench_runs_on_cpu_and_stores_its_config(tmp_path) -> None:
    config = BenchConfig(
        synthetic=0.5, batch=1, context=64, new_tokens=2, memory_budget=None,
        configs=("dense-moa", "plan"), overhead_at=None, dtype="float32", device="cpu",
    )  # fmt: skip
    rows = bench("tiny-llama", None, config, out=tmp_path, new_tokens=3)
    decode = [r for r in rows if r["mode"] == "sweep"]
    assert {r["config"] for r in decode} == {"dense-moa", "plan"}
    assert all(r["status"] == "ok" for r in rows)
    stored = json.loads((tmp_path / "run.json").read_text())["config"]
    assert stored["new_tokens"] == 3 and stored["configs"] == ["dense-moa", "plan"]
