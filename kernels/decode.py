"""Mixed-pattern decode attention: dense / window+sink / elastic KV heads in ONE launch.

Layout (shared with ``moa_search.runtime.cache``): per layer one packed K and one packed V
buffer of shape (B, C_total, D). KV head h owns slots [off_h, off_h + sink_h + ring_h);
position p lives at slot off_h + p if p < sink_h else off_h + sink_h + (p - sink_h) % ring_h.
With n = seq_len[b] tokens, the query of head h attends to positions
[0, min(sink_h, n)) and [max(sink_h, n - span[b, h]), n). With the model layer's own sliding
window W (Mistral, Gemma 2/3 sliding layers) a key is seen only when it is fewer than W
positions back: the sink part starts at max(0, n - W) and the span is clamped to W. With
Gemma 2's logit soft-capping every logit s becomes cap * tanh(s / cap) before the softmax.

Algorithm (flash-decoding): the valid positions of every (b, h) are enumerated as a
logical list (sink part, then window part); the list is cut into chunks of ``chunk``
positions and program (b, h, s) handles chunk s, for all G query heads of the GQA group
at once (K/V tile loaded once, ``tl.dot`` with a G_PAD x D query block). Programs whose
chunk lies past their head's valid length exit at once. Given each head's capacity
(``capacity=``, what the runtime passes), only the chunks a head can fill get a program
(``work_items``: a 1-D grid), so a short window costs one program, not max_len / chunk.
A second small kernel merges the partial (max, sum, acc) of each (b, h). When one chunk
covers every head (short contexts) the first kernel writes the output directly. On Hopper
the append, attention and merge kernels launch with programmatic dependent launch (each
waits in ``gdc_wait`` for the one before).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    check_common,
    fit_tiles,
    interpreting,
    next_pow2,
    pdl_supported,
    pick_chunk,
)

LOG2E = 1.4426950408889634

#: Launch parameters; the benchmark may override them (chosen on an H200, see kernels/NOTES.md).
TUNING: dict[str, int] = {
    "block_n": 64,
    "num_warps": 4,
    "num_stages": 3,
    "chunk_lo": 256,
    "chunk_hi": 1024,
    "per_sm": 16,
    "pdl": 1,  # programmatic dependent launch where the GPU has it (``pdl_supported``)
    "work_items": 1,  # with ``capacity``: programs only for chunks a head can fill
}


def use_pdl(device: torch.device) -> bool:
    """Whether the decode kernels launch with PDL on ``device`` (``TUNING["pdl"]``)."""
    return bool(TUNING["pdl"]) and pdl_supported(device)


@contextlib.contextmanager
def pdl_off() -> Iterator[None]:
    """Launch without PDL inside: a PDL kernel starts early and waits for the one before
    inside itself, time a profiler counts as its own."""
    saved = TUNING["pdl"]
    TUNING["pdl"] = 0
    try:
        yield
    finally:
        TUNING["pdl"] = saved


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; fp32 operands use exact (non-tf32) products."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _attend_block(
    q,
    k_ptrs,
    v_ptrs,
    valid,
    m_i,
    l_i,
    acc,
    qk_scale,
    cap_log2,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One online-softmax step over a tile of key rows.

    q: (G_PAD, D) query block; k_ptrs/v_ptrs: (BLOCK_N, D) pointers; valid: (BLOCK_N,);
    m_i, l_i: (G_PAD,) running max (log2 units) and sum; acc: (G_PAD, D) fp32.
    SOFTCAP: logits are cap * tanh(scale * q.k / cap); qk_scale is then scale / cap and
    cap_log2 = cap * log2(e); otherwise qk_scale = scale * log2(e).
    """
    k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
    s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
    if SOFTCAP:
        s = (2.0 * tl.sigmoid(2.0 * s) - 1.0) * cap_log2  # tanh, in log2 units
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
    return m_new, l_i, acc


@triton.jit
def _mixed_decode_kernel(
    Q,
    K,
    V,
    Off,
    Sink,
    Ring,
    Span,
    SeqLen,
    HeadIds,
    Out,
    PartM,
    PartL,
    PartAcc,
    Count,
    Items,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_span,
    n_list,
    n_items,
    chunk,
    num_splits,
    qk_scale,
    cap_log2,
    window,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_ITEMS: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # launched while the append kernel drains: wait for its lengths and entries
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the merge may launch and wait in turn
    if HAS_ITEMS:  # 1-D grid over (sequence, work item); item = (listed head, chunk index)
        b = tl.program_id(0) // n_items
        item = tl.program_id(0) % n_items
        i = tl.load(Items + 2 * item)
        sid = tl.load(Items + 2 * item + 1)
        pid = b * n_list + i
    else:
        pid = tl.program_id(0)  # b * n_list + i
        sid = tl.program_id(1)  # chunk index
        b = pid // n_list
        i = pid % n_list
    h = tl.load(HeadIds + i) if HAS_IDS else i
    n = tl.load(SeqLen + b)
    off = tl.load(Off + h)
    sink = tl.load(Sink + h)
    ring = tl.load(Ring + h)
    span = tl.load(Span + b * stride_span + h)
    s_lo = 0
    if WINDOW:  # the model's own window: keys at least `window` back are never seen
        span = tl.minimum(span, window)
        s_lo = tl.maximum(n - window, 0)
    s0 = tl.minimum(sink, n)  # sink positions [s_lo, s0)
    ns = tl.maximum(s0 - s_lo, 0)
    w0 = tl.minimum(tl.maximum(sink, n - span), n)  # window positions [w0, n)
    total = ns + (n - w0)
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, total)
    r0 = (w0 - sink) % ring  # ring index of position w0

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gmask = g < G
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None],
        other=0.0,
    )
    q = q.to(K.dtype.element_ty)
    k_base = K + b64 * stride_kb + off.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + off.to(tl.int64) * stride_vn

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # logical index into the valid list
        valid = j < hi
        ridx = r0 + (j - ns)  # < 2 * ring because the window is no longer than the ring
        ridx = tl.where(ridx >= ring, ridx - ring, ridx)
        slot = tl.where(j < ns, s_lo + j, sink + ridx)
        slot = tl.where(valid, slot, 0)
        m_i, l_i, acc = _attend_block(
            q,
            k_base + slot[:, None] * stride_kn + d[None, :],
            v_base + slot[:, None] * stride_vn + d[None, :],
            valid,
            m_i,
            l_i,
            acc,
            qk_scale,
            cap_log2,
            UPCAST,
            IEEE,
            SOFTCAP,
        )

    if SPLIT:
        if sid == 0:
            tl.store(Count + pid, tl.cdiv(total, chunk))
        if lo < total:
            row = pid * num_splits + sid
            tl.store(PartM + row * G + g, m_i, mask=gmask)
            tl.store(PartL + row * G + g, l_i, mask=gmask)
            tl.store(PartAcc + (row * G + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    else:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            Out + b64 * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :],
            y.to(Out.dtype.element_ty),
            mask=gmask[:, None],
        )


@triton.jit
def _merge_kernel(
    PartM,
    PartL,
    PartAcc,
    PartAlpha,
    Count,
    HeadIds,
    SeqLen,
    VSum,
    Out,
    stride_ob,
    stride_oh,
    stride_vsb,
    stride_vsh,
    n_list,
    num_splits,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_IDS: tl.constexpr,
    SPARQ: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merge split-K partials of one query head; SparQ adds alpha * y + (1 - alpha) * mean(V)."""
    if PDL:
        tl.extra.cuda.gdc_wait()  # the partials of the kernel before
    pid = tl.program_id(0)  # (b * n_list + i) * G + g
    bh = pid // G
    g = pid % G
    b = bh // n_list
    i = bh % n_list
    h = tl.load(HeadIds + i) if HAS_IDS else i
    cnt = tl.load(Count + bh)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    lsum = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    asum = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s_start in range(0, cnt, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        smask = s < cnt
        row = (bh * num_splits + s) * G + g
        ms = tl.load(PartM + row, mask=smask, other=float("-inf"))
        ls = tl.load(PartL + row, mask=smask, other=0.0)
        part = tl.load(PartAcc + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(ms, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits that saw nothing
        scale_old = tl.exp2(m - m_use)
        w = tl.exp2(ms - m_use)
        lsum = lsum * scale_old + tl.sum(ls * w, 0)
        acc = acc * scale_old + tl.sum(part * w[:, None], 0)
        m = m_new
        if SPARQ:
            asum += tl.sum(tl.load(PartAlpha + row, mask=smask, other=0.0), 0)
    y = acc / tl.where(lsum > 0, lsum, 1.0)
    b64 = b.to(tl.int64)
    if SPARQ:
        n = tl.load(SeqLen + b).to(tl.float32)
        vmean = tl.load(VSum + b64 * stride_vsb + i * stride_vsh + d) / n
        y = asum * y + (1.0 - asum) * vmean
    tl.store(Out + b64 * stride_ob + (h * G + g) * stride_oh + d, y.to(Out.dtype.element_ty))


def merge_partials(
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    part_acc: torch.Tensor,
    count: torch.Tensor,
    out: torch.Tensor,
    head_ids: torch.Tensor | None,
    n_list: int,
    group: int,
    *,
    part_alpha: torch.Tensor | None = None,
    seq_len: torch.Tensor | None = None,
    v_sum: torch.Tensor | None = None,
) -> None:
    """Launch the merge kernel. part_m/part_l: (B*n_list, S, G); part_acc: (B*n_list, S, G, D);
    count: (B*n_list,) active splits; SparQ also passes part_alpha (B*n_list, S, G),
    seq_len (B,) and v_sum (B, n_list, D) fp32."""
    rows, splits = part_m.shape[0], part_m.shape[1]
    dim = part_acc.shape[-1]
    sparq = part_alpha is not None
    dummy = count
    pdl = use_pdl(out.device)
    block_d = min(dim, 64)  # (rows * G * D/64) programs: enough parallelism at B=1
    _merge_kernel[(rows * group, dim // block_d)](
        part_m,
        part_l,
        part_acc,
        part_alpha if sparq else part_m,
        count,
        head_ids if head_ids is not None else dummy,
        seq_len if sparq else dummy,
        v_sum if sparq else part_m,
        out,
        out.stride(0),
        out.stride(1),
        v_sum.stride(0) if sparq else 0,
        v_sum.stride(1) if sparq else 0,
        n_list,
        splits,
        G=group,
        D=dim,
        BLOCK_S=min(64, max(16, next_pow2(splits))),
        BLOCK_D=block_d,
        HAS_IDS=head_ids is not None,
        SPARQ=sparq,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )


def mixed_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_offset: torch.Tensor,
    head_sink: torch.Tensor,
    head_ring: torch.Tensor,
    span: torch.Tensor,
    seq_len: torch.Tensor,
    scale: float,
    head_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    max_len: int | None = None,
    chunk: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    capacity: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Decode attention of one new token for dense / window / elastic KV heads, one launch.

    Args:
        q: (B, Hq, D) query of the newest token (position seq_len[b] - 1); Hq = Hkv * G and
            query head j belongs to KV head j // G. Last dim contiguous.
        k_cache, v_cache: (B, C_total, D) packed per-head caches (layout in module doc).
        head_offset, head_sink, head_ring: int32 (Hkv,) slot geometry per KV head.
        span: int32 (B, Hkv) recent positions attended (dense: seq_len; may exceed it).
        seq_len: int32 (B,) tokens per sequence including the new one (>= 1, ragged).
        scale: softmax scale (usually D ** -0.5).
        head_ids: optional int32 (n,) KV heads to compute; other heads of ``out`` are left
            untouched (the runtime routes SparQ heads elsewhere this way).
        out: optional (B, Hq, D) output, same dtype as q.
        max_len: optional Python-int upper bound of seq_len (sizes the split-K grid without
            a host sync); defaults to C_total, always safe but launches more programs.
        chunk: override the positions per split-K program (tuning).
        window: the model layer's own sliding window (keys >= window back are not seen).
        softcap: the model's attention logit cap (Gemma 2), applied before the softmax.
        capacity: optional Python ints, per listed head (``head_ids`` order), an upper bound
            of the positions it attends (its sink + ring); programs are then launched only
            for the chunks a head can fill (``work_items``). Without it every head gets
            ``max_len / chunk`` programs, and those past a short window's end only exit:
            in a 25% plan three quarters of the launch.

    Requires ring_h >= min(span, n - sink_h) (what the cache keeps). Accumulates in fp32.
    Returns ``out``.
    """
    batch, hq, dim = check_common(q, k_cache, v_cache)
    hkv = head_offset.shape[0]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    n_list = head_ids.numel() if head_ids is not None else hkv
    if batch == 0 or n_list == 0:
        return out
    span = span.contiguous()
    dev = q.device
    block_n, stages = fit_tiles(
        dev, TUNING["block_n"], dim, k_cache.element_size(), TUNING["num_stages"]
    )
    bound = max_len if max_len is not None else k_cache.shape[1]
    if chunk is None:
        chunk = pick_chunk(
            bound, batch * n_list, dev, block_n, TUNING["chunk_lo"], TUNING["chunk_hi"],
            TUNING["per_sm"],
        )  # fmt: skip
    splits = max(1, cdiv(bound, chunk))
    split = splits > 1
    g_pad = max(16, next_pow2(group))
    rows = batch * n_list
    if capacity is not None and len(capacity) != n_list:
        raise ValueError(f"capacity has {len(capacity)} entries for {n_list} listed heads")
    items = None
    if capacity is not None and TUNING["work_items"]:
        items = work_items(tuple(min(c, bound) for c in capacity), chunk, str(dev))
    grid = (rows, splits) if items is None else (batch * (items.numel() // 2),)
    if split:
        part_m = torch.empty(rows, splits, group, dtype=torch.float32, device=dev)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(rows, splits, group, dim, dtype=torch.float32, device=dev)
        count = torch.empty(rows, dtype=torch.int32, device=dev)
    else:
        part_m = part_l = part_acc = count = out
    upcast = interpreting()
    pdl = use_pdl(dev)
    _mixed_decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        head_offset,
        head_sink,
        head_ring,
        span,
        seq_len,
        head_ids if head_ids is not None else head_offset,
        out,
        part_m,
        part_l,
        part_acc,
        count,
        items if items is not None else head_offset,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        span.stride(0),
        n_list,
        items.numel() // 2 if items is not None else 1,
        chunk,
        splits,
        scale / softcap if softcap else scale * LOG2E,
        softcap * LOG2E if softcap else 0.0,
        window or 0,
        G=group,
        G_PAD=g_pad,
        D=dim,
        BLOCK_N=block_n,
        HAS_IDS=head_ids is not None,
        HAS_ITEMS=items is not None,
        SPLIT=split,
        UPCAST=upcast,
        IEEE=k_cache.dtype == torch.float32,
        SOFTCAP=bool(softcap),
        WINDOW=window is not None,
        PDL=pdl,
        num_warps=TUNING["num_warps"],
        num_stages=stages,
        launch_pdl=pdl,
    )
    if split:
        merge_partials(part_m, part_l, part_acc, count, out, head_ids, n_list, group)
    return out


@functools.lru_cache(maxsize=256)
def work_items(capacity: tuple[int, ...], chunk: int, device: str) -> torch.Tensor:
    """int32 (2 * n_items,) pairs (listed head, chunk index) of every chunk a head with
    ``capacity`` positions can fill, chunk-major (every head's first chunk, then the
    second ...), so the long heads' later chunks come last. Made once per layout and
    chunk (a host-to-device copy: the first call must not be inside a CUDA-graph
    capture; the runtime's warm-up steps make it)."""
    counts = [max(1, cdiv(c, chunk)) for c in capacity]
    pairs = [(i, s) for s in range(max(counts, default=0)) for i, n in enumerate(counts) if s < n]
    return torch.tensor([v for pair in pairs for v in pair], dtype=torch.int32, device=device)


@triton.jit
def _decode_append_kernel(
    KNew,
    VNew,
    K,
    V,
    Lengths,
    Pos,
    Off,
    Sink,
    Ring,
    SpanA,
    SpanB,
    SpanLeast,
    SpanOut,
    SeqLenOut,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    HKV: tl.constexpr,
    HKV_PAD: tl.constexpr,
    D: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_SPAN: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per sequence: store the new token of every KV head, advance the length,
    write the int32 seq_len and spans the attention kernel reads. One program owns a
    sequence's length, so reading it and advancing it cannot race."""
    if PDL:
        tl.extra.cuda.gdc_wait()  # the new token's keys and values
        tl.extra.cuda.gdc_launch_dependents()  # the attention may launch and wait
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    n_old = tl.load(Lengths + b)
    p = tl.load(Pos + b) if HAS_POS else n_old
    real = p >= 0
    h = tl.arange(0, HKV_PAD)
    hmask = h < HKV
    off = tl.load(Off + h, mask=hmask, other=0).to(tl.int64)
    sink = tl.load(Sink + h, mask=hmask, other=0).to(tl.int64)
    ring = tl.maximum(tl.load(Ring + h, mask=hmask, other=1).to(tl.int64), 1)
    pp = tl.maximum(p, 0) + tl.zeros([HKV_PAD], tl.int64)
    slot = off + tl.where(pp < sink, pp, sink + (pp - sink) % ring)
    d = tl.arange(0, D)
    store = (hmask & real)[:, None]
    k = tl.load(KNew + b64 * stride_knb + h[:, None] * stride_knh + d[None, :], mask=store)
    v = tl.load(VNew + b64 * stride_vnb + h[:, None] * stride_vnh + d[None, :], mask=store)
    tl.store(K + b64 * stride_kb + slot[:, None] * stride_kn + d[None, :], k, mask=store)
    tl.store(V + b64 * stride_vb + slot[:, None] * stride_vn + d[None, :], v, mask=store)
    n = n_old + real.to(n_old.dtype)
    tl.store(Lengths + b, n)
    tl.store(SeqLenOut + b, n.to(tl.int32))
    if HAS_SPAN:  # span_at(n) = min(n, max(least, floor(a + b*n + 1/2))), as the cache has it
        a = tl.load(SpanA + h, mask=hmask, other=0.0)
        slope = tl.load(SpanB + h, mask=hmask, other=0.0)
        least = tl.load(SpanLeast + h, mask=hmask, other=1.0)
        nf = n.to(tl.float64)
        span = tl.floor(a + slope * nf + 0.5)
        span = tl.minimum(tl.maximum(span, least), nf)
        tl.store(SpanOut + b * HKV + h, span.to(tl.int32), mask=hmask)


def decode_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    head_offset: torch.Tensor,
    head_sink: torch.Tensor,
    head_ring: torch.Tensor,
    seq_len_out: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    span_affine: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    span_out: torch.Tensor | None = None,
) -> None:
    """Store one decode token per sequence and update the step's metadata, one launch.

    Replaces the PyTorch scatter + length update + span arithmetic of a decode step
    (about thirty small kernels per layer) with one small kernel; no host sync.

    Args:
        k_new, v_new: (B, Hkv, D) the new token's keys / values (last dim contiguous).
        k_cache, v_cache: (B, C_total, D) packed caches (layout in the module doc).
        lengths: int64 (B,) tokens held per sequence; advanced in place by one per real
            token.
        head_offset, head_sink, head_ring: int32 (Hkv,) slot geometry.
        seq_len_out: int32 (B,) written with the new lengths.
        positions: optional int64 (B,) position of the new token, -1 for padding (not
            stored, length kept); default: the current length.
        span_affine: optional float64 (Hkv,) tables (a, b, least) of every head's
            ``span_at(n) = min(n, max(least, floor(a + b*n + 1/2)))``; with ``span_out``
            (int32 (B, Hkv), contiguous) the spans at the new lengths are written there.
    """
    batch, hkv, dim = k_new.shape
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new {tuple(v_new.shape)} != k_new {tuple(k_new.shape)}")
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {dim}")
    has_span = span_affine is not None
    if has_span and (span_out is None or not span_out.is_contiguous()):
        raise ValueError("span_affine needs a contiguous int32 span_out (B, Hkv)")
    if batch == 0:
        return
    pdl = use_pdl(k_new.device)
    _decode_append_kernel[(batch,)](
        k_new,
        v_new,
        k_cache,
        v_cache,
        lengths,
        positions if positions is not None else lengths,
        head_offset,
        head_sink,
        head_ring,
        span_affine[0] if has_span else lengths,
        span_affine[1] if has_span else lengths,
        span_affine[2] if has_span else lengths,
        span_out if has_span else seq_len_out,
        seq_len_out,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        HKV=hkv,
        HKV_PAD=next_pow2(hkv),
        D=dim,
        HAS_POS=positions is not None,
        HAS_SPAN=has_span,
        PDL=pdl,
        num_warps=1,
        launch_pdl=pdl,
        enable_fp_fusion=False,  # a + b*n rounded as PyTorch does (no fma): same spans
    )
