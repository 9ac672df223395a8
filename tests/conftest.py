"""Shared fixtures: tiny random-weight Llama-family models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random Llama small enough for exact fp32 comparisons on a CPU in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def model():
    return tiny_llama()
