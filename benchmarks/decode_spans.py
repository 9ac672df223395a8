"""Decode step time of a plan with floored elastic heads: spans computed in the fused append
kernel (every built-in pattern's ``span_affine`` + ``span_least``) against the per-head
torch path a pattern without an affine span takes, side by side in one run.

Why: the floored twins the profiler adds for multi-length profiles (``elastic:alpha=0,
beta=s/L,floor=s``) are most of a searched plan's elastic heads; until they had an affine
form every decode step computed their spans with a few torch ops per head and layer.
The plan is the bench's synthetic plan at ``--density`` with every elastic head floored at
its span at half the context. Both modes run the same cache, kernels and CUDA graph; only
the span arithmetic differs. Writes OUT/decode_spans.csv, .md and run.json.

    python benchmarks/decode_spans.py --out bench_out/decode_spans
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moa_search.bench.decode_loop import PlanLoop
from moa_search.bench.models import build_model
from moa_search.bench.report import markdown_table, versions, write_csv
from moa_search.bench.synthetic import synthetic_plan
from moa_search.files import write_json, write_text
from moa_search.patterns import Elastic
from moa_search.plan import Plan

MODES = ("fused", "per-head")
COLUMNS = ["mode", "rep", "batch", "context", "elastic_heads", "ms_per_step", "x_per_head"]


def floored_plan(model: Any, density: float, context: int) -> Plan:
    """The synthetic plan with every elastic head floored at its span at half the context."""
    plan = synthetic_plan(model, density=density, length=context)
    plan.heads = [
        [
            dataclasses.replace(p, floor=int(p.span_at(context // 2)))
            if isinstance(p, Elastic)
            else p
            for p in row
        ]
        for row in plan.heads
    ]
    return plan


@contextmanager
def span_path(mode: str) -> Iterator[None]:
    """``per-head``: elastic heads report no affine span, so the cache takes the torch path."""
    original = Elastic.span_affine
    if mode == "per-head":
        Elastic.span_affine = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Elastic.span_affine = original  # type: ignore[method-assign]


def step_ms(model: Any, plan: Plan, batch: int, context: int, steps: int) -> float:
    loop = PlanLoop(model, plan, batch=batch, max_cache_len=context + steps + 8)
    try:
        return loop.step_ms(context, steps)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out/decode_spans"))
    ap.add_argument("--model", default="llama3-8b-shape")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions per mode")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU model (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.context, args.batch, args.steps, args.reps = "tiny-llama", 256, 2, 4, 1
    elif not torch.cuda.is_available():
        sys.exit("decode_spans: needs a CUDA GPU (or --smoke)")
    device = "cpu" if args.smoke else "cuda"
    model = build_model(args.model, device=device)
    plan = floored_plan(model, args.density, args.context)
    n_elastic = sum(isinstance(p, Elastic) for row in plan.heads for p in row)
    rows = []
    for rep in range(args.reps):
        for mode in MODES:
            with span_path(mode):
                ms = step_ms(model, plan, args.batch, args.context, args.steps)
            rows.append({"mode": mode, "rep": rep, "batch": args.batch, "context": args.context,
                         "elastic_heads": n_elastic, "ms_per_step": round(ms, 3)})  # fmt: skip
            print(rows[-1], flush=True)
    best = {m: min(r["ms_per_step"] for r in rows if r["mode"] == m) for m in MODES}
    for r in rows:
        r["x_per_head"] = round(best["per-head"] / r["ms_per_step"], 3)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "decode_spans.csv", COLUMNS)
    summary = (
        f"{card}, {args.model}, density {args.density}, B={args.batch}, N={args.context}, "
        f"{n_elastic} floored elastic heads: fused {best['fused']} ms / step, per-head "
        f"{best['per-head']} ms / step ({best['per-head'] / best['fused']:.3f}x)"
    )
    lines = ["# Decode with floored elastic heads: fused vs per-head spans", "", summary, ""]
    table = "\n".join(lines + markdown_table(rows, COLUMNS)) + "\n"
    write_text(args.out / "decode_spans.md", table)
    run = {**versions(), "argv": argv or sys.argv[1:], "card": card, **vars(args)}
    write_json(args.out / "run.json", {**run, "out": str(args.out)})
    print(summary)
    return rows


if __name__ == "__main__":
    main()
