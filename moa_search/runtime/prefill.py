"""Fast prefill, of a fresh cache (``fresh_prefill``) or of a prompt chunk after cached
tokens (``cached_prefill``): dense-like heads in one causal SDPA call, window / elastic
heads over only the keys their pattern can reach.

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
where banded ran at 0.57x (``benchmarks/prefill.py``). Padded prompts never come here
(attention.py's per-head path).

A prompt fed in chunks (``DecodeLoop.prefill(chunk=)``, or a model called chunk by chunk
with a ``MoACache``) takes ``fresh_prefill`` for its first chunk and ``cached_prefill``
for every later one: the heads that see every key attend to their contiguous cache slice
(bottom-right causal SDPA); the banded heads read their sink, the ring entries they still
hold and the chunk's own keys, put in position order (``ChunkKeys``, gathered before the
chunk is stored). Those heads run in one FlexAttention launch when ``_flex_method`` picks
flex for the chunk (the same rule as above: CUDA, at least ``MIN_FLEX_LENGTH`` queries,
``MOA_PREFILL``; ``flex_prefill.flex_cached_prefill``), else in the banded query chunks of
``_banded_at``. A failure there warns once and turns only the chunk flex path off.

Exact: same keys and softmax as the reference, up to floating-point summation order.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moa_search.patterns import Dense, Pattern, seen_length
from moa_search.runtime.constants import device_tensor
from moa_search.runtime.scores import Logits, sdpa

if TYPE_CHECKING:
    from moa_search.runtime.cache import HeadLayout, MoALayerCache

DEFAULT_CHUNK = 2048
#: ``MOA_PREFILL`` values: the chunked banded path, FlexAttention for every head of a layer,
#: FlexAttention for the banded heads with SDPA for the full ones, or flex where it runs
METHODS = ("banded", "flex", "flex-split", "auto")
#: shortest prompt the flex methods take (see ``_flex_method``)
MIN_FLEX_LENGTH = 1024
#: layer prefills per path taken (fresh prompts: "sdpa", "banded", "flex", "flex-split";
#: chunks after cached tokens: "chunk", the banded path, and "chunk-flex"; "flex-failed" /
#: "chunk-flex-failed" when flex raised): lets benchmarks and users check what really ran
PATH_COUNTS: Counter[str] = Counter()
_FLEX_FAILED: list[str] = []  # the first error of the fresh flex path; later calls skip it
_CHUNK_FLEX_FAILED: list[str] = []  # the same for chunks after cached tokens
#: let the flex paths run on CPU too (eager flex, which forms every score: for tests of
#: small shapes; the CPU default is the banded path)
FLEX_ON_CPU = False


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

        split = flex == "flex-split" and full
        run = functools.partial(flex_prefill, query, key, value, patterns, logits, out, window,
                                full_heads=full if split else None, reach=reach)  # fmt: skip
        result = _flexed(run, _FLEX_FAILED, "flex")
        if result is not None:
            PATH_COUNTS[flex] += 1
            return result
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
    method: str | None = None,
) -> torch.Tensor:
    """Attention of a prompt chunk at positions P..P+C-1 after the P tokens ``layer`` holds
    (a :class:`~moa_search.runtime.cache.MoALayerCache`, ``contiguous``; the chunk has no
    padding), then the chunk stored. query: (B, Hq, C, D); key / value: (B, Hkv, C, D);
    method: as in ``fresh_prefill`` ("flex" and "flex-split" both put the banded heads in
    one flex launch; the full heads always take the causal call below).

    Why: the per-head path masks every head over all its keys (a C x P mask and logits per
    head: gigabytes at P = 120k). Here banded heads read only the sink + band entries of
    their cache (before the chunk may overwrite their ring): all in one FlexAttention launch
    (``flex_prefill.flex_cached_prefill``) where ``_flex_method`` picks it, else by query
    chunks per pattern (``_banded_at``). Then the chunk is stored, and the heads that see
    every key (dense; SparQ, dense in prefill) attend to their contiguous cache slice with
    a bottom-right causal mask (a flash kernel on CUDA, no mask built). Memory: ~ chunk x
    (chunk + span) per banded group, C x P never."""
    batch, q_heads, length, _ = query.shape
    group = q_heads // key.shape[1]
    start = layer.processed
    total = start + length
    reach = max(total, layer.reach)  # a chunk of a longer prompt: the prompt's spans
    layer._ensure_capacity(reach, key)  # the final layout, before any slot is read
    layout = layer.layout
    full, sparse = chunk_heads(patterns, layer, length, window)
    flexed = False
    if sparse and _flex_method(method, query, _CHUNK_FLEX_FAILED) is not None:
        from moa_search.runtime.flex_prefill import flex_cached_prefill  # noqa: PLC0415

        banded = [h for h in range(len(patterns)) if h not in full]
        run = functools.partial(flex_cached_prefill, query, key, value, patterns, layer,
                                banded, logits, out, window)  # fmt: skip
        flexed = _flexed(run, _CHUNK_FLEX_FAILED, "chunk-flex") is not None
    if not flexed:
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
    PATH_COUNTS["chunk-flex" if flexed else "chunk"] += 1
    return out


def chunk_heads(
    patterns: list[Pattern], layer: MoALayerCache, length: int, window: int | None
) -> tuple[list[int], dict[Pattern, list[int]]]:
    """(full, banded) KV heads for a chunk of ``length`` tokens after what ``layer`` holds
    (its final layout made): full heads see every key and hold them at slot = offset +
    position; the others, grouped by pattern (equal patterns share a group), do not."""
    start, layout = layer.processed, layer.layout
    total = start + length
    reach = max(total, layer.reach)
    full: list[int] = []
    sparse: dict[Pattern, list[int]] = {}
    for h, p in enumerate(patterns):
        whole = layout.sinks[h] == 0 and layout.rings[h] >= total
        if whole and covers_all(p, total, window, reach) and p.held_from(start, layer.reach) == 0:
            full.append(h)
        else:
            sparse.setdefault(p, []).append(h)
    return full, sparse


@dataclass(frozen=True)
class ChunkKeys:
    """Where some KV heads find the keys that ``length`` queries at positions start ..
    start + length - 1 may see, in ascending position order. Head i's first ``sinks[i]``
    keys are its cached sink (positions 0 .. sinks[i] - 1), the next ``rings[i]`` the ring
    entries it holds, unrolled (positions start - rings[i] .. start - 1), then the chunk's
    own keys; padding fills every head to ``size`` keys.

    Why this order: positions grow with the key index, so what a query sees (its sink and
    its recent band) is one prefix and one interval of indices per head, which a BlockMask
    describes from bounds, whatever slot a ring put each position in."""

    start: int
    length: int
    sinks: tuple[int, ...]
    rings: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, layout: HeadLayout, heads: list[int], start: int, length: int) -> ChunkKeys:
        """``heads`` of a cache ``layout`` holding positions 0 .. start - 1. ``size``, the
        largest capacity among them + ``length``, is the same for every chunk of a prompt
        of one chunk size (``MoALayerCache`` lays out the whole prompt from its first chunk)."""
        sinks = tuple(min(layout.sinks[h], start) for h in heads)
        rings = tuple(min(layout.rings[h], max(0, start - layout.sinks[h])) for h in heads)
        size = max(layout.capacity(h) for h in heads) + length
        return cls(start, length, sinks, rings, size)

    @classmethod
    def fresh(cls, heads: int, length: int) -> ChunkKeys:
        """A prompt at positions 0 .. length - 1 with nothing cached: index = position."""
        return cls(0, length, (0,) * heads, (0,) * heads, length)

    def cached(self, i: int) -> int:
        """Cached keys of head ``i``: query t of the chunk is its key cached(i) + t."""
        return self.sinks[i] + self.rings[i]

    def index(self, i: int, positions: int | torch.Tensor) -> int | torch.Tensor:
        """Head ``i``'s index of the first key at or after each position (an int or a
        tensor, >= 0): exact for the positions it holds."""
        sink, shift = self.sinks[i], self.start - self.cached(i)
        if torch.is_tensor(positions):
            return torch.where(positions <= sink, positions, (positions - shift).clamp_min(sink))
        return positions if positions <= sink else max(sink, positions - shift)


def chunk_keys(
    layer: MoALayerCache,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: list[int],
    start: int,
    dtype: torch.dtype,
) -> tuple[ChunkKeys, torch.Tensor, torch.Tensor]:
    """(layout, K, V) of ``heads`` for the chunk ``key`` / ``value`` (B, Hkv, C, D) after
    ``start`` cached tokens: K and V (B, n_heads, size, D) in ``dtype``, laid out as
    :class:`ChunkKeys` says. A copy, gathered before the chunk is stored (it may overwrite a
    ring); one gather from the cache and one copy of the chunk, no host sync."""
    layout, dev = layer.layout, key.device
    keys = ChunkKeys.of(layout, heads, start, key.shape[2])

    def column(values) -> torch.Tensor:  # (n_heads, 1) per-head constants
        return device_tensor(values, torch.long, dev)[:, None]

    offset = column([layout.offsets[h] for h in heads])
    sink = column([layout.sinks[h] for h in heads])
    ring = column([max(layout.rings[h], 1) for h in heads])
    first = column(keys.sinks)
    cached = column([keys.cached(i) for i in range(len(heads))])
    j = torch.arange(keys.size, device=dev)[None]
    run = j + (start - cached)  # the position of a key past the cached sink
    slots = offset + torch.where(j < first, j, sink + torch.remainder(run - sink, ring))
    n, length = len(heads), keys.length
    chunk_at = torch.arange(n, device=dev)[:, None] * keys.size + cached  # (n, 1)
    dst = (chunk_at + torch.arange(length, device=dev)).flatten()
    kv_idx, _ = head_index(heads, 1, dev)

    def assemble(store: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        batch, _, dim = store.shape
        got = store.index_select(1, slots.flatten()).to(dtype)  # chunk and padding: any slot
        got.index_copy_(1, dst, new.index_select(1, kv_idx).to(dtype).reshape(batch, -1, dim))
        return got.view(batch, n, keys.size, dim)

    return keys, assemble(layer.keys, key), assemble(layer.values, value)


def _cached_source(layer, key, value, heads: list[int], start: int, dtype) -> _Source:
    """Keys of ``heads`` (one pattern, so one sink / ring size) for a chunk after ``start``
    cached tokens, as ``chunk_keys`` lays them out."""
    keys, k, v = chunk_keys(layer, key, value, heads, start, dtype)
    return _Source(k, v, functools.partial(keys.index, 0))  # every head: one geometry


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


def _flex_method(
    method: str | None, query: torch.Tensor, failed: list[str] | None = None
) -> str | None:
    """ "flex" / "flex-split" when that path should run for ``query``, else None. Prompts
    under ``MIN_FLEX_LENGTH`` stay banded: one chunk per pattern is cheap there, and short
    queries would take flex's separate decoding kernel (one more compile, less tested).
    ``failed``: the flex path's errors so far (None: the fresh prompt's); any turns it off."""
    name = method or os.environ.get("MOA_PREFILL", "").strip().lower() or "auto"
    if name not in METHODS:
        raise ValueError(f"MOA_PREFILL / method must be one of {', '.join(METHODS)}, got {name!r}")
    failed = _FLEX_FAILED if failed is None else failed
    if name == "banded" or not (query.is_cuda or FLEX_ON_CPU) or failed:
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


def _flexed(run, failed: list[str], path: str) -> torch.Tensor | None:
    """Run a flex path and return its attention; None when it raised (not out of memory:
    the prompt's own size, no reason to switch flex off), after recording the error in
    ``failed`` (later calls then skip that path), counting ``{path}-failed`` and warning
    once. The caller then takes the banded path, which overwrites whatever flex wrote."""
    try:
        return run()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # compile / kernel trouble: the banded path still works
        PATH_COUNTS[f"{path}-failed"] += 1
        failed.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            f"FlexAttention prefill ({path}) failed, using the banded path from now on: "
            f"{failed[0][:300]}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


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
