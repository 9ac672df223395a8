"""Read a user's own calibration data into ``CalibSample`` objects.

Why: people calibrate on their own domain. Accepted inputs: ``.txt`` (plain text,
cut into windows), ``.jsonl`` / ``.parquet`` with a ``text`` field (windows) or
``context`` + ``answer`` (+ optional ``question``) fields (chat-templated, loss on
the answer only), or a folder holding any of these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moa_search.data.calibration import CalibSample
from moa_search.data.retrieval import chat_parts
from moa_search.errors import MoaSearchError

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".txt":
        yield {"text": path.read_text("utf-8")}
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise MoaSearchError(f"{path.name}:{n}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        import pandas as pd

        yield from pd.read_parquet(path).to_dict("records")
    else:
        raise MoaSearchError(f"unsupported data file {path.name!r} (use {', '.join(SUFFIXES)})")


def _windows(tokenizer: Any, text: str, length: int, source: str) -> list[CalibSample]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    starts = range(0, max(1, len(ids) - length + 1), length)
    return [
        CalibSample(
            ids[a : a + length],
            [0] + [1] * (len(ids[a : a + length]) - 1),
            "user_text",
            {"source": source},
        )
        for a in starts
    ]


def _qa(tokenizer: Any, rec: dict[str, Any], length: int, source: str) -> CalibSample:
    question = str(rec.get("question") or "")
    head, tail = chat_parts(tokenizer, "", ("\n\n" + question) if question else "", "")
    context = list(tokenizer(str(rec["context"]), add_special_tokens=False)["input_ids"])
    ans = list(tokenizer(str(rec["answer"]), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ans.append(tokenizer.eos_token_id)
    keep = max(0, length - len(head) - len(tail) - len(ans))
    prompt = head + context[-keep:] + tail if keep else head + tail  # keep the context's end
    ids = prompt + ans
    return CalibSample(ids, [0] * len(prompt) + [1] * len(ans), "user_qa", {"source": source})


def read_user_samples(path: str | Path, tokenizer: Any, length: int) -> list[CalibSample]:
    """All samples from a file or folder, in sorted file order."""
    path = Path(path)
    if not path.exists():
        raise MoaSearchError(f"calibration data {str(path)!r} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    samples: list[CalibSample] = []
    for f in files:
        for rec in _records(f):
            if "context" in rec and "answer" in rec:
                samples.append(_qa(tokenizer, rec, length, f.name))
            elif "text" in rec:
                samples.extend(_windows(tokenizer, str(rec["text"]), length, f.name))
            else:
                raise MoaSearchError(
                    f"{f.name}: records need a 'text' field or 'context' + 'answer'"
                )
    if not samples:
        raise MoaSearchError(f"no calibration samples found in {str(path)!r}")
    return samples
