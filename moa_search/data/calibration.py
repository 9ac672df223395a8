"""Calibration set: long text, code and retrieval samples with explicit loss masks.

Why: the profiler scores sparse attention patterns by the loss they cause, so the
set must cover the regimes that matter (long prose, code, long-range lookup) and
say exactly which tokens count. ``loss_mask[i] == 1`` means token ``i`` is a
target predicted from tokens ``< i`` (so ``loss_mask[0]`` is always 0). Samples
are deterministic in ``seed`` and saved as JSON lines a person can read.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moa_search.data.retrieval import (
    chat_parts,
    filler_ids,
    make_kv_sample,
    make_passkey_sample,
)
from moa_search.errors import MoaSearchError

MIX_KINDS = ("text", "code", "passkey", "kv", "multivalue", "self_text", "self_code")
DEFAULT_MIX = {"text": 0.4, "code": 0.2, "passkey": 0.2, "kv": 0.2}
#: prose is its own family: a uniform window is strongest on prose, and technical text full of
#: long-range references (the Python docs) must not hide a prose loss inside one "text" mean
_TEXT_CORPORA = {"text": ("austen",), "code": ("pystdlib", "pydocs")}
_SELF_CORPORA = {"text": ("austen",), "code": ("pystdlib",)}  # what the questions are about
SELF_ANSWER_QUESTIONS = {
    "text": (
        "Summarize the text above in a few sentences.",
        "Who are the people mentioned in the text above, and what do they do?",
        "What happens at the end of the text above?",
    ),
    "code": (
        "Explain what the code above does.",
        "List the main functions or classes defined in the code above and their purpose.",
    ),
}


@dataclass
class CalibSample:
    """Token ids, a 0/1 mask of scored targets, the sample kind and how it was made."""

    input_ids: list[int]
    loss_mask: list[int]
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError("input_ids and loss_mask differ in length")


def _counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``n`` over the mix weights."""
    unknown = set(mix) - set(MIX_KINDS)
    if unknown or not mix or sum(mix.values()) <= 0:
        raise MoaSearchError(f"bad calibration mix {mix!r}: use keys {', '.join(MIX_KINDS)}")
    total = sum(mix.values())
    raw = {k: n * w / total for k, w in mix.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: out[k] - raw[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def text_sample(
    tokenizer: Any, length: int, kind: str, seed: int, split: str = "calibration"
) -> CalibSample:
    """A window of ``length`` tokens of prose or code; every token but the first is scored."""
    rng = random.Random(f"{kind}:{length}:{seed}")
    corpus = rng.choice(_TEXT_CORPORA[kind])
    ids = filler_ids(tokenizer, length, rng, split, corpus)
    mask = [0] + [1] * (length - 1)
    return CalibSample(ids, mask, kind, {"corpus": corpus, "split": split, "seed": seed})


def _answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """Answer tokens plus the end-of-turn token, so the model learns to stop too."""
    ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _multivalue(tokenizer: Any, length: int, depth: float, seed: int, split: str = "test"):
    from moa_search.data.ruler import make_sample  # noqa: PLC0415

    return make_sample("niah-multivalue", tokenizer, length, depth, seed, split)


def retrieval_sample(tokenizer: Any, length: int, kind: str, seed: int) -> CalibSample:
    """Passkey / key-value / multi-value prompt of total ``length``, loss on the answer only.

    ``multivalue``: RULER's multi-value needle (four values under one key, with
    distractors), which the default model partly solves where the hex key-value lookup fails.
    """
    rng = random.Random(f"{kind}:{length}:{seed}")
    depth = rng.random()
    make = {"passkey": make_passkey_sample, "kv": make_kv_sample, "multivalue": _multivalue}[kind]
    kwargs = {"split": "calibration"} if kind in ("passkey", "multivalue") else {}
    s = make(tokenizer, length - 8, depth, seed, **kwargs)
    ans = _answer_ids(tokenizer, s.answer)
    if len(s.prompt_ids) + len(ans) != length:  # same seed -> same key, so redo exactly
        s = make(tokenizer, length - len(ans), depth, seed, **kwargs)
    ids = s.prompt_ids + ans
    mask = [0] * (len(ids) - len(ans)) + [1] * len(ans)
    meta = dict(s.meta, answer=s.answer, answer_start=len(ids) - len(ans))
    return CalibSample(ids, mask, kind, meta)


def build_calibration_set(
    tokenizer: Any,
    length: int,
    n_samples: int,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    model: Any = None,
) -> list[CalibSample]:
    """Deterministic mixed calibration set of ``length``-token samples.

    Text, code and retrieval samples are exactly ``length`` tokens. The MoA-style
    kinds ``self_text`` / ``self_code`` need ``model`` (the dense model answers)
    and are at most ``length`` tokens.
    """
    counts = _counts(n_samples, mix or DEFAULT_MIX)
    if model is None and any(counts.get(k) for k in ("self_text", "self_code")):
        raise MoaSearchError("self_text/self_code calibration samples need the dense model")
    samples: list[CalibSample | None] = []
    answers_wanted, slots = [], []  # self-answer samples: answered together, then slotted in
    for kind, count in counts.items():
        for i in range(count):
            s_seed = seed * 1_000_003 + i
            if kind.startswith("self_"):
                answers_wanted.append((s_seed, kind[5:]))
                slots.append(len(samples))
                samples.append(None)
            elif kind in ("text", "code"):
                samples.append(text_sample(tokenizer, length, kind, s_seed))
            else:
                samples.append(retrieval_sample(tokenizer, length, kind, s_seed))
    for slot, sample in zip(
        slots, self_answer_samples(model, tokenizer, length, answers_wanted), strict=True
    ):
        samples[slot] = sample
    random.Random(seed).shuffle(samples)
    return samples


@dataclass(frozen=True)
class _SelfPrompt:
    """A self-answer sample before the dense model has answered it."""

    kind: str
    seed: int
    question: str
    corpus: str
    head: list[int]
    tail: list[int]
    context: list[int]
    prompt: list[int]


def _self_prompt(
    tokenizer: Any, length: int, seed: int, kind: str, max_new_tokens: int, split: str
) -> _SelfPrompt:
    rng = random.Random(f"self:{kind}:{length}:{seed}")
    question = rng.choice(SELF_ANSWER_QUESTIONS[kind])
    corpus = rng.choice(_SELF_CORPORA[kind])
    head, tail = chat_parts(tokenizer, "", "\n\n" + question, "")
    budget = length - len(head) - len(tail) - max_new_tokens - 1
    if budget < 16:
        raise MoaSearchError(f"length {length} is too short for a self-answer sample")
    context = filler_ids(tokenizer, budget + max_new_tokens + 1, rng, split, corpus)
    prompt = head + context[-budget:] + tail
    return _SelfPrompt(kind, seed, question, corpus, head, tail, context, prompt)


def _self_sample(tokenizer: Any, length: int, p: _SelfPrompt, answer: str) -> CalibSample:
    """The sample scored on the dense model's ``answer`` to prompt ``p``."""
    answer = answer.strip()
    ans = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ans.append(tokenizer.eos_token_id)
    # exactly ``length`` tokens: a short answer gets more of the same text in front, so the
    # context the model answered is a suffix of the one it is scored on
    fill = max(0, length - len(p.head) - len(p.tail) - len(ans))
    prompt = p.head + p.context[-fill:] + p.tail if fill else p.head + p.tail
    ids = (prompt + ans)[-length:] if len(prompt) + len(ans) > length else prompt + ans
    prompt = ids[: len(ids) - len(ans)]
    mask = [0] * len(prompt) + [1] * len(ans)
    meta = {
        "corpus": p.corpus,
        "question": p.question,
        "answer": answer,
        "answer_start": len(prompt),
        "seed": p.seed,
    }
    return CalibSample(ids, mask, f"self_{p.kind}", meta)


def self_answer_samples(
    model: Any,
    tokenizer: Any,
    length: int,
    requests: list[tuple[int, str]],
    max_new_tokens: int = 64,
    split: str = "calibration",
) -> list[CalibSample]:
    """MoA-style samples, one per (seed, kind): a long context, a question, and the dense
    model's own greedy answer (all answered in one ``generate`` batch).

    The loss sits on the model's answer, so calibration keeps what the dense model
    actually does with the context rather than a reference it never produced.
    A sample is ``length`` tokens when the text is long enough (a short answer gets more
    context in front).
    """
    from moa_search.data.retrieval import greedy_generate_batch

    prompts = [_self_prompt(tokenizer, length, s, k, max_new_tokens, split) for s, k in requests]
    if not prompts:
        return []
    answers = greedy_generate_batch(model, tokenizer, [p.prompt for p in prompts], max_new_tokens)
    return [_self_sample(tokenizer, length, p, a) for p, a in zip(prompts, answers, strict=True)]


def self_answer_sample(
    model: Any,
    tokenizer: Any,
    length: int,
    seed: int,
    kind: str = "text",
    max_new_tokens: int = 64,
    split: str = "calibration",
) -> CalibSample:
    """One MoA-style sample (:func:`self_answer_samples`)."""
    return self_answer_samples(model, tokenizer, length, [(seed, kind)], max_new_tokens, split)[0]


def _spans(mask: list[int]) -> list[list[int]]:
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append([start, i])
            start = None
    return spans


def save_calibration_set(
    samples: list[CalibSample], path: str | Path, tokenizer: Any = None
) -> Path:
    """Write JSON lines (``.jsonl``) or Parquet (``.parquet``); loss masks stored as spans.

    With a tokenizer, each row also carries the decoded text of its scored spans.
    """
    path = Path(path)
    rows = []
    for s in samples:
        row = {
            "kind": s.kind,
            "input_ids": s.input_ids,
            "loss_spans": _spans(s.loss_mask),
            "meta": s.meta,
        }
        if tokenizer is not None:
            row["scored_text"] = [tokenizer.decode(s.input_ids[a:b]) for a, b in row["loss_spans"]]
        rows.append(row)
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame["meta"] = frame["meta"].map(json.dumps)
        frame["loss_spans"] = frame["loss_spans"].map(json.dumps)
        frame.to_parquet(path, index=False)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_calibration_set(path: str | Path) -> list[CalibSample]:
    """Read back what ``save_calibration_set`` wrote."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
        for r in rows:
            r["meta"], r["loss_spans"] = json.loads(r["meta"]), json.loads(r["loss_spans"])
            r["input_ids"] = [int(t) for t in r["input_ids"]]
    else:
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
    out = []
    for r in rows:
        mask = [0] * len(r["input_ids"])
        for a, b in r["loss_spans"]:
            mask[a:b] = [1] * (b - a)
        out.append(CalibSample(list(r["input_ids"]), mask, r["kind"], dict(r["meta"])))
    return out


def sample_to_dict(sample: CalibSample) -> dict[str, Any]:
    """Plain dict (for callers that serialise elsewhere)."""
    return asdict(sample)
