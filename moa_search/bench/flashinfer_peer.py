"""FlashInfer as a peer in ``bench``: its KV cache and its attention kernels in place of ours,
inside our decode loop (:class:`moa_search.bench.decode_loop.PeerLoop`), so a row differs
from ``dense-moa`` / ``plan`` only in attention + cache.

- ``flashinfer-dense``: a paged cache (page 16, NHD, the model's dtype) per layer, written
  by ``flashinfer.page.append_paged_kv_cache`` and read by one
  ``BatchDecodeWithPagedKVCacheWrapper`` shared by all layers, in CUDA-graph mode
  (fixed-size index buffers).
- ``flashinfer-plan``: the plan through ``flashinfer.sparse.VariableBlockSparseAttentionWrapper``
  (one per layer: each layer has its own mask). The batch is folded into the heads (row
  ``b * Hkv + h``); every head's K/V is stored dense, ``(B * Hkv, max_len, D)``, as that
  wrapper reads it, so the plan saves reads, not memory. A head's mask has four column
  blocks of variable size -- sink, skipped middle, recent span, not-yet-written tail --
  kept as (sink, no, recent, no): the wrapper expands blocks to token indices (page size
  1), so exact block edges cost nothing and read no key the pattern does not see.

Both are planned once, for ``plan_length`` (the run's final length), before the graph is
captured: FlashInfer's ``plan`` syncs, runs on the host and (for the block-sparse wrapper)
replaces the index tensors a captured graph points to, so re-planning per step would time
the host and re-capture the graph. Steps before the final length therefore read the
planned key range: up to ``plan_length - n`` slots not yet written (dense heads and the
elastic part of a span), the over-read the rows' notes state. Prefill (prompts; tests)
stores K/V the same way and attends with the PyTorch reference, untimed.

Kernel choices: the decode wrapper runs its tensor-core kernels (FlashInfer's fa2 paged
prefill) from a GQA group of 4, as sglang's FlashInfer backend does, and the block-sparse
wrapper runs fa2 too, so both peers need one JIT-compiled attention module (each new
module costs minutes of nvcc on first use). ``MOA_FLASHINFER_TENSOR_CORES=0|1`` and
``MOA_FLASHINFER_SPARSE_BACKEND=auto|fa2|fa3`` override them; the row's note says which ran.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from moa_search import families
from moa_search.bench import memory
from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Pattern
from moa_search.plan import Plan
from moa_search.runtime.reference import attend_head
from moa_search.runtime.scores import Logits

PAGE_SIZE = 16
#: FlashInfer's recommended float workspace (split-KV partial results), shared by layers
WORKSPACE_BYTES = 128 * 2**20
#: GQA group from which the decode wrapper runs its tensor-core (prefill) kernels, as
#: sglang's FlashInfer backend chooses for bf16 / fp16 caches
TENSOR_CORE_GROUP = 4
#: the block-sparse wrapper's backend: fa2 shares the decode wrapper's JIT module
SPARSE_BACKEND = "fa2"


def _tensor_cores(group: int) -> bool:
    env = os.environ.get("MOA_FLASHINFER_TENSOR_CORES")
    return group >= TENSOR_CORE_GROUP if env in (None, "") else env not in ("0", "false")


def require_flashinfer(device: torch.device) -> ModuleType:
    """The ``flashinfer`` module, or a one-line MoaSearchError saying what is missing."""
    try:
        import flashinfer  # noqa: PLC0415 - optional, GPU-only dependency
        import flashinfer.page  # noqa: F401, PLC0415
        import flashinfer.sparse  # noqa: F401, PLC0415
    except ImportError as exc:
        raise MoaSearchError(
            f"flashinfer peers need flashinfer-python 0.7.x (pip install flashinfer-python): {exc}"
        ) from None
    if device.type != "cuda" or not torch.cuda.is_available():
        raise MoaSearchError(f"flashinfer peers need a CUDA device, got {device}")
    return flashinfer


# --- pure parts (CPU-testable) ----------------------------------------------------------
@dataclass(frozen=True)
class PeerShape:
    """What a peer needs of the model: layers, heads, head size, dtype, softmax scale."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @classmethod
    def of(cls, model: Any, check: bool = True) -> PeerShape:
        """From a transformers model; ``check`` refuses what the peers do not model (sliding
        layers, logit caps: FlashInfer has both, but our plans' clamping is not mirrored)."""
        config = families.text_config(model.config)
        if check and any(w is not None for w in families.layer_windows(model.config)):
            raise MoaSearchError("flashinfer peers support full-attention models only")
        if check and getattr(config, "attn_logit_softcapping", None):
            raise MoaSearchError("flashinfer peers do not model attention logit caps")
        modules = families.attention_modules(model)
        heads = config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scale = float(getattr(modules[0], "scaling", dim**-0.5))
        return cls(len(modules), heads, config.num_key_value_heads, int(dim), model.dtype, scale)


def pages_per_seq(max_len: int, page_size: int = PAGE_SIZE) -> int:
    """Pages each sequence owns so that it can hold ``max_len`` tokens."""
    return max(1, math.ceil(max_len / page_size))


def paged_kv_bytes(shape: PeerShape, batch: int, max_len: int) -> int:
    """Bytes of the flashinfer-dense cache: whole pages of K and V for every layer."""
    return memory.paged_kv_bytes(
        layers=shape.num_layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        dtype_bytes=torch.finfo(shape.dtype).bits // 8, batch=batch, max_len=max_len,
        page_size=PAGE_SIZE,
    )  # fmt: skip


def dense_store_bytes(shape: PeerShape, batch: int, max_len: int) -> int:
    """Bytes of the flashinfer-plan cache: K and V of every head at every position."""
    dtype_bytes = torch.finfo(shape.dtype).bits // 8
    return shape.num_layers * batch * max_len * shape.kv_heads * shape.head_dim * 2 * dtype_bytes


@dataclass(frozen=True)
class PagedIndex:
    """FlashInfer's page table (CSR): ``indptr`` (B+1,), ``indices`` (indptr[-1],) and
    ``last_page_len`` (B,), all int32."""

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor


def paged_index(
    batch: int, length: int, capacity_pages: int, page_size: int = PAGE_SIZE
) -> PagedIndex:
    """Page table of ``batch`` sequences holding ``length`` tokens each, sequence ``b``
    owning pages ``[b * capacity_pages, (b + 1) * capacity_pages)`` and using the first
    ``ceil(length / page_size)`` of them (CPU tensors)."""
    if length < 1:
        raise MoaSearchError(f"a page table needs length >= 1, got {length}")
    used = math.ceil(length / page_size)
    if used > capacity_pages:
        raise MoaSearchError(f"{length} tokens need {used} pages, sequences own {capacity_pages}")
    i32 = torch.int32
    indptr = torch.arange(batch + 1, dtype=i32) * used
    first = torch.arange(batch, dtype=i32)[:, None] * capacity_pages
    indices = (first + torch.arange(used, dtype=i32)).to(i32)
    last = torch.full((batch,), length - (used - 1) * page_size, dtype=i32)
    return PagedIndex(indptr, indices.flatten(), last)


@dataclass(frozen=True)
class HeadBlocks:
    """One KV head's column blocks at a length: sizes of (sink, middle, recent, tail)
    summing to the cache's ``max_len``, and which are kept."""

    sizes: tuple[int, int, int, int]
    keep: tuple[bool, bool, bool, bool]

    def kept_positions(self) -> list[int]:
        """Key positions the mask keeps (what a query at the planned length reads)."""
        out, start = [], 0
        for size, keep in zip(self.sizes, self.keep, strict=True):
            if keep:
                out += range(start, start + size)
            start += size
        return out


def head_blocks(pattern: Pattern, length: int, max_len: int) -> HeadBlocks:
    """The block form of ``pattern`` for a decode query that has seen ``length`` tokens:
    its sink and its most recent ``span_at(length)`` positions (all of them for dense
    heads), in a cache of ``max_len`` slots. SparQ and other data-dependent patterns have
    no block form: MoaSearchError."""
    if not pattern.static:
        raise MoaSearchError(
            f"flashinfer-plan: {pattern.spec()} chooses keys from the data and has no "
            "block-mask form; run it with 'plan' or give a plan without SparQ heads"
        )
    if not 1 <= length <= max_len:
        raise MoaSearchError(f"block mask for length {length} in a cache of {max_len}")
    sink = min(pattern.sink, length)
    start = max(sink, length - int(pattern.span_at(length)))
    sizes = (sink, start - sink, length - start, max_len - length)
    keep = (sink > 0, False, True, False)
    return HeadBlocks(sizes, keep)


def block_mask(
    patterns: list[Pattern], batch: int, length: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's VariableBlockSparseAttentionWrapper inputs with the batch folded into
    the heads (row ``b * Hkv + h``): block_mask_map (B*Hkv, 1, 4) bool, block_row_sz
    (B*Hkv, 1) int32 (the one decode query) and block_col_sz (B*Hkv, 4) int32 (CPU)."""
    blocks = [head_blocks(p, length, max_len) for p in patterns]
    keep = torch.tensor([b.keep for b in blocks], dtype=torch.bool).repeat(batch, 1)
    cols = torch.tensor([b.sizes for b in blocks], dtype=torch.int32).repeat(batch, 1)
    rows = torch.ones(batch * len(patterns), 1, dtype=torch.int32)
    return keep[:, None, :], rows, cols


def check_blockable(plan: Plan) -> None:
    """Refuse a plan with any head that has no block form, naming the first one."""
    for layer, row in enumerate(plan.heads):
        for h, pattern in enumerate(row):
            if not pattern.static:
                raise MoaSearchError(
                    f"flashinfer-plan: layer {layer} KV head {h} is {pattern.spec()}, which "
                    "chooses keys from the data and has no block-mask form"
                )


# --- peers ------------------------------------------------------------------------------
class _Peer:
    """Storage and attention for every layer of one model; ``forward`` is the attention
    policy's body. ``positions``: the loop's (B, 1) long buffer of the new token's
    position, advanced on the device by each step (so steps replay from a CUDA graph)."""

    def __init__(
        self, shape: PeerShape, batch: int, max_len: int, plan_length: int,
        positions: torch.Tensor,
    ):  # fmt: skip
        if not 1 <= plan_length <= max_len:
            raise MoaSearchError(f"plan length {plan_length} outside 1..{max_len}")
        self.shape, self.batch, self.max_len = shape, int(batch), int(max_len)
        self.plan_length = int(plan_length)
        self.positions = positions
        self.device = positions.device
        self.length = 0  # host copy of the tokens every sequence holds (prefill only)
        self.logits = Logits(shape.scale, None)
        self.note = ""

    # storage: subclasses ---------------------------------------------------------------
    def _store(self, layer: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor):
        raise NotImplementedError

    def _read(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, n, D) keys and values of positions 0..n-1 (prefill reference only)."""
        raise NotImplementedError

    def _decode(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def patterns(self, layer: int) -> list[Pattern]:
        return [Dense()] * self.shape.kv_heads

    def nbytes(self) -> int:
        raise NotImplementedError

    def predicted_nbytes(self) -> int:
        raise NotImplementedError

    def randomize(self, generator: torch.Generator) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Drop buffers and wrappers (the loop's memory accounting expects them gone)."""

    # the policy body -------------------------------------------------------------------
    def set_length(self, n: int) -> None:
        self.length = int(n)

    def forward(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """query (B, Hq, L, D), key/value (B, Hkv, L, D) of the new tokens -> (B, Hq, L, D).
        Decode (L == 1) stores the token at ``positions`` and runs FlashInfer; a prompt
        (into an empty cache) is stored and attended with the reference."""
        q_len = query.shape[2]
        if q_len == 1:
            self._store(layer, key, value, self.positions[:, 0])
            return self._decode(layer, query)
        if self.length != 0:
            raise MoaSearchError("flashinfer peers prefill into an empty cache only")
        pos = torch.arange(q_len, device=self.device)
        self._store(layer, key, value, pos)
        if layer == self.shape.num_layers - 1:
            self.length = q_len
        return self._prefill_reference(layer, query, q_len)

    def _prefill_reference(self, layer: int, query: torch.Tensor, n: int) -> torch.Tensor:
        keys, values = self._read(layer, n)
        pos = torch.arange(n, device=self.device)[None].expand(self.batch, -1)
        out = torch.empty_like(query)
        g = self.shape.group
        for h, pattern in enumerate(self.patterns(layer)):
            sl = slice(h * g, (h + 1) * g)
            out[:, sl] = attend_head(
                query[:, sl], keys[:, h], values[:, h], pos, pos, pattern, self.logits
            )
        return out


class DensePagedPeer(_Peer):
    """``flashinfer-dense``: paged cache + BatchDecodeWithPagedKVCacheWrapper."""

    def __init__(self, shape: PeerShape, batch: int, max_len: int, plan_length: int,
                 positions: torch.Tensor, *, tensor_cores: bool | None = None):  # fmt: skip
        super().__init__(shape, batch, max_len, plan_length, positions)
        fi = require_flashinfer(self.device)
        dev, s = self.device, shape
        self.capacity_pages = pages_per_seq(max_len)
        pages = batch * self.capacity_pages
        self.caches = [
            torch.zeros(pages, 2, PAGE_SIZE, s.kv_heads, s.head_dim, dtype=s.dtype, device=dev)
            for _ in range(s.num_layers)
        ]
        i32 = torch.int32
        self.indptr = torch.zeros(batch + 1, dtype=i32, device=dev)
        self.indices = torch.zeros(pages, dtype=i32, device=dev)
        self.last_page_len = torch.zeros(batch, dtype=i32, device=dev)
        self.batch_indices = torch.arange(batch, dtype=i32, device=dev)
        full = paged_index(batch, self.capacity_pages * PAGE_SIZE, self.capacity_pages)
        self.append_table = PagedIndex(
            *(t.to(dev) for t in (full.indptr, full.indices, full.last_page_len))
        )
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        tc = _tensor_cores(s.group) if tensor_cores is None else bool(tensor_cores)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tc,
            paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len,
        )  # fmt: skip
        index = paged_index(batch, plan_length, self.capacity_pages)
        self.wrapper.plan(
            index.indptr.to(dev), index.indices.to(dev), index.last_page_len.to(dev),
            s.q_heads, s.kv_heads, s.head_dim, PAGE_SIZE, pos_encoding_mode="NONE",
            q_data_type=s.dtype, kv_data_type=s.dtype, sm_scale=s.scale,
        )  # fmt: skip
        self._append = fi.page.append_paged_kv_cache
        backend = getattr(self.wrapper, "resolved_backend", None) or getattr(
            self.wrapper, "_backend", "?"
        )
        self.note = (
            f"flashinfer {fi.__version__} BatchDecodeWithPagedKVCacheWrapper, backend {backend}, "
            f"tensor cores {tc}, page {PAGE_SIZE} NHD {str(s.dtype).removeprefix('torch.')}, "
            f"use_cuda_graph; planned once for the final length {plan_length}: earlier "
            "steps read up to it (not-yet-written slots)"
        )

    def _store(self, layer, key, value, pos) -> None:
        if key.shape[2] == 1:
            k, v, b_idx = key[:, :, 0], value[:, :, 0], self.batch_indices
            p = pos.to(torch.int32)
        else:  # a prompt: every (sequence, position), sequence-major
            n, heads, dim = key.shape[2], key.shape[1], key.shape[3]
            k = key.transpose(1, 2).reshape(self.batch * n, heads, dim)
            v = value.transpose(1, 2).reshape(self.batch * n, heads, dim)
            b_idx = self.batch_indices.repeat_interleave(n)
            p = pos.to(torch.int32).repeat(self.batch)
        # the whole-capacity table: a write past the planned length stays in its sequence
        table = self.append_table
        self._append(
            k.contiguous(), v.contiguous(), b_idx, p.contiguous(), self.caches[layer],
            table.indices, table.indptr, table.last_page_len, kv_layout="NHD",
        )  # fmt: skip

    def _read(self, layer, n):
        cache = self.caches[layer].view(
            self.batch, self.capacity_pages, 2, PAGE_SIZE, self.shape.kv_heads, -1
        )
        kv = cache.permute(0, 2, 4, 1, 3, 5).reshape(
            self.batch, 2, self.shape.kv_heads, self.capacity_pages * PAGE_SIZE, -1
        )
        return kv[:, 0, :, :n], kv[:, 1, :, :n]

    def _decode(self, layer, query):
        out = self.wrapper.run(query[:, :, 0].contiguous(), self.caches[layer])
        return out[:, :, None]

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches)

    def predicted_nbytes(self) -> int:
        return paged_kv_bytes(self.shape, self.batch, self.max_len)

    def randomize(self, generator: torch.Generator) -> None:
        for cache in self.caches:
            cache.normal_(generator=generator)

    def close(self) -> None:
        self.caches, self.wrapper, self.workspace = [], None, None


class BlockSparsePeer(_Peer):
    """``flashinfer-plan``: dense per-head K/V + one VariableBlockSparseAttentionWrapper
    per layer holding that layer's block mask at ``plan_length``."""

    def __init__(self, shape: PeerShape, batch: int, max_len: int, plan_length: int,
                 positions: torch.Tensor, plan: Plan):  # fmt: skip
        check_blockable(plan)
        if len(plan.heads) != shape.num_layers:
            raise MoaSearchError(f"plan has {len(plan.heads)} layers, model {shape.num_layers}")
        super().__init__(shape, batch, max_len, plan_length, positions)
        fi = require_flashinfer(self.device)
        dev, s = self.device, shape
        self.plan = plan
        rows = batch * s.kv_heads
        self.keys = [
            torch.zeros(rows, max_len, s.head_dim, dtype=s.dtype, device=dev)
            for _ in range(s.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self.wrappers = []
        backend = os.environ.get("MOA_FLASHINFER_SPARSE_BACKEND") or SPARSE_BACKEND
        for layer in range(s.num_layers):
            mask, row_sz, col_sz = block_mask(plan.heads[layer], batch, plan_length, max_len)
            wrapper = fi.sparse.VariableBlockSparseAttentionWrapper(self.workspace, backend=backend)
            wrapper.plan(
                mask.to(dev), row_sz.to(dev), col_sz.to(dev), batch * s.q_heads, rows,
                s.head_dim, causal=False, pos_encoding_mode="NONE", sm_scale=s.scale,
                q_data_type=s.dtype, kv_data_type=s.dtype,
            )  # fmt: skip
            self.wrappers.append(wrapper)
        self._b = torch.arange(batch, device=dev)[:, None].expand(batch, s.kv_heads)
        self._h = torch.arange(s.kv_heads, device=dev)[None, :].expand(batch, s.kv_heads)
        backend = getattr(self.wrappers[0], "_backend", backend)  # "auto" resolves in plan
        self.note = (
            f"flashinfer {fi.__version__} VariableBlockSparseAttentionWrapper, backend "
            f"{backend}, batch folded into heads, dense K/V store; block mask for the final "
            f"length {plan_length} (sink + recent span blocks), so earlier steps read "
            "slightly more (not-yet-written slots)"
        )

    def patterns(self, layer: int) -> list[Pattern]:
        return list(self.plan.heads[layer])

    def _view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(self.batch, self.shape.kv_heads, self.max_len, -1)

    def _store(self, layer, key, value, pos) -> None:
        k, v = self._view(self.keys[layer]), self._view(self.values[layer])
        if key.shape[2] == 1:  # one position per sequence: a graph-safe scatter
            p = pos[:, None].expand(self.batch, self.shape.kv_heads)
            k.index_put_((self._b, self._h, p), key[:, :, 0].to(k.dtype))
            v.index_put_((self._b, self._h, p), value[:, :, 0].to(v.dtype))
        else:
            k[:, :, pos] = key.to(k.dtype)
            v[:, :, pos] = value.to(v.dtype)

    def _read(self, layer, n):
        return self._view(self.keys[layer])[:, :, :n], self._view(self.values[layer])[:, :, :n]

    def _decode(self, layer, query):
        s = self.shape
        q = query.reshape(self.batch * s.q_heads, 1, s.head_dim)
        out = self.wrappers[layer].run(q, self.keys[layer], self.values[layer])
        return out.view(self.batch, s.q_heads, 1, s.head_dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def predicted_nbytes(self) -> int:
        return dense_store_bytes(self.shape, self.batch, self.max_len)

    def randomize(self, generator: torch.Generator) -> None:
        for t in (*self.keys, *self.values):
            t.normal_(generator=generator)

    def close(self) -> None:
        self.keys, self.values, self.wrappers, self.workspace = [], [], [], None


def peer_factory(kind: str, plan: Plan | None, plan_length: int):
    """``make(model, batch, max_len, positions) -> peer`` for :class:`PeerLoop`; ``kind``
    is "dense" (flashinfer-dense) or "plan" (flashinfer-plan, needs ``plan``)."""
    if kind == "plan":
        if plan is None:
            raise MoaSearchError("flashinfer-plan needs a plan")
        check_blockable(plan)  # before any allocation: the one-line refusal for SparQ

    def make(model: Any, batch: int, max_len: int, positions: torch.Tensor) -> _Peer:
        shape = PeerShape.of(model)
        if kind == "dense":
            return DensePagedPeer(shape, batch, max_len, plan_length, positions)
        return BlockSparsePeer(shape, batch, max_len, plan_length, positions, plan)

    return make


def predicted_bytes(kind: str, model: Any, batch: int, max_len: int) -> int:
    """What the peer of ``kind`` ("dense" / "plan") allocates for ``model``: the bench's
    memory accounting (skip check, equal-memory mode) uses it instead of the plan's."""
    shape = PeerShape.of(model, check=False)
    if kind == "dense":
        return paged_kv_bytes(shape, batch, max_len)
    return dense_store_bytes(shape, batch, max_len)
