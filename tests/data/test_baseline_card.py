"""The card's dense perplexity is the number eval computes for the same window."""

from __future__ import annotations

import math
from types import SimpleNamespace

from moa_search.data import texts
from moa_search.data.baseline_card import perplexity_rows
from moa_search.evaluate.baselines import dense_method
from moa_search.evaluate.tasks import ppl_items, run_item
from tests.conftest import tiny_llama
from tests.evaluate.conftest import CharTokenizer


def test_card_perplexity_matches_eval_across_document_boundaries(monkeypatch) -> None:
    docs = [SimpleNamespace(text=f"Document {i}: short text number {i}.") for i in range(12)]
    monkeypatch.setattr(texts, "load_texts", lambda split, corpus=None: docs)
    model, tok, length = tiny_llama(vocab=128), CharTokenizer(), 64
    (row,) = perplexity_rows(model, tok, [length], 1, corpora=("austen",))
    slots = sum(len(d.text) + 1 for d in docs) // length  # one EOS after each document
    items = ppl_items(tok, length, slots, seed=0, corpus="austen")  # every slot, in order
    assert items[0].ids[len(docs[0].text)] == tok.eos_token_id
    trial = run_item(model, tok, dense_method(), items[0])
    assert row["n"] == 1
    assert math.isclose(row["value"], round(math.exp(trial.nll), 3), rel_tol=1e-9)
