"""Models for the benchmark: a config-only shape (random weights, built on the device, no
download) or any name the rest of moa-search loads (``smollm2-135m``, HF names, paths).

Speed and memory do not depend on trained weights, so ``llama3-8b-shape`` gives the
Llama-3-8B attention/MLP shapes without a 16 GB download.
"""

from __future__ import annotations

from typing import Any

import torch

from moa_search.devices import parse_dtype
from moa_search.errors import MoaSearchError

#: Config-only model shapes (LlamaConfig fields). ``tiny-llama`` is for CPU tests.
_LLAMA3 = dict(  # what the Llama-3 shapes share
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b-shape": dict(
        _LLAMA3, num_hidden_layers=32, hidden_size=4096, head_dim=128, intermediate_size=14336
    ),
    "llama3-1b-shape": dict(
        _LLAMA3,
        num_hidden_layers=16,
        hidden_size=2048,
        head_dim=64,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "tiny-llama": dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=8192,
    ),
}


def shape_config(name: str) -> Any:
    """LlamaConfig of a named shape (``SHAPES``); MoaSearchError for unknown names."""
    from transformers import LlamaConfig  # noqa: PLC0415

    if name not in SHAPES:
        raise MoaSearchError(f"unknown model shape {name!r} (known: {', '.join(SHAPES)})")
    config = LlamaConfig(**SHAPES[name])
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = name
    return config


def build_model(
    name: str = "llama3-8b-shape",
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> Any:
    """A causal LM in eval mode on ``device``.

    Names in :data:`SHAPES` are built from the config directly on ``device`` with random
    weights (normal, std = initializer_range; norms 1), so nothing is downloaded and no
    host copy of the weights is made. Other names go to :func:`moa_search.models.load_model`.
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if name not in SHAPES:
        from moa_search.models import load_model  # noqa: PLC0415

        return load_model(name, dtype=dtype, device=device)
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    config = shape_config(name)
    config.dtype = dtype
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif "norm" in pname:
                p.fill_(1.0)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
