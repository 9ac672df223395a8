"""Per-head KV cache: every KV head of a layer stores only what its pattern needs.

One packed K buffer and one V buffer per layer, shape (batch, total_slots, head_dim).
KV head h owns slots [offset_h, offset_h + sink_h + ring_h). Position p of a sequence lives
at slot offset_h + p when p < sink_h, else offset_h + sink_h + (p - sink_h) % ring_h. Dense
and SparQ heads are sink=0 with a ring as long as the cache. The Triton decode kernels read
this layout directly (no copies per step).

Sequences of a batch may hold different numbers of real tokens (left padding is dropped at
prefill), so lengths are per sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moa_search.patterns import SPARQ_SIDE_DTYPE, Pattern, SparQ, sparq_side_keys
from moa_search.plan import Plan
from moa_search.runtime.constants import device_tensor


@dataclass(frozen=True)
class HeadLayout:
    """Slot geometry of one layer's KV heads for caches that can reach ``max_len`` tokens."""

    max_len: int
    offsets: tuple[int, ...]
    sinks: tuple[int, ...]
    rings: tuple[int, ...]

    @classmethod
    def build(cls, patterns: list[Pattern], max_len: int, window: int | None = None) -> HeadLayout:
        """``window``: the model layer's own sliding window. No query then sees a key
        ``window`` or more positions back, so a head keeps at most ``window`` entries: a
        ring of ``window`` slots (its sinks, when still visible, are in it) unless its own
        sink + ring is already smaller."""
        offsets, sinks, rings = [], [], []
        total = 0
        for p in patterns:
            sink = p.sink_slots(max_len)
            ring = p.ring_size(max_len)
            if window is not None and sink + ring > min(window, max_len):
                sink, ring = 0, min(window, max_len)
            offsets.append(total)
            sinks.append(sink)
            rings.append(ring)
            total += sink + ring
        return cls(max_len, tuple(offsets), tuple(sinks), tuple(rings))

    @property
    def total_slots(self) -> int:
        return self.offsets[-1] + self.sinks[-1] + self.rings[-1] if self.offsets else 0

    def capacity(self, head: int) -> int:
        return self.sinks[head] + self.rings[head]


@dataclass(frozen=True)
class CacheRead:
    """What attention reads from a patterned layer: the entries ``layer`` holds plus the
    chunk (``key``, ``value``: (B, Hkv, L, D)) joining them.

    ``MoALayerCache.update`` returns it in place of transformers' (keys, values) tensors
    (every supported family hands them straight to the attention function), so attention
    finds its cache in its inputs, as gpt-fast's ``KVCache.update`` hands back what
    attention reads. The chunk is written after attending (``MoALayerCache.append``): a
    ring must not overwrite old entries that the chunk's own queries still see."""

    layer: MoALayerCache
    key: torch.Tensor
    value: torch.Tensor


class MoALayerCache(CacheLayerMixin):
    """One layer's per-head cache. ``update`` returns a :class:`CacheRead`; the attention
    function attends to it and then appends the chunk (see attention.py)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        patterns: list[Pattern],
        max_cache_len: int | None = None,
        window: int | None = None,
    ):
        super().__init__()
        self.patterns = list(patterns)
        self.max_cache_len = max_cache_len
        self.window = window  # the model layer's own sliding window (None: full attention)
        self.layout: HeadLayout | None = None
        self.lengths: torch.Tensor | None = None  # (B,) real tokens held per sequence
        self.processed = 0  # tokens seen including padding: transformers' notion of length
        #: every sequence holds exactly ``processed`` tokens at positions 0..processed-1 (no
        #: padding so far): a host flag, so a prompt chunk can take the fast path unsynced
        self.contiguous = True
        #: the length the prompt being prefilled reaches when it comes in several chunks
        #: (``MoACache.prompt``; 0: each forward reaches its own end), so a chunked prompt
        #: takes every span where the prompt in one piece would (``patterns``)
        self.reach = 0
        self.sparq_heads = [h for h, p in enumerate(self.patterns) if isinstance(p, SparQ)]
        self.v_sum: torch.Tensor | None = None  # (B, n_sparq, D) fp32 running sum of V
        # (B, n_sparq, D, ring) fp8 keys of the SparQ heads, transposed (``_side_order``)
        self.sparq_kt: torch.Tensor | None = None
        self._geom: dict = {}
        self._sparq_index: torch.Tensor | None = None
        self._static_ids: torch.Tensor | None = None
        self._sparq_groups: list[tuple[SparQ, torch.Tensor, torch.Tensor]] | None = None

    # --- transformers' Cache protocol ---------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch = key_states.shape[0]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[CacheRead, CacheRead]:
        """Both halves are the same :class:`CacheRead` (the pair keeps Cache's signature)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        read = CacheRead(self, key_states, value_states)
        return read, read

    def get_seq_length(self) -> int:
        return self.processed

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.processed + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.lengths is not None:
            self.lengths.zero_()
        if self.v_sum is not None:
            self.v_sum.zero_()
        self.processed = 0
        self.contiguous = True
        self.reach = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is None:
            return
        idx = beam_idx.to(self.keys.device)
        self.keys = self.keys.index_select(0, idx)
        self.values = self.values.index_select(0, idx)
        self.lengths = self.lengths.index_select(0, idx)
        if self.v_sum is not None:
            self.v_sum = self.v_sum.index_select(0, idx)
        if self.sparq_kt is not None:  # fp8 has no index kernels everywhere: move bytes
            kt = self.sparq_kt.view(torch.uint8).index_select(0, idx)
            self.sparq_kt = kt.view(self.sparq_kt.dtype)

    # --- storage ------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    def nbytes(self) -> int:
        """Bytes this layer's cache allocates: K and V, plus its SparQ heads' running V sums
        and transposed-K side buffer (what ``Plan.kv_bytes`` predicts)."""
        if self.keys is None:
            return 0
        side = sum(t.numel() * t.element_size() for t in (self.v_sum, self.sparq_kt)
                   if t is not None)  # fmt: skip
        return self.keys.numel() * self.keys.element_size() * 2 + side

    def slot_positions(self, head: int) -> torch.Tensor:
        """(B, cap) position stored in each slot of ``head``; -1 where the slot is empty."""
        layout = self.layout
        sink, ring = layout.sinks[head], layout.rings[head]
        local = torch.arange(sink + ring, device=self.device)
        return _stored_positions(local, sink, ring, self.lengths)

    def held_from(self, head: int) -> torch.Tensor:
        """(B,) first position past the sink that ``head`` still holds for a later forward
        (``Pattern.held_from`` at each sequence's length and the chunked prompt's reach)."""
        return self.patterns[head].held_from(self.lengths, self.reach)

    def gather(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys (B, cap, D), values (B, cap, D) and positions (B, cap) of ``head``."""
        if self.keys is None:
            batch = self.lengths.shape[0]
            empty = torch.empty(batch, 0, 0, dtype=self.dtype, device=self.device)
            return empty, empty, torch.empty(batch, 0, dtype=torch.long, device=self.device)
        start = self.layout.offsets[head]
        stop = start + self.layout.capacity(head)
        return self.keys[:, start:stop], self.values[:, start:stop], self.slot_positions(head)

    def append(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        *,
        fresh: bool = False,
        unpadded: bool = False,
    ):
        """Store new tokens. key/value: (B, Hkv, L, D); positions: (B, L), -1 for padding.

        ``fresh``: the caller vouches that the cache is :attr:`contiguous` and the chunk
        continues it unpadded (positions processed..processed+L-1 in every row: a prompt's
        prefill, in one piece or in chunks): each slot then gathers the one token it keeps,
        with no host synchronisation and no index lists. ``unpadded``: the chunk has no
        padding (so a contiguous cache stays contiguous).
        Decode steps (L == 1) make no host synchronisation, so they can be CUDA-graph captured.
        """
        real = positions >= 0
        new_lengths = self.lengths + real.sum(1)  # before the write: alive-ness needs the end
        # processed + L bounds every sequence's length without reading device memory.
        # A chunked prompt keeps, from its first chunk on, what the whole prompt will need.
        self._ensure_capacity(max(self.processed + key_states.shape[2], self.reach), key_states)
        if fresh:
            self._write_fresh(key_states, value_states, self.processed)
        else:
            self._write(
                self.keys, self.values, self._geom, key_states, value_states, positions,
                new_lengths,
            )  # fmt: skip
        if self.sparq_heads:
            v = value_states.index_select(1, self._sparq_index).float() * real[:, None, :, None]
            self.v_sum += v.sum(2)
            self._write_side(key_states, positions)
        self.lengths.copy_(new_lengths)  # in place: a captured CUDA graph keeps advancing it
        self.processed += key_states.shape[2]
        self.contiguous = fresh or (self.contiguous and unpadded)

    def append_decode(
        self,
        append_kernel: Callable[..., None],
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        side_kernel: Callable[..., None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Store one decode token per sequence with ``append_kernel`` (the fused
        ``decode_append`` of ``moa_search.kernels``) and return :meth:`decode_metadata` at
        the new lengths, written by the same launch into buffers kept for the layout.

        key/value: (B, Hkv, 1, D); positions: (B, 1), -1 for padding, or None (no padding:
        every sequence's new token sits at its length). Same cache contents as
        :meth:`append`, in one launch instead of a few dozen small kernels; no host sync.
        ``side_kernel``: ``moa_search.kernels.sparq_side_append``, which stores the SparQ
        heads' side-buffer keys in one more launch (torch ops without it).
        """
        self._ensure_capacity(self.processed + 1, key_states)
        pos = positions[:, 0] if positions is not None else None
        self.contiguous = self.contiguous and pos is None
        if self.sparq_heads:
            v = value_states[:, :, 0].index_select(1, self._sparq_index).float()
            self.v_sum += v if pos is None else v * (pos >= 0)[:, None, None]
            side_pos = pos if pos is not None else self.lengths  # before the append advances
            if side_kernel is None:
                self._write_side(key_states, side_pos[:, None])
            else:
                side_kernel(self.sparq_kt, key_states[:, :, 0], self._geom["side_heads"],
                            side_pos, self._geom["side_ring"])  # fmt: skip
        geom = self._geom
        ints, meta = geom["int32"], geom["meta"]
        affine = geom.get("span_affine")
        append_kernel(
            key_states[:, :, 0], value_states[:, :, 0], self.keys, self.values, self.lengths,
            ints["head_offset"], ints["head_sink"], ints["head_ring"], meta["seq_len"],
            positions=pos, span_affine=None if affine is None else tuple(affine[:, 0]),
            span_out=meta["span"],
        )  # fmt: skip
        self.processed += 1
        if affine is None:
            return self.decode_metadata()
        return {**ints, **meta}

    def _write_fresh(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int = 0) -> None:
        """Write L tokens at positions start..start+L-1 after ``start`` contiguous ones:
        every slot whose position at length start + L is new takes that token
        (``_stored_positions``), the others keep theirs; one gather per tensor.

        Why: the general ``_write`` lists the surviving (row, head, token) triples with
        ``nonzero`` (a host sync per layer) and scatters through them; on a prefill this
        is the cache's whole cost and the triples are known in closed form."""
        batch, heads, length, dim = k_new.shape
        slot_head, local, sink, ring = _slot_geometry(self._geom, self.layout.total_slots)
        pos = _stored_positions(local, sink, ring, start + length) - start
        keep = (pos >= 0)[None, :, None]
        index = (slot_head * length + pos.clamp(min=0))[None, :, None]
        index = index.expand(batch, -1, dim)
        for store, new in ((self.keys, k_new), (self.values, v_new)):
            flat = new.reshape(batch, heads * length, dim)
            if start == 0 and flat.dtype == store.dtype:
                # Nothing to keep: a slot without a token yet takes a copy of some token
                # (never read: every reader masks slots by their held position), so the
                # gather writes the store in one pass
                torch.gather(flat, 1, index, out=store)
            else:
                store.copy_(torch.where(keep, flat.gather(1, index).to(store.dtype), store))

    @staticmethod
    def _write(keys, values, geom, k_new, v_new, positions, end_lengths) -> None:
        """Scatter new entries to their slots; only entries still alive at the end are written,
        so a chunk longer than a ring never writes one slot twice."""
        batch, heads, length, _ = k_new.shape
        offs, sinks, rings = geom["offsets"], geom["sinks"], geom["rings"]
        p = positions[:, None, :].expand(batch, heads, length)
        slot = offs + torch.where(p < sinks, p, sinks + torch.remainder(p - sinks, rings))
        if length == 1:  # decode: one slot per (b, h); padding rewrites the old value
            b_idx = torch.arange(batch, device=keys.device)[:, None].expand(batch, heads)
            s_idx = slot[:, :, 0]
            real = (p[:, :, 0] >= 0)[..., None]
            keys[b_idx, s_idx] = torch.where(
                real, k_new[:, :, 0].to(keys.dtype), keys[b_idx, s_idx]
            )
            values[b_idx, s_idx] = torch.where(
                real, v_new[:, :, 0].to(values.dtype), values[b_idx, s_idx]
            )
            return
        end = end_lengths[:, None, None]
        alive = (p >= 0) & ((p < sinks) | (p >= end - rings))
        b_idx, h_idx, l_idx = alive.nonzero(as_tuple=True)
        s_idx = slot[b_idx, h_idx, l_idx]
        keys[b_idx, s_idx] = k_new[b_idx, h_idx, l_idx].to(keys.dtype)
        values[b_idx, s_idx] = v_new[b_idx, h_idx, l_idx].to(values.dtype)

    def _ensure_capacity(self, needed: int, like: torch.Tensor) -> None:
        if self.layout is not None and needed <= self.layout.max_len:
            return
        batch, _, _, dim = like.shape
        if self.layout is None:
            max_len = max(needed, self.max_cache_len or 0)
        else:
            old = self.layout.max_len
            max_len = max(needed, old + max(256, old // 4))
        layout = HeadLayout.build(self.patterns, max_len, self.window)
        geom = _geometry(layout, self.device)
        geom["span_affine"] = _span_affine(self.patterns, self.device)
        geom["meta"] = {  # what append_decode writes each step; kept, so graphs stay valid
            "span": torch.zeros(batch, self.num_heads, dtype=torch.int32, device=self.device),
            "seq_len": torch.zeros(batch, dtype=torch.int32, device=self.device),
        }
        keys = torch.zeros(batch, layout.total_slots, dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        if self.layout is not None:  # move live entries into the larger layout
            for h in range(self.num_heads):
                k, v, pos = self.gather(h)
                one = {key: geom[key][:, h : h + 1] for key in ("offsets", "sinks", "rings")}
                self._write(keys, values, one, k[:, None], v[:, None], pos, self.lengths)
        else:
            self._sparq_index = device_tensor(self.sparq_heads, torch.long, self.device)
            if self.sparq_heads:
                self.v_sum = torch.zeros(
                    batch, len(self.sparq_heads), dim, dtype=torch.float32, device=self.device
                )
        self.keys, self.values, self.layout, self._geom = keys, values, layout, geom
        if self.sparq_heads:
            self._alloc_side()

    # --- SparQ side buffer -----------------------------------------------------------
    def _side_order(self) -> list[int]:
        """SparQ heads in side-buffer order: grouped as ``sparq_groups`` groups them, so each
        group's rows are one contiguous slice (``sparq_side``), never a copy."""
        groups: dict[SparQ, list[int]] = {}
        for h in self.sparq_heads:
            groups.setdefault(self.patterns[h], []).append(h)
        return [h for heads in groups.values() for h in heads]

    def _alloc_side(self) -> None:
        """(Re)allocate the side buffer for the current layout and fill it from K: one slot
        per K slot of every SparQ head (they share a ring: sink 0, the cache's length or
        the layer's window)."""
        order, layout = self._side_order(), self.layout
        ring = layout.rings[order[0]]
        batch, _, dim = self.keys.shape
        self.sparq_kt = torch.empty(
            batch, len(order), dim, ring, dtype=SPARQ_SIDE_DTYPE, device=self.device
        )
        self._geom["side_heads"] = device_tensor(order, torch.int32, self.device)
        self._geom["side_ring"] = device_tensor(
            [layout.rings[h] for h in order], torch.int32, self.device
        )
        self.sync_side()

    def sync_side(self) -> None:
        """Side buffer := the SparQ heads' K slots, transposed and rounded: after a prefill
        chunk (one pass over those heads, cheaper than scattering every token) and after
        anything that writes ``keys`` directly (the benchmarks' random caches)."""
        kt = self.sparq_kt.view(torch.uint8)  # fp8 index/copy kernels are not on every device
        for i, h in enumerate(self._side_order()):
            start = self.layout.offsets[h]
            k = self.keys[:, start : start + kt.shape[-1]]
            kt[:, i] = sparq_side_keys(k, self.sparq_kt.dtype).view(torch.uint8).transpose(1, 2)

    def _write_side(self, key_states: torch.Tensor, positions: torch.Tensor) -> None:
        """Mirror a stored chunk in the side buffer: a prefill chunk refills it from K, a
        decode token (L == 1) writes its slot (pos % ring; padding, pos < 0, is skipped)."""
        if key_states.shape[2] != 1:
            self.sync_side()
            return
        kt = self.sparq_kt.view(torch.uint8)
        heads, ring = self._geom["side_heads"].long(), self._geom["side_ring"].long()
        pos = positions[:, 0].long()
        slot = torch.remainder(pos.clamp(min=0)[:, None], ring[None, :])  # (B, n_sparq)
        new = sparq_side_keys(key_states[:, :, 0].index_select(1, heads), self.sparq_kt.dtype)
        b = torch.arange(kt.shape[0], device=kt.device)[:, None]
        i = torch.arange(kt.shape[1], device=kt.device)[None, :]
        keep = (pos >= 0)[:, None, None]
        kt[b, i, :, slot] = torch.where(keep, new.view(torch.uint8), kt[b, i, :, slot])

    def sparq_side(self, group: int) -> torch.Tensor:
        """Side-buffer rows (B, n, D, ring) of the ``group``-th of ``sparq_groups``: a view
        (groups are contiguous in ``_side_order``)."""
        groups = self.sparq_groups()
        first = sum(ids.numel() for _, ids, _ in groups[:group])
        return self.sparq_kt[:, first : first + groups[group][1].numel()]

    def static_head_ids(self) -> torch.Tensor:
        """int32 ids of the heads with a static pattern (one mixed-kernel launch serves them);
        built once per cache, on its device."""
        if self._static_ids is None:
            ids = [h for h, p in enumerate(self.patterns) if p.static]
            self._static_ids = device_tensor(ids, torch.int32, self.device)
        return self._static_ids

    def static_capacity(self) -> tuple[int, ...]:
        """Slots (sink + ring) of each static head, in ``static_head_ids`` order: the most
        positions each attends, so the mixed kernel launches programs only for chunks a
        head can fill."""
        layout = self.layout
        return tuple(layout.capacity(h) for h, p in enumerate(self.patterns) if p.static)

    def sparq_groups(self) -> list[tuple[SparQ, torch.Tensor, torch.Tensor]]:
        """SparQ heads grouped by identical settings: (pattern, int32 head ids, rows of
        ``v_sum``), one SparQ kernel pipeline per group; built once per cache."""
        if self._sparq_groups is None:
            groups: dict[SparQ, list[int]] = {}
            for h in self.sparq_heads:
                groups.setdefault(self.patterns[h], []).append(h)
            dev = self.device
            self._sparq_groups = [
                (
                    p,
                    device_tensor(heads, torch.int32, dev),
                    device_tensor([self.sparq_heads.index(h) for h in heads], torch.long, dev),
                )
                for p, heads in groups.items()
            ]
        return self._sparq_groups

    def decode_metadata(self) -> dict[str, torch.Tensor]:
        """What the Triton kernels take: int32 head_offset / head_sink / head_ring (Hkv,),
        span (B, Hkv) for the current lengths, and seq_len (B,). No host synchronisation."""
        affine = self._geom.get("span_affine")
        if affine is not None:  # every span is min(n, max(least, floor(a + b*n + 1/2)))
            n = self.lengths[:, None].to(torch.float64)
            raw = torch.floor(affine[0] + affine[1] * n + 0.5)
            spans = torch.minimum(torch.maximum(raw, affine[2]), n)
        else:
            spans = torch.stack(
                [torch.as_tensor(p.span_at(self.lengths)) for p in self.patterns], 1
            )
        meta = dict(self._geom["int32"])
        meta["span"] = spans.to(torch.int32)
        meta["seq_len"] = self.lengths.to(torch.int32)
        return meta


def _stored_positions(
    local: torch.Tensor,
    sink: int | torch.Tensor,
    ring: int | torch.Tensor,
    length: int | torch.Tensor,
) -> torch.Tensor:
    """Position held by slot ``local`` of a head with ``sink`` + ``ring`` slots after
    ``length`` tokens (positions 0..length-1 written in order); -1 where none is.

    local / sink / ring: broadcastable (per slot or per head); length: an int or (B,) ->
    the result gains a leading batch dim. Sink slot j holds position j; ring slot r holds
    the newest position p >= sink with p = sink + r (mod ring)."""
    n = length[:, None] if torch.is_tensor(length) else length
    in_sink = local < sink
    r = local - sink
    last = n - 1 - sink - r  # distance back from the newest position to slot r's class
    step = ring.clamp(min=1) if torch.is_tensor(ring) else max(ring, 1)  # a sink-only head
    ring_pos = sink + r + ring * torch.div(last, step, rounding_mode="floor")
    pos = torch.where(in_sink, local, ring_pos)
    valid = torch.where(in_sink, local < n, last >= 0)
    return torch.where(valid, pos, torch.full_like(pos, -1))


def _span_affine(patterns: list[Pattern], device: torch.device) -> torch.Tensor | None:
    """(3, 1, Hkv) float64 table of every head's ``Pattern.span_affine`` (a, b) and
    ``span_least``; None when a pattern has no affine span (then each pattern's span_at
    is called, a few torch ops per head and step)."""
    rows = [p.span_affine() for p in patterns]
    if any(r is None for r in rows):
        return None
    rows = [(*r, float(p.span_least())) for r, p in zip(rows, patterns, strict=True)]
    return device_tensor(rows, torch.float64, device).T[:, None, :].contiguous()


def _geometry(layout: HeadLayout, device: torch.device) -> dict:
    """Layout as device tensors: shared constants (``device_tensor``), so a new cache for
    a layout seen before makes no host-to-device copy."""

    def t(values: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return device_tensor(values, dtype, device)

    return {
        "offsets": t(layout.offsets, torch.long)[None, :, None],
        "sinks": t(layout.sinks, torch.long)[None, :, None],
        "rings": t(layout.rings, torch.long)[None, :, None],
        "int32": {
            "head_offset": t(layout.offsets, torch.int32),
            "head_sink": t(layout.sinks, torch.int32),
            "head_ring": t(layout.rings, torch.int32),
        },
    }


def _slot_geometry(geom: dict, total_slots: int) -> tuple[torch.Tensor, ...]:
    """(head, place in the head's sink + ring, sink, ring) of every slot, (S,) each, built
    on the device from the per-head geometry (no host sync: the output size is known)."""
    offsets, sinks, rings = (geom[k][0, :, 0] for k in ("offsets", "sinks", "rings"))
    heads = torch.repeat_interleave(
        torch.arange(len(offsets), device=offsets.device), sinks + rings, output_size=total_slots
    )
    local = torch.arange(total_slots, device=offsets.device) - offsets[heads]
    return heads, local, sinks[heads], rings[heads]


class MoACache(Cache):
    """transformers Cache whose layers hold per-KV-head patterned storage for a plan."""

    def __init__(
        self,
        plan: Plan,
        max_cache_len: int | None = None,
        windows: list[int | None] | None = None,
    ):
        """``windows``: per layer, the model's own sliding window (apply_plan passes it)."""
        windows = list(windows) if windows is not None else [None] * len(plan.heads)
        layers = [
            MoALayerCache(row, max_cache_len, w) for row, w in zip(plan.heads, windows, strict=True)
        ]
        super().__init__(layers=layers)
        self.plan = plan

    @contextlib.contextmanager
    def prompt(self, length: int) -> Iterator[None]:
        """Forwards inside take every span at ``length``: a prompt of that many tokens fed
        in chunks attends as it would in one forward (``patterns``: spans are taken at the
        length a forward reaches)."""
        for layer in self.layers:
            layer.reach = int(length)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.reach = 0

    def nbytes(self) -> int:
        """Bytes all layers allocate, SparQ's V sums included (see MoALayerCache.nbytes)."""
        return sum(layer.nbytes() for layer in self.layers)

    def seq_lengths(self) -> torch.Tensor | None:
        """Real tokens held per sequence (padding excluded)."""
        return self.layers[0].lengths if self.layers else None
