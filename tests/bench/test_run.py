"""bench() end to end on CPU with the tiny config-only shape: rows per config, run.json."""

from __future__ import annotations

import json

import pytest

from moa_search.bench import decode_loop, report
from moa_search.bench.run import CONFIG_SPECS, BenchConfig, bench


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


def _tiny(**kw) -> BenchConfig:
    base = dict(
        synthetic=0.5, batch=2, context=48, new_tokens=3, memory_budget=None,
        prefill_batch=None, overhead_at=None, dtype="float32", device="cpu",
        compile_backend="aot_eager",
    )  # fmt: skip
    return BenchConfig(**{**base, **kw})


def test_every_config_runs_side_by_side(tmp_path) -> None:
    """All configs in one run (compiled ones traced with aot_eager on the CPU); the table
    puts each beside dense-moa and the fastest transformers config."""
    # FlashInfer's peers need CUDA and flashinfer: test_flashinfer_peer covers them
    configs = tuple(c for c, spec in CONFIG_SPECS.items() if spec.cache != "flashinfer")
    rows = bench("tiny-llama", None, _tiny(configs=configs), out=tmp_path)
    decode = {r["config"]: r for r in rows if r["mode"] == "sweep"}
    assert set(decode) == set(configs)
    assert {c: r["status"] for c, r in decode.items()} == dict.fromkeys(configs, "ok")
    assert decode["hf-dynamic"]["kv_bytes"] > 0 and "kv_err_pct" not in decode["hf-dynamic"]
    table = (tmp_path / "bench.md").read_text()
    assert "x best transformers" in table
    plan_line = next(line for line in table.splitlines() if "| plan |" in line)
    assert "(dense-sdpa)" in plan_line or "(hf-" in plan_line


def test_a_failing_config_is_a_row_not_a_crash(tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no such cache here\nsecond line")

    monkeypatch.setattr(decode_loop.DynamicLoop, "allocate", broken)
    rows = bench("tiny-llama", None, _tiny(configs=("hf-dynamic", "dense-moa")), out=tmp_path)
    status = {r["config"]: r["status"] for r in rows if r["mode"] == "sweep"}
    assert status == {"hf-dynamic": "error: RuntimeError: no such cache here", "dense-moa": "ok"}


def test_report_knows_the_transformers_configs() -> None:
    hf = tuple(c for c, s in CONFIG_SPECS.items() if s.cache in ("static", "dynamic"))
    assert hf == report.HF_CONFIGS


def test_unknown_config_is_refused(tmp_path) -> None:
    with pytest.raises(Exception, match="unknown config 'dense-flash'"):
        bench("tiny-llama", None, _tiny(configs=("dense-flash",)), out=tmp_path)


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        ("_mixed_decode_kernel", "attention"),
        ("_merge_kernel", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
        ("nvjet_tst_128x64_64x4_1x2_h_bz_TNT", "gemm"),
        # repeat_kv's expand + reshape, and DynamicCache's torch.cat
        ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copy"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),  # a fused RMSNorm
        ("_decode_append_kernel", "other"),
    ],
)
def test_kernel_categories(kernel: str, kind: str) -> None:
    from moa_search.bench.run import _category

    assert _category(kernel) == kind


def test_speedups_compare_like_with_like() -> None:
    rows = {
        c: {"config": c, "tok_s": t}
        for c, t in [("dense-moa", 100.0), ("dense-moa-compiled", 125.0), ("hf-dynamic", 20.0),
                     ("dense-sdpa", 10.0), ("plan", 150.0), ("plan-compiled", 250.0)]
    }  # fmt: skip
    compiled = report._speedups(rows["plan-compiled"], rows.get)
    assert compiled["dense-moa"] == pytest.approx(2.0)  # over dense-moa-compiled
    assert compiled["best-hf"] == pytest.approx(12.5) and compiled["best-hf-config"] == "hf-dynamic"
    assert report._speedups(rows["plan"], rows.get)["dense-moa"] == pytest.approx(1.5)
