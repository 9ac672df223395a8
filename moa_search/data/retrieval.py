"""Synthetic long-range retrieval tasks: passkey and key-value lookup.

Why: sparse attention patterns that look fine on perplexity can still lose the one
token far back that an answer depends on; these tasks measure exactly that. Prompts
are built at token level so the requested length and needle depth are exact, the
filler is real text from a chosen split (not repeated junk), and the model's own
chat template is used via ``apply_chat_template``.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any

from moa_search.data.texts import load_texts
from moa_search.errors import MoaSearchError

_MARK = "\x00MOA_CONTEXT\x00"


@dataclass(frozen=True)
class PromptFormat:
    """Where the instruction and question go around the context, and the answer prefix."""

    before: str
    after: str
    answer_prefix: str = ""


PASSKEY_FORMATS: dict[str, PromptFormat] = {
    "naive": PromptFormat("", "\n\nWhat is the pass key?"),
    "instruct": PromptFormat(
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n\n",
        "\n\nWhat is the pass key?",
    ),
    "instruct_prefix": PromptFormat(
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n\n",
        "\n\nWhat is the pass key?",
        "The pass key is",
    ),
    "repeat_prefix": PromptFormat(
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "What is the pass key?\n\n",
        "\n\nThe text is over. What is the pass key? Answer with the number only.",
        "The pass key is",
    ),
}
KV_FORMATS: dict[str, PromptFormat] = {
    "naive": PromptFormat("", "\n\nWhat is the value of key {key}?"),
    "instruct_prefix": PromptFormat(
        "Below is a list of key: value pairs. Find the value of key {key}.\n\n",
        "\n\nWhat is the value of key {key}?",
        "The value of key {key} is",
    ),
    "repeat_prefix": PromptFormat(
        "Below is a list of key: value pairs. Memorize the value of key {key}.\n\n",
        "\n\nThe list is over. What is the value of key {key}? Answer with the value only.",
        "The value of key {key} is",
    ),
}
DEFAULT_PASSKEY_FORMAT = "repeat_prefix"
DEFAULT_KV_FORMAT = "repeat_prefix"


@dataclass
class RetrievalSample:
    """A prompt (token ids, ending where the model should answer) and the expected answer."""

    prompt_ids: list[int]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_parts(
    tokenizer: Any, before: str, after: str, answer_prefix: str
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt before and after the context slot."""
    if not getattr(tokenizer, "chat_template", None):
        raise MoaSearchError("the tokenizer has no chat template; retrieval prompts need one")
    messages = [{"role": "user", "content": before + _MARK + after}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, tail = text.split(_MARK)
    return _ids(tokenizer, head), _ids(tokenizer, tail + answer_prefix)


def filler_ids(
    tokenizer: Any, n_tokens: int, rng: random.Random, split: str, corpus: str
) -> list[int]:
    """``n_tokens`` of real text, starting at a random paragraph of a random document."""
    docs = load_texts(split, corpus)
    if not docs:
        raise MoaSearchError(f"no {corpus!r} documents in split {split!r}")
    i = rng.randrange(len(docs))
    text = docs[i].text
    starts = [m.end() for m in re.finditer(r"\n\s*\n", text)] or [0]
    pos = rng.choice(starts[: max(1, len(starts) * 3 // 4)])
    out: list[int] = []
    chunk = max(4096, n_tokens * 6)
    while len(out) < n_tokens:
        piece = text[pos : pos + chunk]
        pos += chunk
        if not piece:
            i, pos = (i + 1) % len(docs), 0
            text = docs[i].text
            piece = "\n\n"
        out.extend(_ids(tokenizer, piece))
    return out[:n_tokens]


def _snap(tokenizer: Any, ids: list[int], k: int, radius: int = 32) -> int:
    """Move an insertion point to a nearby sentence end so the needle reads naturally."""
    for ends in ((".", "!", "?", '."', ".'"), ("\n", ",", ";")):
        for d in range(radius + 1):
            for j in (k - d, k + d):
                if 0 < j < len(ids) and tokenizer.decode([ids[j - 1]]).rstrip().endswith(ends):
                    return j
    return k


def snap_to_sentence(tokenizer: Any, ids: list[int], k: int, radius: int = 32) -> int:
    """Public form of the needle placement rule: the nearest sentence end to token ``k``."""
    return _snap(tokenizer, ids, k, radius)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (how every prompt piece is encoded)."""
    return _ids(tokenizer, text)


def _assemble(tokenizer, length, depth, fmt, needle, body_fn, answer, meta) -> RetrievalSample:
    head, tail = chat_parts(tokenizer, fmt[0], fmt[1], fmt[2])
    needle_ids = _ids(tokenizer, needle)
    budget = length - len(head) - len(tail) - len(needle_ids)
    if budget < 16:
        raise MoaSearchError(
            f"length {length} is too short for this prompt ({length - budget} tokens)"
        )
    body, k = body_fn(budget)
    prompt = head + body[:k] + needle_ids + body[k:] + tail
    meta.update(
        length=len(prompt),
        depth=depth,
        needle_start=len(head) + k,
        needle_end=len(head) + k + len(needle_ids),
        context_start=len(head),
        context_end=len(prompt) - len(tail),
    )
    return RetrievalSample(prompt, answer, meta)


def make_passkey_sample(
    tokenizer: Any,
    length: int,
    depth: float,
    seed: int,
    split: str = "test",
    corpus: str = "austen",
    prompt_format: str = DEFAULT_PASSKEY_FORMAT,
) -> RetrievalSample:
    """A 5-digit pass key hidden at ``depth`` (0 = start, 1 = end) of real filler text."""
    rng = random.Random(f"passkey:{depth}:{seed}")  # same key/filler at every length
    key = str(rng.randint(10000, 99999))
    fmt = PASSKEY_FORMATS[prompt_format]
    needle = f" The pass key is {key}. Remember it. {key} is the pass key.\n"

    def body(budget: int) -> tuple[list[int], int]:
        ids = filler_ids(tokenizer, budget, rng, split, corpus)
        return ids, _snap(tokenizer, ids, round(depth * budget))

    meta = {
        "kind": "passkey",
        "format": prompt_format,
        "split": split,
        "corpus": corpus,
        "seed": seed,
    }
    return _assemble(
        tokenizer,
        length,
        depth,
        (fmt.before, fmt.after, fmt.answer_prefix),
        needle,
        body,
        key,
        meta,
    )


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.hexdigits[:16]) for _ in range(n))


def make_kv_sample(
    tokenizer: Any,
    length: int,
    depth: float,
    seed: int,
    prompt_format: str = DEFAULT_KV_FORMAT,
) -> RetrievalSample:
    """Many ``key: value`` lines (UUID-like hex keys and values); ask for the one at ``depth``."""
    rng = random.Random(f"kv:{depth}:{seed}")
    key, value = f"{_hex(rng, 8)}-{_hex(rng, 4)}", _hex(rng, 8)
    f = KV_FORMATS[prompt_format]
    parts = (f.before.format(key=key), f.after.format(key=key), f.answer_prefix.format(key=key))
    needle = f"{key}: {value}\n"

    def body(budget: int) -> tuple[list[int], int]:
        lines: list[list[int]] = []
        total = 0
        while total < budget:
            line = _ids(tokenizer, f"{_hex(rng, 8)}-{_hex(rng, 4)}: {_hex(rng, 8)}\n")
            lines.append(line)
            total += len(line)
        # trim the last line's tail so the length is exact (a cut line is harmless noise)
        flat = [t for line in lines for t in line][:budget]
        bounds, pos = [], 0
        for line in lines:
            bounds.append(pos)
            pos += len(line)
        target = depth * budget
        k = min((b for b in bounds if b <= budget), key=lambda b: abs(b - target))
        return flat, k

    meta = {"kind": "kv", "format": prompt_format, "seed": seed, "key": key}
    return _assemble(tokenizer, length, depth, parts, needle, body, value, meta)


def score_answer(generated_text: str, answer: str) -> bool:
    """True if ``answer`` appears as a whole word in the generated text (case-insensitive)."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.strip()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, generated_text, flags=re.IGNORECASE) is not None


def greedy_generate(
    model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int = 16
) -> str:
    """Greedy continuation of ``prompt_ids``, decoded without special tokens."""
    return greedy_generate_batch(model, tokenizer, [prompt_ids], max_new_tokens)[0]


def greedy_generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int = 16
) -> list[str]:
    """Greedy continuations of several prompts in one ``generate`` call (left-padded to
    the longest; a sequence that ends pads until the others do), each decoded without
    special tokens. Why: one prompt at a time leaves a GPU launch-bound."""
    import torch

    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
