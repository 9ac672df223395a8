"""The plan's attention, installed on a model as the ``"moa"`` policy.

Every supported family's attention module calls ``ALL_ATTENTION_FUNCTIONS[impl](module, q, k,
v, mask, scaling=..., sliding_window=..., softcap=...)`` after its own projections, norms and
RoPE. apply_plan installs it as the model's attention policy (``moa_search.takeover``), with
the plan runtime as its state; it then attends per KV head with the model's ``scaling`` and
``softcap``, inside the model's own window. With a :class:`MoACache`, the layer's ``update``
hands attention a :class:`CacheRead` (the stored entries plus the new chunk); attention
attends to it and then stores only what each head's pattern needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moa_search.errors import MoaSearchError
from moa_search.patterns import Pattern, SparQ, dense_causal
from moa_search.runtime.cache import CacheRead, MoALayerCache
from moa_search.runtime.kernel_dispatch import decode_layer
from moa_search.runtime.prefill import cached_prefill, fresh_prefill
from moa_search.runtime.reference import attend_head
from moa_search.runtime.scores import Logits
from moa_search.takeover import Call

if TYPE_CHECKING:
    from moa_search.runtime.apply import PlanRuntime

ATTN_NAME = "moa"


@dataclass(frozen=True)
class _Clamped(Pattern):
    """``inner`` restricted to the model layer's own sliding window: key j is seen by query
    i only when ``inner`` allows it and ``i - j < window`` (the model's rule). A runtime
    helper handed to ``attend_head``; never part of a plan (so not registered)."""

    inner: Pattern = None  # type: ignore[assignment]
    window: int = 0

    def allowed(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, reach: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        rule = self.inner.allowed if self.inner.static else dense_causal
        near = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)) < self.window
        return rule(q_pos, k_pos, reach) & near


def _clamp(
    pattern: Pattern, window: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> tuple[Pattern, torch.Tensor, bool]:
    """(pattern, key positions, whether SparQ's running mean of V applies) for one head
    under the layer's own window. SparQ decode keeps its algorithm over the keys inside the
    window (the others marked empty) and averages V over those keys."""
    if window is None:
        return pattern, k_pos, True
    if isinstance(pattern, SparQ) and q_pos.shape[1] == 1:
        inside = (q_pos - k_pos) < window
        return pattern, torch.where(inside, k_pos, torch.full_like(k_pos, -1)), False
    return _Clamped(inner=pattern, window=window), k_pos, True


def _positions(real: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Token positions of a (B, L) real-token mask continuing from ``start``; -1 for padding."""
    pos = (
        torch.cumsum(real.long(), dim=1) - 1 + (start[:, None] if torch.is_tensor(start) else start)
    )
    return torch.where(real, pos, torch.full_like(pos, -1))


def moa_attention(
    call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """query: (B, Hq, Lq, D); key/value: (B, Hkv, Lk, D). Returns (B, Hq, Lq, D).

    ``call.mask``: the (B, Lk) padding mask the model was given (``padding_mask`` is this
    policy's mask function), None without padding."""
    runtime: PlanRuntime = call.state
    layer_idx = call.layer
    patterns = runtime.plan.heads[layer_idx]
    layer: MoALayerCache | None = None
    if isinstance(key, CacheRead):  # a patterned cache handed back what to attend to
        layer, key, value = key.layer, key.key, key.value
    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    logits = Logits(call.scale, call.softcap)
    mask2d = call.mask if torch.is_tensor(call.mask) and call.mask.dim() == 2 else None
    window = runtime.windows[layer_idx]
    if "sliding_window" in call.extra and call.window != window:
        raise MoaSearchError(
            f"layer {layer_idx}: the model attends with sliding_window="
            f"{call.window!r}, its config says {window!r}"
        )

    if layer is not None and _fresh_unpadded(runtime, layer, mask2d, q_len):
        # A prompt into an empty cache: attention writes its own output (no copy of it)
        reach = max(q_len, layer.reach)
        out = fresh_prefill(query, key, value, patterns, logits, window=window, reach=reach)
        layer.append(key, value, _positions(_real_mask(mask2d, batch, q_len, query.device)),
                     fresh=True)  # fmt: skip
        return out
    out = torch.empty_like(query)
    if layer is not None:
        # The Triton kernels know sinks and recent spans, not the model's own window.
        kernels = runtime.use_kernels(query, q_len, layer, window, logits.softcap)
        if q_len == 1 and mask2d is None:  # decode without padding: position = length
            q_pos = None if kernels else layer.lengths[:, None].clone()  # the kernel reads it
        else:
            real = _real_mask(mask2d, batch, q_len, query.device)
            q_pos = _positions(real, layer.lengths)
        if kernels:
            decode_layer(
                runtime.kernels, layer, query, out, logits, window,
                key=key, value=value, positions=q_pos,
            )  # fmt: skip
        elif _chunk_unpadded(runtime, layer, mask2d, q_len):
            cached_prefill(query, key, value, patterns, layer, logits, out, window)
        else:
            reach = _reach(q_pos, layer.reach)
            for h, pattern in enumerate(patterns):
                k_old, v_old, pos_old = layer.gather(h)
                pos_old = _unheld(pos_old, pattern.sink, layer.held_from(h)[:, None])
                sl = slice(h * group, (h + 1) * group)
                k_all = (
                    torch.cat([k_old.to(key.dtype), key[:, h]], 1) if k_old.numel() else key[:, h]
                )
                v_all = (
                    torch.cat([v_old.to(key.dtype), value[:, h]], 1)
                    if v_old.numel()
                    else value[:, h]
                )
                k_pos = torch.cat([pos_old, q_pos], 1)
                head_pattern, k_pos, running_mean = _clamp(pattern, window, q_pos, k_pos)
                v_mean = None
                running_mean = running_mean and layer.v_sum is not None and q_len == 1
                if running_mean and h in layer.sparq_heads:
                    j = layer.sparq_heads.index(h)
                    n_now = (layer.lengths + (q_pos[:, -1] >= 0)).clamp_min(1)
                    v_mean = (layer.v_sum[:, j] + value[:, h, -1].float()) / n_now[:, None]
                out[:, sl] = attend_head(
                    query[:, sl], k_all, v_all, q_pos, k_pos, head_pattern, logits, v_mean,
                    reach=reach,
                )  # fmt: skip
            layer.append(key, value, q_pos, unpadded=mask2d is None)
    else:
        # No patterned cache (training, use_cache=False, or a user-supplied dense cache):
        # every head sees the full key range, masked by its pattern. A user's DynamicCache
        # is read for how many tokens its sliding layers dropped (positions stay absolute).
        k_len = key.shape[2]
        real_k = _real_mask(mask2d, batch, k_len, query.device)
        dropped = _dropped_real(runtime.active_cache, layer_idx, k_len, mask2d)
        k_pos = _positions(real_k, dropped)
        q_pos = k_pos[:, -q_len:]
        start = (k_pos[:, : k_len - q_len].max(1, keepdim=True).values + 1 if k_len > q_len
                 else torch.zeros_like(q_pos[:, :1]))  # fmt: skip
        for h, pattern in enumerate(patterns):
            sl = slice(h * group, (h + 1) * group)
            held = pattern.held_from(start)  # what a patterned cache would still hold
            head_pattern, head_k_pos, _ = _clamp(
                pattern, window, q_pos, _unheld(k_pos, pattern.sink, held)
            )
            out[:, sl] = attend_head(  # spans at each row's last position + 1 (the default)
                query[:, sl], key[:, h], value[:, h], q_pos, head_k_pos, head_pattern, logits
            )
    return out


def _unheld(k_pos: torch.Tensor, sink: int, held: torch.Tensor) -> torch.Tensor:
    """``k_pos`` with -1 at keys a head no longer holds: past its sink, before ``held``."""
    gone = (k_pos >= sink) & (k_pos < held)
    return torch.where(gone, torch.full_like(k_pos, -1), k_pos)


def _reach(q_pos: torch.Tensor, least: int = 0) -> torch.Tensor:
    """(B, 1) length each row's sequence reaches in this forward (its last real position
    + 1, at least ``least``): every query's span is taken there (``patterns``)."""
    return (q_pos.max(1, keepdim=True).values + 1).clamp(min=least)


def _dropped_real(cache: Any, layer_idx: int, k_len: int, mask2d) -> torch.Tensor | int:
    """Real tokens before the first key a dense cache returned: non-zero when the cache
    keeps only a window (transformers' sliding layers), so positions stay absolute."""
    layers = getattr(cache, "layers", None)
    if cache is None or layers is None or layer_idx >= len(layers):
        return 0
    dropped = int(layers[layer_idx].get_seq_length()) - k_len
    if dropped <= 0:
        return 0
    if mask2d is not None and mask2d.shape[-1] >= dropped + k_len:
        return mask2d[:, -(dropped + k_len) : -k_len].long().sum(1)
    return dropped


def _fresh_unpadded(runtime, layer: MoALayerCache, mask2d, q_len: int) -> bool:
    """Prompt into an empty cache with no padding: the fast prefill applies (not with the
    "reference" backend, which keeps the plain per-head path)."""
    if runtime.backend == "reference" or q_len == 1 or layer.processed != 0:
        return False
    return mask2d is None or bool(mask2d[:, -q_len:].all())


def _chunk_unpadded(runtime, layer: MoALayerCache, mask2d, q_len: int) -> bool:
    """A prompt chunk after cached tokens, neither padded: ``cached_prefill`` applies."""
    if runtime.backend == "reference" or q_len == 1 or layer.processed == 0:
        return False
    if not layer.contiguous:
        return False
    return mask2d is None or bool(mask2d.all())


def _real_mask(mask2d: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(B, length) bool of real (non-padding) tokens among the last ``length`` positions."""
    if mask2d is None or mask2d.shape[-1] < length:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return mask2d[:, -length:].to(device=device).bool()
