"""Tiny random-weight Llama models and random token data: fast, no download."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(**over) -> LlamaConfig:
    cfg = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    cfg.update(over)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    return config


def tiny_model(seed: int = 0, **over) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**over)).eval()
    with torch.no_grad():  # larger weights: sharper attention, less uniform than init
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6.0)
    return model


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture
def saved_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model().save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI box is small and shared: one intra-op thread avoids oversubscription stalls."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def make_model():
    """Factory for tiny models with other shapes (``make_model(num_hidden_layers=3)``)."""
    return tiny_model
