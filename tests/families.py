"""The one registry of supported families for tests: a tiny random-weight model per family,
built from a config (no download). Generic tests iterate ``TINY``, so a family added here
(and to ``moa_search.families``) gets every one of them.

Each config exercises what makes its family different: Qwen2.5's q/k/v bias with sliding
upper layers, Qwen3's QK-norm, Phi-3's fused qkv_proj with a window on every layer, Gemma 2's
query_pre_attn_scalar and both soft-caps on alternating sliding / global layers, Gemma 3's
QK-norm and local / global RoPE. Windows are short (8 keys) so that sequences of 20-40
tokens cross them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

WINDOW = 8
VOCAB = 128
EOS = 1
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    pad_token_id=0, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_COMMON, sliding_window=WINDOW)


def _qwen2() -> PretrainedConfig:  # Qwen2.5: q/k/v bias; layers >= max_window_layers slide
    return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=1)  # fmt: skip


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(**_COMMON)


def _phi3() -> PretrainedConfig:
    return Phi3Config(**_COMMON, sliding_window=WINDOW)


def _gemma2() -> PretrainedConfig:
    return Gemma2Config(
        **_COMMON, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=_ALTERNATING,
        attn_logit_softcapping=4.0, final_logit_softcapping=8.0,
    )  # fmt: skip


def _gemma3() -> PretrainedConfig:
    return Gemma3TextConfig(
        **_COMMON, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=_ALTERNATING
    )


#: model_type -> tiny config builder
TINY: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
}


def tiny_config(model_type: str, **over) -> PretrainedConfig:
    config = TINY[model_type]()
    for key, value in over.items():
        setattr(config, key, value)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def tiny_family_model(model_type: str, seed: int = 0, **over) -> torch.nn.Module:
    """Random weights, eager attention (the model's own reference, soft-cap included), with
    sharper attention than the init gives (q/k weights scaled up). ``over``: config fields.

    The init leaves Qwen2.5's q/k/v biases at zero and the QK-norm weights at identity, so
    the tests would never see either: both get random values (from their own generator, so
    the global random stream the tests draw inputs from is unchanged)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **over)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    extra = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")) and p.dim() == 2:
                p.mul_(4.0)
            elif name.endswith(_RANDOMISED):
                p.add_(0.5 * torch.randn(p.shape, generator=extra))
    return model


#: parameters the init makes no-ops: attention biases (zero) and QK-norm weights (identity)
_RANDOMISED = (
    "q_proj.bias", "k_proj.bias", "v_proj.bias", "qkv_proj.bias", "q_norm.weight",
    "k_norm.weight",
)  # fmt: skip
