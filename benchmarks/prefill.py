"""Prefill speed of a plan: dense SDPA vs the banded plan path vs the FlexAttention plan path.

Two scopes, measured in one run so the ratios are like for like:

- ``layer``: the attention of sampled layers of a synthetic plan at ``--density`` (Llama-3-8B
  shape: 32 query / 8 KV heads, head_dim 128, bf16, B=1) on random Q/K/V, summed over the
  sampled layers: ``dense`` (one causal SDPA), ``banded`` (``fresh_prefill`` as before),
  ``flex`` (every head in one flex launch), ``flex-split`` (full heads in SDPA, the rest in
  one flex launch), and with ``--static`` ``flex-static`` (flex compiled per shape). The
  outputs of the flex paths are compared with the banded path, and at the first length with
  an fp32 per-head reference too.
- ``model``: a whole-model prefill (``llama3-8b-shape``, random weights, ``logits_to_keep=1``,
  a fresh cache as ``moa-search bench`` does): ``dense`` (the model's own SDPA, no plan)
  and the plan with ``MOA_PREFILL=banded|flex|flex-split``; last-token logits compared.

Times: CUDA events, median of ``--reps`` after one warm-up call; the warm-up (torch.compile
of flex, BlockMask build) is reported apart as ``first_s``. The model scope interleaves its
methods over ``--model-rounds`` rounds (``ms_range``: the rounds' spread). ``peak_gib``:
peak allocated during the timed calls. Each config runs in its own try/except; a time
budget skips what is left (rows say so). Writes OUT/prefill.csv, OUT/prefill.md and OUT/run.json.

    python benchmarks/prefill.py --out bench_out/prefill --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from moa_search.bench.report import markdown_table, versions, write_csv
from moa_search.files import write_json, write_text
from moa_search.runtime import flex_prefill as fp
from moa_search.runtime import prefill
from moa_search.runtime.scores import Logits, sdpa

HQ, HKV, D = 32, 8, 128
GIB = 2**30
#: --smoke (CPU, eager flex, tiny model): checks this script end to end without a GPU
SMOKE = {"device": "cpu"}
LAYER_METHODS = ("dense", "banded", "flex", "flex-split")
#: model scope: "dense-plan" is an all-dense plan through the runtime (its cache and call
#: overhead without any banded head), so a gap to "dense" that is not attention shows
MODEL_METHODS = ("dense", "dense-plan", "banded", "flex", "flex-split")


def log(msg: str) -> None:
    print(f"[prefill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cuda_time(fn, reps: int) -> tuple[float, float, float]:
    """(first call s, median of ``reps`` timed calls s, peak GiB during the timed calls)."""
    if SMOKE["device"] == "cpu":
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return first, statistics.median(times), 0.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return first, statistics.median(times), torch.cuda.max_memory_allocated() / GIB


def plan_for(length: int, density: float, seed: int, model: Any = None):
    """The synthetic plan ``moa-search bench --synthetic`` makes (for ``model``, else for
    the 8B shape's config)."""
    from moa_search.bench.models import shape_config  # noqa: PLC0415
    from moa_search.bench.synthetic import synthetic_plan  # noqa: PLC0415

    if model is None:
        model = shape_config("llama3-8b-shape")
    return synthetic_plan(model, density=density, length=length, seed=seed)


def attended_fraction(plan, length: int) -> float:
    """Query-key pairs the plan's heads attend in a fresh prompt of ``length`` tokens over
    dense causal's (every head, every layer), from the flex path's own per-head bounds: the
    most any kernel can save on attention is 1 - this."""
    pairs = heads = 0.0
    q = torch.arange(length, dtype=torch.float64)
    for patterns in plan.heads:
        bounds = fp.head_bounds(patterns, length, None, "cpu")
        lo = bounds.band_lo[:, :length].double()
        pairs += float((q + 1 - lo).sum() + torch.minimum(lo, bounds.sink[:, None].double()).sum())
        heads += len(patterns)
    return pairs / (heads * length * (length + 1) / 2)


def model_bound(rows: list[dict[str, Any]], length: int, fraction: float, layers: int):
    """Fastest whole-model prefill the plan allows, x dense: the dense model's time less
    the attention it could skip (the dense layer rows' ms per layer x ``layers`` x (1 -
    ``fraction``)), the rest unchanged. None without both dense rows."""

    def dense(scope):
        return next((r for r in rows if r["scope"] == scope and r.get("length") == length
                     and r["method"] == "dense" and r.get("status") == "ok"), None)  # fmt: skip

    layer, model = dense("layer"), dense("model")
    if layer is None or model is None:
        return None
    attention = layer["ms"] / layer["layers"] * layers
    return model["ms"] / (model["ms"] - attention * (1 - fraction))


def add_bound(rows: list[dict[str, Any]], length: int, args, layers: int) -> None:
    """Put the plan's attended fraction and the bound it sets (``model_bound``) on the
    flex rows of the model scope at ``length``."""
    fraction = attended_fraction(plan_for(length, args.density, args.seed), length)
    bound = model_bound(rows, length, fraction, layers)
    for row in rows:
        if row["scope"] == "model" and row.get("length") == length and row["method"] != "dense":
            row["attended"] = round(fraction, 4)
            if bound is not None:
                row["bound_x"] = round(bound, 3)


def sample_layers(plan, count: int) -> list[int]:
    """``count`` layers with at least one banded head, spread over the depth."""
    length = plan.lengths[0]
    banded = [i for i, row in enumerate(plan.heads)
              if not all(prefill.covers_all(p, length) for p in row)]  # fmt: skip
    if len(banded) <= count:
        return banded
    step = len(banded) / count
    return [banded[int(step * (i + 0.5))] for i in range(count)]


def reference(q, k, v, patterns, logits):
    """fp32 per-head reference (``runtime.reference.attend_head``); L x L masks, short L only."""
    from moa_search.runtime.reference import attend_head  # noqa: PLC0415

    group = q.shape[1] // k.shape[1]
    pos = torch.arange(q.shape[2], device=q.device)[None]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h, p in enumerate(patterns):
        sl = slice(h * group, (h + 1) * group)
        out[:, sl] = attend_head(q[:, sl].float(), k[:, h].float(), v[:, h].float(), pos, pos,
                                 p, logits)  # fmt: skip
    return out


def layer_rows(args, length: int, check_reference: bool) -> list[dict[str, Any]]:
    plan = plan_for(length, args.density, args.seed)
    layers = sample_layers(plan, args.layers)
    reps = args.reps if length <= 32768 else max(1, args.reps - 1)
    dev = SMOKE["device"]
    gen = torch.Generator(device=dev).manual_seed(0)
    # (B, L, H, D) transposed, the strides transformers hands attention
    q, k, v = (torch.randn(1, length, h, D, device=dev, dtype=torch.bfloat16, generator=gen)
               .transpose(1, 2) for h in (HQ, HKV, HKV))  # fmt: skip
    logits = Logits(D**-0.5)
    rows: list[dict[str, Any]] = []
    outputs: dict[str, list[torch.Tensor]] = {}
    methods = list(LAYER_METHODS) + (["flex-static"] if args.static else [])
    for method in methods:
        row = {"scope": "layer", "length": length, "method": method, "layers": len(layers),
               "reps": reps}  # fmt: skip
        if over_budget(args):
            rows.append({**row, "status": "skipped: time budget"})
            continue
        try:
            first = total = peak = 0.0
            outs = []
            for layer in layers:
                patterns = plan.heads[layer]
                out = torch.empty_like(q)
                fn = layer_call(method, q, k, v, patterns, logits, out, length)
                f, t, p = cuda_time(fn, reps)
                first, total, peak = first + f, total + t, max(peak, p)
                outs.append(out.clone() if method != "dense" else out[:, :0])
                del out
            outputs[method] = outs
            row.update(status="ok", ms=round(total * 1e3, 3), first_s=round(first, 3),
                       peak_gib=round(peak, 3))  # fmt: skip
            row["mask_cache_gib"] = round(fp.MASKS.bytes / GIB, 3)
        except Exception as exc:
            row["status"] = error_text(exc)
        rows.append(row)
        log(" ".join(f"{k}={v}" for k, v in row.items()))
    add_errors(rows, outputs, "banded")
    if check_reference and "banded" in outputs:
        for row in rows:
            if row.get("status") != "ok" or row["method"] == "dense":
                continue
            try:
                worst = 0.0
                for i, layer in enumerate(layers):
                    want = reference(q, k, v, plan.heads[layer], logits)
                    got = outputs[row["method"]][i].float()
                    worst = max(worst, float((got - want).abs().max()))
                row["err_vs_fp32_ref"] = f"{worst:.3g}"
            except Exception as exc:
                row["err_vs_fp32_ref"] = error_text(exc)
    del outputs
    fp.MASKS.clear()
    empty_cache()
    return rows


def layer_call(method, q, k, v, patterns, logits, out, length):
    if method == "dense":
        return lambda: out.copy_(sdpa(q, k, v, is_causal=True, scale=logits.scale,
                                      enable_gqa=True))  # fmt: skip
    if method == "banded":
        return lambda: prefill.fresh_prefill(q, k, v, patterns, logits, out=out, method="banded")
    full = [h for h, p in enumerate(patterns) if prefill.covers_all(p, length)]
    split = full if method == "flex-split" else None
    compiled = "static" if method == "flex-static" else SMOKE["device"] != "cpu"
    return lambda: fp.flex_prefill(q, k, v, patterns, logits, out, full_heads=split,
                                   compiled=compiled)  # fmt: skip


#: --sweep: (name, FlexSettings kwargs), at most 8; the first is the default. BLOCK_M /
#: BLOCK_N must divide the block; names are checked by FlexSettings (valid in torch 2.11+)
SWEEP = (
    ("b128", {}),
    ("b128-m128n64-w8s3", {"kernel_options": (("BLOCK_M", 128), ("BLOCK_N", 64),
                                              ("num_warps", 8), ("num_stages", 3))}),
    ("b128-m128n128-w8s2", {"kernel_options": (("BLOCK_M", 128), ("BLOCK_N", 128),
                                               ("num_warps", 8), ("num_stages", 2))}),
    ("b128-m64n128-w4s3", {"kernel_options": (("BLOCK_M", 64), ("BLOCK_N", 128),
                                              ("num_warps", 4), ("num_stages", 3))}),
    ("b128-safe-rows", {"kernel_options": (("ROWS_GUARANTEED_SAFE", True),)}),
    ("b256", {"block": 256}),
    ("b256-m128n64-w8s3", {"block": 256, "kernel_options": (("BLOCK_M", 128), ("BLOCK_N", 64),
                                                            ("num_warps", 8), ("num_stages", 3))}),
    ("b64-m64n64-w4s3", {"block": 64, "kernel_options": (("BLOCK_M", 64), ("BLOCK_N", 64),
                                                         ("num_warps", 4), ("num_stages", 3))}),
)  # fmt: skip


def sweep_rows(args, lengths: list[int]) -> list[dict[str, Any]]:
    """Layer-scope dense and ``--sweep-method`` under each ``SWEEP`` variant, 4k then 32k
    per variant as the runtime sees them (a fresh dynamo state per variant: first shape
    static, the next symbolic). Outputs are compared with the first variant's."""
    rows: list[dict[str, Any]] = []
    base_out: dict[int, list[torch.Tensor]] = {}
    inputs = {n: sweep_inputs(args, n) for n in lengths}
    for n in lengths:
        rows.append(sweep_one(args, n, inputs[n], "dense", None, base_out))
    for name, kwargs in SWEEP[: args.sweep_count]:
        try:
            settings = fp.FlexSettings(**kwargs)
        except ValueError as exc:
            rows.append({"scope": "sweep", "method": name, "status": f"invalid: {exc}"})
            continue
        previous = fp.configure(settings)
        torch._dynamo.reset()
        fp.compiled_flex.cache_clear()
        try:
            for n in lengths:
                rows.append(sweep_one(args, n, inputs[n], name, args.sweep_method, base_out))
        finally:
            fp.configure(previous)
    return rows


def sweep_inputs(args, length: int):
    plan = plan_for(length, args.density, args.seed)
    layers = sample_layers(plan, args.layers)
    gen = torch.Generator(device=SMOKE["device"]).manual_seed(0)
    q, k, v = (torch.randn(1, length, h, D, device=SMOKE["device"], dtype=torch.bfloat16,
                           generator=gen).transpose(1, 2) for h in (HQ, HKV, HKV))  # fmt: skip
    return plan, layers, q, k, v


def sweep_one(args, length, inputs, variant, method, base_out) -> dict[str, Any]:
    """One variant at one length: ms summed over the sampled layers, compile in first_s."""
    plan, layers, q, k, v = inputs
    row = {"scope": "sweep", "length": length, "method": variant, "layers": len(layers),
           "reps": args.reps}  # fmt: skip
    if over_budget(args):
        return {**row, "status": "skipped: time budget"}
    logits = Logits(D**-0.5)
    try:
        first = total = peak = 0.0
        worst = 0.0
        for i, layer in enumerate(layers):
            out = torch.empty_like(q)
            fn = layer_call(method or "dense", q, k, v, plan.heads[layer], logits, out, length)
            f, t, p = cuda_time(fn, args.reps)
            first, total, peak = first + f, total + t, max(peak, p)
            if method is not None:
                ref = base_out.setdefault(length, [])
                if len(ref) <= i:
                    ref.append(out.clone())
                worst = max(worst, float((out.float() - ref[i].float()).abs().max()))
        row.update(status="ok", ms=round(total * 1e3, 3), first_s=round(first, 3),
                   peak_gib=round(peak, 3))  # fmt: skip
        if method is not None:
            row["err_vs_banded"] = f"{worst:.3g}"  # here: vs the first variant
    except Exception as exc:
        row["status"] = error_text(exc)
    log(" ".join(f"{k}={v}" for k, v in row.items()))
    return row


def add_errors(rows, outputs, base: str) -> None:
    """max |out - banded out| over the sampled layers (bf16 vs bf16)."""
    if base not in outputs:
        return
    for row in rows:
        got = outputs.get(row["method"])
        if row["method"] in ("dense", base) or got is None:
            continue
        worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, outputs[base]))
        row["err_vs_banded"] = f"{worst:.3g}"


def model_rows(args, model, length: int) -> list[dict[str, Any]]:
    """Whole-model prefill per method, timed in ``--model-rounds`` interleaved rounds
    (dense, dense-plan, banded, flex, flex-split, then again): a GPU's clock drifts by a
    few percent over a run, as much as the plan saves at 4k, so every method samples the
    same stretch of it. ``ms``: median over rounds of each round's median of
    ``--model-reps`` calls; ``ms_range``: the rounds' lowest and highest."""
    plan = plan_for(length, args.density, args.seed, model)
    dev = SMOKE["device"]
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen, device=dev)
    rows = {m: {"scope": "model", "length": length, "method": m, "reps": args.model_reps}
            for m in MODEL_METHODS}  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in MODEL_METHODS}
    last: dict[str, torch.Tensor] = {}
    for rnd in range(args.model_rounds):
        for method in MODEL_METHODS:
            row = rows[method]
            if row.get("status", "ok") != "ok":
                continue
            if over_budget(args):
                row.setdefault("status", "skipped: time budget")
                continue
            try:
                times[method].append(model_call(args, model, plan, method, ids, row, last, rnd))
            except Exception as exc:
                row["status"] = error_text(exc)
            log(f"round {rnd} " + " ".join(f"{k}={v}" for k, v in row.items()))
    for method, got in times.items():
        if got and rows[method].get("status", "ok") == "ok":
            rows[method].update(status="ok", ms=round(statistics.median(got) * 1e3, 2),
                                ms_range=f"{min(got) * 1e3:.2f}-{max(got) * 1e3:.2f}",
                                rounds=len(got))  # fmt: skip
    if "banded" in last:
        scale = float(last["banded"].std())
        for method, row in rows.items():
            got = last.get(method)
            if method in ("dense", "dense-plan", "banded") or got is None:
                continue
            row["err_vs_banded"] = f"{float((got - last['banded']).abs().max()):.3g}"
            row["logit_std"] = f"{scale:.3g}"
            row["same_argmax"] = bool(got.argmax() == last["banded"].argmax())
    fp.MASKS.clear()
    return list(rows.values())


def model_call(args, model, plan, method: str, ids, row: dict, last: dict, rnd: int) -> float:
    """One round of ``method``: install it, time ``--model-reps`` prefills, remove it.
    Round 0 also records the first call, the peak, the paths taken and the logits."""
    from moa_search.plan import uniform_plan  # noqa: PLC0415
    from moa_search.runtime import apply_plan  # noqa: PLC0415

    runtime = None
    before = dict(prefill.PATH_COUNTS)
    length = ids.shape[1]
    try:
        if method == "dense-plan":
            runtime = apply_plan(model, uniform_plan(model, "dense"), max_cache_len=length + 1)
        elif method != "dense":
            os.environ["MOA_PREFILL"] = method
            runtime = apply_plan(model, plan, max_cache_len=length + 1)
        holder: dict[str, torch.Tensor] = {}

        def run(holder=holder):
            with torch.no_grad():
                holder["logits"] = model(ids, use_cache=True, logits_to_keep=1).logits

        empty_cache()
        f, t, p = cuda_time(run, args.model_reps)
        if rnd == 0:
            last[method] = holder["logits"][0, -1].float()
            counts = {k: prefill.PATH_COUNTS[k] - before.get(k, 0) for k in prefill.PATH_COUNTS}
            paths = ",".join(f"{k}:{n}" for k, n in sorted(counts.items()) if n)
            row.update(first_s=round(f, 3), peak_gib=round(p, 3), paths=paths)
            if method.startswith("flex") and counts.get("flex-failed"):
                row["status"] = f"fell back: {prefill._FLEX_FAILED[0][:200]}"
        return t
    finally:
        if runtime is not None:
            runtime.remove()
        os.environ.pop("MOA_PREFILL", None)


def empty_cache() -> None:
    if SMOKE["device"] != "cpu":
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


_START = time.perf_counter()


def over_budget(args) -> bool:
    return time.perf_counter() - _START > args.budget_s


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """x_dense = dense ms / this ms (>1: faster than dense); x_banded likewise."""
    for row in rows:
        same = [r for r in rows if r["scope"] == row["scope"] and r["length"] == row["length"]]
        ms = {r["method"]: r.get("ms") for r in same if r.get("status") == "ok"}
        if row.get("status") != "ok":
            continue
        for base in ("dense", "banded"):
            if ms.get(base):
                row[f"x_{base}"] = round(ms[base] / row["ms"], 3)


COLUMNS = ["scope", "length", "method", "status", "ms", "x_dense", "x_banded", "ms_range",
           "first_s", "peak_gib", "err_vs_banded", "err_vs_fp32_ref", "same_argmax", "logit_std",
           "paths", "layers", "reps", "rounds", "attended", "bound_x",
           "mask_cache_gib"]  # fmt: skip


def write(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    write_csv(rows, out / "prefill.csv", COLUMNS)
    lines = [
        "# Prefill: dense vs banded plan path vs FlexAttention plan path",
        "",
        *verdict(rows),
        "",
        f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"transformers {meta['transformers']}; synthetic plan at density {meta['density']} "
        f"(llama3-8b-shape, bf16, B=1). `x_dense` = dense ms / ms (> 1: faster than dense). "
        "`layer` ms: attention of the sampled layers summed; `model` ms: whole-model prefill. "
        "`first_s`: first call (torch.compile + BlockMask build), not in ms.",
        "",
        *markdown_table(rows, COLUMNS[:15]),
    ]
    text = "\n".join(lines) + "\n"
    write_text(out / "prefill.md", text)
    write_json(out / "run.json", {**meta, "rows": rows})
    return text


TARGETS = (("model", 32768, 1.3), ("model", 4096, 1.0), ("layer", 32768, 1.3), ("layer", 4096, 1.0))


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target of issue 16: flex paths' x_dense at 32k (>= 1.3) and 4k (>= 1)."""
    out = []
    for scope, length, want in TARGETS:
        same = [r for r in rows if r["scope"] == scope and r.get("length") == length]
        got = {r["method"]: r["x_dense"] for r in same if r.get("x_dense")}
        flex = {m: x for m, x in got.items() if m.startswith("flex")}
        if not flex:
            continue
        best = max(flex, key=flex.get)
        mark = "MET" if flex[best] >= want else "NOT met"
        shown = ", ".join(f"{m} {x}x" for m, x in sorted(flex.items()))
        banded = got.get("banded")
        bound = next((r["bound_x"] for r in same if r.get("bound_x")), None)
        ceiling = (f"; at most {bound}x with attention at the plan's work (it attends "
                   f"{same[-1]['attended']:.1%} of dense's pairs)" if bound else "")  # fmt: skip
        out.append(f"- {scope} {length}: want x_dense >= {want}; {shown} (banded {banded}x): "
                   f"{mark} by {best}{ceiling}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for prefill.csv / .md")
    ap.add_argument("--quick", action="store_true", help="fewer layers and reps (< 150 s)")
    ap.add_argument("--lengths", default="4096,32768,131072", help="layer-scope lengths")
    ap.add_argument("--model-lengths", default="4096,32768", help="model-scope lengths ('' off)")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="sampled layers (quick 2, else 4)")
    ap.add_argument("--reps", type=int, default=None, help="layer reps (quick 3, else 7)")
    ap.add_argument("--model-reps", type=int, default=None, help="model reps (quick 2, else 5)")
    ap.add_argument("--model-rounds", type=int, default=3, help="interleaved model rounds")
    ap.add_argument("--static", action="store_true", help="also time flex compiled per shape")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="only the flex settings sweep (layer scope, --lengths, SWEEP variants)",
    )
    ap.add_argument("--sweep-method", default="flex", choices=("flex", "flex-split"))
    ap.add_argument("--sweep-count", type=int, default=len(SWEEP), help="first N variants")
    ap.add_argument("--budget-s", type=float, default=None, help="skip configs after this")
    ap.add_argument("--model-shape", default="llama3-8b-shape", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 4)
    args.reps = args.reps or (3 if args.quick else 7)
    args.model_reps = args.model_reps or (2 if args.quick else 5)
    args.budget_s = args.budget_s or (135.0 if args.quick else 1800.0)
    if args.smoke:
        SMOKE["device"] = "cpu"
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    elif torch.cuda.is_available():
        SMOKE["device"] = "cuda"
    else:
        raise SystemExit("benchmarks/prefill.py needs a CUDA GPU (--smoke: a CPU dry run)")
    meta = {**versions(), "density": args.density, "seed": args.seed}
    log(f"{meta['device']} torch {meta['torch']} triton {meta['triton']}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.sweep:
        run_sweep(args, lengths, meta)
        return
    model_lengths = [int(x) for x in args.model_lengths.split(",") if x]
    rows: list[dict[str, Any]] = []
    # Order: what the targets need first (layer and model at 4k and 32k), 128k last.
    short = [n for n in lengths if n <= 32768]
    for i, n in enumerate(short):
        rows += guarded(lambda n=n, i=i: layer_rows(args, n, check_reference=i == 0), "layer", n)
        add_ratios(rows)
        write(rows, args.out, meta)
    if model_lengths:
        model = None
        try:
            from moa_search.bench.models import build_model  # noqa: PLC0415

            t0 = time.perf_counter()
            model = build_model(args.model_shape, dtype=torch.bfloat16, device=SMOKE["device"])
            log(f"model built in {time.perf_counter() - t0:.1f}s")
        except Exception as exc:
            rows.append({"scope": "model", "method": "build", "status": error_text(exc)})
        if model is not None:
            for n in model_lengths:
                rows += guarded(lambda n=n: model_rows(args, model, n), "model", n)
                add_bound(rows, n, args, model.config.num_hidden_layers)
                add_ratios(rows)
                write(rows, args.out, meta)
            del model
            empty_cache()
    for n in [n for n in lengths if n > 32768]:
        rows += guarded(lambda n=n: layer_rows(args, n, check_reference=False), "layer", n)
    add_ratios(rows)
    meta["seconds"] = round(time.perf_counter() - _START, 1)
    print(write(rows, args.out, meta))
    log(f"done in {meta['seconds']}s; wrote {args.out}/prefill.csv, prefill.md, run.json")


def run_sweep(args, lengths: list[int], meta: dict[str, Any]) -> None:
    """--sweep: dense beside each flex variant at ``lengths``; x_dense per row."""
    rows = sweep_rows(args, lengths)
    for row in rows:
        dense = [r for r in rows if r.get("method") == "dense" and r.get("length") ==
                 row.get("length") and r.get("status") == "ok"]  # fmt: skip
        if dense and row.get("status") == "ok":
            row["x_dense"] = round(dense[0]["ms"] / row["ms"], 3)
    meta["seconds"] = round(time.perf_counter() - _START, 1)
    meta["sweep"] = {name: kwargs for name, kwargs in SWEEP[: args.sweep_count]}
    print(write(rows, args.out, meta))
    for n in lengths:
        best = max((r for r in rows if r.get("length") == n and r.get("x_dense") and
                    r["method"] != "dense"), key=lambda r: r["x_dense"], default=None)  # fmt: skip
        if best:
            log(f"{n}: best {best['method']} x_dense {best['x_dense']} ({best['ms']} ms)")
    log(f"done in {meta['seconds']}s; wrote {args.out}/prefill.csv, prefill.md, run.json")


def guarded(fn, scope: str, length: int) -> list[dict[str, Any]]:
    try:
        return fn()
    except Exception as exc:
        return [{"scope": scope, "length": length, "method": "-", "status": error_text(exc)}]


if __name__ == "__main__":
    main()
