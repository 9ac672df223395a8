"""Decode-attention benchmark: mixed-pattern Triton kernel and SparQ vs SDPA and FlexAttention.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), one new token
per sequence, all sequences at length N. For each (B, N) and plan: median time (CUDA-graph
replay), bytes the kernel must read, achieved bandwidth against the device's measured
copy bandwidth, speedup vs dense ``scaled_dot_product_attention(enable_gqa=True)`` and vs
``flex_attention`` with a block mask of the same pattern. Everything runs in one process.

    python benchmarks/decode_attention.py --out OUT_DIR [--quick] [--flex subset|all|none]

Writes OUT_DIR/decode_attention.csv, decode_attention.svg (speedup vs density per B, N)
and decode_attention.log (breakdowns, tuning).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import moa_search.kernels as mk
from moa_search.bench.report import write_csv
from moa_search.kernels import decode as decode_mod
from moa_search.kernels.testing import HeadGeom

HQ, HKV, D = 32, 8, 128
GROUP = HQ // HKV
DTYPE = torch.bfloat16
KB = 1024


LOG: list[str] = []
READ_BW = {"GBps": float("nan")}  # read-only bandwidth, set by main()


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


# --- timing -------------------------------------------------------------------------------
def bench(fn: Callable[[], object], rep_ms: int = 40) -> float:
    """Median milliseconds of fn, replayed from a CUDA graph (falls back to do_bench)."""
    import triton.testing as tt  # noqa: PLC0415

    fn()
    torch.cuda.synchronize()
    try:
        return float(tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception as exc:  # noqa: BLE001 - report and fall back
        log(f"  (cuda graph failed: {type(exc).__name__}: {str(exc)[:120]}; using do_bench)")
        torch.cuda.synchronize()
        return float(tt.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def profile_breakdown(fn: Callable[[], object], label: str, iters: int = 5) -> None:
    """Log the GPU kernels one call of fn launches, with their mean time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
    except Exception as exc:  # noqa: BLE001
        log(f"profile {label} failed: {exc}")
        return
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / iters
    parts = [f"{e.key[:48]} {e.device_time_total / iters:.0f}us" for e in events[:8]]
    log(f"profile {label}: kernels sum {total:.0f} us/call: " + "; ".join(parts))


def copy_bandwidth() -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, read-only GB/s), 4 GiB buffers.

    Timed with events (do_bench), not graph replay: a graph-captured memcpy of this size
    measured ~35% lower on the H200. Read-only: torch.amax over the buffer.
    """
    import triton.testing as tt  # noqa: PLC0415

    n = 1 << 30
    src = torch.randn(n, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms_copy = tt.do_bench(functools.partial(dst.copy_, src), rep=200, return_mode="median")
    ms_read = tt.do_bench(functools.partial(torch.amax, src), rep=200, return_mode="median")
    return 2 * 4 * n / (ms_copy * 1e-3) / 1e9, 4 * n / (ms_read * 1e-3) / 1e9


# --- plans ----------------------------------------------------------------------------------
def plans(n: int) -> dict[str, list[HeadGeom]]:
    """Nominal density -> 8 KV heads (dense / window+sink / elastic mixes)."""
    dense = HeadGeom.dense(n)
    return {
        "100%": [dense] * 8,
        "50%": [dense] * 2
        + [HeadGeom.elastic(0, 0.0, 0.5, n)] * 4
        + [HeadGeom.window(64, 512, n)] * 2,
        "25%": [dense] * 2 + [HeadGeom.window(64, 1024, n)] * 6,
        "12.5%": [HeadGeom.elastic(4, 0.0, 0.25, n)] * 4 + [HeadGeom.window(16, 256, n)] * 4,
    }


def layer_tensors(heads: list[HeadGeom], batch: int, n: int, dense_k, dense_v) -> dict:
    """Packed caches for ``heads`` (fresh random data; the dense plan reuses the dense cache)."""
    offsets, total = [], 0
    for hd in heads:
        offsets.append(total)
        total += hd.cap
    if all(h.kind == "dense" for h in heads):
        k, v = dense_k.view(batch, HKV * n, D), dense_v.view(batch, HKV * n, D)
    else:
        k = torch.randn(batch, total, D, device="cuda", dtype=DTYPE)
        v = torch.randn(batch, total, D, device="cuda", dtype=DTYPE)
    i32 = {"dtype": torch.int32, "device": "cuda"}
    return {
        "k_cache": k,
        "v_cache": v,
        "head_offset": torch.tensor(offsets, **i32),
        "head_sink": torch.tensor([h.sink for h in heads], **i32),
        "head_ring": torch.tensor([h.ring for h in heads], **i32),
        "span": torch.tensor([[h.span_fn(n) for h in heads]] * batch, **i32),
        "seq_len": torch.full((batch,), n, **i32),
    }


def flex_runner(heads: list[HeadGeom], batch: int, n: int, q, k4, v4, flex):
    """flex_attention on the logical (B, Hkv, N, D) cache with a block mask of the plan."""
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

    sink = torch.tensor([h.sink for h in heads], device="cuda")
    span = torch.tensor([h.span_fn(n) for h in heads], device="cuda")

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        kvh = h // GROUP
        return (kv_idx < sink[kvh]) | (kv_idx >= n - span[kvh])

    bm = create_block_mask(mask_mod, batch, HQ, 1, n, device="cuda")
    q4 = q[:, :, None, :]
    return lambda: flex(q4, k4, v4, block_mask=bm, enable_gqa=True, scale=D**-0.5)


# --- main -----------------------------------------------------------------------------------
def tune() -> dict:
    """Pick mixed_decode launch parameters: total time of B=8 N=64k dense, B=1 N=128k dense
    and B=8 N=64k at 25% density (so chunking is not tuned for dense plans only)."""
    dense_k = torch.randn(8, HKV, 64 * KB, D, device="cuda", dtype=DTYPE)
    dense_v = torch.randn_like(dense_k)
    configs = [
        {"block_n": 64, "num_warps": 4, "num_stages": 3, "chunk_hi": 1024},
        {"block_n": 64, "num_warps": 4, "num_stages": 3, "chunk_hi": 512},
        {"block_n": 64, "num_warps": 4, "num_stages": 3, "chunk_hi": 2048},
        {"block_n": 64, "num_warps": 4, "num_stages": 4, "chunk_hi": 1024},
        {"block_n": 128, "num_warps": 8, "num_stages": 2, "chunk_hi": 1024},
    ]
    cases = []
    for batch, n, plan in ((8, 64 * KB, "100%"), (1, 128 * KB, "100%"), (8, 64 * KB, "25%")):
        k = dense_k.view(-1)[: batch * HKV * n * D].view(batch, HKV * n, D)
        v = dense_v.view(-1)[: batch * HKV * n * D].view(batch, HKV * n, D)
        lay = layer_tensors(plans(n)[plan], batch, n, k, v)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
        cases.append(functools.partial(_mixed, q, lay, torch.empty_like(q), n))
    best, best_t = None, math.inf
    for cfg in configs:
        decode_mod.TUNING.update(cfg)
        times = [bench(fn) for fn in cases]
        log(f"tune {json.dumps(cfg)}: {[round(t * 1e3, 1) for t in times]} us")
        if sum(times) < best_t:
            best, best_t = cfg, sum(times)
    decode_mod.TUNING.update(best)
    log(f"tune best: {json.dumps(best)}")
    return best


def main() -> None:  # noqa: PLR0915
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--quick", action="store_true", help="B=8, N=64k only")
    ap.add_argument("--flex", choices=["subset", "all", "none"], default="subset")
    ap.add_argument("--no-tune", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    card = props.name
    log(f"device: {card}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    bw_copy, bw_read = copy_bandwidth()
    READ_BW["GBps"] = bw_read
    log(f"copy bandwidth (read+write): {bw_copy:.0f} GB/s; read-only (amax): {bw_read:.0f} GB/s")

    shapes = [(b, n * KB) for b in (1, 8, 32) for n in (4, 16, 64, 128)]
    if args.quick:
        shapes = [(8, 64 * KB)]
    flex_shapes = {(1, 128 * KB), (8, 64 * KB), (32, 16 * KB)}
    flex = None
    if args.flex != "none":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

            torch._dynamo.config.cache_size_limit = 64  # one compile per (shape, plan)
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:  # noqa: BLE001
            log(f"flex_attention unavailable: {exc}")

    if not args.no_tune:
        tune()
        torch.cuda.empty_cache()
    rows: list[dict] = []
    for batch, n in shapes:
        t0 = time.time()
        need = 2 * batch * HKV * n * D * 2 * 2.6  # dense cache + plan caches + kt + workspace
        free = torch.cuda.mem_get_info()[0]
        if need > 0.9 * free:
            log(f"skip B={batch} N={n}: needs ~{need / 1e9:.0f} GB, {free / 1e9:.0f} GB free")
            continue
        use_flex = flex is not None and (args.flex == "all" or (batch, n) in flex_shapes)
        new = run_shape(batch, n, card, bw_copy, flex if use_flex else None)
        torch.cuda.empty_cache()
        rows += new
        for row in new:
            log(
                f"B={batch:<2} N={n // KB:>3}k {row['plan']:<9} {row['method']:<20} "
                f"dens {row['density']:.3f} {row['time_us']:>9.1f} us "
                f"{row['GBps']:>6.0f} GB/s ({row['frac_copy_bw']:.2f} copy) "
                f"x{row['speedup_vs_sdpa']:.2f} sdpa"
                + (f" x{row['speedup_vs_flex']:.2f} flex" if "speedup_vs_flex" in row else "")
            )
        log(f"B={batch} N={n}: {time.time() - t0:.0f} s wall")

    write_outputs(args.out, rows, bw_copy)


def _mixed(q, lay, out, n):  # noqa: ANN001, ANN202
    return mk.mixed_decode(q, **lay, scale=D**-0.5, out=out, max_len=n)


def _sparq(q, lay, v_sum, ids, r, k, n, kt, out=None):  # noqa: ANN001, ANN202
    return mk.sparq_decode(
        q, lay["k_cache"], lay["v_cache"], lay["head_offset"], lay["seq_len"],
        v_sum, r, k, 16, D**-0.5, ids, out, max_len=n, kt=kt,
    )  # fmt: skip


def run_shape(batch: int, n: int, card: str, bw_copy: float, flex) -> list[dict]:  # noqa: ANN001
    """All plans, SparQ and baselines at one (B, N)."""
    rows: list[dict] = []
    dense_k = torch.randn(batch, HKV, n, D, device="cuda", dtype=DTYPE)
    dense_v = torch.randn(batch, HKV, n, D, device="cuda", dtype=DTYPE)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    dense_bytes = 2 * batch * HKV * n * D * 2
    t_sdpa = bench(
        functools.partial(
            F.scaled_dot_product_attention, q[:, :, None, :], dense_k, dense_v, enable_gqa=True
        )
    )

    def add(plan: str, method: str, ms: float, nbytes: int, density: float, **extra) -> None:
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(
            {
                "card": card,
                "B": batch,
                "N": n,
                "plan": plan,
                "method": method,
                "density": round(density, 4),
                "time_us": round(ms * 1e3, 1),
                "bytes_read": nbytes,
                "GBps": round(gbs, 1),
                "frac_copy_bw": round(gbs / bw_copy, 3),
                "frac_read_bw": round(gbs / READ_BW["GBps"], 3),
                "speedup_vs_sdpa": round(t_sdpa / ms, 3),
                **extra,
            }
        )

    add("100%", "sdpa", t_sdpa, dense_bytes, 1.0)
    for name, heads in plans(n).items():
        lay = layer_tensors(heads, batch, n, dense_k, dense_v)
        read = sum(h.read_rows(n) for h in heads) * batch * D * 2 * 2
        t = bench(functools.partial(_mixed, q, lay, torch.empty_like(q), n))
        if name == "100%":  # large-shape check (int32 overflow etc.) against SDPA
            ref = F.scaled_dot_product_attention(q[:, :, None], dense_k, dense_v, enable_gqa=True)
            err = (_mixed(q, lay, torch.empty_like(q), n).float() - ref[:, :, 0].float()).abs()
            log(f"check B={batch} N={n}: max |mixed - sdpa| = {err.max().item():.2e}")
        t_flex = None
        if flex is not None:
            try:
                t_flex = bench(flex_runner(heads, batch, n, q, dense_k, dense_v, flex))
                add(name, "flex", t_flex, read, read / dense_bytes)
            except Exception as exc:  # noqa: BLE001
                log(f"flex failed B={batch} N={n} {name}: {type(exc).__name__}: {exc}"[:300])
        if (batch, n) == (8, 64 * KB):
            profile_breakdown(functools.partial(_mixed, q, lay, torch.empty_like(q), n),
                              f"mixed {name} B=8 N=64k")  # fmt: skip
        extra = {"speedup_vs_flex": round(t_flex / t, 3)} if t_flex else {}
        add(name, "triton_mixed", t, read, read / dense_bytes, **extra)

    # SparQ, all 8 heads; transfer 1/4: r=32, k=N/8; 1/8: r=16, k=N/16 (patterns.SparQ
    # costs); benchmarks/sparq_decode.py has the stage breakdown and the old pipeline
    ids = torch.arange(HKV, dtype=torch.int32, device="cuda")
    lay = layer_tensors(plans(n)["100%"], batch, n, dense_k, dense_v)
    v_sum = torch.randn(batch, HKV, D, device="cuda", dtype=torch.float32)
    kt = mk.sparq_kt_from_cache(lay["k_cache"], lay["head_offset"], ids, n)
    for name, r, kk in (("sparq 1/4", 32, n // 8), ("sparq 1/8", 16, n // 16)):
        for layout, kt_arg in (("kt", kt), ("gather", None)):
            t = bench(functools.partial(_sparq, q, lay, v_sum, ids, r, kk, n, kt_arg,
                                        torch.empty_like(q)))  # fmt: skip
            side = kt_arg.element_size() if kt_arg is not None else None
            parts = mk.sparq_kernel_bytes(n, D, r, kk, 2, side)
            read = HKV * batch * sum(parts.values())
            add(name, f"triton_sparq_{layout}", t, read, read / dense_bytes)
    return rows


def write_outputs(out: Path, rows: list[dict], bw_copy: float) -> None:
    write_csv(rows, out / "decode_attention.csv")
    (out / "decode_attention.svg").write_text(svg_plot(rows))
    LOG.append(f"copy_bw_GBps={bw_copy:.1f} time={time.strftime('%Y-%m-%d %H:%M:%S')}")
    (out / "decode_attention.log").write_text("\n".join(LOG) + "\n")


def svg_plot(rows: list[dict]) -> str:
    """Speedup vs SDPA against KV density, one line per (B, N) (mixed kernel + SparQ kt)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["method"] in ("triton_mixed", "triton_sparq_kt"):
            label = f"B={r['B']} N={r['N'] // KB}k"
            series.setdefault(label, []).append((r["density"], r["speedup_vs_sdpa"]))
    w, h, pad = 760, 460, 60
    ymax = max([s for pts in series.values() for _, s in pts] + [1.0]) * 1.1

    def xy(dens: float, sp: float) -> tuple[float, float]:
        x = pad + (math.log2(max(dens, 1 / 64)) + 6) / 6 * (w - 2 * pad)
        return x, h - pad - sp / ymax * (h - 2 * pad)

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aa0077"]  # fmt: skip
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">decode attention '
             "speedup vs SDPA (bf16, 32q/8kv heads, D=128)</text>"]  # fmt: skip
    for k in range(7):
        x, _ = xy(2.0**-k, 0)
        parts.append(f'<text x="{x}" y="{h - pad + 16}" text-anchor="middle">1/{2**k}</text>')
    for s in range(int(ymax) + 1):
        _, y = xy(1, s)
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        parts.append(f'<text x="{pad - 6}" y="{y + 4}" text-anchor="end">{s}x</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">KV bytes read / dense '
                 "(log scale)</text>")  # fmt: skip
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        c = colors[i % len(colors)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(d, s) for d, s in pts))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        parts.append(f'<text x="{w - pad + 4}" y="{pad + 14 * i}" fill="{c}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
