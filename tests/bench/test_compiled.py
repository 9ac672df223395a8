"""compile_non_attention: what it compiles, that it undoes exactly that, and that inductor's
code gives the eager tokens (CPU, tiny random model)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from moa_search.bench.compiled import CompileSettings, compile_non_attention
from moa_search.bench.decode_loop import PlanLoop
from moa_search.bench.models import build_model
from moa_search.bench.synthetic import synthetic_plan


@pytest.fixture(scope="module")
def model():
    return build_model("tiny-llama", dtype=torch.float32, device="cpu", seed=0)


def test_pieces_installed_and_removed_exactly(model):
    rotary = modeling_llama.apply_rotary_pos_emb
    layer = model.model.layers[1]
    pieces = compile_non_attention(model, CompileSettings(backend="aot_eager"))
    try:
        # two norms + MLP per layer, the final norm, cos / sin, the modeling file's rotary
        assert pieces.pieces == 3 * model.config.num_hidden_layers + 3
        assert "forward" in layer.post_attention_layernorm.__dict__
        assert "forward" in model.model.norm.__dict__
        assert "forward" in model.model.rotary_emb.__dict__
        assert modeling_llama.apply_rotary_pos_emb is not rotary
        assert "forward" not in layer.self_attn.__dict__  # attention stays eager
    finally:
        pieces.remove()
    assert modeling_llama.apply_rotary_pos_emb is rotary
    assert "forward" not in layer.post_attention_layernorm.__dict__
    assert "forward" not in model.model.norm.__dict__
    assert "forward" not in model.model.rotary_emb.__dict__
    assert pieces.pieces == 0


def test_inductor_pieces_decode_the_eager_tokens(model):
    """Generated code (inductor's CPU backend here; the same graphs the GPU gets) keeps the
    plan's greedy tokens on a synthetic cache."""
    plan = synthetic_plan(model, density=0.5, length=48, sink=4, tolerance=0.1)
    runs = []
    for settings in (None, CompileSettings()):
        loop = PlanLoop(model, plan, 2, 64, backend="reference", compile_settings=settings)
        try:
            loop.allocate()
            loop.fill_synthetic(40, seed=3)
            loop.run(6)
            runs.append(loop.out_tokens[:, :6].clone())
        finally:
            loop.close()
    assert torch.equal(runs[0], runs[1])
