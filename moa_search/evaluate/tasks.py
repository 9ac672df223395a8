"""The tasks: perplexity on held-out text, passkey, key-value retrieval and the RULER suite.

Why these and how they are run:
- Perplexity uses the ``test`` split only (never the calibration documents the profiler saw),
  cut into non-overlapping windows of exactly ``length`` tokens. It runs one masked prefill
  with ``use_cache=False`` (every head masked by its pattern); for static patterns (dense,
  window, elastic) this equals decoding token by token through the per-head cache, which the
  runtime tests check. SparQ is a decode-only method (its prefill is dense), so its
  perplexity would just repeat dense: those heads are reported, not hidden (see run.py).
- Retrieval prompts are built once per (task, length, sample) and decoded greedily through
  ``model.generate`` with the plan applied, so the answer comes out of the plan's real decode
  path (per-head cache, window heads that really dropped old entries), not a mask.
- RULER-style tasks (``moa_search.data.ruler``: needles with number / word / UUID values,
  multi-key, multi-value, multi-query, variable tracking, common / frequent words) are built
  from the test split and run like retrieval; each has its own scorer (fraction of the
  expected strings in the answer). ``ruler`` names the whole suite in ``tasks``.
- Every sample has a fixed seed; the same prompts are shown to every method.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moa_search.data import ruler
from moa_search.data.retrieval import (
    greedy_generate_batch,
    make_kv_sample,
    make_passkey_sample,
    score_answer,
)
from moa_search.errors import MoaSearchError
from moa_search.evaluate.baselines import Method
from moa_search.nll import token_stream, window_nll
from moa_search.runtime import apply_plan

RULER_TASKS = tuple(ruler.TASKS)
TASKS = ("ppl", "passkey", "kv-retrieval", *RULER_TASKS)
RETRIEVAL_TASKS = ("passkey", "kv-retrieval")
TASK_GROUPS = {  # names that stand for several tasks in ``tasks``
    "ruler": RULER_TASKS,
    "niah": tuple(t for t in RULER_TASKS if ruler.TASKS[t].family == "niah"),
}
# tasks with one needle at a chosen depth and samples at every depth: the needle heatmaps
DEPTH_TASKS = ("passkey", *(t for t in RULER_TASKS if ruler.TASKS[t].depth_grid))
DEFAULT_NEW_TOKENS = {
    "passkey": 10,
    "kv-retrieval": 14,
    **{name: t.new_tokens for name, t in ruler.TASKS.items()},
}


@dataclass
class Trial:
    """One scored unit: a retrieval prompt or a perplexity window, for one method."""

    method: str
    task: str
    length: int
    depth: float
    sample: int
    seed: int
    correct: float = math.nan  # retrieval: 1.0 / 0.0; RULER: fraction of answers found
    nll: float = math.nan  # mean NLL per token for perplexity
    tokens: int = 0  # predicted tokens (ppl) or prompt tokens (retrieval)
    output: str = ""
    answer: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Item:
    """A task input shared by all methods: a retrieval sample or a token window."""

    task: str
    length: int
    depth: float
    sample: int
    seed: int
    ids: tuple[int, ...]
    answer: str = ""
    new_tokens: int = 0  # greedy tokens to generate (retrieval)


def check_tasks(tasks: tuple[str, ...] | list[str], allow_empty: bool = False) -> tuple[str, ...]:
    """Normalise, expand groups (``ruler``, ``niah``), refuse unknown names (one-line error)."""
    out: list[str] = []
    known = ", ".join([*TASKS, *TASK_GROUPS])
    for t in tasks:
        name = str(t).strip().lower()
        if name not in TASKS and name not in TASK_GROUPS:
            raise MoaSearchError(f"unknown task {t!r} (known: {known})")
        out += [n for n in TASK_GROUPS.get(name, (name,)) if n not in out]
    if not out and not allow_empty:
        raise MoaSearchError(f"no tasks given (known: {known})")
    return tuple(out)


# --- inputs -------------------------------------------------------------------------------
def ppl_items(tokenizer: Any, length: int, samples: int, seed: int, corpus: str) -> list[Item]:
    """``samples`` non-overlapping windows of ``length`` test tokens, picked by ``seed``."""
    tokens = token_stream(tokenizer, "test", corpus)
    slots = len(tokens) // length
    if slots < samples:
        raise MoaSearchError(
            f"ppl: test split of {corpus!r} has {len(tokens)} tokens, room for {slots} windows "
            f"of {length}; asked for {samples} (lower --samples or pick another corpus)"
        )
    rng = np.random.default_rng([seed, length])
    chosen = sorted(rng.choice(slots, size=samples, replace=False).tolist())
    windows = [tuple(tokens[s * length : (s + 1) * length].tolist()) for s in chosen]
    return [Item("ppl", length, math.nan, i, seed, ids) for i, ids in enumerate(windows)]


def prompt_items(
    tokenizer: Any,
    task: str,
    length: int,
    depths: tuple[float, ...],
    samples: int,
    seed: int,
    new_tokens: int | None = None,
    source: str | None = None,
) -> list[Item]:
    """Retrieval or RULER prompts of ``length - new_tokens`` tokens, so prompt plus answer
    fit in ``length`` (and a model whose context is exactly ``length`` is never run past it).

    Passkey and single-needle RULER tasks: ``samples`` prompts per depth (the heatmap); kv and
    multi-needle tasks: ``samples`` prompts with the (queried) needle's depth cycled; RULER
    tasks without a depth (vt, cwe, fwe): ``samples`` prompts, depth NaN. ``source``: the
    passkey / kv prompt format, or the RULER filler corpus of the test split (default austen).
    """
    if task in ruler.TASKS:
        spec = ruler.get_task(task)
        new, keep_depth = new_tokens or spec.new_tokens, spec.uses_depth

        def make(depth: float, s: int) -> Any:
            return ruler.make_sample(
                task, tokenizer, length - new, depth, s, split="test", corpus=source or "austen"
            )
    elif task in RETRIEVAL_TASKS:
        new, keep_depth = new_tokens or DEFAULT_NEW_TOKENS[task], True
        maker = make_passkey_sample if task == "passkey" else make_kv_sample
        fmt = {"prompt_format": source} if source else {}

        def make(depth: float, s: int) -> Any:
            return maker(tokenizer, length - new, depth, s, **fmt)
    else:
        raise MoaSearchError(f"unknown prompt task {task!r} (known: {RETRIEVAL_TASKS} + RULER)")
    items = []
    for i, depth in _cells(task, depths, samples):
        s = make(depth, seed + i)
        d = depth if keep_depth else math.nan
        items.append(Item(task, length, d, i, seed + i, tuple(s.prompt_ids), s.answer, new))
    return items


def _cells(task: str, depths: tuple[float, ...], samples: int) -> list[tuple[int, float]]:
    if task in DEPTH_TASKS:
        return [(i, d) for d in depths for i in range(samples)]
    if task in ruler.TASKS and not ruler.TASKS[task].uses_depth:
        return [(i, 0.0) for i in range(samples)]
    return [(i, depths[i % len(depths)]) for i in range(samples)]


# --- running ------------------------------------------------------------------------------
@contextlib.contextmanager
def method_applied(model: Any, method: Method, backend: str, max_len: int) -> Iterator[None]:
    """Run ``model`` under ``method`` (nothing to do for the dense reference)."""
    if method.plan is None:
        yield
        return
    with apply_plan(model, method.plan, backend=backend, max_cache_len=max_len):
        yield


def run_item(model: Any, tokenizer: Any, method: Method, item: Item) -> Trial:
    """Score one item under the method already applied to ``model``."""
    return run_items(model, tokenizer, method, [item])[0]


def run_items(model: Any, tokenizer: Any, method: Method, items: list[Item]) -> list[Trial]:
    """Score items under the method already applied to ``model``: perplexity windows one
    by one, prompts in one greedy ``generate`` batch (each trial's seconds are the batch's
    share)."""
    start = time.perf_counter()
    trials = [Trial(method.name, it.task, it.length, it.depth, it.sample, it.seed) for it in items]
    prompts = [(t, it) for t, it in zip(trials, items, strict=True) if it.task != "ppl"]
    for trial, item in zip(trials, items, strict=True):
        if item.task == "ppl":
            trial.nll, trial.tokens = window_nll(model, item.ids)
    for budget in sorted({it.new_tokens for _, it in prompts}):  # each its own answer length
        group = [(t, it) for t, it in prompts if it.new_tokens == budget]
        ids = [list(it.ids) for _, it in group]
        texts = greedy_generate_batch(model, tokenizer, ids, max_new_tokens=budget)
        for (trial, item), text in zip(group, texts, strict=True):
            if item.task in ruler.TASKS:
                trial.correct = ruler.score(item.task, item.answer, text)
            else:
                trial.correct = float(score_answer(text, item.answer))
            trial.output, trial.answer, trial.tokens = text.strip(), item.answer, len(item.ids)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    for trial in trials:
        trial.seconds = (time.perf_counter() - start) / len(trials)
    return trials
