"""RULER-style synthetic long-context tasks, generated offline from the shipped corpora.

Why: one passkey format says little about which heads a plan may window. RULER (Hsieh et
al. 2024, arXiv 2404.06654) measures a model at a given length with synthetic tasks in
three groups, and this module builds tasks of the same designs (own wording, nothing
downloaded):

- retrieval (needle in a haystack): one needle with a number, word or UUID value; several
  needles with other keys as distractors (multi-key); several values under one key
  (multi-value); several keys asked at once (multi-query);
- multi-hop tracing: variable tracking, a chain ``VAR B = VAR A`` spread over the text;
- aggregation: common-word extraction (the words repeated most in a numbered list) and
  frequent-word extraction (the most frequent words of a Zipf-distributed coded text).

Every prompt is exactly ``length`` tokens, uses the tokenizer's chat template, and puts the
queried needle at ``depth`` of the context (0 = start, 1 = end) at a sentence end. Filler
text comes from the documents of ``split`` (``"test"`` for eval, ``"calibration"`` for the
profiler; the two never share a document, and their random streams differ). A seed gives
the same keys, values and filler start at every length. One scorer per task family:
:func:`score` is the fraction of expected strings found as whole words in the output
(RULER's recall-style match), so a single-needle task scores 0 or 1.

Public API (also for the profiler): :data:`TASKS`, :func:`make_sample`, :func:`score`.
"""

from __future__ import annotations

import itertools
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from moa_search.data.retrieval import (
    RetrievalSample,
    chat_parts,
    filler_ids,
    snap_to_sentence,
    token_ids,
)
from moa_search.data.texts import load_texts
from moa_search.errors import MoaSearchError

ANSWER_SEP = ", "  # RetrievalSample.answer joins several expected strings with this
N_COMMON = 10  # cwe: words to extract (RULER: 10)
N_FREQUENT = 3  # fwe: words to extract (RULER: 3)
ZIPF_ALPHA = 2.0  # fwe: word frequency ~ rank^-alpha (RULER: 2.0)
VT_HOPS = 4  # vt: assignments after the first (RULER: 4 hops, 1 chain)
_MIN_CONTEXT = 24  # tokens of filler a prompt must leave, else the length is too short


@dataclass(frozen=True)
class RulerTask:
    """One task: its family's builder, how many needles/keys/values, and the answer budget."""

    name: str
    family: str  # niah | vt | cwe | fwe
    summary: str
    new_tokens: int  # greedy tokens the answer needs (the prompt is length - new_tokens)
    value: str = "number"  # niah: number | word | uuid
    keys: int = 1  # niah: needles with distinct keys (the queried ones included)
    values: int = 1  # niah: values under each queried key
    queries: int = 1  # niah: keys asked for
    depth_grid: bool = False  # eval: samples at every depth (heatmap) instead of cycling
    uses_depth: bool = True  # False: the task has no needle depth (aggregation, tracing)
    case_sensitive: bool = False


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in (
        RulerTask("niah-number", "niah", "one needle, 7-digit number value", 12, "number",
                  depth_grid=True),
        RulerTask("niah-word", "niah", "one needle, word value", 10, "word", depth_grid=True),
        RulerTask("niah-uuid", "niah", "one needle, UUID value", 40, "uuid", depth_grid=True),
        RulerTask("niah-multikey", "niah", "one needle among 3 distractor needles (other keys)",
                  12, "number", keys=4),
        RulerTask("niah-multivalue", "niah", "4 values under one key, all asked", 40,
                  "number", values=4),
        RulerTask("niah-multiquery", "niah", "4 needles with 4 keys, all asked", 44,
                  "number", keys=4, queries=4),
        RulerTask("vt", "vt", f"variable tracking: a chain of {VT_HOPS} assignments", 30,
                  uses_depth=False, case_sensitive=True),
        RulerTask("cwe", "cwe", f"the {N_COMMON} most common words of a numbered list", 48,
                  uses_depth=False),
        RulerTask("fwe", "fwe", f"the {N_FREQUENT} most frequent words of a coded text", 24,
                  uses_depth=False),
    )
}  # fmt: skip


def get_task(task: str) -> RulerTask:
    """The registry entry for ``task`` (one-line error for an unknown name)."""
    try:
        return TASKS[task]
    except KeyError:
        raise MoaSearchError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})") from None


# --- shared pieces ------------------------------------------------------------------------
@cache
def vocabulary(split: str, corpus: str = "austen") -> tuple[str, ...]:
    """Lower-case words of 5-10 letters seen at least twice in ``split`` (sorted)."""
    counts: Counter[str] = Counter()
    for doc in load_texts(split, corpus):
        counts.update(re.findall(r"\b[a-z]{5,10}\b", doc.text))
    words = tuple(sorted(w for w, c in counts.items() if c >= 2))
    if len(words) < 64:
        raise MoaSearchError(f"split {split!r} of {corpus!r} has too few words for RULER tasks")
    return words


def _rng(task: str, split: str, depth: float, seed: int) -> random.Random:
    # no length in the seed: the same sample (keys, values, filler start) at every length
    return random.Random(f"ruler:{task}:{split}:{depth:.6g}:{seed}")


def _pad_id(tokenizer: Any) -> int:
    return token_ids(tokenizer, "\n")[-1]


def _assemble(
    tokenizer: Any,
    length: int,
    parts: tuple[str, str, str],
    body_fn: Callable[[int], tuple[list[int], list[tuple[int, int]]]],
    answers: list[str],
    meta: dict,
) -> RetrievalSample:
    """Chat-templated prompt of exactly ``length`` tokens around ``body_fn(budget)``.

    ``body_fn`` returns the context ids (exactly ``budget`` of them) and the (start, end)
    offsets of each needle inside it, the queried needle first.
    """
    head, tail = chat_parts(tokenizer, *parts)
    budget = length - len(head) - len(tail)
    if budget < _MIN_CONTEXT:
        raise MoaSearchError(
            f"length {length} is too short for {meta['task']} "
            f"({len(head) + len(tail)} tokens of instructions)"
        )
    body, spans = body_fn(budget)
    if len(body) != budget:  # a builder bug, never the user's input
        raise AssertionError(f"{meta['task']}: context is {len(body)} tokens, not {budget}")
    prompt = head + body + tail
    needles = [(len(head) + s, len(head) + e) for s, e in spans]
    meta.update(
        length=len(prompt),
        answers=list(answers),
        needles=needles,
        context_start=len(head),
        context_end=len(head) + budget,
    )
    if needles:
        meta.update(needle_start=needles[0][0], needle_end=needles[0][1])
    return RetrievalSample(prompt, ANSWER_SEP.join(answers), meta)


def _haystack(
    tokenizer: Any,
    budget: int,
    needles: list[list[int]],
    fractions: list[float],
    rng: random.Random,
    split: str,
    corpus: str,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Real filler text with ``needles`` inserted at sentence ends near ``fractions``."""
    room = budget - sum(len(n) for n in needles)
    if room < _MIN_CONTEXT:
        raise MoaSearchError(
            f"length too short: {budget} tokens of context, of which the needles take "
            f"{budget - room}"
        )
    filler = filler_ids(tokenizer, room, rng, split, corpus)
    at = [snap_to_sentence(tokenizer, filler, round(f * room)) for f in fractions]
    order = sorted(range(len(needles)), key=lambda i: (at[i], i))
    body: list[int] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(needles)
    prev = 0
    for i in order:
        body += filler[prev : at[i]]
        spans[i] = (len(body), len(body) + len(needles[i]))
        body += needles[i]
        prev = at[i]
    body += filler[prev:]
    return body, spans


def _distinct(make: Callable[[], str], n: int, taken: set[str] | None = None) -> list[str]:
    seen = set(taken or ())
    out: list[str] = []
    while len(out) < n:
        x = make()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


# --- retrieval (needle in a haystack) -----------------------------------------------------
_KINDS = {"number": "number", "word": "word", "uuid": "UUID"}


def _value_maker(kind: str, rng: random.Random, words: tuple[str, ...]) -> Callable[[], str]:
    if kind == "number":
        return lambda: str(rng.randint(10**6, 10**7 - 1))
    if kind == "word":
        return lambda: rng.choice(words)
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(t: RulerTask, tok, length, depth, rng, split, corpus, meta) -> RetrievalSample:
    words = vocabulary(split, corpus)
    keys = _distinct(lambda: f"{rng.choice(words)}-{rng.choice(words)}", t.keys)
    make_value = _value_maker(t.value, rng, words)
    taken = set(keys) | {part for k in keys for part in k.split("-")}  # never a key's word
    values = _distinct(make_value, t.values * t.queries + (t.keys - t.queries), taken)
    asked = keys[: t.queries]
    pairs: list[tuple[str, str]] = []  # queried needles first, then the distractors
    it = iter(values)
    for k in asked:
        pairs += [(k, next(it)) for _ in range(t.values)]
    pairs += [(k, next(it)) for k in keys[t.queries :]]
    kind = _KINDS[t.value]
    many = len(pairs) > 1
    lead = f"One of the special magic {kind}s" if many else f"The special magic {kind}"
    needles = [token_ids(tok, f" {lead} for {k} is: {v}.\n") for k, v in pairs]
    fractions = [depth] + [rng.random() for _ in pairs[1:]]
    before = (
        f"Some special magic {kind}s are hidden in the text below. Memorize them; you will "
        f"be asked about them afterwards.\n\n"
        if many
        else f"A special magic {kind} is hidden in the text below. Memorize it; you will be "
        f"asked about it afterwards.\n\n"
    )
    if t.values > 1:
        question = f"What are all the special magic {kind}s for {asked[0]}? List them all."
        prefix = f"The special magic {kind}s for {asked[0]} are:"
    elif t.queries > 1:
        listed = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        question = f"What are the special magic {kind}s for {listed}? List them all."
        prefix = f"The special magic {kind}s for {listed} are:"
    else:
        question = f"What is the special magic {kind} for {asked[0]}? Answer with the {kind} only."
        prefix = f"The special magic {kind} for {asked[0]} is:"
    after = f"\n\nThe text is over. {question}"
    meta.update(keys=keys, asked=asked)

    def body(budget: int):
        return _haystack(tok, budget, needles, fractions, rng, split, corpus)

    answers = [v for k, v in pairs if k in asked]
    return _assemble(tok, length, (before, after, prefix), body, answers, meta)


# --- multi-hop tracing (variable tracking) ------------------------------------------------
def _vt(t: RulerTask, tok, length, depth, rng, split, corpus, meta) -> RetrievalSample:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = _distinct(lambda: "".join(rng.choice(letters) for _ in range(5)), VT_HOPS + 1)
    value = str(rng.randint(10000, 99999))
    lines = [f" VAR {names[0]} = {value}.\n"]
    lines += [f" VAR {b} = VAR {a}.\n" for a, b in zip(names, names[1:], strict=False)]
    needles = [token_ids(tok, s) for s in lines]
    fractions = [(i + 0.5) / len(lines) for i in range(len(lines))]  # spread over the text
    before = (
        "Variable assignments are hidden in the text below. Memorize them and follow the "
        "chain; you will be asked about it afterwards.\n\n"
    )
    after = (
        f"\n\nThe text is over. Find all variables that are assigned the value {value} in the "
        f"text above, directly or through other variables."
    )
    prefix = (
        f"According to the chain of assignments, {len(names)} variables are assigned the "
        f"value {value}. They are:"
    )
    meta.update(value=value)

    def body(budget: int):
        return _haystack(tok, budget, needles, fractions, rng, split, corpus)

    return _assemble(tok, length, (before, after, prefix), body, names, meta)


# --- aggregation: common and frequent words -----------------------------------------------
def _cwe(t: RulerTask, tok, length, depth, rng, split, corpus, meta) -> RetrievalSample:
    """A numbered list: N_COMMON words repeated f_c times, the rest f_u < f_c times.

    RULER uses f_c = 30, f_u = 3 at 4k tokens; here f_c scales with the room (about 40% of
    the list entries are the common words, at most 30 each) so short prompts still work.
    """
    pool = list(vocabulary(split, corpus))
    rng.shuffle(pool)
    before = (
        "Below is a numbered list of words. Some words appear more often than others. "
        "Memorize the ones that appear most often.\n\n"
    )
    after = f"\n\nThe list is over. What are the {N_COMMON} most common words in the list above?"
    prefix = f"The {N_COMMON} words that appear most often in the list are:"
    pieces: dict[str, list[int]] = {}

    def word(w: str) -> list[int]:
        if w not in pieces:
            pieces[w] = token_ids(tok, f" {w}\n")
        return pieces[w]

    def number(i: int) -> list[int]:
        return token_ids(tok, f"{i}.")

    def body(budget: int):
        per_entry = sum(len(number(40)) + len(word(w)) for w in pool[:50]) / 50
        entries = budget / per_entry
        f_c = int(min(30, max(2, round(0.4 * entries / N_COMMON))))
        f_u = 1 if f_c < 6 else (2 if f_c < 12 else 3)
        common, rest = pool[:N_COMMON], iter(pool[N_COMMON:])
        seq = [w for w in common for _ in range(f_c)]
        n_tok = sum(len(word(w)) for w in seq) + sum(len(number(i + 1)) for i in range(len(seq)))
        if n_tok > budget:
            raise MoaSearchError(f"length {length} is too short for cwe")
        for w in rest:  # greedy: add uncommon words while their entries fit
            add = f_u * len(word(w))
            add += sum(len(number(len(seq) + j + 1)) for j in range(f_u))
            if n_tok + add > budget:
                break
            seq += [w] * f_u
            n_tok += add
        rng.shuffle(seq)
        ids: list[int] = []
        for i, w in enumerate(seq):
            ids += number(i + 1) + word(w)
        ids += [_pad_id(tok)] * (budget - len(ids))  # fewer tokens than one entry
        ranked = Counter(seq).most_common()
        runner_up = ranked[N_COMMON][1] if len(ranked) > N_COMMON else 0
        if ranked[N_COMMON - 1][1] <= runner_up:  # a builder bug: f_c > f_u always
            raise AssertionError("cwe: the common words do not stand out")
        meta.update(common_count=f_c, uncommon_count=f_u, entries=len(seq))
        return ids, []

    return _assemble(tok, length, (before, after, prefix), body, pool[:N_COMMON], meta)


def _pseudo_word(rng: random.Random) -> str:
    cons, vow = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(2, 3)))


def _fwe(t: RulerTask, tok, length, depth, rng, split, corpus, meta) -> RetrievalSample:
    """Coded text: made-up words drawn with P(rank r) ~ r^-alpha; name the top N_FREQUENT."""
    before = (
        "Below is a coded text made of made-up words. Track how often each coded word appears.\n\n"
    )
    after = (
        f"\n\nThe coded text is over. What are the {N_FREQUENT} most frequently appearing "
        f"words in the coded text above?"
    )
    prefix = f"The {N_FREQUENT} most frequent words in the coded text are:"
    answers: list[str] = []

    def body(budget: int):
        vocab = _distinct(lambda: _pseudo_word(rng), max(16, budget // 8))
        cum = list(itertools.accumulate((r + 1) ** -ZIPF_ALPHA for r in range(len(vocab))))
        pieces = {w: token_ids(tok, f" {w}") for w in vocab}
        newline = token_ids(tok, "\n")
        for _ in range(100):  # redraw until the top words are strictly ahead (ties are rare)
            ids: list[int] = []
            seq: list[str] = []
            while True:
                w = rng.choices(vocab, cum_weights=cum)[0]
                extra = pieces[w] + (newline if (len(seq) + 1) % 12 == 0 else [])
                if len(ids) + len(extra) > budget:
                    break
                ids += extra
                seq.append(w)
            counts = Counter(seq).most_common(N_FREQUENT + 1)
            tail = counts[N_FREQUENT][1] if len(counts) > N_FREQUENT else 0
            if len(counts) >= N_FREQUENT and counts[N_FREQUENT - 1][1] > tail:
                break
        else:
            raise MoaSearchError(f"length {length} is too short for fwe")
        ids += [_pad_id(tok)] * (budget - len(ids))
        answers[:] = [w for w, _ in counts[:N_FREQUENT]]
        meta.update(counts=[c for _, c in counts[:N_FREQUENT]], words=len(seq))
        return ids, []

    # ``answers`` is filled by ``body``, which _assemble runs before it reads the answers
    return _assemble(tok, length, (before, after, prefix), body, answers, meta)


_BUILDERS = {"niah": _niah, "vt": _vt, "cwe": _cwe, "fwe": _fwe}


def make_sample(
    task: str,
    tokenizer: Any,
    length: int,
    depth: float = 0.5,
    seed: int = 0,
    split: str = "test",
    corpus: str = "austen",
) -> RetrievalSample:
    """A prompt of exactly ``length`` tokens for ``task`` and its expected answer(s).

    ``answer`` joins the expected strings with ``", "`` (``meta["answers"]`` has the list);
    ``meta`` also has the needle spans (``needles``, the queried one first, and
    ``needle_start`` / ``needle_end``), the context span, the split and the seed.
    ``depth`` is ignored by tasks without a needle depth (``uses_depth`` False).
    """
    t = get_task(task)
    if not 0 <= depth <= 1:
        raise MoaSearchError(f"depth must be in [0, 1], got {depth}")
    d = depth if t.uses_depth else 0.0
    meta: dict[str, Any] = {
        "kind": "ruler",
        "task": task,
        "family": t.family,
        "split": split,
        "corpus": corpus,
        "seed": seed,
        "depth": d if t.uses_depth else float("nan"),
    }
    return _BUILDERS[t.family](t, tokenizer, length, d, _rng(task, split, d, seed), split,
                               corpus, meta)  # fmt: skip


def expected(answer: str | Sequence[str]) -> list[str]:
    """The expected strings from a joined ``answer`` (or a list, returned as is)."""
    if isinstance(answer, str):
        return [a for a in (x.strip() for x in answer.split(ANSWER_SEP.strip())) if a]
    return [str(a) for a in answer]


def _found(text: str, needle: str, case_sensitive: bool) -> bool:
    pattern = r"(?<![0-9A-Za-z])" + re.escape(needle.strip()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, text, flags=0 if case_sensitive else re.IGNORECASE) is not None


def score(task: str, answer: str | Sequence[str], generated: str) -> float:
    """Fraction of the expected strings that appear as whole words in ``generated``.

    RULER's recall-style match ("string_match_all"): a single-needle task scores 0 or 1,
    multi-value / multi-query / vt / cwe / fwe give partial credit. Case-insensitive except
    for variable names (vt).
    """
    t = get_task(task)
    want = expected(answer)
    if not want:
        raise MoaSearchError(f"{task}: no expected answer to score against")
    return sum(_found(generated, a, t.case_sensitive) for a in want) / len(want)


__all__ = [
    "ANSWER_SEP",
    "TASKS",
    "RulerTask",
    "expected",
    "get_task",
    "make_sample",
    "score",
    "vocabulary",
]
