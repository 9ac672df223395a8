"""Route one decode step of a layer to the Triton kernels: one small launch that stores the
new token and writes the step's lengths and spans, one launch for all dense / window /
elastic heads, one SparQ pipeline per distinct SparQ setting (scoring from the cache's fp8
side buffer). No host syncs, so a decode step can be captured in a CUDA graph."""

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
    *,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> None:
    """query / out: (B, Hq, 1, D); out's last dim contiguous (the kernels write into it).

    ``key`` / ``value`` (B, Hkv, 1, D): the new token, stored first in one fused launch
    (``kernels.decode.decode_append``); ``positions`` (B, 1): its positions, -1 for
    padding, None when every sequence's token sits at its length. Without ``key`` the new
    token must already be appended to ``layer``. ``logits``: the layer's scale and logit
    cap; ``window``: its own sliding window (the runtime routes SparQ layers with a window
    or a cap to the reference)."""
    scale, softcap = logits.scale, logits.softcap
    q = query[:, :, 0].contiguous()
    o = out[:, :, 0]  # a view: the kernels write the layer output in place (no copy back)
    # moa_search.kernels.decode holds the fused append; test doubles of the module lack it
    fused = getattr(getattr(kernels, "decode", None), "decode_append", None)
    if key is not None and fused is not None:
        side = getattr(kernels, "sparq_side_append", None)
        meta = layer.append_decode(fused, key, value, positions, side_kernel=side)
    else:
        if key is not None:
            pos = positions if positions is not None else layer.lengths[:, None].clone()
            layer.append(key, value, pos, unpadded=positions is None)
        meta = layer.decode_metadata()
    max_len = layer.layout.max_len
    static_ids = layer.static_head_ids()
    if static_ids.numel():
        kernels.mixed_decode(
            q, layer.keys, layer.values, meta["head_offset"], meta["head_sink"],
            meta["head_ring"], meta["span"], meta["seq_len"], scale,
            head_ids=static_ids, out=o, max_len=max_len, window=window, softcap=softcap,
            capacity=layer.static_capacity(),
        )  # fmt: skip
    for group, (pattern, head_ids, rows) in enumerate(layer.sparq_groups()):
        if pattern.k is not None:
            k, k_max = pattern.k, pattern.k
        else:
            k = pattern.k_at(layer.lengths)[:, None].expand(-1, len(rows))
            k = k.to(torch.int32).contiguous()
            k_max = max(1, min(max_len, math.ceil(pattern.k_ratio * max_len) + pattern.local))
        kernels.sparq_decode(
            q, layer.keys, layer.values, meta["head_offset"], meta["seq_len"],
            layer.v_sum.index_select(1, rows), min(pattern.r, q.shape[-1]), k, pattern.local,
            scale, head_ids, out=o, max_len=max_len, k_max=k_max, kt=layer.sparq_side(group),
        )  # fmt: skip
