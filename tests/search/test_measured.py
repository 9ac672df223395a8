"""Measured objective on a tiny random Llama (no downloads): real apply_plan, cached losses."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, SparQ, Window
from moa_search.plan import ModelIdentity
from moa_search.search import plan_search
from moa_search.search.synthetic import make_synthetic_profile


class CharTokenizer:
    """Bytes modulo a tiny vocabulary: enough to feed real text to a random model."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + b % 63 for b in text[:4000].encode()]}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def test_measured_objective_applies_plans_and_caches(tiny, tmp_path):
    ident = ModelIdentity.from_config(tiny.config, "tiny-llama")
    cands = [
        Dense(),
        *(Window(sink=4, span=s) for s in (16, 32, 64)),
        SparQ(r=4, k_ratio=0.25, local=4),
    ]
    profile = make_synthetic_profile(tmp_path / "p", ident, lengths=(64, 128), candidates=cands)
    run = dict(
        budgets=["memory=0.5"],
        objective="measured",
        model=tiny,
        tokenizer=CharTokenizer(),
        val_samples=2,
        val_length=192,
        progress=False,
    )
    result = plan_search(profile, trials=2, **run)
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert len(done) and done["measured_loss"].notna().all()
    assert np.allclose(done["loss"], done["measured_loss"])
    assert 2.0 < done["loss"].min() < 8.0  # ~ln(64) for a random model
    cache = sorted((result.out / "val_cache" / "len192_n2").glob("*.json"))
    assert 1 <= len(cache) <= len(done["choice"].unique()) + 3  # + uniform baselines
    again = plan_search(profile, trials=3, **run)
    assert len(again.trials) == 3
    summary = pd.read_json(result.out / "summary.json", typ="series")
    assert all(b["measured_loss"] is not None for b in summary["baselines"])


def test_validation_must_be_longer_than_profile(tiny, tmp_path):
    ident = ModelIdentity.from_config(tiny.config)
    profile = make_synthetic_profile(
        tmp_path / "p", ident, lengths=(64, 128), candidates=[Dense(), Window(sink=4, span=16)]
    )
    with pytest.raises(MoaSearchError, match="must exceed the longest profiled"):
        plan_search(
            profile,
            budgets=["memory=0.5"],
            objective="measured",
            model=tiny,
            tokenizer=CharTokenizer(),
            val_length=128,
            trials=1,
            progress=False,
        )
    assert not (profile / "plans").exists()
