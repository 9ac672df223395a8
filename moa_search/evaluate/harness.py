"""Bridge to lm-evaluation-harness: run any harness task with a plan applied.

Why through the harness's own Hugging Face model class (``HFLM``): its request handling
(log-likelihood batching, ``generate_until`` stop sequences, few-shot contexts, chat
templates) is what users compare numbers against. The model already loaded by ``evaluate``
is wrapped once (``HFLM(pretrained=model)``), and each method is applied with
``moa_search.apply_plan`` for the length of one ``simple_evaluate`` call, so the harness's
forward passes go through the plan's masked prefill and its ``generate`` calls through the
per-head cache (window heads really drop old entries).

Equal memory: harness prompts have many lengths, so the uniform baselines are solved to the
plan's KV memory at one reference length (``length``, default the longest eval length) and
the report names it. A window longer than a prompt is dense on that prompt, so short
harness tasks measure little; long-context suites (RULER, LongBench) are where plans differ.
SparQ is decode-only: its log-likelihood scores equal dense.

Needs the optional extra: ``pip install 'moa-search[lm-eval]'`` (lm-eval 0.4.x).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_search.errors import MoaSearchError
from moa_search.evaluate.baselines import Method
from moa_search.evaluate.stats import _z, score_ci
from moa_search.evaluate.tasks import method_applied

PREFIX = "lm-eval:"  # task names in trials/results: "lm-eval:<harness task>"
SECTION = "lm-eval"


@dataclass(frozen=True)
class HarnessConfig:
    """Which lm-evaluation-harness tasks ``moa-search eval --lm-eval`` runs, and how.
    ``length``: the context cap where baselines match the plan's memory (None: eval's
    longest length); ``limit``: documents per task (< 1: a fraction)."""

    tasks: tuple[str, ...] = ()
    include: str | os.PathLike[str] | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    length: int | None = None
    batch_size: int = 1
    chat_template: bool = False


_SKIP_KEYS = {"alias", "name", "sample_len", "samples"}


def require_lm_eval() -> str:
    """The installed lm-eval version; a one-line error when it is missing or not 0.4.x."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MoaSearchError(
            "--lm-eval needs lm-evaluation-harness: pip install 'moa-search[lm-eval]'"
        )
    from importlib.metadata import version  # noqa: PLC0415

    v = version("lm_eval")
    if not v.startswith("0.4."):
        raise MoaSearchError(f"lm-eval 0.4.x is supported, found {v}")
    return v


def check_harness_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Normalise harness task names (their names are case-sensitive, so only strip)."""
    out = tuple(dict.fromkeys(str(t).strip() for t in tasks if str(t).strip()))
    if not out:
        raise MoaSearchError("--lm-eval: no harness task names given")
    return out


def task_manager(tasks: Sequence[str], include: str | os.PathLike[str] | None) -> Any:
    """A TaskManager that knows ``tasks``; only ``include`` is indexed when it has them all
    (indexing the harness's thousands of built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - optional dependency

    if include is not None:
        if not Path(include).exists():
            raise MoaSearchError(f"--lm-eval-include: {include} does not exist")
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=str(include) if include is not None else None)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise MoaSearchError(
            f"unknown lm-eval task(s) {', '.join(missing)} (see `lm-eval ls tasks`, or pass "
            f"a folder of task YAMLs with --lm-eval-include)"
        )
    return tm


def run_harness(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    harness: HarnessConfig,
    *,
    backend: str = "auto",
    seed: int = 0,
    confidence: float = 0.95,
    quiet: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Run ``harness.tasks`` once per method at ``harness.length``; return (trial rows,
    summary rows) for the report.

    Trial rows: one per document of each task's first metric (``correct`` = that metric's
    per-document value). Summary rows: one per (method, task, metric) with the harness's
    value, its stderr, and an interval (Wilson / bootstrap over documents when the metric
    is a per-document mean, else value +- z * stderr).
    """
    require_lm_eval()
    import lm_eval  # noqa: PLC0415 - optional dependency
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    if quiet:
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
    tasks = check_harness_tasks(harness.tasks)
    tm = task_manager(tasks, harness.include)
    length = harness.length
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=harness.batch_size,
        max_length=length,
        device=str(model.device),
    )
    trials: list[dict] = []
    summary: list[dict] = []
    for method in methods:
        start = time.perf_counter()
        with method_applied(model, method, backend, length):
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=tm,
                num_fewshot=harness.num_fewshot,
                limit=harness.limit,
                log_samples=True,
                apply_chat_template=harness.chat_template,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        seconds = time.perf_counter() - start
        t, s = _rows(res, method, length, seed, confidence, seconds)
        trials += t
        summary += s
    return trials, summary


def _method_cols(method: Method) -> dict:
    return {
        "section": SECTION,
        "point": "plan",
        "method": method.name,
        "description": method.description,
        "memory_density": method.memory_density,
        "read_density": method.read_density,
    }


def _rows(
    res: dict, method: Method, length: int, seed: int, confidence: float, seconds: float
) -> tuple[list[dict], list[dict]]:
    trials: list[dict] = []
    summary: list[dict] = []
    samples = res.get("samples") or {}
    total_docs = sum(len(v) for v in samples.values()) or 1
    for name, metrics in res.get("results", {}).items():
        docs = samples.get(name, [])
        n_eff = (res.get("n-samples", {}).get(name) or {}).get("effective", len(docs))
        better = res.get("higher_is_better", {}).get(name, {})
        first = True
        for key, value in metrics.items():
            if key in _SKIP_KEYS or "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            value = float(value)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, int | float) else math.nan
            per_doc = [
                float(d[metric])
                for d in docs
                if d.get("filter", filt) == filt and isinstance(d.get(metric), int | float)
            ]
            lo, hi, how = _interval(value, stderr, per_doc, confidence, seed)
            summary.append(
                {
                    **_method_cols(method),
                    "task": PREFIX + name,
                    "length": length,
                    "depth": math.nan,
                    "metric": metric if filt == "none" else f"{metric} ({filt})",
                    "value": value,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": int(n_eff) if n_eff else len(per_doc),
                    "tokens": 0,
                    "ci_method": how,
                    "seconds_per_trial": seconds / total_docs,
                    "stderr": stderr,
                    "higher_is_better": better.get(metric),
                    "signal": True,
                }
            )
            if first and per_doc:
                first = False
                for d in (d for d in docs if d.get("filter", filt) == filt):
                    trials.append(
                        {
                            **_method_cols(method),
                            "task": PREFIX + name,
                            "length": length,
                            "depth": math.nan,
                            "sample": int(d.get("doc_id", len(trials))),
                            "seed": seed,
                            "correct": float(d.get(metric, math.nan)),
                            "nll": math.nan,
                            "tokens": 0,
                            "output": _text(d.get("filtered_resps")),
                            "answer": _text(d.get("target")),
                            "seconds": seconds / total_docs,
                        }
                    )
    return trials, summary


def _interval(
    value: float, stderr: float, per_doc: list[float], confidence: float, seed: int
) -> tuple[float, float, str]:
    mean_of_docs = per_doc and abs(sum(per_doc) / len(per_doc) - value) < 1e-9
    if mean_of_docs and all(0.0 <= x <= 1.0 for x in per_doc):
        _, lo, hi, how = score_ci(per_doc, confidence, seed)
        return lo, hi, f"{how} over documents"
    if not math.isnan(stderr):
        z = _z(confidence)
        return value - z * stderr, value + z * stderr, "harness stderr (normal)"
    return math.nan, math.nan, ""


def _text(x: Any, limit: int = 300) -> str:
    while isinstance(x, list | tuple) and len(x) == 1:
        x = x[0]
    return str(x)[:limit]
