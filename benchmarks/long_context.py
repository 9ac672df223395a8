"""Long context on one card (issue 16, item 4): the 8B shape at (B=1, 128k) and (B=8, 64k),
dense vs a 25% plan, side by side in one run -- chunked prefill time, decode ms/token
(CUDA-graph replays) and peak GPU memory.

Configs (names as in ``moa-search bench``):

- ``dense-moa``: a uniform dense plan through the moa runtime: the chunked prefill runs its
  full heads as one bottom-right causal flash call per chunk (``cached_prefill``), decode
  the Triton kernels -- the like-for-like dense baseline;
- ``plan``: the synthetic plan at ``--density`` for that length, same loop;
- ``dense-sdpa``: transformers StaticCache + SDPA (what ``generate(cache_implementation=
  "static")`` runs), decode from a random cache of the same length. Its chunked prefill
  (a C x max_len mask per chunk, no block skipping) is timed only with ``--sdpa-prefill``:
  at B=8 x 64k it alone takes minutes.

Per config: allocate the cache for N + steps, capture the decode graph, warm the prefill
up on two chunks (flex compile, kernels), then one timed chunked prefill of N random tokens
and ``--steps`` timed decode steps. ``prefill_peak_gib`` / ``decode_peak_gib``:
``torch.cuda.max_memory_allocated`` (weights + cache + transients), reset before each
phase; the peak allocator state is reset and emptied between configs. An out-of-memory is
the row's status ``OOM``; a time budget skips what is left. Writes OUT/long_context.csv,
OUT/long_context.md and OUT/run.json.

    python benchmarks/long_context.py --out bench_out/long_context
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moa_search.bench.report import markdown_table, versions, write_csv
from moa_search.files import write_json, write_text
from moa_search.runtime.prefill import PATH_COUNTS

GIB = 2**30
#: (batch, prompt tokens) measured by default
SHAPES = ((1, 131072), (8, 65536))
CONFIGS = ("dense-moa", "plan", "dense-sdpa")


@dataclass(frozen=True)
class Settings:
    """One run: ``chunk`` prefill tokens per forward, ``steps`` timed decode steps (after
    ``warm_steps``), plan ``density``, ``budget_s`` after which configs are skipped."""

    model: str = "llama3-8b-shape"
    device: str = "cuda"
    dtype: str = "bfloat16"
    chunk: int = 8192
    steps: int = 16
    warm_steps: int = 4
    density: float = 0.25
    seed: int = 0
    sdpa_prefill: bool = False
    budget_s: float = 220.0


def log(msg: str) -> None:
    print(f"[long_context {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_loop(model, config: str, batch: int, length: int, settings: Settings):
    """The decode loop of ``config`` with room for the prompt and every decode step."""
    from moa_search.bench.decode_loop import DenseLoop, PlanLoop  # noqa: PLC0415
    from moa_search.bench.synthetic import synthetic_plan  # noqa: PLC0415
    from moa_search.plan import uniform_plan  # noqa: PLC0415

    max_len = length + settings.warm_steps + settings.steps + 2
    cap = settings.warm_steps + settings.steps + 2
    if config == "dense-sdpa":
        return DenseLoop(model, batch, max_len, out_capacity=cap)
    if config == "dense-moa":
        plan = uniform_plan(model, "dense")
    else:
        plan = synthetic_plan(model, density=settings.density, length=length, seed=settings.seed)
    return PlanLoop(model, plan, batch, max_len, out_capacity=cap)


def timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()`` (synchronised around it)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(model, config: str, batch: int, length: int, settings: Settings) -> dict[str, Any]:
    """One row: chunked prefill s, decode ms/token and peaks of ``config`` at (B, N)."""
    device = next(model.parameters()).device
    row: dict[str, Any] = {"config": config, "batch": batch, "length": length,
                           "chunk": settings.chunk, "steps": settings.steps}  # fmt: skip
    _free(device)
    _reset_peak(device)
    loop = make_loop(model, config, batch, length, settings)
    try:
        loop.allocate()
        row["kv_gib"] = round(loop.kv_nbytes() / GIB, 3)
        loop.capture()
        gen = torch.Generator(device=device).manual_seed(settings.seed)
        vocab = int(model.config.vocab_size)
        ids = torch.randint(0, vocab, (batch, length), generator=gen, device=device)
        prefill = config != "dense-sdpa" or settings.sdpa_prefill
        if prefill:
            warm = ids[:, : min(length, 2 * settings.chunk)]
            row["warmup_s"] = round(timed(lambda: loop.prefill(warm, settings.chunk), device), 2)
            _reset_peak(device)
            before = dict(PATH_COUNTS)
            row["prefill_s"] = round(timed(lambda: loop.prefill(ids, settings.chunk), device), 3)
            row["prefill_peak_gib"] = _peak_gib(device)
            row["paths"] = paths_since(before)
            row["prefill_tok_s"] = round(batch * length / row["prefill_s"])
        else:
            loop.fill_synthetic(length, seed=settings.seed)
            row["prefill_s"] = "skipped (--sdpa-prefill)"
        loop.run(settings.warm_steps)
        _reset_peak(device)
        seconds = loop.run(settings.steps)
        row["decode_ms"] = round(seconds * 1e3 / settings.steps, 3)
        row["decode_tok_s"] = round(batch * settings.steps / seconds)
        row["decode_peak_gib"] = _peak_gib(device)
        row["graph"] = loop.graph is not None
        row["status"] = "ok"
    finally:
        loop.close()
        _free(device)
    return row


def paths_since(before: dict[str, int]) -> str:
    """Layer prefills per path since ``before`` ("flex:32,chunk:480"): which paths ran."""
    diff = {k: n - before.get(k, 0) for k, n in PATH_COUNTS.items()}
    return ",".join(f"{k}:{n}" for k, n in sorted(diff.items()) if n)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    traceback.print_exc()
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first}"


def run_all(model, shapes, settings: Settings, configs=CONFIGS) -> list[dict[str, Any]]:
    """Every config at every (B, N), each in its own try block; ratios added."""
    start = time.perf_counter()
    rows = []
    for batch, length in shapes:
        for config in configs:
            base = {"config": config, "batch": batch, "length": length}
            if time.perf_counter() - start > settings.budget_s:
                rows.append({**base, "status": "skipped: time budget"})
                continue
            try:
                row = measure(model, config, batch, length, settings)
            except Exception as exc:  # OOM included: the row says so, the run goes on
                row = {**base, "status": error_text(exc)}
                _free(next(model.parameters()).device)
            rows.append(row)
            log(" ".join(f"{k}={v}" for k, v in row.items()))
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """plan vs dense-moa: x_prefill, x_decode (> 1: plan faster), mem_ratio (plan peak /
    dense peak); x_decode_sdpa against transformers' StaticCache + SDPA."""
    for row in rows:
        if row["config"] != "plan" or row.get("status") != "ok":
            continue
        same = {r["config"]: r for r in rows if (r["batch"], r["length"]) ==
                (row["batch"], row["length"]) and r.get("status") == "ok"}  # fmt: skip
        dense, sdpa = same.get("dense-moa"), same.get("dense-sdpa")
        if dense:
            if _num(dense.get("prefill_s")) and _num(row.get("prefill_s")):
                row["x_prefill"] = round(dense["prefill_s"] / row["prefill_s"], 3)
            row["x_decode"] = round(dense["decode_ms"] / row["decode_ms"], 3)
            for phase in ("prefill", "decode"):
                a, b = row.get(f"{phase}_peak_gib"), dense.get(f"{phase}_peak_gib")
                if _num(a) and _num(b) and b:
                    row[f"{phase}_mem_ratio"] = round(a / b, 3)
        if sdpa:
            row["x_decode_sdpa"] = round(sdpa["decode_ms"] / row["decode_ms"], 3)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


COLUMNS = ["batch", "length", "config", "status", "prefill_s", "x_prefill", "prefill_tok_s",
           "prefill_peak_gib", "prefill_mem_ratio", "decode_ms", "x_decode", "x_decode_sdpa",
           "decode_tok_s", "decode_peak_gib", "decode_mem_ratio", "kv_gib", "warmup_s", "chunk",
           "steps", "graph", "paths"]  # fmt: skip


def write(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    write_csv(rows, out / "long_context.csv", COLUMNS)
    lines = [
        "# Long context on one card: chunked prefill, decode, peak memory",
        "",
        f"{meta.get('device')}, torch {meta.get('torch')}, {meta.get('model')} "
        f"{meta.get('dtype')}, random weights; plan: synthetic at density {meta.get('density')}; "
        f"prefill in chunks of {meta.get('chunk')} tokens. `x_*` = dense-moa / plan "
        "(> 1: plan faster); `*_mem_ratio` = plan peak / dense-moa peak; peaks include weights "
        "and cache.",
        "",
        *markdown_table(rows, COLUMNS),
    ]
    text = "\n".join(lines) + "\n"
    write_text(out / "long_context.md", text)
    write_json(out / "run.json", {**meta, "rows": rows})
    return text


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x131072,8x65536"`` -> [(1, 131072), (8, 65536)]."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        b, sep, n = part.partition("x")
        if not sep or not b.isdigit() or not n.isdigit():
            raise SystemExit(f"--shapes: expected BxN like 1x131072, got {part!r}")
        shapes.append((int(b), int(n)))
    return shapes


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shapes", default="1x131072,8x65536", help="BxN list")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--chunk", type=int, default=Settings.chunk)
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--density", type=float, default=Settings.density)
    ap.add_argument("--budget-s", type=float, default=Settings.budget_s)
    ap.add_argument("--sdpa-prefill", action="store_true", help="also time dense-sdpa prefill")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (a dry run)")
    args = ap.parse_args(argv)
    if args.chunk <= 0:
        raise SystemExit(f"--chunk must be a positive number of tokens, got {args.chunk}")
    if args.smoke:
        settings = Settings(model="tiny-llama", device="cpu", dtype="float32", chunk=16,
                            steps=3, warm_steps=1, density=args.density)  # fmt: skip
        shapes = (
            parse_shapes(args.shapes) if "--shapes" in (argv or sys.argv) else [(1, 64), (2, 48)]
        )
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/long_context.py needs a CUDA GPU (--smoke: a CPU dry run)")
        settings = Settings(chunk=args.chunk, steps=args.steps, density=args.density,
                            sdpa_prefill=args.sdpa_prefill, budget_s=args.budget_s)  # fmt: skip
        shapes = parse_shapes(args.shapes)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"--configs: unknown {sorted(unknown)} (known: {', '.join(CONFIGS)})")
    from moa_search.bench.models import build_model  # noqa: PLC0415

    t0 = time.perf_counter()
    model = build_model(settings.model, dtype=settings.dtype, device=settings.device)
    log(f"model built in {time.perf_counter() - t0:.1f}s")
    meta = {**asdict(settings), **versions(), "shapes": shapes}
    rows = run_all(model, shapes, settings, configs)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    print(write(rows, args.out, meta))
    for r in rows:
        if r["config"] == "plan" and r.get("status") == "ok":
            log(f"B={r['batch']} N={r['length']}: prefill x{r.get('x_prefill')} decode "
                f"x{r.get('x_decode')} (vs sdpa x{r.get('x_decode_sdpa')}), prefill peak "
                f"ratio {r.get('prefill_mem_ratio')}")  # fmt: skip
    log(f"done in {meta['seconds']}s; wrote {args.out}/long_context.csv, .md, run.json")
    return rows


if __name__ == "__main__":
    main()
