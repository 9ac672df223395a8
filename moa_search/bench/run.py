"""``bench``: dense and a plan side by side -- prefill time, decode tokens/s and per-token
latency (CUDA-graph replays), peak GPU memory, KV bytes measured vs predicted -- over
batch x context, plus the equal-memory mode (largest batch within a budget, and its speed).

Configurations (``configs``; :data:`CONFIG_SPECS`):

- ``dense-sdpa``: transformers StaticCache + SDPA, eager, in our CUDA graph
  (``generate(cache_implementation="static")`` without compile). With a static cache
  transformers always builds a mask at decode (``create_causal_mask`` drops its skip for
  compileable caches when the query length is 1), and SDPA's GQA path needs no mask
  (``use_gqa_in_sdpa``), so ``repeat_kv`` copies every layer's K and V to all query heads
  over the whole cache every step: at B=8, 32k on the 8B shape 4.3 GB written per layer,
  the 150 ms of "other" kernels measured on an H200, and SDPA then reads 4x the bytes.
- ``hf-static-compiled``: transformers' documented fast path, StaticCache + ``torch.compile
  (model.forward, mode="reduce-overhead", fullgraph=True)`` (its own CUDA graphs); the same
  mask, so the same repeat_kv, now in inductor's copy kernels.
- ``hf-dynamic``: transformers' default ``generate``: DynamicCache + SDPA, eager, no CUDA
  graph; no mask at decode, so SDPA runs GQA directly, but every step ``torch.cat`` copies
  every layer's cache.
- ``dense-moa``: a uniform dense plan through the moa runtime (same Triton kernel as the
  plan): the like-for-like dense baseline.
- ``plan``: the plan file, or a synthetic plan at ``synthetic`` density made for each context.
- ``dense-moa-compiled``, ``plan-compiled``: the same, with the norms, MLPs and rotary
  compiled (:mod:`moa_search.bench.compiled`) inside the same CUDA graph.
- ``flashinfer-dense``, ``flashinfer-plan``: FlashInfer's paged-cache decode and its
  per-KV-head block-sparse attention on the plan, as the attention + cache of our own
  decode step (:mod:`moa_search.bench.flashinfer_peer`, :class:`PeerLoop`): everything
  else in the step is what dense-moa / plan run. Decode only (no prefill rows).

Each config is measured in its own try block: a failure is the row's ``status``, and the
run goes on.

Decode runs start from a synthetic cache (random K/V, every sequence at ``context``): decode
speed depends on lengths, not values, and a real prefill of B x 32k tokens would dominate
the run. Prefill is timed apart, at ``prefill_batch`` sequences of ``context`` real tokens.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moa_search.bench.compiled import CompileSettings
from moa_search.bench.decode_loop import DecodeLoop, DenseLoop, DynamicLoop, PeerLoop, PlanLoop
from moa_search.bench.memory import FitResult, fit_margin, parse_bytes, search_max_batch
from moa_search.bench.models import build_model, weight_bytes
from moa_search.bench.synthetic import parse_synthetic, synthetic_plan
from moa_search.errors import MoaSearchError
from moa_search.files import write_json
from moa_search.plan import Plan, load_plan, uniform_plan


@dataclass(frozen=True)
class ConfigSpec:
    """How a bench config decodes: ``cache`` ``"static"`` / ``"dynamic"`` (transformers'
    caches, the model's own SDPA), ``"moa"`` (the runtime) or ``"flashinfer"`` (the peer's
    cache and kernels in our step); ``plan`` ``"dense"`` or ``"plan"`` for moa and
    flashinfer; ``compile``: ``"hf"`` (transformers' torch.compile recipe) or
    ``"pieces"`` (:func:`moa_search.bench.compiled.compile_non_attention`)."""

    cache: str
    plan: str | None = None
    compile: str | None = None


CONFIG_SPECS: dict[str, ConfigSpec] = {
    "dense-sdpa": ConfigSpec("static"),
    "hf-static-compiled": ConfigSpec("static", compile="hf"),
    "hf-dynamic": ConfigSpec("dynamic"),
    "dense-moa": ConfigSpec("moa", "dense"),
    "plan": ConfigSpec("moa", "plan"),
    "dense-moa-compiled": ConfigSpec("moa", "dense", compile="pieces"),
    "plan-compiled": ConfigSpec("moa", "plan", compile="pieces"),
    "flashinfer-dense": ConfigSpec("flashinfer", "dense"),
    "flashinfer-plan": ConfigSpec("flashinfer", "plan"),
}
#: what ``bench`` runs unless told otherwise
CONFIGS = ("dense-sdpa", "dense-moa", "plan")
GIB = 2**30
EXTRA_SLOTS = 32  # cache room past context + new tokens for warm-up / profiling steps


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Bench:
    """State of one run: the model, the plans per context, rows written as they come."""

    def __init__(
        self,
        model: Any,
        plan_for: Any,
        *,
        new_tokens: int,
        device: torch.device,
        out: Path | None,
        configs: Sequence[str],
        dtype_bytes: int,
        compile_backend: str = "inductor",
    ):
        self.model = model
        self.plan_for = plan_for
        self.new_tokens = new_tokens
        self.device = device
        self.out = out
        self.configs = list(configs)
        self.dtype_bytes = dtype_bytes
        self.compile_backend = compile_backend
        self.weights = weight_bytes(model)
        self.rows: list[dict[str, Any]] = []
        self.capacity = (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        )

    # --- helpers -----------------------------------------------------------------------
    def plan_of(self, config: str, context: int) -> Plan | None:
        spec = CONFIG_SPECS[config]
        if spec.cache not in ("moa", "flashinfer"):
            return None
        if spec.plan == "dense":
            if spec.cache == "flashinfer":
                return None  # no plan: the row is dense, like transformers' rows
            return uniform_plan(self.model, "dense")
        return self.plan_for(context)

    def kv_per_seq(self, config: str, context: int) -> int:
        max_len = context + self.new_tokens + EXTRA_SLOTS
        spec = CONFIG_SPECS[config]
        if spec.cache == "flashinfer":  # the peer's own cache: paged, or dense per head
            from moa_search.bench.flashinfer_peer import predicted_bytes  # noqa: PLC0415

            return predicted_bytes(spec.plan, self.model, 1, max_len)
        plan = self.plan_of(config, context) or uniform_plan(self.model, "dense")
        return plan.kv_bytes(max_len, 1, self.dtype_bytes)

    def make_loop(self, config: str, batch: int, context: int) -> DecodeLoop:
        max_len = context + self.new_tokens + EXTRA_SLOTS
        spec = CONFIG_SPECS[config]
        cap = self.new_tokens + 8
        if spec.cache == "dynamic":
            return DynamicLoop(self.model, batch, max_len, out_capacity=cap)
        backend = self.compile_backend
        if spec.cache == "static":
            hf = spec.compile == "hf"
            return DenseLoop(
                self.model, batch, max_len, out_capacity=cap,
                compile=CompileSettings(backend, "reduce-overhead") if hf else None,
            )  # fmt: skip
        plan = self.plan_of(config, context)
        if spec.cache == "flashinfer":
            from moa_search.bench.flashinfer_peer import peer_factory  # noqa: PLC0415

            # planned once for the timed run's final length (see flashinfer_peer)
            make = peer_factory(spec.plan, plan, plan_length=context + self.new_tokens)
            return PeerLoop(self.model, make, batch, max_len, out_capacity=cap)
        pieces = CompileSettings(backend) if spec.compile == "pieces" else None
        return PlanLoop(self.model, plan, batch, max_len, out_capacity=cap, compile_settings=pieces)

    def emit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.out is not None:
            from moa_search.bench.report import write_csv  # noqa: PLC0415

            write_csv(self.rows, self.out / "bench.csv")
        keys = ("mode", "config", "context", "batch", "status", "tok_s", "step_ms", "peak_gib")
        _log(" ".join(f"{k}={row.get(k)}" for k in keys if k in row))

    # --- measurements ------------------------------------------------------------------
    def decode(
        self, config: str, batch: int, context: int, mode: str = "sweep", overhead: bool = False
    ) -> dict[str, Any]:
        """One decode measurement; the row (status ok / oom / error)."""
        plan = self.plan_of(config, context)
        row: dict[str, Any] = {
            "mode": mode,
            "config": config,
            "context": context,
            "batch": batch,
            "new_tokens": self.new_tokens,
            "weights_bytes": self.weights,
            "kv_density": (
                plan.memory_density(context, self.dtype_bytes)
                if plan is not None and CONFIG_SPECS[config].cache == "moa"
                else 1.0  # transformers' and FlashInfer's caches store every token
            ),
        }
        _free(self.device)
        loop = None
        try:
            loop = self.make_loop(config, batch, context)
            t0 = time.perf_counter()
            kv_alloc = loop.allocate()
            loop.capture()
            row["setup_s"] = round(time.perf_counter() - t0, 3)
            loop.fill_synthetic(context)
            t0 = time.perf_counter()
            loop.run(4)  # warm replays (compiled configs compile and record here)
            row["warm_s"] = round(time.perf_counter() - t0, 3)
            loop.fill_synthetic(context)
            seconds = loop.run(self.new_tokens)
            row.update(self._timing(loop, batch, context, seconds, plan))
            row["graph"] = loop.graph is not None
            if getattr(loop, "compile_note", None):
                row["compile_note"] = loop.compile_note
            if getattr(loop, "note", None):
                row["note"] = loop.note
            if loop.preallocates:
                row["kv_bytes"] = loop.kv_nbytes()
                row["kv_alloc_bytes"] = kv_alloc
                row["kv_pred_bytes"] = loop.predicted_kv_bytes()
                row["kv_err_pct"] = round(100 * (kv_alloc / row["kv_pred_bytes"] - 1), 3)
            else:  # a growing cache: what it holds now (context + new tokens)
                row["kv_bytes"] = loop.kv_nbytes()
            if self.device.type == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
                row["peak_gib"] = round(row["peak_bytes"] / GIB, 3)
                row["reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / GIB, 3)
            if overhead:
                row.update(self._overhead(loop, context, row["step_ms"]))
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as exc:  # keep the sweep going; the row says what broke
            row["status"] = _error(exc)
        finally:
            if loop is not None:
                try:
                    loop.close()
                except Exception as exc:  # a failed close must not lose the row
                    row["close_error"] = _error(exc)
            del loop
            _free(self.device)
        return row

    def _timing(self, loop, batch, context, seconds, plan) -> dict[str, Any]:
        step = seconds / self.new_tokens
        read = (plan or uniform_plan(self.model, "dense")).read_bytes(
            context, batch, self.dtype_bytes
        )
        return {
            "step_ms": round(step * 1e3, 4),
            "tok_s": round(batch / step, 2),
            "kv_read_bytes": read,
            "achieved_gbs": round((read + self.weights) / step / 1e9, 1),
        }

    def _overhead(self, loop: DecodeLoop, context: int, graph_ms: float) -> dict[str, Any]:
        """Eager step time, and the device-kernel time of one step by category (profiler):
        overhead = graph step - kernel sum (what is neither a kernel nor hidden by the graph)."""
        res: dict[str, Any] = {}
        steps = 8
        loop.fill_synthetic(context)
        res["eager_step_ms"] = round(loop.run(steps, graph=False) / steps * 1e3, 4)
        try:
            from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

            from moa_search.kernels.decode import pdl_off  # noqa: PLC0415

            loop.fill_synthetic(context)
            # PDL kernels wait for their predecessor inside themselves: profile without
            with profile(activities=[ProfilerActivity.CUDA]) as prof, pdl_off():
                loop.run(3, graph=False)
                torch.cuda.synchronize(self.device)
            cats: dict[str, float] = {}
            count = 0
            for evt in prof.key_averages():
                us = getattr(evt, "self_device_time_total", None)
                if us is None:
                    us = getattr(evt, "self_cuda_time_total", 0)
                if not us or evt.key.startswith("ProfilerStep"):
                    continue
                if getattr(evt, "device_type", None) is not None and "CUDA" not in str(
                    evt.device_type
                ):
                    continue
                cat = _category(evt.key)
                cats[cat] = cats.get(cat, 0.0) + us / 3 / 1e3
                count += evt.count
            total = sum(cats.values())
            res["kernel_ms"] = round(total, 4)
            res["kernels_per_step"] = round(count / 3)
            for cat, ms in sorted(cats.items()):
                res[f"kernel_{cat}_ms"] = round(ms, 4)
            res["overhead_pct"] = round(100 * (graph_ms - total) / graph_ms, 2)
        except Exception as exc:  # profiler unavailable: keep the eager number
            res["profile_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        return res

    def prefill(self, config: str, context: int, batch: int) -> dict[str, Any]:
        """Time a real prompt of ``context`` tokens x ``batch`` into a fresh cache."""
        plan = self.plan_of(config, context)
        row: dict[str, Any] = {
            "mode": "prefill",
            "config": config,
            "context": context,
            "batch": batch,
        }
        _free(self.device)
        runtime = None
        try:
            from moa_search.runtime import apply_plan  # noqa: PLC0415

            if plan is not None:
                runtime = apply_plan(self.model, plan, max_cache_len=context + 1)
            gen = torch.Generator(device=self.device).manual_seed(1)
            vocab = self.model.config.get_text_config().vocab_size
            with torch.no_grad():
                warm = torch.randint(
                    0, vocab, (batch, min(context, 512)), generator=gen, device=self.device
                )
                self.model(warm, use_cache=True, logits_to_keep=1)
                ids = torch.randint(0, vocab, (batch, context), generator=gen, device=self.device)
                _free(self.device)
                t0 = time.perf_counter()
                if self.device.type == "cuda":
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                out = self.model(ids, use_cache=True, logits_to_keep=1)
                if self.device.type == "cuda":
                    end.record()
                    end.synchronize()
                    seconds = start.elapsed_time(end) / 1e3
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
                else:
                    seconds = time.perf_counter() - t0
                del out
            row["prefill_s"] = round(seconds, 4)
            row["prefill_tok_s"] = round(batch * context / seconds, 1)
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as exc:
            row["status"] = _error(exc)
        finally:
            if runtime is not None:
                runtime.remove()
            _free(self.device)
        return row

    def equal_memory(self, config: str, context: int, budget: int, max_tries: int) -> None:
        """Largest batch within ``budget`` (predicted from bytes + the margin measured in the
        sweep, then verified by running it) and its decode speed."""
        kv1 = self.kv_per_seq(config, context)
        measured = {
            r["batch"]: r["peak_bytes"]
            for r in self.rows
            if r.get("mode") == "sweep"
            and r.get("config") == config
            and r.get("context") == context
            and r.get("status") == "ok"
            and "peak_bytes" in r
        }
        model = fit_margin(self.weights, kv1, measured)
        rows: dict[int, dict[str, Any]] = {}

        def try_batch(b: int) -> int | None:
            row = self.decode(config, b, context, mode="equal-memory-try")
            rows[b] = row
            return row.get("peak_bytes") if row["status"] == "ok" else None

        res: FitResult = search_max_batch(budget, model, try_batch, max_tries=max_tries)
        if res.batch and res.batch in rows:
            row = dict(rows[res.batch])
        else:
            row = {"config": config, "context": context, "batch": res.batch, "status": "none-fit"}
        row.update(
            {
                "mode": "equal-memory",
                "budget_gib": round(budget / GIB, 3),
                "predicted_batch": res.predicted,
                "margin_fixed_gib": round(model.fixed / GIB, 3),
                "margin_per_seq_mib": round(model.per_seq / 2**20, 2),
                "tries": json.dumps([[b, ok] for b, ok, _ in res.tries]),
            }
        )
        self.emit(row)


def _error(exc: BaseException) -> str:
    """A row's status for a failure: the type and the first line of the message."""
    lines = str(exc).splitlines() or [""]
    return f"error: {type(exc).__name__}: {lines[0][:160]}"


def _category(name: str) -> str:
    low = name.lower()
    if any(
        s in low
        for s in (
            "mixed_decode",
            "merge_kernel",
            "sparq",
            "flash",
            "fmha",
            "attention",
            "sdpa",
            "efficient",
        )
    ):
        return "attention"
    if any(
        s in low
        for s in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "matmul", "cublas", "splitk", "sm90")
    ):
        return "gemm"
    # PyTorch's copy kernels (casts, torch.cat, repeat_kv's expand + reshape, index_copy_);
    # inductor's fused kernels may say "_to_copy" in their names and stay "other"
    if "memcpy" in low or "memset" in low or ("copy" in low and not low.startswith("triton")):
        return "copy"
    return "other"


def _as_list(value: int | str | Sequence[int]) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


@dataclass(frozen=True)
class BenchConfig:
    """What ``bench`` measures: built by the CLI, stored in run.json (``config``).

    ``synthetic``: density (``0.25``) or ``"density=0.25,seed=1"``, a synthetic plan made
    for each context (:func:`moa_search.bench.synthetic.synthetic_plan`) when no plan file
    is given. ``batch`` x ``context``: the sweep (lists or "1,8,32"); ``new_tokens``: decode
    steps timed per point; ``memory_budget``: the equal-memory mode's budget ("60GiB"; None
    skips it); ``configs``: names in :data:`CONFIG_SPECS`;
    ``prefill_batch``: sequences per timed prefill (None: no prefill timing);
    ``overhead_at``: (batch, context) where eager vs graph time and the kernel-time
    breakdown are measured (skipped when not in the sweep); ``max_tries``: batch sizes the
    equal-memory search tries past the first estimate; ``compile_backend``: torch.compile
    backend of the compiled configs (``aot_eager`` traces without code generation: tests).
    """

    synthetic: float | str | None = None
    batch: int | str | Sequence[int] = (1, 8, 32)
    context: int | str | Sequence[int] = (4096, 32768)
    new_tokens: int = 128
    memory_budget: str | int | None = "60GiB"
    configs: Sequence[str] = CONFIGS
    prefill_batch: int | None = 1
    overhead_at: tuple[int, int] | None = (8, 32768)
    dtype: str = "bfloat16"
    device: str = "cuda"
    seed: int = 0
    max_tries: int = 4
    compile_backend: str = "inductor"


def bench(
    model: str = "llama3-8b-shape",
    plan: str | os.PathLike[str] | Plan | None = None,
    config: BenchConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = "bench_out",
    **settings: Any,
) -> list[dict[str, Any]]:
    """Dense vs plan, side by side; writes OUT/bench.csv, bench.md, plots, run.json.

    ``model``: a shape from :data:`moa_search.bench.models.SHAPES` (random weights, no
    download), the default alias ``smollm2-135m``, or any HF name / path; ``plan``: a plan
    YAML (or Plan) for ``model``, or give ``synthetic`` in ``config``. Any
    :class:`BenchConfig` field may also be given as a keyword, over ``config``.
    Returns the rows (also in OUT/bench.csv).
    """
    cfg = replace(config or BenchConfig(), **settings)
    synthetic, configs, seed = cfg.synthetic, cfg.configs, cfg.seed
    new_tokens, memory_budget, prefill_batch = cfg.new_tokens, cfg.memory_budget, cfg.prefill_batch
    if (plan is None) == (synthetic is None):
        raise MoaSearchError("give exactly one of plan or synthetic")
    bad = [c for c in configs if c not in CONFIG_SPECS]
    if bad:
        raise MoaSearchError(f"unknown config {bad[0]!r} (known: {', '.join(CONFIG_SPECS)})")
    if new_tokens < 1:
        raise MoaSearchError("new_tokens must be >= 1")
    batches, contexts = _as_list(cfg.batch), _as_list(cfg.context)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoaSearchError("device cuda requested but no GPU is visible")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    net = build_model(model, dtype=cfg.dtype, device=dev, seed=seed)
    _log(f"model {model} built in {time.perf_counter() - t0:.1f}s")
    dtype_bytes = torch.finfo(net.dtype).bits // 8

    if plan is not None:
        fixed = plan if isinstance(plan, Plan) else load_plan(plan)
        fixed.check_model(net)

        def plan_for(ctx: int) -> Plan:
            return fixed
    else:
        kwargs = (
            parse_synthetic(synthetic)
            if isinstance(synthetic, str)
            else {"density": float(synthetic)}
        )
        cache: dict[int, Plan] = {}

        def plan_for(ctx: int) -> Plan:
            if ctx not in cache:
                kw = {"length": ctx, "seed": seed, **kwargs}
                cache[ctx] = synthetic_plan(net, **kw)
                if out_dir is not None:
                    from moa_search.plan import save_plan  # noqa: PLC0415

                    save_plan(cache[ctx], out_dir / f"plan_synthetic_{ctx}.yaml")
            return cache[ctx]

    b = Bench(
        net,
        plan_for,
        new_tokens=new_tokens,
        device=dev,
        out=out_dir,
        configs=configs,
        dtype_bytes=dtype_bytes,
        compile_backend=cfg.compile_backend,
    )
    meta = {
        "model": model,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "new_tokens": new_tokens,
        "batch": batches,
        "context": contexts,
        "configs": list(configs),
        "weights_bytes": b.weights,
        "memory_budget": memory_budget,
        "plan": str(plan) if plan is not None else None,
        "synthetic": synthetic,
        "argv": sys.argv,
        "config": asdict(cfg),
    }
    if out_dir is not None:
        write_json(out_dir / "run.json", meta)
    _log(f"device {meta['device']}, weights {b.weights / GIB:.2f} GiB")

    for ctx in contexts:
        if prefill_batch:
            timed: set[tuple[str, str | None]] = set()
            for config in configs:  # compile and cache choices are decode-only: time once
                spec = CONFIG_SPECS[config]
                if spec.cache == "flashinfer":
                    continue  # decode-only peers: a prompt would run transformers' SDPA
                key = (spec.cache == "moa", spec.plan)
                if key not in timed:
                    timed.add(key)
                    b.emit(b.prefill(config, ctx, prefill_batch))
        for bs in batches:
            for config in configs:
                need = b.weights + bs * b.kv_per_seq(config, ctx)
                if b.capacity and need > 0.97 * b.capacity:
                    b.emit(
                        {
                            "mode": "sweep",
                            "config": config,
                            "context": ctx,
                            "batch": bs,
                            "status": f"skipped: needs {need / GIB:.1f} GiB",
                        }
                    )
                    continue
                ov = cfg.overhead_at is not None and (bs, ctx) == tuple(cfg.overhead_at)
                b.emit(b.decode(config, bs, ctx, overhead=ov))
        if memory_budget is not None:
            budget = parse_bytes(memory_budget)
            for config in configs:
                b.equal_memory(config, ctx, budget, cfg.max_tries)

    if out_dir is not None:
        from moa_search.bench.report import write_report  # noqa: PLC0415

        write_report(b.rows, out_dir, meta)
    _log(f"done in {time.perf_counter() - t0:.1f}s")
    return b.rows
