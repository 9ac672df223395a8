"""Prefill with FlexAttention: every head of a layer in one fused launch that visits, per
query block, only the key blocks its pattern can reach (sink blocks + band blocks).

Why: the banded path (``prefill._banded``) loops over query chunks and distinct patterns
with explicit (chunk x band) masks and no flash kernel; at 32k tokens that made a 25% plan
slower to prefill than dense. Here each layer gets a :class:`BlockMask` computed directly
from the heads' bounds (no L x L mask is ever formed, and no mask_mod is evaluated to build
it), cached per (layer patterns, length), and ``flex_attention`` (compiled on CUDA) runs a
flash kernel that skips blocks outside the mask and evaluates the exact rule only on the
edge blocks.

The rule, per KV head and query ``q``: key ``k <= q`` is seen when ``k >= band_lo[q]``
(``band_lo = q + 1 - span``, the span taken at the length the prompt reaches and clamped
to the layer's own ``window``) or when ``k < sink`` and, with a window, ``q - k < window``.
Dense and SparQ heads (SparQ is dense in prefill) are ``band_lo = 0``. Softcap is a
``score_mod``. Exact like the reference, up to summation order.

A prompt chunk at positions P .. P + C - 1 after cached tokens (``cached_prefill``) runs
its banded heads through ``flex_cached_prefill`` in one launch. Their keys come in the
order ``prefill.ChunkKeys`` lays out: per head its cached sink, its held ring entries
unrolled and the chunk's own keys, in ascending position, padded to one length M for all
heads (M = the largest capacity + C: the same for every full chunk of a prompt, so one
compiled shape). Positions grow with the key index, so the same rule holds in key-index
space with two per-head offsets: query i's own key is key i + ``key_offset`` (its sink
and held ring entries come first), and the window test of a sink key k reads
i + ``sink_offset`` - k. A band starts no earlier than the oldest position past the sink
that the cache still holds (``Pattern.held_from``). The BlockMask is built from those
bounds too, cached per (patterns, key layout, window, reach, group, device, block). Padded
prompts keep the existing paths.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moa_search.patterns import Pattern, seen_length
from moa_search.runtime.constants import device_tensor
from moa_search.runtime.prefill import ChunkKeys, chunk_keys, head_index
from moa_search.runtime.scores import Logits, sdpa

if TYPE_CHECKING:
    from moa_search.runtime.cache import MoALayerCache

#: query / key block of the BlockMask (FlexAttention's default sparse block)
BLOCK = 128
#: ``flex_attention`` kernel options accepted here: names both torch 2.11 (the benchmark
#: GPU) and 2.13 read in ``torch/_inductor/kernel/flex/flex_attention.py``
KERNEL_OPTIONS = frozenset(
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "ROWS_GUARANTEED_SAFE", "PRESCALE_QK"}
)


@dataclass(frozen=True)
class FlexSettings:
    """How the flex prefill runs: ``block``, the BlockMask's query / key block, and
    ``kernel_options`` handed to ``flex_attention`` as (name, value) pairs. Settable because
    the 32k prefill target needs a faster flex kernel than the defaults gave;
    ``benchmarks/prefill.py --sweep`` tries variants. The kernel's BLOCK_M / BLOCK_N must
    divide ``block`` (inductor refuses otherwise)."""

    block: int = BLOCK
    kernel_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.block <= 0 or self.block % 16:
            raise ValueError(f"flex block must be a positive multiple of 16, got {self.block}")
        options = dict(self.kernel_options)
        unknown = set(options) - KERNEL_OPTIONS
        if unknown:
            known = ", ".join(sorted(KERNEL_OPTIONS))
            raise ValueError(f"flex kernel options {sorted(unknown)}: known are {known}")
        for name in ("BLOCK_M", "BLOCK_N"):
            if name in options and self.block % int(options[name]):
                raise ValueError(f"{name}={options[name]} must divide the flex block {self.block}")


SETTINGS = FlexSettings()


def configure(settings: FlexSettings) -> FlexSettings:
    """Use ``settings`` from now on (returns the previous ones). Cached BlockMasks are
    dropped (they are built for one block size); a new kernel option recompiles flex."""
    global SETTINGS
    previous, SETTINGS = SETTINGS, settings
    MASKS.clear()
    return previous


#: bytes of BlockMask index tensors kept across calls (an entry per fresh (patterns, length)
#: and per chunk's (patterns, key layout));
#: a mask larger than this is built per call (~ms at 128k, small next to its attention)
CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class HeadBounds:
    """The rule per KV head in key-index space (see the module docstring).

    ``band_lo`` (Hkv, >= Lq) int32: the first band key of every query (rows padded to whole
    blocks); ``sink`` (Hkv,) int32: keys below it count while inside ``window`` (None: no
    window); ``keys``: the key count (None: the query count, a fresh prompt).
    ``key_offset`` (Hkv,) int32: query i's own key is key i + key_offset, its last one;
    ``sink_offset`` (Hkv,) int32: sink key k lies i + sink_offset - k positions before query
    i. None: 0 (a fresh prompt, key index = position), so its mask_mod reads no offsets."""

    band_lo: torch.Tensor
    sink: torch.Tensor
    window: int | None
    keys: int | None = None
    key_offset: torch.Tensor | None = None
    sink_offset: torch.Tensor | None = None


def head_bounds(
    patterns: list[Pattern],
    length: int,
    window: int | None,
    device: torch.device | str,
    block: int = BLOCK,
    reach: int | None = None,
) -> HeadBounds:
    """The bounds of a fresh prompt of ``length`` tokens whose spans are taken at ``reach``
    (None: ``length``; see ``patterns``): ``key_bounds`` with key index = position."""
    fresh = ChunkKeys.fresh(len(patterns), length)
    return key_bounds(patterns, fresh, window, device, block, max(length, reach or 0))


def key_bounds(
    patterns: list[Pattern],
    keys: ChunkKeys,
    window: int | None,
    device: torch.device | str,
    block: int = BLOCK,
    reach: int = 0,
) -> HeadBounds:
    """The bounds of the rule for queries at positions keys.start .. keys.start + keys.length
    - 1 over keys laid out as ``keys`` says (ascending positions per head). ``reach``: the
    length the prompt reaches (0: this chunk's end); spans are taken there, and a head no
    longer holds the positions past its sink below ``held_from(keys.start, reach)``.

    Why bounds: positions grow with the key index, so each position rule (band from
    ``q + 1 - span``, sinks below ``sink``) is one index threshold per (head, query)."""
    start, length = keys.start, keys.length
    end = start + length
    q = torch.arange(start, end, dtype=torch.long, device=device)
    seen = seen_length(q, max(end, reach))
    rows, sinks, in_run = [], [], []
    for i, p in enumerate(patterns):
        span = torch.as_tensor(p.span_at(seen), device=device) if p.static else q + 1
        if window is not None:
            span = span.clamp(max=window)
        first = (q + 1 - span).clamp_min(int(p.held_from(start, reach)))  # held_from >= 0
        rows.append(keys.index(i, first))
        sinks.append(keys.index(i, min(p.sink, end)) if p.static else 0)
        in_run.append(sinks[-1] > keys.sinks[i])  # sink keys past the cached sink entries
        if in_run[-1] and keys.sinks[i] and start != keys.cached(i):  # two index shifts
            raise ValueError(f"head {i}: sink {p.sink} straddles its cached sink entries")
    band_lo = torch.stack(rows).to(torch.int32)
    # Padded to whole blocks: the kernel may evaluate the mask on rows past the end.
    pad = -(-length // block) * block - length
    if pad:
        band_lo = torch.cat([band_lo, band_lo[:, -1:].expand(-1, pad)], 1)
    key_offset = sink_offset = None
    if start:  # after cached tokens; offsets as device ops or shared constants: no host sync
        cached = [keys.cached(i) for i in range(len(patterns))]
        key_offset = device_tensor(cached, torch.int32, device)
        # a cached sink entry sits at index = position; a sink key in the run (the chunk's
        # own, or a ring's under the layer window) is shifted as the chunk's keys are
        sink_offset = torch.where(device_tensor(in_run, torch.bool, device), key_offset, start)
    sink = device_tensor(sinks, torch.int32, device)
    return HeadBounds(band_lo, sink, window, keys.size, key_offset, sink_offset)


def mask_mod_for(bounds: HeadBounds, group: int):
    """FlexAttention ``mask_mod`` of the rule; ``h`` is the query head (GQA: h // group)."""
    band_lo, sink, window = bounds.band_lo, bounds.sink, bounds.window
    key_offset, sink_offset = bounds.key_offset, bounds.sink_offset

    def mask_mod(b, h, q_idx, kv_idx):
        kv = h // group
        band = kv_idx >= band_lo[kv, q_idx]
        sunk = kv_idx < sink[kv]
        if window is not None:
            back = q_idx - kv_idx if sink_offset is None else q_idx + sink_offset[kv] - kv_idx
            sunk = sunk & (back < window)
        last = q_idx if key_offset is None else q_idx + key_offset[kv]
        return (band | sunk) & (kv_idx <= last)

    return mask_mod


def softcap_mod(softcap: float):
    """``score_mod`` capping every logit as ``softcap * tanh(s / softcap)`` (Gemma 2)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def block_tables(
    bounds: HeadBounds, length: int, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(visit, full): (Hkv, QB, KB) bool per (query block, key block) for ``length`` queries.

    ``visit`` holds every block with a seen pair (a superset is safe: the kernel masks it);
    ``full`` only complete blocks whose every pair is seen (the kernel skips the mask
    there, so it must be exact). Built from per-block min / max of the bounds, O(QB x KB)."""
    band_lo, sink, window = bounds.band_lo, bounds.sink, bounds.window
    keys = bounds.keys or length
    dev = band_lo.device
    nb = -(-length // block)
    pad = nb * block - length
    lo = band_lo[:, :length].long()
    lo_min = F.pad(lo, (0, pad), value=keys).view(-1, nb, block).amin(-1)[:, :, None]
    lo_max = F.pad(lo, (0, pad), value=-1).view(-1, nb, block).amax(-1)[:, :, None]
    q_first, q_last, q_complete = _blocks(length, block, dev)
    k0, k1, k_complete = _blocks(keys, block, dev)
    q_first, q_last = q_first[None, :, None], q_last[None, :, None]
    k0, k1 = k0[None, None, :], k1[None, None, :]
    s = sink.long()[:, None, None]
    key_off = _per_head(bounds.key_offset)
    last_lo, last_hi = q_first + key_off, q_last + key_off  # each query's own (last) key
    band_any = (k0 <= last_hi) & (k1 >= lo_min)
    sink_any = (k0 < s) & (k0 <= last_hi)
    band_full = (k1 <= last_lo) & (k0 >= lo_max)
    sink_full = (k1 < s) & (k1 <= last_lo)
    if window is not None:
        sink_off = _per_head(bounds.sink_offset)
        sink_any = sink_any & (torch.minimum(k1, s - 1) > q_first + sink_off - window)
        sink_full = sink_full & (q_last + sink_off - k0 < window)
    visit = band_any | sink_any
    full = (band_full | sink_full) & q_complete[None, :, None] & k_complete[None, None, :]
    return visit, full


def _blocks(count: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first, last, complete) index of each block of ``count`` indices."""
    first = torch.arange(-(-count // block), device=device) * block
    last = (first + block).clamp(max=count) - 1
    return first, last, (last - first + 1) == block


def _per_head(offset: torch.Tensor | None) -> torch.Tensor | int:
    """An (Hkv,) offset as (Hkv, 1, 1) against the block tables; None: 0."""
    return 0 if offset is None else offset.long()[:, None, None]


def _ordered(mask: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of a (Hkv, QB, KB) bool block mask in BlockMask layout, one row of
    heads per query head: (1, Hq, QB) int32 and (1, Hq, QB, KB) int32, set blocks first in
    ascending order (what the kernel reads; the rest of a row is never read)."""
    count = mask.sum(-1, dtype=torch.int32)
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
    count = count.repeat_interleave(group, dim=0)[None]
    return count, order.to(torch.int32).repeat_interleave(group, dim=0)[None].contiguous()


_FROM_KV = None


def build_block_mask(bounds: HeadBounds, length: int, group: int, block: int = BLOCK):
    """The layer's BlockMask for ``length`` queries (query heads = KV heads x ``group``) with
    the exact mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask  # noqa: PLC0415

    global _FROM_KV
    if _FROM_KV is None:
        _FROM_KV = set(inspect.signature(BlockMask.from_kv_blocks).parameters)
    visit, full = block_tables(bounds, length, block)
    keys = bounds.keys or length
    partial = visit & ~full
    kv_num, kv_idx = _ordered(partial, group)
    full_num, full_idx = _ordered(full, group)
    extra = {}
    if "seq_lengths" in _FROM_KV:
        extra["seq_lengths"] = (length, keys)
    if "compute_q_blocks" in _FROM_KV:
        extra["compute_q_blocks"] = False  # forward only: no backward index
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(block, block),
        mask_mod=mask_mod_for(bounds, group), **extra,
    )  # fmt: skip


class _MaskCache:
    """LRU of BlockMasks by what builds them (a fresh prompt: patterns, window, length,
    reach, group, device, block; a chunk: ``chunk_mask``'s key), bounded in bytes."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit = limit
        self.entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, patterns, length, window, group, device, block: int = BLOCK, reach=None):
        """The BlockMask of a fresh prompt of ``length`` tokens."""
        reach = max(length, reach or 0)
        key = (tuple(patterns), window, length, reach, group, str(device), block)  # hashable
        return self.lookup(key, lambda: build_block_mask(
            head_bounds(patterns, length, window, device, block, reach), length, group, block
        ))  # fmt: skip

    def lookup(self, key: tuple, build):
        """The mask cached under ``key``, else ``build()``'s, kept if it fits."""
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit[0]
        mask = build()
        size = _mask_bytes(mask)
        if size <= self.limit:
            with self.lock:
                self.entries[key] = (mask, size)
                self.bytes += size
                while self.bytes > self.limit:
                    _, (_, old) = self.entries.popitem(last=False)
                    self.bytes -= old
        return mask

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0


def _mask_bytes(mask) -> int:
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    tensors = [getattr(mask, n, None) for n in names]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


MASKS = _MaskCache()


@functools.cache
def compiled_flex(dynamic: bool | None = None):
    """``flex_attention`` under torch.compile. ``dynamic=None`` (torch's default): the first
    shape compiles static, the first change of length or head count recompiles with those
    sizes symbolic, and every later one reuses it (so an eval over many lengths stays under
    dynamo's recompile limit). ``False``: one static compile per shape (the benchmark's
    ``flex-static``, to show what the symbolic sizes cost)."""
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    return torch.compile(flex_attention, fullgraph=True, dynamic=dynamic)


def _flex(q, k, v, block_mask, logits: Logits, compiled: bool | str) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    fn = (compiled_flex(False if compiled == "static" else None) if compiled
          else flex_attention)  # fmt: skip
    score_mod = softcap_mod(logits.softcap) if logits.softcap else None
    group = q.shape[1] // k.shape[1]
    extra = {"kernel_options": dict(SETTINGS.kernel_options)} if SETTINGS.kernel_options else {}
    with recompile_room():
        return fn(
            q, k.to(q.dtype), v.to(q.dtype), score_mod=score_mod, block_mask=block_mask,
            scale=logits.scale, enable_gqa=group > 1, **extra,
        )  # fmt: skip


#: compiled variants flex may keep: fresh and chunk masks, layer window and softcap on or
#: off, and each batch size, head count and length that first changes (later ones reuse a
#: symbolic compile). Dynamo's default of 8 was hit on an H200 by one benchmark process
#: that prefilled 1 x 128k and then 8 x 64k in chunks, and every later chunk fell back
#: to the banded path.
RECOMPILE_LIMIT = 64


def recompile_room():
    """Dynamo's recompile limit raised to ``RECOMPILE_LIMIT`` (never lowered) while flex
    runs; a config patch, so the user's own setting is back afterwards."""
    import torch._dynamo.config as dynamo_config  # noqa: PLC0415

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(getattr(dynamo_config, name), RECOMPILE_LIMIT)})


def flex_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: list[Pattern],
    logits: Logits,
    out: torch.Tensor | None,
    window: int | None = None,
    *,
    full_heads: list[int] | None = None,
    compiled: bool | str | None = None,
    reach: int | None = None,
) -> torch.Tensor:
    """Attention of a prompt at positions 0..L-1 (no padding, nothing cached) into ``out``.

    query: (B, Hq, L, D); key / value: (B, Hkv, L, D); patterns: one per KV head.
    ``full_heads``: KV heads that see every earlier key; given, they run in one causal SDPA
    (the fused flash path) and the others in one flex launch ("split"); None: every head
    in the one flex launch. ``compiled``: torch.compile the flex kernel (``compiled_flex``;
    "static": one compile per shape; default: on CUDA; eager flex materialises the
    scores, fine for tests only). ``reach``: the length the prompt reaches, where every
    span is taken (None: L). Returns ``out``; with ``out=None`` and one launch for every
    head, that launch's own output (no copy).
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    if compiled is None:
        compiled = query.is_cuda
    sparse = list(range(kv_heads))
    if out is None and full_heads:
        out = torch.empty_like(query)
    if full_heads:
        dense = set(full_heads)
        sparse = [h for h in sparse if h not in dense]
        kv_idx, q_idx = head_index(full_heads, group, query.device)
        out.index_copy_(1, q_idx, sdpa(
            query.index_select(1, q_idx), key.index_select(1, kv_idx).to(query.dtype),
            value.index_select(1, kv_idx).to(query.dtype), is_causal=True, scale=logits.scale,
            enable_gqa=group > 1, softcap=logits.softcap,
        ))  # fmt: skip
    if not sparse:
        return out
    picked = [patterns[h] for h in sparse]
    mask = MASKS.get(picked, length, window, group, query.device, SETTINGS.block, reach)
    if len(sparse) == kv_heads:
        y = _flex(query, key, value, mask, logits, compiled)
        if out is None:
            return y
        out.copy_(y)
    else:
        kv_idx, q_idx = head_index(sparse, group, query.device)
        out.index_copy_(1, q_idx, _flex(
            query.index_select(1, q_idx), key.index_select(1, kv_idx),
            value.index_select(1, kv_idx), mask, logits, compiled,
        ))  # fmt: skip
    return out


def chunk_mask(
    patterns: list[Pattern],
    keys: ChunkKeys,
    window: int | None,
    group: int,
    device: torch.device | str,
    reach: int = 0,
):
    """The BlockMask of a chunk's queries over keys laid out as ``keys`` says (``key_bounds``),
    cached: the layers of one plan that share their banded patterns share it, and the same
    prompt length fed in the same chunks meets it again."""
    block = SETTINGS.block
    key = ("chunk", tuple(patterns), keys, window, reach, group, str(device), block)
    return MASKS.lookup(key, lambda: build_block_mask(
        key_bounds(patterns, keys, window, device, block, reach), keys.length, group, block
    ))  # fmt: skip


def flex_cached_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: list[Pattern],
    layer: MoALayerCache,
    heads: list[int],
    logits: Logits,
    out: torch.Tensor,
    window: int | None = None,
    *,
    compiled: bool | str | None = None,
) -> torch.Tensor:
    """Attention of KV heads ``heads`` (and their query heads) for a prompt chunk after the
    tokens ``layer`` holds, in one flex launch, into ``out``; the chunk is not stored.

    query: (B, Hq, C, D); key / value: (B, Hkv, C, D); patterns: one per KV head of the
    layer. Every head's keys (``chunk_keys``: sink, held ring entries, chunk, in position
    order) are padded to one length M = the largest capacity among ``heads`` + C, so every
    full chunk of a prompt has the same shapes (one compile) and one BlockMask layout.
    ``compiled`` as in ``flex_prefill``."""
    group = query.shape[1] // key.shape[1]
    if compiled is None:
        compiled = query.is_cuda
    keys, k, v = chunk_keys(layer, key, value, heads, layer.processed, query.dtype)
    mask = chunk_mask([patterns[h] for h in heads], keys, window, group, query.device,
                      layer.reach)  # fmt: skip
    if len(heads) == key.shape[1]:
        out.copy_(_flex(query, k, v, mask, logits, compiled))
        return out
    _, q_idx = head_index(heads, group, query.device)
    out.index_copy_(1, q_idx, _flex(query.index_select(1, q_idx), k, v, mask, logits, compiled))
    return out
