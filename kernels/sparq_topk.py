"""The previous SparQ decode pipeline (torch.topk select), kept as the benchmark's baseline.

Not used by the runtime: :mod:`.sparq` replaced it (side buffer, radix select, no torch
launches per step). ``benchmarks/sparq_decode.py`` times both in one run, so the speedup is
measured against this code rather than against remembered numbers.

For the listed KV heads (dense layout: slot = offset + position):

1. torch: top-r components of |q| summed over the G query heads of the group; the
   gathered query components are pre-divided by sqrt(D * sum|q[idx]| / sum|q|) (per query
   head) and by ln 2, so kernel scores come out in log2 units.
2. ``_scores_kernel``: s_hat = q[idx] . K[:, idx] for all G heads and all valid positions
   (reads r columns of K: from the optional transposed copy ``kt`` it is a contiguous
   read of r rows, from the packed cache a gather), writes s_hat (fp32) and per-chunk
   softmax partials.
3. ``_select_kernel``: p_hat = softmax(s_hat) per query head (normalisers from the
   partials); selection score = sum of p_hat over the group, +inf for the ``local`` newest
   positions, -inf past the sequence.
4. torch.topk of the selection scores (k_max columns).
5. ``_attend_kernel``: exact softmax(scale q.K) over the chosen rows (gather, split-K),
   plus alpha = sum of p_hat over them; the shared merge kernel then writes
   alpha * y + (1 - alpha) * v_sum / n.

No host synchronisation: sizes come from Python ints (max_len, k_max).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..patterns import sparq_query_components
from ._common import cdiv, check_common, fit_tiles, interpreting, next_pow2, pick_chunk
from .decode import LOG2E, _attend_block, merge_partials

TUNING: dict[str, int] = {
    "score_block": 128,
    "score_chunk_lo": 1024,
    "score_chunk_hi": 4096,
    "select_block": 256,
    "attend_block": 32,
    "attend_chunk_lo": 64,
    "attend_chunk_hi": 512,
    "num_warps": 4,
    "num_stages": 3,
}


@triton.jit
def _scores_kernel(
    Qr,
    Idx,
    K,
    Kt,
    Off,
    HeadIds,
    SeqLen,
    S2,
    PartM,
    PartL,
    stride_kb,
    stride_kn,
    stride_ktb,
    stride_kth,
    stride_ktd,
    R,
    n_list,
    npad,
    chunk,
    num_splits,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KT: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_list + i
    sid = tl.program_id(1)
    b = pid // n_list
    i = pid % n_list
    h = tl.load(HeadIds + i)
    n = tl.load(SeqLen + b)
    off = tl.load(Off + h)
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, n)
    rr = tl.arange(0, R_PAD)
    rmask = rr < R
    g = tl.arange(0, G_PAD)
    gmask = g < G
    idx = tl.load(Idx + pid * R + rr, mask=rmask, other=0)
    qr = tl.load(
        Qr + (pid * G + g)[:, None] * R + rr[None, :],
        mask=gmask[:, None] & rmask[None, :],
        other=0.0,
    )
    b64 = b.to(tl.int64)
    if HAS_KT:
        base = Kt + b64 * stride_ktb + i.to(tl.int64) * stride_kth + idx[:, None] * stride_ktd
    else:
        base = K + b64 * stride_kb + off.to(tl.int64) * stride_kn + idx[:, None]
    s_rows = S2 + (pid * G + g).to(tl.int64)[:, None] * npad
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        valid = p < hi
        if HAS_KT:
            kc = tl.load(base + p[None, :], mask=valid[None, :], other=0.0)  # (R_PAD, BLOCK_N)
        else:
            kc = tl.load(base + p[None, :] * stride_kn, mask=valid[None, :], other=0.0)
        s = tl.dot(qr, kc.to(tl.float32), input_precision="ieee")  # (G_PAD, BLOCK_N), log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        tl.store(s_rows + p[None, :], s, mask=gmask[:, None] & valid[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    row = pid * num_splits + sid
    tl.store(PartM + row * G + g, m_i, mask=gmask)  # -inf / 0 for chunks past n
    tl.store(PartL + row * G + g, l_i, mask=gmask)


@triton.jit
def _select_kernel(
    S2,
    PartM,
    PartL,
    Lse,
    Sel,
    SeqLen,
    n_list,
    npad,
    chunk,
    num_splits_a,
    local,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_list
    n = tl.load(SeqLen + b)
    g = tl.arange(0, G_PAD)
    gmask = g < G
    # log2-sum-exp2 of s_hat per query head from the score partials (cheap, recomputed).
    m = tl.zeros([G_PAD], tl.float32) + float("-inf")
    lsum = tl.zeros([G_PAD], tl.float32)
    for s_start in range(0, num_splits_a, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = gmask[:, None] & (s < num_splits_a)[None, :]
        rows = (pid * num_splits_a + s)[None, :] * G + g[:, None]
        ms = tl.load(PartM + rows, mask=mask, other=float("-inf"))
        ls = tl.load(PartL + rows, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(ms, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        lsum = lsum * tl.exp2(m - m_use) + tl.sum(ls * tl.exp2(ms - m_use[:, None]), 1)
        m = m_new
    lse = tl.where(gmask, m + tl.log2(tl.where(gmask, lsum, 1.0)), 0.0)
    if sid == 0:
        tl.store(Lse + pid * G + g, lse, mask=gmask)
    s_rows = S2 + (pid * G + g).to(tl.int64)[:, None] * npad
    lo = sid * chunk
    hi = tl.minimum(lo + chunk, npad)
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        valid = p < n
        s2 = tl.load(s_rows + p[None, :], mask=gmask[:, None] & valid[None, :], other=float("-inf"))
        sel = tl.sum(tl.exp2(s2 - lse[:, None]), 0)
        sel = tl.where(p >= n - local, float("inf"), sel)
        sel = tl.where(valid, sel, float("-inf"))
        tl.store(Sel + pid.to(tl.int64) * npad + p, sel, mask=p < hi)


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
    S2,
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
    npad,
    k_max,
    k_scalar,
    local,
    chunk,
    num_splits,
    qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_TENSOR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_list
    i = pid % n_list
    h = tl.load(HeadIds + i)
    n = tl.load(SeqLen + b)
    off = tl.load(Off + h)
    if K_TENSOR:  # per-sequence k: topk was sorted, scan its first k_eff entries
        kb = tl.load(KTensor + b * stride_kt + i)
        lim = tl.minimum(tl.minimum(tl.maximum(kb, tl.minimum(local, n)), n), k_max)
    else:  # one k: unsorted topk, scan all k_max entries and drop positions >= n
        lim = k_max + 0 * n
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
    lse = tl.load(Lse + pid * G + g, mask=gmask, other=0.0)
    k_base = K + b64 * stride_kb + off.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + off.to(tl.int64) * stride_vn
    s_rows = S2 + (pid * G + g).to(tl.int64)[:, None] * npad

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    asum = tl.zeros([G_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        pos = tl.load(Top + pid.to(tl.int64) * k_max + j, mask=j < hi, other=0)
        valid = (j < hi) & (pos < n)
        pos = tl.where(valid, pos, 0)
        m_i, l_i, acc = _attend_block(
            q,
            k_base + pos[:, None] * stride_kn + d[None, :],
            v_base + pos[:, None] * stride_vn + d[None, :],
            valid,
            m_i,
            l_i,
            acc,
            qk_scale,
            0.0,
            UPCAST,
            IEEE,
            False,
        )
        s2 = tl.load(
            s_rows + pos[None, :], mask=gmask[:, None] & valid[None, :], other=float("-inf")
        )
        asum += tl.sum(tl.exp2(s2 - lse[:, None]), 1)
    if sid == 0:
        tl.store(Count + pid, tl.cdiv(lim, chunk))
    if lo < lim:
        row = pid * num_splits + sid
        tl.store(PartM + row * G + g, m_i, mask=gmask)
        tl.store(PartL + row * G + g, l_i, mask=gmask)
        tl.store(PartAlpha + row * G + g, asum, mask=gmask)
        tl.store(PartAcc + (row * G + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])


def _query_components(
    q: torch.Tensor, head_ids: torch.Tensor, hkv: int, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r components shared by each group and the pre-scaled gathered queries.

    Returns idx int32 (B, n_s, r) and qr fp32 (B, n_s, G, r) = q[idx] / sqrt(D * sum|q[idx]|
    / sum|q|) / ln 2 (so dot products are s_hat in log2 units).
    """
    batch, hq, dim = q.shape
    group = hq // hkv
    qs = q.reshape(batch, hkv, group, dim).index_select(1, head_ids.long()).float()
    idx, qr, approx = sparq_query_components(qs, r, group_dim=2)  # idx: (B, n_s, r)
    qr = qr * (LOG2E / approx)[..., None]
    return idx.to(torch.int32).contiguous(), qr.contiguous()


def sparq_decode_topk(
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
) -> torch.Tensor:
    """SparQ decode for the KV heads ``head_ids`` (dense layout, slot = offset + position).

    Args:
        q: (B, Hq, D) newest query; k_cache, v_cache: (B, C_total, D) packed caches.
        head_offset: int32 (Hkv,); seq_len: int32 (B,) tokens including the new one.
        v_sum: fp32 (B, n_sparq, D) running sum of V over the sequence, rows in head_ids order.
        r: components per group (Python int, shared by the listed heads; call once per
            distinct (r, local) when heads differ).
        k: positions attended exactly: a Python int, or an int32 (B, n_sparq) tensor (e.g.
            SparQ.k_at(n_b) per sequence; then pass ``k_max``). k_eff = min(max(k,
            min(local, n)), n).
        local: newest positions always selected (Python int).
        scale: softmax scale of the exact attention.
        head_ids: int32 (n_sparq,) KV heads to compute; other heads of ``out`` untouched.
        out: optional (B, Hq, D) output, dtype of q.
        max_len: Python-int upper bound of seq_len; sizes the score buffers and the topk
            width. Defaults to C_total (correct, but wide): the runtime should pass it.
        k_max: Python-int upper bound of k (tensor k); defaults to max_len.
        kt: optional transposed K copy (B, n_sparq, D, >= max_len) from
            :func:`sparq_kt_from_cache`; makes step 2 read r contiguous rows instead of
            gathering columns (the bandwidth SparQ is meant to save).

    Workspace per call: fp32 s_hat (B, n_sparq, G, max_len) + selection (B, n_sparq, max_len).
    """
    batch, hq, dim = check_common(q, k_cache, v_cache)
    hkv = head_offset.shape[0]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    n_s = head_ids.numel()
    if batch == 0 or n_s == 0:
        return out
    dev = q.device
    npad = max_len if max_len is not None else k_cache.shape[1]
    if kt is not None and (
        kt.shape[:3] != (batch, n_s, dim) or kt.shape[3] < npad or kt.stride(3) != 1
    ):
        raise ValueError(
            f"kt must be (B, n_sparq, D, >= max_len) contiguous, got {tuple(kt.shape)}"
        )
    r = max(1, min(int(r), dim))
    k_tensor = isinstance(k, torch.Tensor)
    if k_tensor:
        kmax = min(k_max if k_max is not None else npad, npad)
    else:
        kmax = min(max(int(k), int(local), 1), npad)
    rows = batch * n_s
    g_pad = max(16, next_pow2(group))
    upcast = interpreting()
    tn = TUNING

    idx, qr = _query_components(q, head_ids, hkv, r)
    r_pad = max(16, next_pow2(r))

    # 2. approximate scores
    chunk_a = pick_chunk(
        npad, rows, dev, tn["score_block"], tn["score_chunk_lo"], tn["score_chunk_hi"]
    )
    splits_a = cdiv(npad, chunk_a)
    s2 = torch.empty(rows, group, npad, dtype=torch.float32, device=dev)
    part_m = torch.empty(rows, splits_a, group, dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    kt_arg = kt if kt is not None else k_cache
    _scores_kernel[(rows, splits_a)](
        qr,
        idx,
        k_cache,
        kt_arg,
        head_offset,
        head_ids,
        seq_len,
        s2,
        part_m,
        part_l,
        k_cache.stride(0),
        k_cache.stride(1),
        kt.stride(0) if kt is not None else 0,
        kt.stride(1) if kt is not None else 0,
        kt.stride(2) if kt is not None else 0,
        r,
        n_s,
        npad,
        chunk_a,
        splits_a,
        G=group,
        G_PAD=g_pad,
        R_PAD=r_pad,
        BLOCK_N=tn["score_block"],
        HAS_KT=kt is not None,
        num_warps=tn["num_warps"],
    )

    # 3. selection scores
    sel = torch.empty(rows, npad, dtype=torch.float32, device=dev)
    lse = torch.empty(rows, group, dtype=torch.float32, device=dev)
    _select_kernel[(rows, splits_a)](
        s2,
        part_m,
        part_l,
        lse,
        sel,
        seq_len,
        n_s,
        npad,
        chunk_a,
        splits_a,
        int(local),
        G=group,
        G_PAD=g_pad,
        BLOCK_S=16,
        BLOCK_N=tn["select_block"],
        num_warps=tn["num_warps"],
    )

    # 4. top-k positions
    top = torch.topk(sel, kmax, dim=-1, sorted=k_tensor).indices.to(torch.int32)

    # 5. exact attention over the chosen rows + merge with mean(V)
    block_c, stages_c = fit_tiles(
        dev, tn["attend_block"], dim, k_cache.element_size(), tn["num_stages"]
    )
    chunk_c = pick_chunk(kmax, rows, dev, block_c, tn["attend_chunk_lo"], tn["attend_chunk_hi"])
    splits_c = cdiv(kmax, chunk_c)
    pm = torch.empty(rows, splits_c, group, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    palpha = torch.empty_like(pm)
    pacc = torch.empty(rows, splits_c, group, dim, dtype=torch.float32, device=dev)
    count = torch.empty(rows, dtype=torch.int32, device=dev)
    k_arg = k.contiguous() if k_tensor else seq_len
    _attend_kernel[(rows, splits_c)](
        q,
        k_cache,
        v_cache,
        head_offset,
        head_ids,
        seq_len,
        top,
        k_arg,
        s2,
        lse,
        pm,
        pl,
        pacc,
        palpha,
        count,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        k_arg.stride(0) if k_tensor else 0,
        n_s,
        npad,
        kmax,
        0 if k_tensor else kmax,
        int(local),
        chunk_c,
        splits_c,
        scale * LOG2E,
        G=group,
        G_PAD=g_pad,
        D=dim,
        BLOCK_N=block_c,
        K_TENSOR=k_tensor,
        UPCAST=upcast,
        IEEE=k_cache.dtype == torch.float32,
        num_warps=tn["num_warps"],
        num_stages=stages_c,
    )
    merge_partials(
        pm,
        pl,
        pacc,
        count,
        out,
        head_ids,
        n_s,
        group,
        part_alpha=palpha,
        seq_len=seq_len,
        v_sum=v_sum,
    )
    return out
