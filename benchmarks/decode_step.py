"""Whole-model decode step with the decode kernels' launch options side by side: the mixed
kernel's work-item grid (programs only for the chunks a head can fill) and programmatic
dependent launch, each on and off, for dense and a synthetic plan at chosen (batch, context)
points, in interleaved rounds (a GPU's clock drifts by a few percent over a run).

Why: both options were measured once with throwaway scripts (work items: 17.00 -> 16.63 ms
a step at B=44, level at B=8; PDL: ~0.3% at B=8, NVIDIA H200); this makes the comparison a
command. Every step is a CUDA-graph replay of PlanLoop (the bench's decode loop), with the
norms / MLPs / rotary compiled under ``--compile`` (the bench's ``*-compiled`` configs).
Points are ``config:BxN`` with config ``dense`` (a uniform dense plan through the runtime)
or ``plan`` (the bench's synthetic plan at ``--density``). Writes OUT/decode_step.csv, .md
and run.json.

    python benchmarks/decode_step.py --out bench_out/decode_step --compile \\
        --points dense:8x32768,plan:8x32768,dense:11x32768,plan:44x32768
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moa_search.bench.compiled import CompileSettings
from moa_search.bench.decode_loop import PlanLoop
from moa_search.bench.models import build_model
from moa_search.bench.report import markdown_table, versions, write_csv
from moa_search.bench.synthetic import synthetic_plan
from moa_search.files import write_json, write_text
from moa_search.plan import Plan, uniform_plan

#: variant -> the decode TUNING it sets; "default" is what the runtime ships
VARIANTS: dict[str, dict[str, int]] = {
    "default": {"work_items": 1, "pdl": 1},
    "no-pdl": {"work_items": 1, "pdl": 0},
    "no-work-items": {"work_items": 0, "pdl": 1},
    "neither": {"work_items": 0, "pdl": 0},
}
COLUMNS = ["config", "batch", "context", "variant", "ms", "ms_range", "rounds", "x_neither",
           "tok_s"]  # fmt: skip


def parse_points(text: str) -> list[tuple[str, int, int]]:
    """``dense:8x32768,plan:44x32768`` -> [("dense", 8, 32768), ("plan", 44, 32768)]."""
    points = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        config, _, shape = item.partition(":")
        batch, _, context = shape.partition("x")
        if config not in ("dense", "plan") or not batch.isdigit() or not context.isdigit():
            raise SystemExit(f"--points: {item!r} is not dense:BxN or plan:BxN")
        points.append((config, int(batch), int(context)))
    if not points:
        raise SystemExit("--points: give at least one dense:BxN or plan:BxN")
    return points


@contextlib.contextmanager
def variant_tuning(tuning: dict[str, int], settings: dict[str, int]) -> Iterator[None]:
    """``tuning`` (the decode kernels' TUNING) with ``settings`` applied inside, restored
    afterwards whatever happens."""
    saved = dict(tuning)
    tuning.update(settings)
    try:
        yield
    finally:
        tuning.clear()
        tuning.update(saved)


def decode_tuning(smoke: bool) -> dict[str, int]:
    """The kernels' TUNING; for the CPU smoke run a stand-in dict (the CPU decodes through
    the PyTorch reference, and importing the kernels here, before the kernel tests set up
    Triton's interpreter, would leave Triton without a driver in the test process)."""
    if smoke:
        return {}
    from moa_search.kernels import decode  # noqa: PLC0415

    return decode.TUNING


def step_ms(model: Any, plan: Plan, batch: int, context: int, steps: int, compile_: bool):
    """Best of two timed runs of ``steps`` decode steps from a synthetic cache, ms a step."""
    settings = CompileSettings() if compile_ else None
    loop = PlanLoop(model, plan, batch=batch, max_cache_len=context + steps + 8,
                    compile_settings=settings)  # fmt: skip
    try:
        return loop.step_ms(context, steps, warm=2, repeats=2)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out/decode_step"))
    ap.add_argument("--model", default="llama3-8b-shape")
    ap.add_argument("--points", default="dense:8x32768,plan:8x32768")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    ap.add_argument("--compile", action="store_true", help="compile norms / MLPs / rotary")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU model (tests)")
    args = ap.parse_args(argv)
    points = parse_points(args.points)
    if args.smoke:
        args.model, args.steps, args.rounds = "tiny-llama", 3, 1
        points = [(c, 2, 64) for c in ("dense", "plan")]
    elif not torch.cuda.is_available():
        sys.exit("decode_step: needs a CUDA GPU (or --smoke)")
    device = "cpu" if args.smoke else "cuda"
    model = build_model(args.model, device=device)
    plans = {n: synthetic_plan(model, density=args.density, length=n)
             for n in {p[2] for p in points}}  # fmt: skip
    dense = uniform_plan(model, "dense")
    times: dict[tuple, list[float]] = {}
    tuning = decode_tuning(args.smoke)
    for _ in range(args.rounds):
        for variant, settings in VARIANTS.items():
            with variant_tuning(tuning, settings):
                for config, batch, context in points:
                    plan = dense if config == "dense" else plans[context]
                    ms = step_ms(model, plan, batch, context, args.steps, args.compile)
                    times.setdefault((config, batch, context, variant), []).append(ms)
                    print(f"{config} B={batch} N={context} {variant}: {ms:.3f} ms", flush=True)
    rows = []
    for (config, batch, context, variant), got in times.items():
        ms = statistics.median(got)
        rows.append({"config": config, "batch": batch, "context": context, "variant": variant,
                     "ms": round(ms, 4), "ms_range": f"{min(got):.3f}-{max(got):.3f}",
                     "rounds": len(got), "tok_s": round(batch / ms * 1e3, 1)})  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["variant"] == "neither" and
                    (r["config"], r["batch"], r["context"]) ==
                    (row["config"], row["batch"], row["context"]))  # fmt: skip
        row["x_neither"] = round(base["ms"] / row["ms"], 4)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "decode_step.csv", COLUMNS)
    head = (f"{card}, {args.model}, synthetic plan at density {args.density}, "
            f"{'compiled pieces' if args.compile else 'eager pieces'}, CUDA-graph steps "
            f"(CPU smoke: eager), {args.rounds} interleaved rounds; `x_neither` = the "
            "variant without work items and PDL / this one (> 1: faster)")  # fmt: skip
    lines = ["# Decode step: work-item grid and PDL, on and off", "", head, ""]
    write_text(args.out / "decode_step.md", "\n".join(lines + markdown_table(rows, COLUMNS)) + "\n")
    run = {**versions(), "argv": argv or sys.argv[1:], "card": card, **vars(args)}
    write_json(args.out / "run.json", {**run, "out": str(args.out), "points": points})
    return rows


if __name__ == "__main__":
    main()
