"""GGUF files of the new families load through ``load_model`` (transformers' GGUF reader).

No GGUF of these families is at hand offline, so a tiny random-weight model is written as
one here (gguf's own writer and tensor-name map, as llama.cpp's converter does) and read
back: the model has the same weights, config, native windows and logits, and a plan runs
on it. Only what a GGUF file can say is used: Qwen2.5 without its sliding layers (GGUF has
no ``use_sliding_window``), Gemma 3 with its default layer pattern (5 sliding, 1 global).
"""

from __future__ import annotations

import pytest
import torch

from moa_search import apply_plan, uniform_plan
from moa_search.families import layer_windows
from moa_search.models import load_model
from tests.families import VOCAB, tiny_family_model

gguf = pytest.importorskip("gguf")

#: model_type -> (GGUF architecture, config fields a GGUF file can express)
CASES = {
    "qwen2": ("qwen2", {"use_sliding_window": False, "layer_types": ["full_attention"] * 3}),
    "gemma3_text": (
        "gemma3",
        {
            "num_hidden_layers": 6,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
            "query_pre_attn_scalar": 256,
        },
    ),
}


def _model(model_type: str) -> torch.nn.Module:
    return tiny_family_model(model_type, seed=7, **CASES[model_type][1])


def _write_gguf(model: torch.nn.Module, arch: str, path) -> None:
    c = model.config
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(kind, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if any(layer_windows(c)):
        w.add_sliding_window(c.sliding_window)
    for name, p in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        target = names.get_name(base)
        assert target, name
        value = p.float().numpy()
        if arch.startswith("gemma") and "norm" in base:  # llama.cpp stores Gemma's 1 + w
            value = value + 1
        w.add_tensor(f"{target}.{suffix}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model_type", list(CASES))
@torch.no_grad()
def test_gguf_of_a_new_family_loads_and_runs_a_plan(model_type, tmp_path):
    model = _model(model_type)
    path = tmp_path / f"{model_type}.gguf"
    _write_gguf(model, CASES[model_type][0], path)
    loaded = load_model(str(path), attn_implementation="eager")
    assert type(loaded) is type(model) and loaded.config.model_type == model_type
    assert layer_windows(loaded.config) == layer_windows(model.config)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for name, value in mine.items():
        torch.testing.assert_close(theirs[name], value, atol=1e-6, rtol=0, msg=name)
    ids = torch.randint(3, VOCAB, (1, 20))
    want = model(ids).logits
    torch.testing.assert_close(loaded(ids).logits, want, atol=1e-4, rtol=0)
    with apply_plan(loaded, uniform_plan(loaded, "dense")):
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-4, rtol=0)
