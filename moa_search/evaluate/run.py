"""``evaluate(...)``: the plan against dense and uniform baselines at equal budget.

Flow: check arguments (cheap, before any model loads) -> load model and plan (plan validated
against the model) -> list the work (section, point, method, task, length) -> run it,
applying each method once per length and showing every method the same prompts -> write
trials.csv, results.csv, results.md and plots into ``out``.

Budget sweep (``budgets`` and/or ``sweep_plans``), at one length (``sweep_length``, default
the longest eval length): every point gets uniform baselines rebuilt at that point's budget.
The plan side of a point is either one of ``sweep_plans`` (e.g. a search's Pareto plans; each
sits at its own density) or, for each memory fraction in ``budgets``, the main plan with its
window / elastic sizes scaled to that fraction (``baselines.scale_plan``).

lm-evaluation-harness tasks (``lm_eval_tasks``, optional extra ``moa-search[lm-eval]``) run
after the built-in tasks, for the plan and the same baselines solved to its KV memory at
``lm_eval_length`` (default the longest eval length); their scores join the same report
(section ``lm-eval``). See ``harness.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from moa_search.errors import MoaSearchError
from moa_search.evaluate import aggregate, report
from moa_search.evaluate.baselines import (
    BASELINES,
    DEFAULT_SINK,
    Method,
    build_methods,
    dense_method,
    scale_plan,
)
from moa_search.evaluate.harness import HarnessConfig
from moa_search.evaluate.tasks import (
    RULER_TASKS,
    Item,
    check_tasks,
    method_applied,
    ppl_items,
    prompt_items,
    run_items,
)
from moa_search.files import atomic_write, write_text
from moa_search.plan import Plan, load_plan, validate

DEFAULT_LENGTHS = (2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PathLike = str | os.PathLike[str]


@dataclass
class EvalResult:
    """What ``evaluate`` wrote, also returned as tables for notebooks and tests."""

    out: Path
    trials: pd.DataFrame
    summary: pd.DataFrame
    derived: pd.DataFrame
    files: list[Path]
    seconds: float


@dataclass(frozen=True)
class _Work:
    section: str
    point: str
    method: Method
    length: int


def check_baselines(baselines: Sequence[str]) -> tuple[str, ...]:
    """Normalise and refuse unknown baseline names (one-line error)."""
    out: list[str] = []
    for b in baselines:
        name = str(b).strip().lower()
        if name not in BASELINES:
            raise MoaSearchError(f"unknown baseline {b!r} (known: {', '.join(BASELINES)})")
        if name not in out:
            out.append(name)
    return tuple(out)


def _check_numbers(lengths, depths, samples, budgets) -> tuple[int, ...]:
    lengths = tuple(sorted({int(n) for n in lengths}))
    if not lengths or lengths[0] <= 0:
        raise MoaSearchError(f"lengths must be positive integers, got {lengths!r}")
    if not depths or not all(0 <= float(d) <= 1 for d in depths):
        raise MoaSearchError(f"depths must be in [0, 1], got {tuple(depths)!r}")
    if int(samples) <= 0:
        raise MoaSearchError(f"samples must be a positive integer, got {samples!r}")
    for b in budgets or ():
        if not 0 < float(b) <= 1:
            raise MoaSearchError(f"budgets are memory fractions in (0, 1], got {b!r}")
    return lengths


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoaSearchError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoaSearchError(f"device {device!r} requested but CUDA is not available here")
    return dev


def _load(model: Any, tokenizer: Any, device: str, dtype: str) -> tuple[Any, Any, str]:
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise MoaSearchError("evaluate: pass tokenizer= together with a loaded model")
        return model.eval(), tokenizer, getattr(model.config, "_name_or_path", "") or "model"
    from moa_search.models import load_model, load_tokenizer  # noqa: PLC0415 - heavy import

    _device(device)
    loaded = load_model(model, dtype=dtype, device=device)
    return loaded, tokenizer or load_tokenizer(model), str(model)


def _check_lengths(model: Any, lengths: tuple[int, ...]) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and lengths[-1] > int(limit):
        raise MoaSearchError(
            f"length {lengths[-1]} exceeds the model's context "
            f"(config.max_position_embeddings = {limit})"
        )


def _load_plan(plan: Plan | PathLike, model: Any) -> tuple[Plan, str]:
    source = "" if isinstance(plan, Plan) else Path(plan).name
    return validate(plan, model), source


def _work(
    plan: Plan,
    source: str,
    lengths: tuple[int, ...],
    baselines: tuple[str, ...],
    sweep: list[tuple[str, Plan]],
    sweep_length: int,
    opts: dict,
) -> list[_Work]:
    work = []
    for n in lengths:
        for m in build_methods(plan, n, baselines, source, **opts):
            work.append(_Work("main", "plan", m, n))
    non_dense = tuple(b for b in baselines if b != "dense")
    for label, p in sweep:
        for m in build_methods(p, sweep_length, non_dense, label, **opts):
            work.append(_Work("sweep", label, m, sweep_length))
    if sweep and "dense" in baselines:
        work.append(_Work("sweep", "dense", dense_method(), sweep_length))
    return work


def _skip_reason(method: Method, task: str) -> str | None:
    plan = method.plan
    if task == "ppl" and plan is not None and not any(p.static for r in plan.heads for p in r):
        return "perplexity not measured: SparQ is decode-only (dense prefill), so it equals dense"
    return None


def _sweep_points(
    plan: Plan,
    model: Any,
    budgets: Sequence[float] | None,
    sweep_plans: Sequence[Plan | PathLike] | None,
    n: int,
) -> list[tuple[str, Plan]]:
    points = []
    for p in sweep_plans or ():
        loaded, source = _load_plan(p, model)
        points.append((f"{source or 'plan'}@{loaded.memory_density(n):.3f}", loaded))
    for b in budgets or ():
        points.append((f"memory={float(b):g}", scale_plan(plan, n, float(b))))
    return points


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` measures: built by the CLI, stored in the report's run.json.

    ``samples`` is per cell: ppl windows per length, passkey prompts per (length, depth),
    kv prompts per length (depths cycled); RULER tasks (``ruler`` = all of them): per depth
    for the single-needle ones, else per length. A retrieval prompt plus its greedy answer
    (``max_new_tokens``, default per task: 10 passkey, 14 kv, RULER's own) fits in the eval
    length. ``budgets`` / ``sweep_plans`` / ``sweep_length``: the budget sweep (module
    doc); ``lm_eval``: harness tasks (``harness.HarnessConfig``).
    """

    baselines: Sequence[str] = BASELINES
    tasks: Sequence[str] = ("ppl", "passkey", "kv-retrieval")
    lengths: Sequence[int] = DEFAULT_LENGTHS
    depths: Sequence[float] = DEFAULT_DEPTHS
    samples: int = 10
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"
    budgets: Sequence[float] | None = None
    sweep_plans: Sequence[Plan | PathLike] | None = None
    sweep_length: int | None = None
    sink: int = DEFAULT_SINK
    elastic_beta: float | None = None
    sparq_r: int | None = None
    ppl_corpus: str = "austen"
    ruler_corpus: str = "austen"
    prompt_format: str | None = None
    max_new_tokens: int | None = None
    confidence: float = 0.95
    plots: bool = True
    lm_eval: HarnessConfig | None = None
    batch: int = 1  # prompts generated together (a GPU is launch-bound at batch 1)


#: the keyword names evaluate() accepted before EvalConfig, for its lm_eval fields
_HARNESS_KEYWORDS = {
    "lm_eval_tasks": "tasks",
    "lm_eval_include": "include",
    "lm_eval_limit": "limit",
    "lm_eval_fewshot": "num_fewshot",
    "lm_eval_length": "length",
    "lm_eval_batch_size": "batch_size",
    "lm_eval_chat_template": "chat_template",
}


def _eval_config(config: EvalConfig | None, settings: dict[str, Any]) -> EvalConfig:
    """``config`` with keyword overrides (``lm_eval_*`` ones go to its HarnessConfig)."""
    cfg = config or EvalConfig()
    harness = {
        _HARNESS_KEYWORDS[k]: settings.pop(k) for k in list(settings) if k in _HARNESS_KEYWORDS
    }
    if harness.get("tasks"):
        harness["tasks"] = tuple(harness["tasks"])
        settings["lm_eval"] = replace(cfg.lm_eval or HarnessConfig(), **harness)
    return replace(cfg, **settings)


def evaluate(
    model: Any = "smollm2-135m",
    plan: Plan | PathLike | None = None,
    config: EvalConfig | None = None,
    *,
    out: PathLike = "eval",
    tokenizer: Any = None,
    progress: bool = True,
    **settings: Any,
) -> EvalResult:
    """Evaluate ``plan`` on ``model`` against dense and uniform baselines at equal budget.

    ``config`` says what (:class:`EvalConfig`); any of its fields may also be given as a
    keyword, over ``config`` (and ``lm_eval_tasks=`` etc. for its harness fields).
    ``model`` is a name/path or a loaded model (then pass ``tokenizer``). Returns the tables
    it wrote to ``out``; see the module doc for the sweep and lm-eval. Every bad input is a
    one-line MoaSearchError.
    """
    t0 = time.perf_counter()
    cfg = _eval_config(config, settings)
    if plan is None:
        raise MoaSearchError("evaluate: a plan is required (--plan PLAN.yaml)")
    harness_tasks: tuple[str, ...] = ()
    if cfg.lm_eval is not None and cfg.lm_eval.tasks:
        from moa_search.evaluate import harness  # noqa: PLC0415 - optional dependency

        lm_eval_version = harness.require_lm_eval()
        harness_tasks = harness.check_harness_tasks(cfg.lm_eval.tasks)
    task_names = check_tasks(cfg.tasks, allow_empty=bool(harness_tasks))
    base_names = check_baselines(cfg.baselines)
    n_all = _check_numbers(cfg.lengths, cfg.depths, cfg.samples, cfg.budgets)
    if not isinstance(cfg.batch, int) or cfg.batch < 1:
        raise MoaSearchError(f"batch must be a positive integer, got {cfg.batch!r}")
    depths = tuple(float(d) for d in cfg.depths)
    samples, seed = cfg.samples, cfg.seed
    s_len = int(cfg.sweep_length or n_all[-1])
    h_len = int((cfg.lm_eval.length if harness_tasks else None) or n_all[-1])
    if not isinstance(plan, Plan):
        load_plan(plan)  # a bad plan file fails in a second, before the model loads
    net, tok, model_name = _load(model, tokenizer, cfg.device, cfg.dtype)
    main_plan, source = _load_plan(plan, net)
    _check_lengths(net, tuple(sorted({*n_all, s_len, *((h_len,) if harness_tasks else ())})))
    sweep = _sweep_points(main_plan, net, cfg.budgets, cfg.sweep_plans, s_len)
    opts = dict(sink=cfg.sink, elastic_beta=cfg.elastic_beta, sparq_r=cfg.sparq_r)
    work = _work(main_plan, source, n_all, base_names, sweep, s_len, opts)
    torch.manual_seed(seed)

    items: dict[tuple[str, int], list[Item]] = {}

    def inputs(task: str, n: int) -> list[Item]:
        if (task, n) not in items:
            if task == "ppl":
                items[task, n] = ppl_items(tok, n, samples, seed, cfg.ppl_corpus)
            else:
                source = cfg.ruler_corpus if task in RULER_TASKS else cfg.prompt_format
                items[task, n] = prompt_items(
                    tok, task, n, depths, samples, seed, cfg.max_new_tokens, source
                )
        return items[task, n]

    todo = [[t for t in task_names if not _skip_reason(w.method, t)] for w in work]
    notes = sorted(
        {
            f"{w.method.name}: {r}"
            for w in work
            for t in task_names
            if (r := _skip_reason(w.method, t))
        }
    )
    total = sum(len(inputs(t, w.length)) for w, ts in zip(work, todo, strict=True) for t in ts)
    partial = Path(out) / "trials.partial.csv"  # kept per finished cell: a rerun resumes
    run_key = _run_key(model_name, main_plan, cfg, net)
    finished = _resume(partial, run_key)
    rows: list[dict] = []
    done: dict[tuple[str, str, int], list[dict]] = {}  # dense results, reused by the sweep
    bar = tqdm(total=total, desc="evaluate", unit="trial", disable=not progress)
    for w, tasks_here in zip(work, todo, strict=True):
        with method_applied(net, w.method, cfg.backend, w.length):
            for task in tasks_here:
                key = (w.method.name, task, w.length)
                if w.method.is_reference and key in done:
                    rows.extend({**r, "section": w.section, "point": w.point} for r in done[key])
                    bar.update(len(done[key]))
                    continue
                if cell := finished.get((w.section, w.point, *key)):
                    rows.extend(cell)  # finished by an interrupted run with the same settings
                    if w.method.is_reference:
                        done.setdefault(key, cell)
                    bar.update(len(cell))
                    continue
                bar.set_postfix_str(f"{w.point}/{w.method.name} {task} n={w.length}")
                cell = []
                here = inputs(task, w.length)
                for b0 in range(0, len(here), cfg.batch):
                    for trial in run_items(net, tok, w.method, here[b0 : b0 + cfg.batch]):
                        cell.append(
                            {"section": w.section, "point": w.point, **_method_cols(w),
                             **asdict(trial)}
                        )  # fmt: skip
                        bar.update(1)
                if w.method.is_reference:
                    done[key] = cell
                rows.extend(cell)
                atomic_write(partial, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    bar.close()

    trials = pd.DataFrame(rows)
    summary = aggregate.summarize(trials, cfg.confidence, seed) if rows else pd.DataFrame()
    if harness_tasks:
        h_trials, h_summary = harness.run_harness(
            net,
            tok,
            build_methods(main_plan, h_len, base_names, source, **opts),
            replace(cfg.lm_eval, tasks=harness_tasks, length=h_len),
            backend=cfg.backend,
            seed=seed,
            confidence=cfg.confidence,
        )
        trials = pd.concat([trials, pd.DataFrame(h_trials)], ignore_index=True)
        summary = pd.concat([summary, pd.DataFrame(h_summary)], ignore_index=True)
    profiled = max(main_plan.lengths) if main_plan.lengths else None
    summary["beyond_profiled"] = (
        summary.length > profiled if profiled else pd.Series(pd.NA, index=summary.index)
    )
    derived = aggregate.derived(summary)
    seconds = time.perf_counter() - t0
    lm = cfg.lm_eval
    meta = {
        "model": model_name,
        "plan": source or "(in memory)",
        "plan_profiled_lengths": list(main_plan.lengths),
        "device": str(net.device),
        "dtype": str(next(net.parameters()).dtype).replace("torch.", ""),
        "backend": cfg.backend,
        "seed": seed,
        "samples_per_cell": int(samples),
        "lengths": list(n_all),
        "depths": list(depths),
        "tasks": list(task_names),
        "baselines": list(base_names),
        "sweep_length": s_len if sweep else None,
        "sweep_points": [label for label, _ in sweep],
        "ppl_corpus": cfg.ppl_corpus,
        "ruler_corpus": cfg.ruler_corpus,
        "lm_eval": (
            {
                "version": lm_eval_version,
                "tasks": list(harness_tasks),
                "length": h_len,
                "limit": lm.limit,
                "num_fewshot": lm.num_fewshot,
                "chat_template": lm.chat_template,
                "include": Path(lm.include).name if lm.include else None,
            }
            if harness_tasks
            else None
        ),
        "confidence": cfg.confidence,
        "notes": notes,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "config": {k: v for k, v in asdict(cfg).items() if k != "sweep_plans"},
    }
    files = report.write_all(Path(out), trials, summary, derived, meta, plots=cfg.plots)
    partial.unlink(missing_ok=True)
    partial.with_suffix(".key").unlink(missing_ok=True)
    return EvalResult(Path(out), trials, summary, derived, files, seconds)


def _run_key(model_name: str, plan: Plan, cfg: EvalConfig, net: Any) -> str:
    """What makes two eval runs' trials interchangeable: model, plan, settings, device
    kind and dtype (the output-only settings aside)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("plots", "batch")}
    settings["device"] = net.device.type
    settings["dtype"] = str(next(net.parameters()).dtype)
    blob = json.dumps([model_name, plan.to_dict(), settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resume(partial: Path, run_key: str) -> dict[tuple, list[dict]]:
    """Cells an interrupted run with the same key finished, by (section, point, method,
    task, length). A partial file of other settings (or without a key) is deleted before
    this run's key is written, so the key on disk always names the cells beside it."""
    key_file = partial.with_suffix(".key")
    same = partial.is_file() and key_file.is_file() and key_file.read_text().strip() == run_key
    if not same:
        partial.unlink(missing_ok=True)
        write_text(key_file, run_key + "\n")
        return {}
    text = {c: str for c in ("output", "answer", "description")}
    frame = pd.read_csv(partial, dtype=text)
    frame[list(text)] = frame[list(text)].fillna("")  # an empty string reads back as NaN
    cells: dict[tuple, list[dict]] = {}
    for row in frame.to_dict("records"):
        where = (row["section"], row["point"], row["method"], row["task"], int(row["length"]))
        cells.setdefault(where, []).append(row)
    return cells


def _method_cols(w: _Work) -> dict:
    m = w.method
    return {
        "description": m.description,
        "memory_density": m.memory_density,
        "read_density": m.read_density,
    }
