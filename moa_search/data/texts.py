"""Built-in texts (Austen, Python docs, Python stdlib code) and their fixed splits.

Why: calibration, validation and test must never share a document, and results
must be reproducible, so the split of every document is recorded with its sha256
in ``splits.json`` and the compressed texts ship as package data.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from moa_search.errors import MoaSearchError

CORPORA = ("austen", "pydocs", "pystdlib")
SPLITS = ("calibration", "validation", "test")
Split = Literal["calibration", "validation", "test"]
_REBUILD = "reinstall moa-search or run `python scripts/build_corpora.py --write`"


@dataclass(frozen=True)
class Document:
    """One document of a corpus; ``kind`` is "text" for prose and "code" for source."""

    id: str
    corpus: str
    split: str
    title: str
    text: str

    @property
    def kind(self) -> str:
        return "code" if self.corpus == "pystdlib" else "text"


def _data_file(name: str) -> bytes:
    try:
        return resources.files("moa_search.data").joinpath(name).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise MoaSearchError(f"built-in data file {name!r} is missing: {_REBUILD}") from e


@cache
def manifest() -> dict:
    """The committed split manifest (document ids, splits, char counts, sha256)."""
    return json.loads(_data_file("splits.json"))


@cache
def _corpus(corpus: str) -> tuple[dict, ...]:
    if corpus not in CORPORA:
        raise MoaSearchError(f"unknown corpus {corpus!r} (choose from {', '.join(CORPORA)})")
    raw = lzma.decompress(_data_file(f"corpora/{corpus}.jsonl.xz")).decode("utf-8")
    return tuple(json.loads(line) for line in raw.splitlines() if line)


def load_texts(split: str | None = None, corpus: str | None = None) -> list[Document]:
    """Documents of one split (or all) from one corpus (or all), in manifest order."""
    if split is not None and split not in SPLITS:
        raise MoaSearchError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    entries = [
        e
        for e in manifest()["documents"]
        if (split is None or e["split"] == split) and (corpus is None or e["corpus"] == corpus)
    ]
    if corpus is not None and corpus not in CORPORA:
        raise MoaSearchError(f"unknown corpus {corpus!r} (choose from {', '.join(CORPORA)})")
    docs = []
    for e in entries:
        by_id = {d["id"]: d for d in _corpus(e["corpus"])}
        if e["id"] not in by_id:
            raise MoaSearchError(f"document {e['corpus']}/{e['id']} is missing: {_REBUILD}")
        d = by_id[e["id"]]
        docs.append(Document(d["id"], e["corpus"], e["split"], d["title"], d["text"]))
    return docs


def verify_texts() -> int:
    """Check every document against its recorded sha256 and char count; return the count."""
    n = 0
    for corpus in CORPORA:
        by_id = {d["id"]: d["text"] for d in _corpus(corpus)}
        for e in (e for e in manifest()["documents"] if e["corpus"] == corpus):
            text = by_id.get(e["id"])
            if text is None:
                raise MoaSearchError(f"document {corpus}/{e['id']} is missing: {_REBUILD}")
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest != e["sha256"] or len(text) != e["chars"]:
                raise MoaSearchError(
                    f"document {corpus}/{e['id']} fails its hash check: {_REBUILD}"
                )
            n += 1
    return n
