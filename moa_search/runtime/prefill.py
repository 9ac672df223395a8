"""Fast prefill for a fresh cache: dense-like heads in one causal SDPA call, window / elastic
heads by query chunks over only the keys their pattern can reach.

The plain path (``reference.attend_head`` per KV head) builds an L x L boolean mask per head
and attends over every key: at 32k tokens that is a 1 GiB mask per head and the full
quadratic cost for a 4k window. Here, for a prompt that starts at position 0 with no
padding (the usual prefill), heads are grouped:

- full heads (dense, SparQ -- dense in prefill -- and static patterns that reach every key
  at this length): one ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``
  (FlashAttention on CUDA);
- every distinct window / elastic pattern of the layer: queries in chunks of ``chunk``
  positions; chunk [c0, c1) attends to the sink keys and the band [c1 - 1 - span_max + 1 ..
  c1) with a small (chunk x band) mask, so work is ~ L x (chunk + span) instead of L^2 / 2.

With ``window`` (the model layer's own sliding window) no query sees a key ``window`` or
more positions back, whatever its pattern: every head is then clamped to it (a dense head
becomes a band of ``window`` keys, a sink only counts while it is inside the window).

``softcap`` (Gemma 2's attention logit cap) is applied to every logit before the mask.

On CUDA, a layer with some banded heads, for a prompt of at least ``MIN_FLEX_LENGTH``
tokens, runs through FlexAttention (``runtime/flex_prefill.py``: one fused launch visiting
only each head's sink + band key blocks). ``MOA_PREFILL`` picks: ``auto`` (the default:
flex where torch has it), ``flex``, ``flex-split`` (full heads in the causal SDPA call, the
others in one flex launch) or ``banded``, the chunked path below, which also runs on CPU,
for shorter prompts, and once the flex path has raised (a warning says so). Why flex by
default: on an H200 (8B shape, 25% plan, bf16) it prefilled a 32k prompt 1.18x faster than
dense where the banded path took 1.6x dense's time, and 4k at 0.98x of dense speed
where banded ran at 0.57x (``benchmarks/prefill.py``). Padded prompts and
prompts after cached tokens never come here (attention.py's per-head path).

Exact: same keys and softmax as the reference, up to floating-point summation order.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from moa_search.patterns import Dense, Pattern, seen_length
from moa_search.runtime.constants import device_tensor
from moa_search.runtime.scores import Logits, sdpa

DEFAULT_CHUNK = 2048
#: ``MOA_PREFILL`` values: the chunked banded path, FlexAttention for every head of a layer,
#: FlexAttention for the banded heads with SDPA for the full ones, or flex where it runs
METHODS = ("banded", "flex", "flex-split", "auto")
#: shortest prompt the flex methods take (see ``_flex_method``)
MIN_FLEX_LENGTH = 1024
#: layer prefills per path taken ("sdpa", "banded", "flex", "flex-split", "flex-failed"):
#: lets benchmarks and users check which path really ran
PATH_COUNTS: Counter[str] = Counter()
_FLEX_FAILED: list[str] = []  # the first error of the flex path; later calls skip it


@dataclass(frozen=True)
class _Band:
    """What every banded chunk shares: the layer's ``logits``, its own sliding ``window``
    (None: none), the query ``chunk`` length and the GQA ``group`` (query heads per KV head)."""

    logits: Logits
    window: int | None
    chunk: int
    group: int = 1
    reach: int = 0  # the length the prompt reaches: every query's span is taken there


def covers_all(
    pattern: Pattern, length: int, window: int | None = None, reach: int | None = None
) -> bool:
    """True when every query of a prompt of ``length`` tokens (its spans taken at
    ``reach``, at least ``length``) sees all earlier keys. Memoised: asked for every head
    of every layer on each prefill."""
    return _covers_all(pattern, length, window, max(length, reach or 0))


@functools.lru_cache(maxsize=4096)
def _covers_all(pattern: Pattern, length: int, window: int | None, reach: int) -> bool:
    if window is not None and window < length:
        return False
    if isinstance(pattern, Dense) or not pattern.static:
        return True
    return pattern.sink + int(pattern.span_at(reach)) >= length


def fresh_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: list[Pattern],
    logits: Logits,
    out: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    window: int | None = None,
    method: str | None = None,
    reach: int | None = None,
) -> torch.Tensor:
    """Attention of a prompt at positions 0..L-1 (no padding, nothing cached before).

    query: (B, Hq, L, D); key / value: (B, Hkv, L, D); patterns: one per KV head;
    logits: the layer's scale and logit cap; window: its own sliding window, if any;
    method: one of ``METHODS`` (None: ``$MOA_PREFILL``, else "auto"); reach: the length
    the prompt reaches, where every span is taken (None: L; more when L is its first chunk).
    Returns (B, Hq, L, D), same dtype as query: ``out``, or without it the one kernel
    call's own output where one call serves every head (no copy).
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    full: list[int] = []
    sparse: dict[Pattern, tuple[Pattern, list[int]]] = {}
    reach = max(length, reach or 0)
    for h, p in enumerate(patterns):
        if covers_all(p, length, window, reach):
            full.append(h)
        else:
            sparse.setdefault(p, (p, []))[1].append(h)  # frozen: equal patterns group

    flex = _flex_method(method, query) if sparse else None
    if flex is not None:
        from moa_search.runtime.flex_prefill import flex_prefill  # noqa: PLC0415

        try:
            split = flex == "flex-split" and full
            out = flex_prefill(query, key, value, patterns, logits, out, window,
                               full_heads=full if split else None, reach=reach)  # fmt: skip
            PATH_COUNTS[flex] += 1
            return out
        except torch.OutOfMemoryError:  # the prompt's own size: no reason to switch flex off
            raise
        except Exception as exc:  # compile / kernel trouble: the banded path still works
            PATH_COUNTS["flex-failed"] += 1
            _FLEX_FAILED.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(
                f"FlexAttention prefill failed, using the banded path from now on: "
                f"{_FLEX_FAILED[0][:300]}",
                RuntimeWarning,
                stacklevel=2,
            )
    PATH_COUNTS["banded" if sparse else "sdpa"] += 1

    everything = len(full) == kv_heads
    if out is None and not everything:
        out = torch.empty_like(query)
    if full:
        kv_idx, qi = head_index(full, group, query.device)
        q = query if everything else query.index_select(1, qi)
        k = key if everything else key.index_select(1, kv_idx)
        v = value if everything else value.index_select(1, kv_idx)
        y = sdpa(
            q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=logits.scale,
            enable_gqa=group > 1, softcap=logits.softcap,
        )  # fmt: skip
        if everything:
            if out is None:
                return y
            out.copy_(y)
        else:
            out.index_copy_(1, qi, y)

    for pattern, heads in sparse.values():
        band = _Band(logits, window, chunk, group, reach)
        _banded(query, key, value, pattern, heads, out, band)
    return out


def cached_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: list[Pattern],
    layer,
    logits: Logits,
    out: torch.Tensor,
    window: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Attention of a prompt chunk at positions P..P+C-1 after the P tokens ``layer`` holds
    (a :class:`~moa_search.runtime.cache.MoALayerCache`, ``contiguous``; the chunk has no
    padding), then the chunk stored. query: (B, Hq, C, D); key / value: (B, Hkv, C, D).

    Why: the per-head path masks every head over all its keys (a C x P mask and logits per
    head: gigabytes at P = 120k). Here banded heads read only the sink + band entries of
    their cache (before the chunk may overwrite their ring), the chunk is stored, and the
    heads that see every key (dense; SparQ, dense in prefill) attend to their contiguous
    cache slice with a bottom-right causal mask (a flash kernel on CUDA, no mask built).
    Memory: ~ chunk x (chunk + span) per banded group, C x P never."""
    batch, q_heads, length, _ = query.shape
    group = q_heads // key.shape[1]
    start = layer.processed
    total = start + length
    reach = max(total, layer.reach)  # a chunk of a longer prompt: the prompt's spans
    layer._ensure_capacity(reach, key)  # the final layout, before any slot is read
    layout = layer.layout
    full: list[int] = []
    sparse: dict[Pattern, list[int]] = {}
    for h, p in enumerate(patterns):
        whole = layout.sinks[h] == 0 and layout.rings[h] >= total  # slot = offset + position
        if whole and covers_all(p, total, window, reach) and p.held_from(start, layer.reach) == 0:
            full.append(h)
        else:
            sparse.setdefault(p, []).append(h)
    shared = _Band(logits, window, chunk, group, reach)
    for pattern, heads in sparse.items():
        source = _cached_source(layer, key, value, heads, start, query.dtype)
        held = pattern.held_from(start, layer.reach)  # older cached keys are gone
        _banded_at(query, source, start, pattern, heads, out, shared, held)
    positions = (start + torch.arange(length, device=query.device)).expand(batch, -1)
    layer.append(key, value, positions, fresh=True)
    for h in full:
        sl = slice(h * group, (h + 1) * group)
        off = layout.offsets[h]
        k = layer.keys[:, off : off + total]
        v = layer.values[:, off : off + total]
        out[:, sl] = _tail_causal(query[:, sl], k, v, logits)
    PATH_COUNTS["chunk"] += 1
    return out


def _cached_source(layer, key, value, heads: list[int], start: int, dtype) -> _Source:
    """Keys of ``heads`` (one pattern, so one sink / ring size) for a chunk after ``start``
    cached tokens: their cache slots (a copy: the chunk is stored before the full heads
    attend and may overwrite a ring) followed by the chunk's own entries."""
    layout = layer.layout
    sink, ring = layout.sinks[heads[0]], layout.rings[heads[0]]
    cap = sink + ring
    kv_idx, _ = head_index(heads, 1, key.device)

    def gather(store: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        old = torch.stack([store[:, layout.offsets[h] : layout.offsets[h] + cap] for h in heads], 1)
        return torch.cat([old.to(dtype), new.index_select(1, kv_idx).to(dtype)], 2)

    def slot(p: torch.Tensor) -> torch.Tensor:
        cached = torch.where(p < sink, p, sink + torch.remainder(p - sink, max(ring, 1)))
        return torch.where(p >= start, cap + p - start, cached)

    return _Source(gather(layer.keys, key), gather(layer.values, value), slot)


def _tail_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logits: Logits):
    """q (B, G, C, D): the last C positions of k / v (B, S, D), causal aligned at the
    bottom right (query i sees keys 0 .. S - C + i). ``CausalBias`` runs the flash or
    memory-efficient kernel on CUDA without forming a mask (the plain ``is_causal`` aligns
    top left); with a softcap the logits are formed (``scores.sdpa``)."""
    batch, group, _, dim = q.shape
    size = k.shape[1]
    k = k[:, None].expand(batch, group, size, dim).to(q.dtype)
    v = v[:, None].expand(batch, group, size, dim).to(q.dtype)
    if logits.softcap is not None:
        return sdpa(q, k, v, scale=logits.scale, is_causal=True, softcap=logits.softcap)
    from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

    if q.is_cuda:  # the fused kernels want real head strides
        k, v = k.contiguous(), v.contiguous()
    bias = causal_lower_right(q.shape[2], size)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=logits.scale
    )


def _flex_method(method: str | None, query: torch.Tensor) -> str | None:
    """ "flex" / "flex-split" when that path should run for ``query``, else None. Prompts
    under ``MIN_FLEX_LENGTH`` stay banded: one chunk per pattern is cheap there, and short
    queries would take flex's separate decoding kernel (one more compile, less tested)."""
    name = method or os.environ.get("MOA_PREFILL", "").strip().lower() or "auto"
    if name not in METHODS:
        raise ValueError(f"MOA_PREFILL / method must be one of {', '.join(METHODS)}, got {name!r}")
    if name == "banded" or not query.is_cuda or _FLEX_FAILED:
        return None
    if query.shape[2] < MIN_FLEX_LENGTH:
        return None
    if name == "auto":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401, PLC0415
        except ImportError:
            return None
        return "flex"
    return name


def head_index(kv_heads: list[int], group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device index tensors of ``kv_heads`` and of their query heads (GQA: kv head h owns
    query heads h * group .. h * group + group - 1). Shared constants: indexing with a
    Python list copies it to the device, a host sync per call."""
    q_heads = [h * group + g for h in kv_heads for g in range(group)]
    return device_tensor(kv_heads, torch.long, device), device_tensor(q_heads, torch.long, device)


def _sdpa_masked(q, k, v, mask, scale, softcap=None):
    """Masked SDPA off the cuDNN backend: cuDNN builds a plan per new shape (milliseconds
    each), and the memory-efficient kernel handles masks well."""
    if q.is_cuda and softcap is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return sdpa(q, k, v, mask=mask, scale=scale)
    return sdpa(q, k, v, mask=mask, scale=scale, softcap=softcap)


@dataclass(frozen=True)
class _Source:
    """Where a group of heads finds its keys: ``k`` / ``v`` (B, n_h, M, D) and ``slot``,
    the index in M of an absolute position (a fresh prompt: the position itself; a chunk
    after cached tokens: the head's cache slot, or the chunk's own entry)."""

    k: torch.Tensor
    v: torch.Tensor
    slot: object  # (positions: LongTensor) -> LongTensor


def _fresh_source(key, value, kv_idx, dtype) -> _Source:
    k = key.index_select(1, kv_idx).to(dtype)  # (B, n_h, L, D)
    v = value.index_select(1, kv_idx).to(dtype)
    return _Source(k, v, lambda p: p)


def _banded(query, key, value, pattern, heads, out, shared: _Band) -> None:
    """Window / elastic heads sharing ``pattern`` of a fresh prompt (see ``_banded_at``)."""
    kv_idx, _ = head_index(heads, shared.group, query.device)
    source = _fresh_source(key, value, kv_idx, query.dtype)
    _banded_at(query, source, 0, pattern, heads, out, shared)


def _banded_at(
    query, source: _Source, start: int, pattern, heads, out, shared: _Band, held: int = 0
) -> None:
    """Window / elastic heads sharing ``pattern``: query chunks over sink + band keys.

    query: (B, Hq, C, D), the tokens at positions start..start+C-1; ``source`` holds every
    key they may see. Every chunk reads a band of the same width (positions before the
    sink or before 0 are masked), so all full chunks share one shape and memory stays
    ~ chunk x (chunk + span), whatever the prompt length. With ``window`` every span is
    clamped to it and a sink key counts only for queries less than ``window`` positions
    after it (dense and SparQ heads, dense in prefill, are sink 0 / span n). ``held``: the
    first position past the sink the cache still holds (``Pattern.held_from``)."""
    batch, _, length, dim = query.shape
    group = shared.group
    scale, softcap = shared.logits.scale, shared.logits.softcap
    window, chunk = shared.window, shared.chunk
    dev = query.device
    total = start + length
    _, qi = head_index(heads, group, dev)
    n_h = len(heads)
    q_g = query.index_select(1, qi)  # (B, n_h * G, C, D)
    sink = min(pattern.sink, total)
    pos = start + torch.arange(length, device=dev)  # absolute positions of the queries
    seen = seen_length(pos, max(total, shared.reach))  # where each query's span is taken
    spans = torch.as_tensor(pattern.span_at(seen), device=dev)  # (C,) span of each query
    if window is not None:
        spans = spans.clamp(max=window)
    span_max = int(spans.max())
    chunk = max(16, min(chunk, length))
    width = min(total, -(-(chunk + span_max - 1) // 64) * 64)  # band keys per chunk
    sink_pos = torch.arange(sink, device=dev)
    sink_slots = source.slot(sink_pos)
    for c0 in range(0, length, chunk):
        c1 = min(length, c0 + chunk)
        band = start + c1 - width + torch.arange(width, device=dev)  # may start below 0
        idx = source.slot(band.clamp_min(0))
        q_pos = pos[c0:c1, None]
        in_band = (
            (band[None] >= max(sink, held))
            & (band[None] <= q_pos)
            & (q_pos - band[None] < spans[c0:c1, None])
        )
        if sink:
            sees_sink = sink_pos[None] <= q_pos
            if window is not None:
                sees_sink = sees_sink & (q_pos - sink_pos[None] < window)
            mask = torch.cat([sees_sink, in_band], 1)
        else:
            mask = in_band
        k = torch.cat([source.k.index_select(2, sink_slots), source.k.index_select(2, idx)], 2)
        v = torch.cat([source.v.index_select(2, sink_slots), source.v.index_select(2, idx)], 2)
        m = k.shape[2]
        if group > 1:
            k = k[:, :, None].expand(batch, n_h, group, m, dim).reshape(batch, n_h * group, m, dim)
            v = v[:, :, None].expand(batch, n_h, group, m, dim).reshape(batch, n_h * group, m, dim)
        out[:, qi, c0:c1] = _sdpa_masked(q_g[:, :, c0:c1], k, v, mask[None, None], scale, softcap)
