"""SparQ decode benchmark: dense SDPA, the previous gather pipeline and the new pipeline.

One new token per sequence, Llama-3-8B attention shape (32 query heads, 8 KV heads,
head_dim 128, bf16), SparQ on all 8 KV heads at the paper's 1/8 (r = d/8, k = N/16) and
1/4 (r = d/4, k = N/8) transfers, at (B=8, N=64k) and (B=1, N=128k). Rows:

- ``sdpa``: dense ``scaled_dot_product_attention(enable_gqa=True)``, the baseline;
- ``topk_gather``: the previous pipeline (``kernels.sparq_topk``: r columns gathered from
  the packed cache, torch.topk), what the runtime ran before;
- ``radix_fp8`` (the runtime's path), ``radix_bf16`` and ``radix_gather``: the new pipeline
  with an fp8 or bf16 side buffer, or gathering from the packed cache;
- ``plan_sparq_window`` vs ``plan_dense_window``: one runtime layer (``MoALayerCache`` +
  ``kernel_dispatch.decode_layer``, new token stored each step) of 4 SparQ 1/8 + 4
  window(sink 64, span 1024) heads against the same plan with those SparQ heads dense.

Times are medians of CUDA-graph replays. For the new pipeline a per-stage breakdown
(score, select, attend; CUDA events around each stage, eager launches) is printed with
the bytes each stage moves by the kernels' own count (``sparq_kernel_bytes``) next to the
pattern's declaration (``patterns.sparq_step_bytes``) and the achieved GB/s.

    python benchmarks/sparq_decode.py --out OUT [--quick]
    python benchmarks/sparq_decode.py --sweep --out OUT   # launch knobs at the 3 targets
    TRITON_INTERPRET=1 python benchmarks/sparq_decode.py --tiny --out OUT   # CPU smoke run

Writes OUT/sparq_decode.csv and OUT/sparq_decode.md; ``--sweep`` instead times the fp8
pipeline under each of ``SWEEP``'s ``sparq.TUNING`` variants at the issue's three target
points (SDPA timed in the same run) and writes OUT/sparq_sweep.csv and OUT/sparq_sweep.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import moa_search.kernels as mk
from moa_search.bench.report import markdown_table, write_csv
from moa_search.files import write_text
from moa_search.kernels import sparq as sparq_mod
from moa_search.kernels import sparq_topk
from moa_search.kernels.reference import sparq_decode_ref
from moa_search.kernels.testing import fix_interpreter_loop_bounds
from moa_search.patterns import SparQ, Window, parse, sparq_step_bytes
from moa_search.runtime.cache import MoALayerCache
from moa_search.runtime.kernel_dispatch import decode_layer
from moa_search.runtime.scores import Logits

KB = 1024
LOCAL = 16


@dataclass(frozen=True)
class Setup:
    """Attention shape and the (B, N) points of one run."""

    hq: int
    hkv: int
    dim: int
    shapes: tuple[tuple[int, int], ...]
    device: str
    reps: int  # eager repetitions of the stage breakdown
    variants: tuple[str, ...] = ("fp8", "bf16", "gather")  # new-pipeline step-1 sources

    @property
    def group(self) -> int:
        return self.hq // self.hkv


FULL = Setup(32, 8, 128, ((8, 64 * KB), (1, 128 * KB)), "cuda", 20)
TINY = Setup(8, 2, 32, ((2, 300), (1, 400)), "cpu", 1, ("fp8", "gather"))
SIDE = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "gather": None}


def transfers(dim: int, n: int) -> dict[str, SparQ]:
    """The paper's two settings as patterns (what the search would price)."""
    return {
        "1/8": SparQ(r=max(1, dim // 8), k=n // 16, local=LOCAL),
        "1/4": SparQ(r=max(1, dim // 4), k=n // 8, local=LOCAL),
    }


# --- timing -------------------------------------------------------------------------------
REP_MS = {"rep": 40}  # --quick halves it


def bench(fn: Callable[[], object], device: str) -> float:
    """Median microseconds of fn: CUDA-graph replays on a GPU, wall clock on CPU."""
    fn()
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing as tt  # noqa: PLC0415

    torch.cuda.synchronize()
    try:
        return 1e3 * float(tt.do_bench_cudagraph(fn, rep=REP_MS["rep"], return_mode="median"))
    except Exception as exc:  # noqa: BLE001 - report and fall back
        print(f"  (cuda graph failed: {type(exc).__name__}; timing eager launches)")
        torch.cuda.synchronize()
        return 1e3 * float(tt.do_bench(fn, warmup=10, rep=REP_MS["rep"], return_mode="median"))


class StageClock:
    """``marks`` hook of ``sparq_decode``: events (GPU) or wall clock (CPU) per stage."""

    def __init__(self, device: str):
        self.device, self.samples, self._open = device, {}, []

    def __call__(self, stage: str) -> None:
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self._open.append((stage, ev))

    def close(self) -> None:
        """Turn the marks of one call into per-stage durations (us)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        for (stage, a), (_, b) in zip(self._open, self._open[1:]):
            us = a.elapsed_time(b) * 1e3 if self.device == "cuda" else (b - a) * 1e6
            self.samples.setdefault(stage, []).append(us)
        self._open = []

    def medians(self) -> dict[str, float]:
        return {s: statistics.median(v) for s, v in self.samples.items()}


# --- one shape ----------------------------------------------------------------------------
def tensors(setup: Setup, batch: int, n: int) -> dict:
    """Random q, dense packed caches (all KV heads, slot = offset + position), V sums."""
    gen = torch.Generator(device=setup.device).manual_seed(batch * n)
    dev, d, hkv = setup.device, setup.dim, setup.hkv
    bf16 = {"device": dev, "dtype": torch.bfloat16}
    k = torch.randn(batch, hkv * n, d, generator=gen, **bf16)
    v = torch.randn(batch, hkv * n, d, generator=gen, **bf16)
    i32 = {"dtype": torch.int32, "device": dev}
    return {
        "q": torch.randn(batch, setup.hq, d, generator=gen, **bf16),
        "k_cache": k,
        "v_cache": v,
        "head_offset": torch.arange(hkv, **i32) * n,
        "seq_len": torch.full((batch,), n, **i32),
        "v_sum": v.view(batch, hkv, n, d).float().sum(2),
        "head_ids": torch.arange(hkv, **i32),
    }


def run_shape(setup: Setup, batch: int, n: int, rows: list[dict]) -> None:
    t = tensors(setup, batch, n)
    dev, d = setup.device, setup.dim
    k4 = t["k_cache"].view(batch, setup.hkv, n, d)
    v4 = t["v_cache"].view(batch, setup.hkv, n, d)
    sdpa = functools.partial(
        F.scaled_dot_product_attention, t["q"][:, :, None], k4, v4, enable_gqa=True
    )
    t_sdpa = bench(sdpa, dev)
    dense_bytes = 2 * batch * setup.hkv * n * d * 2

    def add(transfer: str, method: str, us: float, nbytes: int | None, **extra) -> None:
        row = {"B": batch, "N": n, "transfer": transfer, "method": method,
               "time_us": round(us, 1), "speedup_vs_sdpa": round(t_sdpa / us, 2)}  # fmt: skip
        if nbytes is not None:
            row |= {"bytes_read": int(nbytes), "GBps": round(nbytes / us / 1e3, 1)}
        row |= extra
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    add("dense", "sdpa", t_sdpa, dense_bytes)
    args = {key: t[key] for key in ("q", "k_cache", "v_cache", "head_offset", "seq_len",
                                    "v_sum")}  # fmt: skip
    for transfer, p in transfers(d, n).items():
        common = dict(r=p.r, k=p.k, local=LOCAL, scale=d**-0.5, head_ids=t["head_ids"])
        base = torch.empty_like(t["q"])
        legacy = functools.partial(sparq_topk.sparq_decode_topk, **args, **common, out=base,
                                   max_len=n)  # fmt: skip
        add(transfer, "topk_gather", bench(legacy, dev), None)
        for name in setup.variants:
            kt = None
            if SIDE[name] is not None:
                kt = mk.sparq_kt_from_cache(t["k_cache"], t["head_offset"], t["head_ids"], n,
                                            SIDE[name])  # fmt: skip
            out = torch.empty_like(t["q"])
            run = functools.partial(mk.sparq_decode, **args, **common, out=out, max_len=n, kt=kt)
            us = bench(run, dev)
            extra = stages(setup, batch, n, p, kt, run)
            if name != "fp8":  # exact (bf16) scores: the same rows as the old pipeline
                extra["max_diff_vs_topk"] = f"{(out - base).abs().max().item():.2e}"
            elif dev != "cuda":  # the float64 reference (a loop: CPU sizes only)
                ref = sparq_decode_ref(**args, **common, score_dtype=SIDE[name])
                extra["max_err_vs_ref"] = f"{(out.double() - ref).abs().max().item():.2e}"
            side = kt.element_size() if kt is not None else None
            total = batch * setup.hkv * sum(mk.sparq_kernel_bytes(n, d, p.r, p.k_at(n), 2,
                                                                  side).values())  # fmt: skip
            add(transfer, f"radix_{name}", us, total, **extra)
            del kt


def stages(setup: Setup, batch: int, n: int, p: SparQ, kt, run) -> dict:  # noqa: ANN001
    """Per stage: median time, bytes by the kernels' count and by the pattern's, GB/s."""
    d = setup.dim
    side = kt.element_size() if kt is not None else None
    counted = mk.sparq_kernel_bytes(n, d, p.r, p.k_at(n), 2, side)
    declared = sparq_step_bytes(n, d, p.r, p.k_at(n), 2, side) if side else counted
    clock = StageClock(setup.device)
    for _ in range(setup.reps):
        run(marks=clock)
        clock.close()
    stage_us = clock.medians()
    extra: dict = {}
    for stage in ("score", "select", "attend"):
        b_k, b_d = batch * setup.hkv * counted[stage], batch * setup.hkv * declared[stage]
        extra |= {f"{stage}_us": round(stage_us[stage], 1), f"{stage}_bytes": int(b_k),
                  f"{stage}_declared": int(b_d),
                  f"{stage}_GBps": round(b_k / stage_us[stage] / 1e3, 1)}  # fmt: skip
    return extra


def run_plan(setup: Setup, batch: int, n: int, rows: list[dict]) -> None:
    """One runtime layer: SparQ + window heads vs the same plan with dense for SparQ."""
    d, dev = setup.dim, setup.device
    sparq = transfers(d, n)["1/8"]
    window = Window(sink=64, span=min(1024, n // 2))
    half = setup.hkv // 2
    times = {}
    for label, first in (("plan_sparq_window", sparq), ("plan_dense_window", parse("dense"))):
        patterns = [first] * half + [window] * (setup.hkv - half)
        layer = MoALayerCache(patterns, max_cache_len=n + 16)
        gen = torch.Generator(device=dev).manual_seed(n)
        bf16 = {"device": dev, "dtype": torch.bfloat16}
        kv = torch.randn(batch, setup.hkv, n, d, generator=gen, **bf16)
        pos = torch.arange(n, device=dev)[None].expand(batch, -1)
        layer.update(kv, kv)
        layer.append(kv, kv, pos)  # prefill: fills K, V, V sums and the side buffer
        del kv
        q = torch.randn(batch, setup.hq, 1, d, generator=gen, **bf16)
        key = torch.randn(batch, setup.hkv, 1, d, generator=gen, **bf16)
        out = torch.empty_like(q)

        def step(layer=layer, q=q, key=key, out=out) -> None:  # noqa: ANN001
            # every call decodes token n: a graph captures hundreds of calls and replays
            # them, and the cache must neither grow (host side) nor pass its capacity
            layer.processed = n
            layer.lengths.fill_(n)
            decode_layer(mk, layer, q, out, Logits(d**-0.5), key=key, value=key)

        times[label] = bench(step, dev)
        del layer
    for label, us in times.items():
        row = {"B": batch, "N": n, "transfer": "plan", "method": label, "time_us": round(us, 1),
               "speedup_vs_dense_plan": round(times["plan_dense_window"] / us, 2)}  # fmt: skip
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


# --- launch-knob sweep ---------------------------------------------------------------------
#: sparq.TUNING overrides tried by --sweep (the first is the default); few enough that the
#: whole sweep (Triton compiles included) stays under 3 minutes on an H200: variants that
#: change only chunk sizes reuse the compiled kernels
SWEEP: dict[str, dict[str, int]] = {
    "default": {},
    "score_blk512_w4": {"score_block": 512, "score_warps": 4},
    "score_blk1024_w4": {"score_warps": 4},
    "score_blk2048": {"score_block": 2048},
    "fp8_hw_cvt": {"fp8_decode": 0},
    "score_chunk1k": {"score_chunk_lo": 1024},
    "score_per_sm4": {"score_per_sm": 4},
    "score_per_sm32": {"score_per_sm": 32, "score_chunk_lo": 1024},
    "select_blk1024": {"radix_block": 1024, "select_chunk_lo": 2048},
    "select_w8_per_sm4": {"select_warps": 8, "select_per_sm": 4},
    "attend_blk64": {"attend_block": 64},
    "attend_chunk1k": {"attend_chunk_hi": 1024, "attend_per_sm": 8},
}
#: (B, N, transfer) points of the issue's targets (1/8: >= 3x, >= 2x; 1/4: >= 2x SDPA)
TARGETS = ((8, 64 * KB, "1/8"), (1, 128 * KB, "1/8"), (8, 64 * KB, "1/4"))
TINY_TARGETS = ((2, 300, "1/8"), (1, 400, "1/4"))
SWEEP_BUDGET_S = 150  # later variants are skipped past this (compile-heavy GPUs)


def run_sweep(setup: Setup, targets: tuple, variants: dict, rows: list[dict]) -> None:
    """Time the fp8 pipeline per (point, variant); SDPA per point in the same run."""
    t0, base = time.time(), dict(sparq_mod.TUNING)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for batch, n, transfer in targets:
        by_shape.setdefault((batch, n), []).append(transfer)
    try:
        for (batch, n), which in by_shape.items():
            t = tensors(setup, batch, n)
            d = setup.dim
            k4 = t["k_cache"].view(batch, setup.hkv, n, d)
            v4 = t["v_cache"].view(batch, setup.hkv, n, d)
            t_sdpa = bench(functools.partial(F.scaled_dot_product_attention, t["q"][:, :, None],
                                             k4, v4, enable_gqa=True), setup.device)  # fmt: skip
            kt = mk.sparq_kt_from_cache(t["k_cache"], t["head_offset"], t["head_ids"], n,
                                        torch.float8_e4m3fn)  # fmt: skip
            for transfer in which:
                first = None
                for name, over in variants.items():
                    if time.time() - t0 > SWEEP_BUDGET_S:
                        print(f"  (sweep budget spent: {name} at B={batch} N={n} skipped)")
                        continue
                    sparq_mod.TUNING.clear()
                    sparq_mod.TUNING.update(base | over)
                    row = sweep_point(setup, t, kt, batch, n, transfer, t_sdpa)
                    out = row.pop("_out")
                    first = out if first is None else first
                    row = {"variant": name} | row
                    row["max_diff_vs_default"] = f"{(out - first).abs().max().item():.2e}"
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del t, kt, k4, v4
            if setup.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        sparq_mod.TUNING.clear()
        sparq_mod.TUNING.update(base)


def sweep_point(setup: Setup, t: dict, kt, batch: int, n: int, transfer: str,  # noqa: ANN001
                t_sdpa: float) -> dict:  # fmt: skip
    """One variant at one point: graph-replay time, stage breakdown, ratio to SDPA."""
    d = setup.dim
    p = transfers(d, n)[transfer]
    args = {key: t[key] for key in ("q", "k_cache", "v_cache", "head_offset", "seq_len",
                                    "v_sum", "head_ids")}  # fmt: skip
    out = torch.empty_like(t["q"])
    run = functools.partial(mk.sparq_decode, **args, r=p.r, k=p.k, local=LOCAL, scale=d**-0.5,
                            out=out, max_len=n, kt=kt)  # fmt: skip
    us = bench(run, setup.device)
    total = batch * setup.hkv * sum(mk.sparq_kernel_bytes(n, d, p.r, p.k_at(n), 2, 1).values())
    row = {"B": batch, "N": n, "transfer": transfer, "time_us": round(us, 1),
           "sdpa_us": round(t_sdpa, 1), "speedup_vs_sdpa": round(t_sdpa / us, 2),
           "GBps": round(total / us / 1e3, 1)}  # fmt: skip
    row |= stages(setup, batch, n, p, kt, run)
    run()
    row["_out"] = out.clone()
    return row


def write_sweep(out: Path, rows: list[dict], header: str) -> None:
    """CSV of every (point, variant) and a markdown table with the best variant per point."""
    write_csv(rows, out / "sparq_sweep.csv")
    cols = ["variant", "B", "N", "transfer", "time_us", "sdpa_us", "speedup_vs_sdpa",
            "score_us", "score_GBps", "select_us", "select_GBps", "attend_us", "attend_GBps",
            "GBps", "max_diff_vs_default"]  # fmt: skip
    lines = [header, "", "Knobs per variant (sparq.TUNING overrides): "
             + "; ".join(f"{k}: {v or 'defaults'}" for k, v in SWEEP.items()), ""]  # fmt: skip
    lines += markdown_table(rows, cols)
    lines += ["", "Best variant per point:", ""]
    for point in dict.fromkeys((r["B"], r["N"], r["transfer"]) for r in rows):
        best = min((r for r in rows if (r["B"], r["N"], r["transfer"]) == point),
                   key=lambda r: r["time_us"])  # fmt: skip
        lines.append(f"- B={point[0]} N={point[1]} {point[2]}: {best['variant']} "
                     f"{best['time_us']} us, {best['speedup_vs_sdpa']}x SDPA")  # fmt: skip
    write_text(out / "sparq_sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-len(set((r["B"], r["N"], r["transfer"]) for r in rows)) :]))


# --- output -------------------------------------------------------------------------------
def write(out: Path, rows: list[dict], header: str) -> None:
    write_csv(rows, out / "sparq_decode.csv")
    main_cols = ["B", "N", "transfer", "method", "time_us", "speedup_vs_sdpa",
                 "speedup_vs_dense_plan", "bytes_read", "GBps"]  # fmt: skip
    stage_cols = ["B", "N", "transfer", "method"] + [
        f"{s}_{c}" for s in ("score", "select", "attend") for c in ("us", "bytes", "declared",
                                                                    "GBps")]  # fmt: skip
    lines = [header, ""]
    for cols, keep in ((main_cols, "time_us"), (stage_cols, "score_us")):
        lines += markdown_table([r for r in rows if keep in r], cols, _cell)
        lines.append("")
    write_text(out / "sparq_decode.md", "\n".join(lines))


def _cell(value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return str(value)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--quick", action="store_true", help="fp8 side buffer only, 5 stage reps")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes (TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="sparq.TUNING variants at the targets")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: sparq_decode.py needs a CUDA GPU (CPU smoke run: TRITON_INTERPRET=1 "
                 "python benchmarks/sparq_decode.py --tiny --out OUT)")  # fmt: skip
    setup = TINY if args.tiny else FULL
    fix_interpreter_loop_bounds()  # CPU interpreter only (--tiny with TRITON_INTERPRET=1)
    if args.quick and not args.tiny:
        setup = Setup(setup.hq, setup.hkv, setup.dim, setup.shapes, setup.device, 5, ("fp8",))
        REP_MS["rep"] = 20
    args.out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0) if setup.device == "cuda" else "cpu (interpreter)"
    header = (f"# SparQ decode, {where}, bf16, {setup.hq} q / {setup.hkv} kv heads, "
              f"d={setup.dim}, torch {torch.__version__}")  # fmt: skip
    print(header)
    rows: list[dict] = []
    t0 = time.time()
    if args.sweep:
        REP_MS["rep"] = 20
        setup = Setup(setup.hq, setup.hkv, setup.dim, setup.shapes, setup.device, 5, ("fp8",))
        variants = dict(list(SWEEP.items())[:2]) if args.tiny else SWEEP
        run_sweep(setup, TINY_TARGETS if args.tiny else TARGETS, variants, rows)
        write_sweep(args.out, rows, header + f" ({time.time() - t0:.0f} s)")
        return rows
    for batch, n in setup.shapes:
        run_shape(setup, batch, n, rows)
        run_plan(setup, batch, n, rows)
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    write(args.out, rows, header + f" ({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
