"""SparQ decode (arXiv 2312.04985) with GQA: side-buffer scoring, radix top-k, masked attend.

Why this shape: at 1/8 transfer the exact attention reads only k = N/16 rows, so the step
is won or lost in step 1 (r components of every key) and in picking the top k. Step 1
reads a transposed side buffer ``kt`` (B, n_sparq, D, capacity) of the SparQ heads' keys,
fp8 e4m3 by default (``moa_search.patterns.SPARQ_SIDE_DTYPE``, written by the runtime cache
in prefill and at every decode step): the r rows of one head are contiguous runs of
positions, so the read is coalesced and costs N * r bytes. Without ``kt`` the same kernels
gather r columns from the packed cache (a whole 32-byte sector per component).

Launches per call (no torch ops, no host sync; every size is a Python int):

1. ``_lse_kernel``: per program (row = (b, head), chunk of positions) the top-r components
   of |q| summed over the group (ranked in-kernel) and the scaled gathered query, then
   s_hat = q[idx] . K[:, idx] (log2 units) and per-chunk softmax partials per query head.
   Program 0 of a row stores the components and zeroes the row's histograms.
2. ``_keys_kernel``: recomputes s_hat (reading ``kt`` again is as cheap as a round trip of
   the fp32 scores), turns it into the selection score sum_g p_hat_g (softmax over the
   partials' normalisers), stores it as an int32 key (fp32 bits of a non-negative value
   order like the float; -1 for the ``local`` newest positions and past n) and adds the
   top 8 bits to the row's level-0 histogram.
3. ``_radix_kernel`` x3: exact radix select of the k-th largest key, 8 bits a level
   (bits 30-23, 22-15, 14-7, 6-0): every program re-derives the chosen prefix from the
   previous levels' histograms (256 ints each) and histograms the next digit of the keys
   that match it. The last level also stores, per chunk, how many keys reach each value of
   the final digit, so that step 4 can place its rows without atomics.
4. ``_compact_kernel``: keys above the threshold, and keys equal to it in position order
   until exactly k_eff are chosen (ties are deterministic), written in ascending position
   order, then the ``local`` newest positions.
5. ``_attend_kernel``: exact softmax(scale q.K) over the chosen rows of the normal K/V
   cache (split-K) and alpha_g = sum of p_hat_g over them, recomputed from the K rows
   already loaded (rounded to the side buffer's dtype, so alpha uses the same s_hat as the
   selection); the shared merge kernel writes alpha * y + (1 - alpha) * v_sum / n.

The float64 reference (``kernels.reference.sparq_decode_ref``) takes the side buffer's
rounding (``score_dtype``), so tests hold the kernel to the same algorithm exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..patterns import SPARQ_SIDE_DTYPE, sectors_touched
from ..patterns import sparq_side_keys as to_side
from ._common import cdiv, check_common, fit_tiles, interpreting, next_pow2, pick_chunk
from .decode import LOG2E, _dot, merge_partials

#: Launch knobs, one place (the benchmark's ``--sweep`` overrides them). Score: positions per
#: tile (``score_block``; one (1, block) load per component, all r in flight), positions per
#: program (``score_chunk_lo/hi``, aiming at ``score_per_sm`` programs per SM), warps, and
#: ``fp8_decode`` (1: e4m3 bytes decoded with integer ops, 0: the hardware conversion).
#: Select: the radix/compaction programs' own chunking (the keys are only 4 bytes a
#: position, so their programs take more positions than the scoring ones).
#: score_warps=4 won every point of `benchmarks/sparq_decode.py --sweep` on an H200
#: (B=8 64k 1/8: 284 vs 316 us; 1/4: 455 vs 582 us; B=1 128k 1/8: 107 vs 113 us).
TUNING: dict[str, int] = {
    "score_block": 1024,
    "score_chunk_lo": 2048,
    "score_chunk_hi": 8192,
    "score_per_sm": 16,
    "score_warps": 4,
    "fp8_decode": 1,
    "radix_block": 2048,
    "select_chunk_lo": 4096,
    "select_chunk_hi": 16384,
    "select_per_sm": 8,
    "select_warps": 4,
    "attend_block": 32,
    "attend_chunk_lo": 64,
    "attend_chunk_hi": 512,
    "attend_per_sm": 16,
    "num_warps": 4,
    "num_stages": 3,
}

#: radix levels over a non-negative fp32's 31 bits: (shift, mask) per level
_RADIX = ((23, 255), (15, 255), (7, 255), (0, 127))
#: side-buffer rounding codes the kernels understand (see ``_round_side``)
_ROUND = {None: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}
#: int32 slots per row of the radix state: (prefix, keys still to take) after levels 0..L-1
_STATE = 8


def side_round_code(side_dtype: torch.dtype, key_dtype: torch.dtype) -> int:
    """How the kernels round K to the side buffer's values: 0 none (same dtype), 1 bf16,
    2 fp8 e4m3. Raises for a side dtype that is not a rounding of ``key_dtype``."""
    if side_dtype == key_dtype:
        return 0
    if side_dtype in _ROUND and side_dtype is not None:
        return _ROUND[side_dtype]
    raise ValueError(f"side buffer dtype {side_dtype} is not supported for {key_dtype} keys")


@triton.jit
def _round_side(x, ROUND: tl.constexpr):
    """fp32 x rounded (to nearest even) as ``patterns.sparq_side_keys`` rounds it, in
    plain fp32/int ops so that the CPU interpreter and the GPU agree bit for bit."""
    if ROUND == 1:  # bf16: keep 7 mantissa bits
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:  # fp8 e4m3fn: 3 mantissa bits, subnormal step 2^-9, max 448
        a = tl.minimum(tl.abs(x), 448.0)
        bits = a.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        normal = tl.minimum(bits.to(tl.float32, bitcast=True), 448.0)
        sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        r = tl.where(a < 0.015625, sub, normal)
        x = tl.where(x < 0, -r, r)
    return x


@triton.jit
def _side_f32(kc, FP8_BITS: tl.constexpr):
    """Side-buffer values as fp32. FP8_BITS: ``kc`` holds raw e4m3 bytes (uint8), decoded
    with integer ops and one exact multiply: the e4m3 fields moved into an fp32's place
    times 2^120 re-bias the exponent, and turn e4m3 subnormals into fp32 subnormals of the
    same value (NaN bytes aside, which the saturating writer never stores). Why: the
    hardware fp8 -> fp32 conversions are quarter-rate and made the fp8 scoring pass
    compute-bound (slower than the bf16 buffer with twice the bytes)."""
    if FP8_BITS:
        b = kc.to(tl.int32)
        bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
        x = bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120
    else:
        x = kc.to(tl.float32)
    return x


@triton.jit
def _query_setup(Q, b64, h, stride_qb, stride_qh, R, G: tl.constexpr, G_P2: tl.constexpr,
                 R_PAD: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Top-r components of |q| summed over the group (ties: lower index) and the gathered
    query scaled by log2(e) / sqrt(D * sum|q[idx]| / sum|q|) per head (so dots are s_hat in
    log2 units)."""
    g = tl.arange(0, G_P2)
    gmask = g < G
    d = tl.arange(0, D)
    q_rows = Q + b64 * stride_qb + (h * G + g)[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    qa = tl.abs(q)
    tot = tl.sum(qa, 0)
    # rank by (sum |q|, lower index first): a non-negative float's bits order like it, so
    # one sort of packed int64 keys (no D x D comparison: Gemma's D = 256 would not fit)
    key = (tot.to(tl.int32, bitcast=True).to(tl.int64) << 9) | (D - 1 - d).to(tl.int64)
    ranked = tl.sort(key, 0, descending=True)
    jj = tl.arange(0, R_PAD)
    rmask = jj < R
    first = tl.sum(tl.where(d[None, :] == jj[:, None], ranked[None, :], 0), 1)  # (R_PAD,)
    idx = tl.where(rmask, D - 1 - (first & 511).to(tl.int32), 0)
    qr = tl.load(q_rows + idx[None, :], mask=gmask[:, None] & rmask[None, :], other=0.0)
    qr = qr.to(tl.float32)
    q_sel = tl.sum(tl.abs(qr), 1)
    approx = tl.sqrt(D * q_sel / tl.maximum(tl.sum(qa, 1), 1e-30))
    fac = 1.4426950408889634 / tl.maximum(approx, 1e-30)
    return idx, qr * fac[:, None]


@triton.jit
def _query_kernel(Q, HeadIds, Idx, Qr, Hist, stride_qb, stride_qh, R, n_list,
                  G: tl.constexpr, G_P2: tl.constexpr, R_PAD: tl.constexpr,
                  D: tl.constexpr):  # fmt: skip
    """Per row (b, head): the components and scaled query (once, not in every scoring
    program: the in-kernel sort was a large share of a short program) and zeroed
    histograms."""
    pid = tl.program_id(0)  # b * n_list + i
    h = tl.load(HeadIds + pid % n_list)
    idx, qr = _query_setup(Q, (pid // n_list).to(tl.int64), h, stride_qb, stride_qh, R, G,
                           G_P2, R_PAD, D)  # fmt: skip
    jj = tl.arange(0, R_PAD)
    g = tl.arange(0, G_P2)
    tl.store(Idx + pid * R_PAD + jj, idx)
    tl.store(Qr + pid * R_PAD * G_P2 + jj[None, :] * G_P2 + g[:, None], qr)  # (R_PAD, G_P2)
    tl.store(Hist + pid * 1024 + tl.arange(0, 1024), tl.zeros([1024], tl.int32))


@triton.jit
def _approx_block(base, IdxRow, QrRow, start, hi, stride_c, stride_p, R: tl.constexpr,
                  R_PAD: tl.constexpr, G_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                  FP8_BITS: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """s_hat (G_P2, BLOCK_N) of positions start + [0, BLOCK_N) (-inf at and past ``hi``).

    One (1, BLOCK_N) load per component row, unrolled so that all r loads are in flight
    before the first is used; the row is contiguous in the side buffer (coalesced), and
    the (1, BLOCK_N) shape keeps every query head of the group in the same thread's
    registers (the products need no shuffles or reductions). MASKED only for a chunk's
    last, partial block: a mask that may end anywhere stops Triton from vectorizing the
    loads (one byte a load). Exact fp32 products in component order (no tensor cores), so
    the float64 reference picks the same rows.
    """
    p = start + tl.arange(0, BLOCK_N)[None, :]
    off = p.to(tl.int64) * stride_p
    g = tl.arange(0, G_P2)
    s = tl.zeros([G_P2, BLOCK_N], tl.float32)
    # reloaded per block (L1 hits) rather than hoisted out of the loop: r * G_P2 query
    # values and r row pointers held in every thread cost 200+ registers (occupancy 1).
    # ``zero`` is 0 (start >= 0) but depends on the loop, so Triton does not hoist them.
    zero = tl.minimum(start, 0)
    for j in tl.static_range(R):
        c = tl.load(IdxRow + zero + j).to(tl.int64)
        qj = tl.load(QrRow + zero + j * G_P2 + g)  # (G_P2,), 0 past G
        if MASKED:
            kc = tl.load(base + c * stride_c + off, mask=p < hi)  # masked lanes: -inf below
        else:
            kc = tl.load(base + c * stride_c + off)
        s += qj[:, None] * _side_f32(kc, FP8_BITS)
    if MASKED:
        s = tl.where(p < hi, s, float("-inf"))
    return s


@triton.jit
def _row_base(Src, Off, HeadIds, b, i, stride_sb, stride_si, stride_so):
    """Where row (b, head i) of step 1's source starts (int64 offsets)."""
    off = tl.load(Off + tl.load(HeadIds + i)).to(tl.int64)
    return Src + b.to(tl.int64) * stride_sb + i.to(tl.int64) * stride_si + off * stride_so


@triton.jit
def _online_lse(s, m_i, l_e):
    """Running max per query head (G_P2,) and per-element sums of exp2 (G_P2, BLOCK)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_e = l_e * tl.exp2(m_i - m_use)[:, None] + tl.exp2(s - m_use[:, None])
    return m_new, l_e


@triton.jit
def _lse_kernel(Src, Off, HeadIds, SeqLen, Idx, Qr, PartM, PartL, stride_sb, stride_si,
                stride_so, stride_c, stride_p, n_list, chunk, num_splits, G: tl.constexpr,
                G_P2: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, FP8_BITS: tl.constexpr):  # fmt: skip
    """Per (row, chunk): softmax partials (max, sum of exp2) of s_hat per query head. The
    sum stays per element (one exp2 a score, no per-tile sum reduction) until the end."""
    pid = tl.program_id(0)  # b * n_list + i
    sid = tl.program_id(1)
    b = pid // n_list
    n = tl.load(SeqLen + b)
    base = _row_base(Src, Off, HeadIds, b, pid % n_list, stride_sb, stride_si, stride_so)
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, n)
    m_i = tl.full([G_P2], float("-inf"), tl.float32)
    l_e = tl.zeros([G_P2, BLOCK_N], tl.float32)
    idx_row, qr_row = Idx + pid * R_PAD, Qr + pid * G_P2 * R_PAD
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, full_end, BLOCK_N):
        s = _approx_block(base, idx_row, qr_row, start, hi, stride_c, stride_p, R, R_PAD, G_P2,
                          BLOCK_N, FP8_BITS, False)  # fmt: skip
        m_i, l_e = _online_lse(s, m_i, l_e)
    if full_end < hi:
        s = _approx_block(base, idx_row, qr_row, full_end, hi, stride_c, stride_p, R, R_PAD,
                          G_P2, BLOCK_N, FP8_BITS, True)  # fmt: skip
        m_i, l_e = _online_lse(s, m_i, l_e)
    g = tl.arange(0, G_P2)
    gmask = g < G
    row = pid * num_splits + sid
    tl.store(PartM + row * G_P2 + g, m_i, mask=gmask)  # -inf / 0 for chunks past n
    tl.store(PartL + row * G_P2 + g, tl.sum(l_e, 1), mask=gmask)


@triton.jit
def _row_lse(PartM, PartL, pid, num_splits, gmask, G_P2: tl.constexpr, BLOCK_S: tl.constexpr):
    """log2-sum-exp2 of s_hat per query head from a row's chunk partials."""
    g = tl.arange(0, G_P2)
    m = tl.full([G_P2], float("-inf"), tl.float32)
    lsum = tl.zeros([G_P2], tl.float32)
    for s_start in range(0, num_splits, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = gmask[:, None] & (s < num_splits)[None, :]
        rows = (pid * num_splits + s)[None, :] * G_P2 + g[:, None]
        ms = tl.load(PartM + rows, mask=mask, other=float("-inf"))
        ls = tl.load(PartL + rows, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(ms, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        lsum = lsum * tl.exp2(m - m_use) + tl.sum(ls * tl.exp2(ms - m_use[:, None]), 1)
        m = m_new
    return tl.where(gmask, m + tl.log2(tl.where(gmask, lsum, 1.0)), 0.0)


@triton.jit
def _store_keys(s, lse, gmask, key_row, start, hi, n_cand, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """Selection keys of one block (fp32 bits of sum_g p_hat_g, -1 for the forced newest
    positions) stored (unmasked, vector stores, for full blocks), and their level-0 radix
    histogram (top 8 bits) returned."""
    sel = tl.sum(tl.where(gmask[:, None], tl.exp2(s - lse[:, None]), 0.0), 0)
    p = start + tl.arange(0, BLOCK_N)
    cand = p < n_cand
    key = tl.where(cand, sel.to(tl.int32, bitcast=True), -1)
    if MASKED:
        tl.store(key_row + p, key, mask=p < hi)
    else:
        tl.store(key_row + p, key)
    return tl.histogram(tl.where(cand, key >> 23, 0), 256, mask=cand)


@triton.jit
def _keys_kernel(Src, Off, HeadIds, SeqLen, Idx, Qr, PartM, PartL, Lse, Keys, Hist,
                 stride_sb, stride_si, stride_so, stride_c, stride_p, n_list, npad, chunk,
                 num_splits, local, G: tl.constexpr, G_P2: tl.constexpr, R: tl.constexpr,
                 R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 FP8_BITS: tl.constexpr):  # fmt: skip
    """Per (row, chunk): s_hat again (reading r side-buffer bytes costs less than a round
    trip of G fp32 scores), the selection key of every position and the level-0 radix
    histogram (fused here, so the select stage reads the keys once per remaining level)."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_list
    n = tl.load(SeqLen + b)
    g = tl.arange(0, G_P2)
    gmask = g < G
    lse = _row_lse(PartM, PartL, pid, num_splits, gmask, G_P2, BLOCK_S)
    if sid == 0:
        tl.store(Lse + pid * G_P2 + g, lse)
    base = _row_base(Src, Off, HeadIds, b, pid % n_list, stride_sb, stride_si, stride_so)
    n_cand = n - tl.minimum(local, n)  # the newest `local` positions are chosen anyway
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, n)
    hist = tl.zeros([256], tl.int32)
    key_row = Keys + pid.to(tl.int64) * npad
    idx_row, qr_row = Idx + pid * R_PAD, Qr + pid * G_P2 * R_PAD
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, full_end, BLOCK_N):
        s = _approx_block(base, idx_row, qr_row, start, hi, stride_c, stride_p, R, R_PAD, G_P2,
                          BLOCK_N, FP8_BITS, False)  # fmt: skip
        hist += _store_keys(s, lse, gmask, key_row, start, hi, n_cand, BLOCK_N, False)
    if full_end < hi:
        s = _approx_block(base, idx_row, qr_row, full_end, hi, stride_c, stride_p, R, R_PAD,
                          G_P2, BLOCK_N, FP8_BITS, True)  # fmt: skip
        hist += _store_keys(s, lse, gmask, key_row, full_end, hi, n_cand, BLOCK_N, True)
    tl.atomic_add(Hist + pid * 1024 + tl.arange(0, 256), hist)


@triton.jit
def _k_eff(KTensor, stride_kt, b, i, n, k_scalar, local, k_max, K_TENSOR: tl.constexpr):
    """Rows attended exactly: min(max(k, min(local, n)), n), at most the list's k_max."""
    if K_TENSOR:  # noqa: SIM108 - constexpr branch: the load exists only with a tensor k
        kb = tl.load(KTensor + b * stride_kt + i)
    else:
        kb = k_scalar + 0 * n
    return tl.minimum(tl.minimum(tl.maximum(kb, tl.minimum(local, n)), n), k_max)


@triton.jit
def _descend_step(Hist, pid, prefix, need, LEV: tl.constexpr):
    """One radix level: the bin of level LEV holding the ``need``-th largest key among
    those of ``prefix`` (the highest bin whose count from the top reaches it; keys in
    higher bins are all taken), appended to the prefix, and the keys still to take."""
    j = tl.arange(0, 256)
    h = tl.load(Hist + pid * 1024 + LEV * 256 + j)
    c = tl.cumsum(h, 0, reverse=True)
    bin_ = tl.maximum(tl.max(tl.where(c >= need, j, -1), 0), 0)
    need -= tl.sum(tl.where(j == bin_, c - h, 0), 0)
    width = 7 if LEV == 3 else 8
    return (prefix << width) | bin_, need


@triton.jit
def _level_state(Hist, State, pid, sid, need0, LEVEL: tl.constexpr):
    """(prefix, need) after levels 0..LEVEL-1: the previous launch's state (stored by its
    chunk-0 programs) plus one step, instead of every program re-walking all levels (a
    chain of dependent loads in front of a short program). Chunk 0 stores the result for
    the next launch (a separate slot per level: no program reads what this one writes)."""
    if LEVEL == 1:
        prefix = need0 * 0
        need = need0
    else:
        prefix = tl.load(State + pid * 8 + 2 * (LEVEL - 1))
        need = tl.load(State + pid * 8 + 2 * (LEVEL - 1) + 1)
    prefix, need = _descend_step(Hist, pid, prefix, need, LEVEL - 1)
    if LEVEL < 4:  # noqa: SIM102 - a constexpr branch around a runtime one
        if sid == 0:
            tl.store(State + pid * 8 + 2 * LEVEL, prefix)
            tl.store(State + pid * 8 + 2 * LEVEL + 1, need)
    return prefix, need


@triton.jit
def _radix_kernel(Keys, Hist, State, Ge, SeqLen, KTensor, stride_kt, n_list, npad, k_max, chunk,
                  num_splits, k_scalar, local, LEVEL: tl.constexpr, SHIFT_PREV: tl.constexpr,
                  SHIFT: tl.constexpr, MASK: tl.constexpr, K_TENSOR: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """Radix level LEVEL (1-3): histogram of the next digit of the keys matching the
    prefix; level 3 also stores, per chunk, how many keys reach each final digit."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_list
    n = tl.load(SeqLen + b)
    need0 = _k_eff(KTensor, stride_kt, b, pid % n_list, n, k_scalar, local, k_max, K_TENSOR)
    need0 -= tl.minimum(local, n)
    prefix, need = _level_state(Hist, State, pid, sid, need0, LEVEL)
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, n)
    hist = tl.zeros([256], tl.int32)
    above = lo * 0
    key_row = Keys + pid.to(tl.int64) * npad
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        key = tl.load(key_row + p, mask=p < hi, other=-1)
        top = key >> SHIFT_PREV
        match = (key >= 0) & (top == prefix)
        above += tl.sum(((key >= 0) & (top > prefix)).to(tl.int32), 0)
        if tl.max(match.to(tl.int32), 0) > 0:  # most blocks hold no key of the prefix
            hist += tl.histogram(tl.where(match, (key >> SHIFT) & MASK, 0), 256, mask=match)
    tl.atomic_add(Hist + pid * 1024 + LEVEL * 256 + tl.arange(0, 256), hist)
    if LEVEL == 3:  # per chunk: keys >= (prefix, digit) for every digit, for the compaction
        reach = tl.cumsum(hist, 0, reverse=True) + above
        tl.store(Ge + (pid * num_splits + sid).to(tl.int64) * 256 + tl.arange(0, 256), reach)


@triton.jit
def _compact_kernel(
    Keys,
    Hist,
    State,
    Ge,
    SeqLen,
    KTensor,
    Top,
    stride_kt,
    n_list,
    npad,
    k_max,
    chunk,
    num_splits,
    k_scalar,
    local,
    K_TENSOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_list
    i = pid % n_list
    n = tl.load(SeqLen + b)
    n_local = tl.minimum(local, n)
    take = _k_eff(KTensor, stride_kt, b, i, n, k_scalar, local, k_max, K_TENSOR) - n_local
    thresh, ties = _level_state(Hist, State, pid, sid, take, 4)
    digit = thresh & 127
    # rows the earlier chunks write: those above the threshold, and ties in position order
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    ge = Ge + (pid * num_splits + s).to(tl.int64) * 256
    gt = tl.load(ge + digit + 1, mask=smask, other=0)
    eq = tl.load(ge + digit, mask=smask, other=0) - gt
    tie_before = tl.cumsum(eq, 0) - eq
    took = tl.minimum(tl.maximum(ties - tie_before, 0), eq)
    before = smask & (s < sid)
    out_at = tl.sum(tl.where(before, gt + took, 0), 0)
    tie_rank = tl.sum(tl.where(before, eq, 0), 0)
    top_row = Top + pid.to(tl.int64) * k_max
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, n)
    key_row = Keys + pid.to(tl.int64) * npad
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        key = tl.load(key_row + p, mask=p < hi, other=-1)
        is_eq = (key == thresh).to(tl.int32)
        rank = tie_rank + tl.cumsum(is_eq, 0) - is_eq
        pick = ((key > thresh) | ((is_eq > 0) & (rank < ties))).to(tl.int32)
        tl.store(top_row + out_at + tl.cumsum(pick, 0) - pick, p, mask=pick > 0)
        out_at += tl.sum(pick, 0)
        tie_rank += tl.sum(is_eq, 0)
    if sid == 0:  # the newest positions close the list (it stays in position order)
        for j0 in range(0, n_local, BLOCK_L):
            j = j0 + tl.arange(0, BLOCK_L)
            tl.store(top_row + take + j, n - n_local + j, mask=j < n_local)


@triton.jit
def _attend_kernel(
    Q,
    K,
    V,
    Off,
    HeadIds,
    SeqLen,
    Top,
    KTensor,
    Idx,
    Qr,
    Lse,
    PartM,
    PartL,
    PartAcc,
    PartAlpha,
    Count,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_kt,
    n_list,
    k_max,
    k_scalar,
    local,
    chunk,
    num_splits,
    qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    G_P2: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_TENSOR: tl.constexpr,
    ROUND: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_list
    i = pid % n_list
    h = tl.load(HeadIds + i)
    n = tl.load(SeqLen + b)
    off = tl.load(Off + h).to(tl.int64)
    lim = _k_eff(KTensor, stride_kt, b, i, n, k_scalar, local, k_max, K_TENSOR)
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, lim)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gmask = g < G
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None],
        other=0.0,
    ).to(K.dtype.element_ty)
    g2 = tl.arange(0, G_P2)
    jj = tl.arange(0, R_PAD)
    idx = tl.load(Idx + pid * R_PAD + jj)
    qr = tl.load(Qr + pid * R_PAD * G_P2 + jj[None, :] * G_P2 + g2[:, None])  # 0 past G, r
    lse = tl.load(Lse + pid * G_P2 + g2)
    k_base = K + b64 * stride_kb + off * stride_kn
    v_base = V + b64 * stride_vb + off * stride_vn
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    asum = tl.zeros([G_P2], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < hi
        pos = tl.load(Top + pid.to(tl.int64) * k_max + j, mask=valid, other=0).to(tl.int64)
        k = tl.load(k_base + pos[:, None] * stride_kn + d[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + pos[:, None] * stride_vn + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new
        # the chosen rows' approximate mass: their r components (cache lines just loaded),
        # rounded as the side buffer holds them
        kr = tl.load(k_base + pos[None, :] * stride_kn + idx[:, None], mask=valid[None, :])
        sa = tl.sum(qr[:, :, None] * _round_side(kr.to(tl.float32), ROUND)[None, :, :], 1)
        p_hat = tl.where(valid[None, :], tl.exp2(sa - lse[:, None]), 0.0)  # (G_P2, BLOCK_N)
        asum += tl.sum(p_hat, 1)
    if sid == 0:
        tl.store(Count + pid, tl.cdiv(lim, chunk))
    if lo < lim:
        row = pid * num_splits + sid
        tl.store(PartM + row * G + g, m_i, mask=gmask)
        tl.store(PartL + row * G + g, l_i, mask=gmask)
        tl.store(PartAlpha + row * G + g2, asum, mask=g2 < G)
        tl.store(PartAcc + (row * G + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _side_append_kernel(
    KNew,
    Kt,
    HeadIds,
    Pos,
    Ring,
    stride_knb,
    stride_knh,
    stride_ktb,
    stride_kth,
    stride_ktd,
    n_list,
    D: tl.constexpr,
    ROUND: tl.constexpr,
):
    """kt[b, i, :, pos % ring_i] = round(k_new[b, head_ids[i]]) unless pos < 0 (padding)."""
    pid = tl.program_id(0)
    b = pid // n_list
    i = pid % n_list
    p = tl.load(Pos + b)
    if p >= 0:
        h = tl.load(HeadIds + i)
        slot = (p % tl.load(Ring + i)).to(tl.int64)
        d = tl.arange(0, D)
        k = tl.load(KNew + b.to(tl.int64) * stride_knb + h * stride_knh + d).to(tl.float32)
        k = _round_side(k, ROUND)
        dst = Kt + b.to(tl.int64) * stride_ktb + i * stride_kth + d.to(tl.int64) * stride_ktd
        tl.store(dst + slot, k.to(Kt.dtype.element_ty))


def sparq_side_append(
    kt: torch.Tensor,
    k_new: torch.Tensor,
    head_ids: torch.Tensor,
    pos: torch.Tensor,
    ring: torch.Tensor,
) -> None:
    """Store one decode token's keys in the side buffer, one launch, no host sync.

    kt: (B, n_sparq, D, capacity) side buffer; k_new: (B, Hkv, D) new keys (last dim
    contiguous); head_ids: int32 (n_sparq,) KV head of each kt row; pos: (B,) position of
    the token, -1 for padding (skipped); ring: int32 (n_sparq,) slots of each head (the slot
    is pos % ring, as in the packed cache of a sink-free head)."""
    batch, n_s = kt.shape[:2]
    if batch == 0 or n_s == 0:
        return
    _side_append_kernel[(batch * n_s,)](
        k_new,
        kt,
        head_ids,
        pos,
        ring,
        k_new.stride(0),
        k_new.stride(1),
        kt.stride(0),
        kt.stride(1),
        kt.stride(2),
        n_s,
        D=kt.shape[2],
        ROUND=side_round_code(kt.dtype, k_new.dtype),
        num_warps=1,
    )


def sparq_kt_from_cache(
    k_cache: torch.Tensor,
    head_offset: torch.Tensor,
    head_ids: torch.Tensor,
    length: int,
    dtype: torch.dtype = SPARQ_SIDE_DTYPE,
) -> torch.Tensor:
    """Side buffer (B, n_sparq, D, length) of the SparQ heads, head order of ``head_ids``:
    kt[b, i, :, p] = to_side(k_cache[b, head_offset[head_ids[i]] + p]). Syncs (reads the
    offsets): for prefill and tests, not for the decode loop (:func:`sparq_side_append`)."""
    offs = head_offset[head_ids.long()].tolist()
    cols = [to_side(k_cache[:, o : o + length], dtype).transpose(1, 2) for o in offs]
    return torch.stack(cols, 1).contiguous()


def _source(k_cache: torch.Tensor, kt: torch.Tensor | None) -> tuple[torch.Tensor, tuple, bool]:
    """(tensor, (stride_b, stride_head_row, stride_offset, stride_component, stride_pos),
    fp8_bits) of what step 1 reads: the side buffer (an fp8 one as its raw bytes when
    ``TUNING["fp8_decode"]`` asks for the integer decode), or the packed cache's r columns."""
    if kt is None:
        return k_cache, (k_cache.stride(0), 0, k_cache.stride(1), 1, k_cache.stride(1)), False
    strides = (kt.stride(0), kt.stride(1), 0, kt.stride(2), kt.stride(3))
    if kt.dtype == torch.float8_e4m3fn and TUNING["fp8_decode"]:
        return kt.view(torch.uint8), strides, True
    return kt, strides, False


def sparq_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_offset: torch.Tensor,
    seq_len: torch.Tensor,
    v_sum: torch.Tensor,
    r: int,
    k: int | torch.Tensor,
    local: int,
    scale: float,
    head_ids: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    max_len: int | None = None,
    k_max: int | None = None,
    kt: torch.Tensor | None = None,
    marks: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """SparQ decode for the KV heads ``head_ids`` (dense layout, slot = offset + position).

    Args:
        q: (B, Hq, D) newest query; k_cache, v_cache: (B, C_total, D) packed caches.
        head_offset: int32 (Hkv,); seq_len: int32 (B,) tokens including the new one.
        v_sum: fp32 (B, n_sparq, D) running sum of V over the sequence, rows in head_ids order.
        r: components per group (Python int, shared by the listed heads).
        k: positions attended exactly: a Python int, or an int32 (B, n_sparq) tensor (then
            pass ``k_max``). k_eff = min(max(k, min(local, n)), n).
        local: newest positions always selected (Python int).
        scale: softmax scale of the exact attention.
        head_ids: int32 (n_sparq,) KV heads to compute; other heads of ``out`` untouched.
        out: optional (B, Hq, D) output, dtype of q.
        max_len: Python-int upper bound of seq_len (sizes the grids and the workspace).
        k_max: Python-int upper bound of a tensor k; defaults to max_len.
        kt: the side buffer (B, n_sparq, D, >= max_len), last dim contiguous, dtype fp8
            e4m3, bf16 or K's (see :func:`sparq_kt_from_cache`); without it step 1
            gathers r columns of the packed cache.
        marks: called with "score", "select" and "attend" before each stage and "end"
            after (the benchmark records CUDA events there).

    Workspace per call: int32 keys (B, n_sparq, max_len), histograms and small partials.
    """
    batch, hq, dim = check_common(q, k_cache, v_cache)
    hkv = head_offset.shape[0]
    group = hq // hkv
    out = torch.empty_like(q) if out is None else out
    n_s = head_ids.numel()
    if batch == 0 or n_s == 0:
        return out
    npad = max_len if max_len is not None else k_cache.shape[1]
    if kt is not None and (
        kt.shape[:3] != (batch, n_s, dim) or kt.shape[3] < npad or kt.stride(3) != 1
    ):
        raise ValueError(f"kt must be (B, n_sparq, D, >= max_len), got {tuple(kt.shape)}")
    rnd = side_round_code(kt.dtype, k_cache.dtype) if kt is not None else 0
    r = max(1, min(int(r), dim))
    k_tensor = isinstance(k, torch.Tensor)
    want = (k_max if k_max is not None else npad) if k_tensor else int(k)
    kmax = min(max(want, int(local), 1), npad)  # the list always holds the local positions
    k_arg = k.contiguous() if k_tensor else seq_len
    k_args = (k_arg, k_arg.stride(0) if k_tensor else 0)
    k_scalar = 0 if k_tensor else kmax
    note = marks or (lambda _stage: None)
    ws = _Workspace(batch * n_s, group, r, dim, npad, q.device)
    note("score")
    _score(q, k_cache, kt, head_offset, head_ids, seq_len, ws, int(local))
    note("select")
    top = torch.empty(ws.rows, kmax, dtype=torch.int32, device=q.device)
    _select(ws, seq_len, k_args, top, kmax, k_scalar, int(local), k_tensor)
    note("attend")
    _attend(q, k_cache, v_cache, head_offset, head_ids, seq_len, v_sum, out, ws, top,
            k_args, kmax, k_scalar, int(local), scale, k_tensor, rnd)  # fmt: skip
    note("end")
    return out


class _Workspace:
    """Per-call buffers shared by the stages, and the score/select launch geometry."""

    def __init__(self, rows: int, group: int, r: int, dim: int, npad: int, dev: torch.device):
        tn = TUNING
        self.rows, self.group, self.npad, self.r = rows, group, npad, r
        self.g_p2, self.r_pad = max(2, next_pow2(group)), max(16, next_pow2(r))
        self.score_block = tn["score_block"]
        self.chunk = pick_chunk(npad, rows, dev, self.score_block, tn["score_chunk_lo"],
                                tn["score_chunk_hi"], tn["score_per_sm"])  # fmt: skip
        self.splits = cdiv(npad, self.chunk)
        self.sel_chunk = pick_chunk(npad, rows, dev, tn["radix_block"], tn["select_chunk_lo"],
                                    tn["select_chunk_hi"], tn["select_per_sm"])  # fmt: skip
        self.sel_splits = cdiv(npad, self.sel_chunk)
        i32 = {"dtype": torch.int32, "device": dev}
        f32 = {"dtype": torch.float32, "device": dev}
        self.idx = torch.empty(rows, self.r_pad, **i32)
        self.qr = torch.empty(rows, self.r_pad, self.g_p2, **f32)  # component-major
        self.hist = torch.empty(rows, 4, 256, **i32)
        self.state = torch.empty(rows, _STATE, **i32)
        self.part_m = torch.empty(rows, self.splits, self.g_p2, **f32)
        self.part_l = torch.empty_like(self.part_m)
        self.lse = torch.empty(rows, self.g_p2, **f32)
        self.keys = torch.empty(rows, npad, **i32)
        self.ge = torch.empty(rows, self.sel_splits, 256, **i32)


def _score(q, k_cache, kt, head_offset, head_ids, seq_len, ws: _Workspace, local) -> None:  # noqa: ANN001
    """Steps 1-2: query components, softmax partials, selection keys and level-0 histogram."""
    src, (sb, si, so, sc, sp), fp8_bits = _source(k_cache, kt)
    n_s, tn = head_ids.numel(), TUNING
    _query_kernel[(ws.rows,)](
        q, head_ids, ws.idx, ws.qr, ws.hist, q.stride(0), q.stride(1), ws.r, n_s, G=ws.group,
        G_P2=ws.g_p2, R_PAD=ws.r_pad, D=q.shape[-1], num_warps=4,
    )  # fmt: skip
    common = dict(G=ws.group, G_P2=ws.g_p2, R=ws.r, R_PAD=ws.r_pad, BLOCK_N=ws.score_block,
                  FP8_BITS=fp8_bits, num_warps=tn["score_warps"])  # fmt: skip
    _lse_kernel[(ws.rows, ws.splits)](
        src, head_offset, head_ids, seq_len, ws.idx, ws.qr, ws.part_m, ws.part_l, sb, si, so,
        sc, sp, n_s, ws.chunk, ws.splits, **common,
    )  # fmt: skip
    _keys_kernel[(ws.rows, ws.splits)](
        src, head_offset, head_ids, seq_len, ws.idx, ws.qr, ws.part_m, ws.part_l, ws.lse,
        ws.keys, ws.hist, sb, si, so, sc, sp, n_s, ws.npad, ws.chunk, ws.splits, local,
        BLOCK_S=min(64, max(16, next_pow2(ws.splits))), **common,
    )  # fmt: skip


def _select(ws: _Workspace, seq_len, k_args, top, kmax, k_scalar, local, k_tensor) -> None:  # noqa: ANN001
    """Step 3: exact top-k positions of the keys (three radix levels, then compaction)."""
    n_s = ws.rows // seq_len.shape[0]
    block, warps = TUNING["radix_block"], TUNING["select_warps"]
    grid = (ws.rows, ws.sel_splits)
    for level in (1, 2, 3):
        shift, mask = _RADIX[level]
        _radix_kernel[grid](
            ws.keys, ws.hist, ws.state, ws.ge, seq_len, *k_args, n_s, ws.npad, kmax,
            ws.sel_chunk, ws.sel_splits, k_scalar, local, LEVEL=level,
            SHIFT_PREV=_RADIX[level - 1][0], SHIFT=shift, MASK=mask, K_TENSOR=k_tensor,
            BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
    _compact_kernel[grid](
        ws.keys, ws.hist, ws.state, ws.ge, seq_len, k_args[0], top, k_args[1], n_s, ws.npad,
        kmax, ws.sel_chunk, ws.sel_splits, k_scalar, local, K_TENSOR=k_tensor, BLOCK_N=block,
        BLOCK_S=max(16, next_pow2(ws.sel_splits)), BLOCK_L=64, num_warps=warps,
    )  # fmt: skip


def _attend(q, k_cache, v_cache, head_offset, head_ids, seq_len, v_sum, out, ws: _Workspace,  # noqa: ANN001
            top, k_args, kmax, k_scalar, local, scale, k_tensor, rnd) -> None:  # fmt: skip
    """Step 4: exact attention over the chosen rows, alpha, and the V-mean epilogue."""
    dev, dim, group, rows = q.device, q.shape[-1], ws.group, ws.rows
    tn = TUNING
    block, stages = fit_tiles(dev, tn["attend_block"], dim, k_cache.element_size(),
                              tn["num_stages"])  # fmt: skip
    chunk = pick_chunk(kmax, rows, dev, block, tn["attend_chunk_lo"], tn["attend_chunk_hi"],
                       tn["attend_per_sm"])  # fmt: skip
    splits = cdiv(kmax, chunk)
    f32 = {"dtype": torch.float32, "device": dev}
    pm = torch.empty(rows, splits, group, **f32)
    pl, palpha = torch.empty_like(pm), torch.empty_like(pm)
    pacc = torch.empty(rows, splits, group, dim, **f32)
    count = torch.empty(rows, dtype=torch.int32, device=dev)
    _attend_kernel[(rows, splits)](
        q, k_cache, v_cache, head_offset, head_ids, seq_len, top, k_args[0], ws.idx, ws.qr,
        ws.lse,
        pm, pl, pacc, palpha, count, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), k_args[1], head_ids.numel(),
        kmax, k_scalar, local, chunk, splits, scale * LOG2E, G=group,
        G_PAD=max(16, next_pow2(group)), D=dim, BLOCK_N=block, K_TENSOR=k_tensor, ROUND=rnd,
        UPCAST=interpreting(), IEEE=k_cache.dtype == torch.float32, G_P2=ws.g_p2,
        R_PAD=ws.r_pad, num_warps=tn["num_warps"], num_stages=stages,
    )  # fmt: skip
    merge_partials(pm, pl, pacc, count, out, head_ids, head_ids.numel(), group,
                   part_alpha=palpha, seq_len=seq_len, v_sum=v_sum)  # fmt: skip


def sparq_kernel_bytes(
    n: int, head_dim: int, r: int, k_eff: int, kv_bytes: int, side_bytes: int | None
) -> dict[str, int]:
    """Bytes one (sequence, head) moves in each stage, counted from this module's launches
    and buffers (``side_bytes`` None: step 1 gathers r components of every packed K row,
    whole 32-byte sectors). The search's declaration is
    ``moa_search.patterns.sparq_step_bytes``; tests and the benchmark compare the two."""
    if side_bytes is None:
        col = 2 * n * sectors_touched(head_dim, r, kv_bytes) * 32
    else:
        col = 2 * n * r * side_bytes  # _lse_kernel and _keys_kernel each read r rows
    key = torch.empty((), dtype=torch.int32).element_size()
    levels = len(_RADIX) - 1
    return {
        "score": round(col) + n * key,  # _keys_kernel writes one key per position
        "select": (levels + 1) * n * key,  # radix levels 1-3 and the compaction read them
        "attend": 2 * k_eff * head_dim * kv_bytes + head_dim * 4,  # rows, fp32 V sum
    }


__all__ = [
    "sparq_decode",
    "sparq_kernel_bytes",
    "sparq_kt_from_cache",
    "sparq_side_append",
    "to_side",
]
