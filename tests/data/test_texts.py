"""Committed corpora: counts, hashes, split hygiene, clear errors when data is missing."""

from __future__ import annotations

import pytest

from moa_search.data import texts
from moa_search.errors import MoaSearchError


def test_document_counts_and_hashes():
    assert texts.verify_texts() == 212
    counts = {c: len(texts.load_texts(corpus=c)) for c in texts.CORPORA}
    assert counts == {"austen": 6, "pydocs": 163, "pystdlib": 43}


def test_austen_split_is_fixed():
    ids = {s: [d.id for d in texts.load_texts(s, "austen")] for s in texts.SPLITS}
    assert ids["test"] == ["emma"] and ids["validation"] == ["persuasion"]
    assert len(ids["calibration"]) == 4
    assert texts.load_texts("test", "austen")[0].text.startswith("EMMA")


def test_splits_do_not_overlap():
    seen: dict[tuple[str, str], str] = {}
    hashes: dict[str, str] = {}
    for e in texts.manifest()["documents"]:
        assert (e["corpus"], e["id"]) not in seen
        seen[(e["corpus"], e["id"])] = e["split"]
        assert hashes.setdefault(e["sha256"], e["split"]) == e["split"]
    for corpus in texts.CORPORA:
        assert {s for (c, _), s in seen.items() if c == corpus} == set(texts.SPLITS)


def test_code_documents_are_code():
    doc = texts.load_texts("test", "pystdlib")[0]
    assert doc.kind == "code" and ("def " in doc.text or "class " in doc.text)


def test_missing_data_file_is_one_line_error():
    with pytest.raises(MoaSearchError, match="build_corpora.py") as err:
        texts._data_file("corpora/missing.jsonl.xz")
    assert "\n" not in str(err.value)


def test_unknown_split_or_corpus():
    with pytest.raises(MoaSearchError):
        texts.load_texts("train")
    with pytest.raises(MoaSearchError):
        texts.load_texts("test", "shakespeare")
