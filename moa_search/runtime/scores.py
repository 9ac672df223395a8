"""Scaled dot-product attention with the model's own logit soft-capping.

Why: Gemma 2 caps every attention logit as ``cap * tanh(s / cap)`` before the softmax
(``attn_logit_softcapping``, handed to attention functions as ``softcap``). PyTorch's SDPA
has no such option, so with a cap the logits are formed explicitly (fp32); without one this
is plain ``scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Logits:
    """How a layer forms its attention logits: softmax ``scale`` and the model's logit
    ``softcap`` (None: no cap). Travels as one value through the attention helpers."""

    scale: float
    softcap: float | None = None


def cap_logits(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)``; unchanged when ``softcap`` is None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """q: (..., Hq, Lq, D); k, v: (..., Hk, Lk, D); mask: bool (True = attend) broadcast to
    (..., Hq, Lq, Lk). Causal aligns the last query with the last key. Output dtype of q."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = cap_logits((q.float() @ k.float().transpose(-1, -2)) * scale, softcap)
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        mask = causal if mask is None else mask & causal
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)
