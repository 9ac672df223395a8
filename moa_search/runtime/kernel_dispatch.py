"""Route one decode step of a layer to the Triton kernels: one launch for all dense /
window / elastic heads, one SparQ pipeline per distinct SparQ setting. No host syncs, so a
decode step can be captured in a CUDA graph."""

from __future__ import annotations

import math
from types import ModuleType

import torch

from moa_search.runtime.cache import MoALayerCache
from moa_search.runtime.scores import Logits


def decode_layer(
    kernels: ModuleType,
    layer: MoALayerCache,
    query: torch.Tensor,
    out: torch.Tensor,
    logits: Logits,
    window: int | None = None,
) -> None:
    """query / out: (B, Hq, 1, D). The new token must already be appended to ``layer``.

    ``logits``: the layer's scale and logit cap; ``window``: its own sliding window (the
    runtime routes SparQ layers with a window or a cap to the reference)."""
    scale, softcap = logits.scale, logits.softcap
    q = query[:, :, 0].contiguous()
    o = torch.empty_like(q)
    meta = layer.decode_metadata()
    max_len = layer.layout.max_len
    static_ids = layer.static_head_ids()
    if static_ids.numel():
        kernels.mixed_decode(
            q, layer.keys, layer.values, meta["head_offset"], meta["head_sink"],
            meta["head_ring"], meta["span"], meta["seq_len"], scale,
            head_ids=static_ids, out=o, max_len=max_len, window=window, softcap=softcap,
        )  # fmt: skip
    for pattern, head_ids, rows in layer.sparq_groups():
        if pattern.k is not None:
            k, k_max = pattern.k, pattern.k
        else:
            k = pattern.k_at(layer.lengths)[:, None].expand(-1, len(rows))
            k = k.to(torch.int32).contiguous()
            k_max = max(1, min(max_len, math.ceil(pattern.k_ratio * max_len) + pattern.local))
        kernels.sparq_decode(
            q, layer.keys, layer.values, meta["head_offset"], meta["seq_len"],
            layer.v_sum.index_select(1, rows), min(pattern.r, q.shape[-1]), k, pattern.local,
            scale, head_ids, out=o, max_len=max_len, k_max=k_max,
        )  # fmt: skip
    out[:, :, 0] = o
