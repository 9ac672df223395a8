"""Supported model families and the few attention details that differ between them.

Why one place: the runtime, both profilers, the plan's cost model and the tests all need to
know which layers a model itself makes sliding, how its logits are formed and where its
attention modules are. Everything goes through transformers' public extension points
(AttentionInterface, Cache): the model's own attention module runs its projections (fused
qkv for Phi-3, q/k/v bias for Qwen2.5, QK-norm for Gemma 3 / Qwen3) and RoPE, then calls
our attention function with ``scaling`` (Gemma's ``query_pre_attn_scalar``), ``softcap``
(Gemma 2's ``attn_logit_softcapping``) and ``sliding_window``. What is left for us is read
from the config here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from moa_search.errors import MoaSearchError


@dataclass(frozen=True)
class Family:
    """One supported ``model_type`` and what about its attention the runtime honours."""

    model_type: str
    name: str
    attention: str


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama (SmolLM2, Llama 2/3)", "GQA, RoPE"),
    Family("mistral", "Mistral", "GQA, RoPE, config.sliding_window on every layer"),
    Family("qwen2", "Qwen2 / Qwen2.5", "q/k/v bias, optional sliding layers (layer_types)"),
    Family("qwen3", "Qwen3", "QK-norm, optional sliding layers (layer_types)"),
    Family("phi3", "Phi-3 / Phi-3.5", "fused qkv_proj, config.sliding_window on every layer"),
    Family(
        "gemma2",
        "Gemma 2",
        "query_pre_attn_scalar, attention and final logit soft-capping, sliding/global layers",
    ),
    Family(
        "gemma3_text",
        "Gemma 3 (text)",
        "query_pre_attn_scalar, QK-norm, local/global RoPE, sliding/global layers",
    ),
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in FAMILIES)
#: image-text checkpoints whose language model is a supported family: load_model keeps it
TEXT_MODEL_OF = {"gemma3": "gemma3_text"}
_HINTS = {
    "gemma3": "an image-text model: load it with moa_search.load_model, which keeps its "
    "language model (gemma3_text)",
}


def family(model_type: str) -> Family:
    """The registry entry of ``model_type`` (MoaSearchError when unsupported)."""
    for f in FAMILIES:
        if f.model_type == model_type:
            return f
    hint = f"; {_HINTS[model_type]}" if model_type in _HINTS else ""
    raise MoaSearchError(
        f"model type {model_type!r} is not supported "
        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}){hint}"
    )


def text_config(config: Any) -> Any:
    """The config plans are made for: the language model's of an image-text checkpoint
    (Gemma 3 4b and larger), else ``config`` itself."""
    if getattr(config, "model_type", None) not in TEXT_MODEL_OF:
        return config
    text = config.text_config
    if not getattr(text, "architectures", None):
        text.architectures = [_CAUSAL_LM[text.model_type]]
    if not getattr(text, "_name_or_path", ""):
        text._name_or_path = getattr(config, "_name_or_path", "")
    return text


_CAUSAL_LM = {"gemma3_text": "Gemma3ForCausalLM"}


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside an image-text model (its own decoder and lm_head modules, not a
    copy): a ``Gemma3ForCausalLM`` over ``model.model.language_model``. Others unchanged."""
    if getattr(model.config, "model_type", None) not in TEXT_MODEL_OF:
        return model
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config = text_config(model.config)
    with torch.device("meta"):  # no weights: both children are replaced by the real ones
        lm = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    lm.model = model.model.language_model
    lm.lm_head = model.lm_head
    lm.generation_config = model.generation_config
    return lm


def check_supported(config: Any) -> None:
    """Refuse architectures (or settings) whose attention the runtime does not reproduce."""
    config = getattr(config, "config", config)
    family(str(getattr(config, "model_type", None)))
    if getattr(config, "use_bidirectional_attention", False):
        raise MoaSearchError(
            "use_bidirectional_attention=True: plans are causal; use a causal LM config"
        )


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer, the sliding window the model itself applies (None: full causal).

    ``layer_types`` (Gemma 2/3, Qwen2/3) marks sliding layers; Mistral and Phi-3 slide
    every layer when ``config.sliding_window`` is set; Llama never slides."""
    config = getattr(config, "config", config)
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        found = tuple(window if t == "sliding_attention" else None for t in types[:n])
    elif config.model_type in ("mistral", "phi3"):
        found = (window,) * n
    else:
        found = (None,) * n
    for i, w in enumerate(found):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise MoaSearchError(
                f"layer {i}: sliding_window: expected a positive integer or None, got {w!r}"
            )
    return found


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``model.model`` for every supported family)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers"):
        base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise MoaSearchError(f"{type(model).__name__}: no decoder layers found (model.layers)")
    return base


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's self-attention module, in layer order."""
    return [layer.self_attn for layer in decoder(model).layers]


def rotary(model: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
    """(cos, sin) for ``layer`` at ``positions`` (1-D); Gemma 3 has local and global RoPE."""
    base = decoder(model)
    emb = base.rotary_emb
    pos = positions[None].to(hidden.device)
    if "layer_type" in inspect.signature(emb.forward).parameters:
        return emb(hidden, pos, base.config.layer_types[layer])
    return emb(hidden, pos)


def final_logits(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Apply the model's final logit soft-capping (Gemma 2) to raw ``lm_head`` output."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def lm_head(model: torch.nn.Module, head: Any = None) -> Any:
    """The LM head as the model applies it: ``head`` (default: the output embeddings)
    followed by the final logit soft-cap where the family has one, so every NLL (eval,
    profiler, card) scores the logits the model really produces."""
    head = head if head is not None else model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None) is None:
        return head
    return lambda hidden: final_logits(model, head(hidden))
