"""Fused first-order influence of static (mask) patterns: the profiler's hot loop on GPU.

For one layer, every query head and every query tile of ``BLOCK`` rows, two passes over
the causal key blocks (FlashAttention-style recomputation, nothing N x N is stored):

1. online softmax: row max ``m``, row sum ``l`` and ``D = sum_j A_j G_j`` with
   ``G_j = dO . v_j``;
2. recompute ``A``, ``AG = A * G`` and the entry effect ``|e| = |A (D - G)| / (1 - A)``;
   write the ``BLOCK x BLOCK`` sum of ``|e|`` (MoA's block influence) and keep running row
   sums of ``A``, ``AG`` and ``|e|``.

Every static candidate drops one key range per row, ``[lo_c, hi_c(i)]``, so its sums are
running sums read at two positions. The boundaries of a tile fall into at most three key
blocks per candidate (``hi`` moves by at most one key per row); the host lists those
(key block, candidate, kind) "events" per tile, sorted, and the kernel takes a masked
partial sum only there. The row estimate is evaluated over the kept keys (float64 row sums,
see the end of the kernel), so rows that keep almost no mass stay exact. Per tile and
candidate the kernel stores the sums that ``moa_search.profile.influence`` computes with
plain PyTorch (``static_influence_torch``, the CPU path and the reference).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2
from .decode import _dot

LOG2E = 1.4426950408889634
EPS = tl.constexpr(1e-6)  # a Triton global must be a constexpr
MAX_CANDIDATES = 32  # per launch; more candidates are split over several launches
_NO_EVENT = 1 << 30
#: launch parameters (benchmarks/influence_kernel.py --tune compares others)
TUNING: dict[str, int] = {"num_warps": 4, "num_stages": 2}  # best of 2x3 on an H200


@triton.jit
def _scores(q, do, K, V, kv_base, s_kn, keys, dcols, dmask, qk_scale, UPCAST, IEEE):
    """Scaled log2 scores q.k and G = dO.v for one key block (no masking)."""
    k = tl.load(K + kv_base + keys[:, None] * s_kn + dcols[None, :], mask=dmask[None, :], other=0.0)
    v = tl.load(V + kv_base + keys[:, None] * s_kn + dcols[None, :], mask=dmask[None, :], other=0.0)
    s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
    g = _dot(do, tl.trans(v), UPCAST, IEEE)
    return s, g


@triton.jit
def _static_influence_kernel(
    Q,
    K,
    V,
    DO,
    HI,
    LO,
    EV_KB,
    EV_C,
    EV_KIND,
    BLOCKS,
    OUT_MOA,
    OUT_ROW,
    OUT_SIGNED,
    qk_scale,
    N,
    n_q,
    group,
    n_cand,
    n_ev,
    s_qh,
    s_qn,
    s_kh,
    s_kn,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    C_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    h = tl.program_id(0)
    qb = n_q - 1 - tl.program_id(1)  # longest rows first: better tail balance
    kv_base = (h // group).to(tl.int64) * s_kh
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < HEAD_DIM
    q_offs = h.to(tl.int64) * s_qh + rows[:, None] * s_qn + dcols[None, :]
    q = tl.load(Q + q_offs, mask=dmask[None, :], other=0.0)
    do = tl.load(DO + q_offs, mask=dmask[None, :], other=0.0)

    # pass 1: softmax statistics and D = sum_j A_j G_j
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    lsum = tl.zeros((BLOCK,), tl.float32)
    dacc = tl.zeros((BLOCK,), tl.float32)
    for kb in range(0, qb + 1):
        keys = kb * BLOCK + cols
        s, g = _scores(q, do, K, V, kv_base, s_kn, keys, dcols, dmask, qk_scale, UPCAST, IEEE)
        s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # key 0 is valid for every row: finite from kb 0
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        dacc = dacc * alpha + tl.sum(p * g, 1)
        m = m_new
    inv_l = 1.0 / lsum
    dval = dacc * inv_l

    # pass 2: entry effects, block sums, and at the event blocks the pieces of each
    # candidate's sums (see the estimate below). Elements stay float32; running row sums
    # and the per-candidate pieces are float64, so that "row total - running sum" is the
    # exact sum of the later blocks' (rounded) block sums.
    cum_a = tl.zeros((BLOCK,), tl.float64)
    cum_ag = tl.zeros((BLOCK,), tl.float64)
    cum_e = tl.zeros((BLOCK,), tl.float64)
    cidx = tl.arange(0, C_PAD)
    kept_a = tl.zeros((BLOCK, C_PAD), tl.float64)  # sink part + (kept in hi's block - cum)
    kept_ag = tl.zeros((BLOCK, C_PAD), tl.float64)
    drop_e = tl.zeros((BLOCK, C_PAD), tl.float64)  # prefix(hi) - prefix(lo - 1) of |e|
    ev_base = qb.to(tl.int64) * n_ev
    ev = 0
    block_base = (h.to(tl.int64) * n_q + qb) * n_q
    for kb in range(0, qb + 1):
        k0 = kb * BLOCK
        keys = k0 + cols
        s, g = _scores(q, do, K, V, kv_base, s_kn, keys, dcols, dmask, qk_scale, UPCAST, IEEE)
        a = tl.where(keys[None, :] <= rows[:, None], tl.exp2(s - m[:, None]) * inv_l[:, None], 0.0)
        ag = a * g
        e = tl.abs(a * dval[:, None] - ag) / tl.maximum(1.0 - a, EPS)
        sum_a = tl.sum(a, 1).to(tl.float64)
        sum_ag = tl.sum(ag, 1).to(tl.float64)
        sum_e = tl.sum(e, 1)
        tl.store(BLOCKS + block_base + kb, tl.sum(sum_e, 0))
        sum_e = sum_e.to(tl.float64)
        while tl.load(EV_KB + ev_base + ev) == kb:
            c = tl.load(EV_C + ev_base + ev)
            kind = tl.load(EV_KIND + ev_base + ev)
            is_hi = kind == 0
            x_hi = tl.load(HI + c.to(tl.int64) * N + rows)
            x = tl.where(is_hi, x_hi, tl.load(LO + c) - 1)  # last dropped / last sink key
            upd = (cidx[None, :] == c) & ((x >= k0) & (x < k0 + BLOCK))[:, None]
            upd_hi = upd & is_hi
            upd_lo = upd & (kind != 0)
            sel = keys[None, :] <= x[:, None]
            pre_e = (cum_e + tl.sum(tl.where(sel, e, 0.0), 1).to(tl.float64))[:, None]
            drop_e += tl.where(upd_hi, pre_e, 0.0) - tl.where(upd_lo, pre_e, 0.0)
            # hi: keys after x in this block, minus the running sum through this block
            in_a = tl.sum(tl.where(sel, 0.0, a), 1).to(tl.float64) - cum_a - sum_a
            in_ag = tl.sum(tl.where(sel, 0.0, ag), 1).to(tl.float64) - cum_ag - sum_ag
            kept_a += tl.where(upd_hi, in_a[:, None], 0.0)
            kept_ag += tl.where(upd_hi, in_ag[:, None], 0.0)
            # lo: the sink keys [0, lo) directly
            sink_a = cum_a + tl.sum(tl.where(sel, a, 0.0), 1).to(tl.float64)
            sink_ag = cum_ag + tl.sum(tl.where(sel, ag, 0.0), 1).to(tl.float64)
            kept_a += tl.where(upd_lo, sink_a[:, None], 0.0)
            kept_ag += tl.where(upd_lo, sink_ag[:, None], 0.0)
            ev += 1
        cum_a += sum_a
        cum_ag += sum_ag
        cum_e += sum_e

    cmask = cidx < n_cand
    hi = tl.load(HI + cidx[None, :].to(tl.int64) * N + rows[:, None], mask=cmask[None, :], other=-1)
    lo = tl.load(LO + cidx, mask=cmask, other=0)
    nonempty = (hi >= lo[None, :]) & cmask[None, :]
    # (D A_S - AG_S) / (1 - A_S) over the kept keys K = [0, lo) + (hi, i]: with A_S = 1 - A_K
    # it is (AG_K - D A_K) / A_K, which stays exact for rows that keep almost nothing. The
    # window part of A_K is row total + (kept in hi's block - running sum through it).
    kept_a += cum_a[:, None]
    kept_ag += cum_ag[:, None]
    mean_g = (cum_ag / cum_a)[:, None]  # D, normalised by the row's own total
    est = (kept_ag - mean_g * kept_a) / tl.maximum(kept_a, EPS)
    est = tl.where(nonempty, est, 0.0).to(tl.float32)
    moa = tl.where(nonempty, drop_e, 0.0).to(tl.float32)
    out = (h.to(tl.int64) * n_q + qb) * C_PAD + cidx
    tl.store(OUT_MOA + out, tl.sum(moa, 0))
    tl.store(OUT_ROW + out, tl.sum(tl.abs(est), 0))
    tl.store(OUT_SIGNED + out, tl.sum(est, 0))


def tile_events(hi: torch.Tensor, lo: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """Per query tile, the (key block, candidate, kind) where a range boundary lies.

    hi: (C, N) last dropped key per row (< lo: nothing dropped); lo: (C,) first dropped key.
    kind 0: the block holding ``hi`` of some rows (dropped |e| prefix, kept window part),
    kind 1: the block holding ``lo - 1`` (the sink keys ``[0, lo)``). Returns int32 tensors
    (n_q, E + 1) sorted by key block, each row ending in a sentinel.
    """
    n_cand, length = hi.shape
    n_q = length // block
    tiles = hi.view(n_cand, n_q, block)
    hmin, hmax = tiles.amin(-1), tiles.amax(-1)  # (C, n_q)
    if bool(((hmax - hmin.clamp_min(0)) >= block).any()):
        raise ValueError("a candidate's dropped range moves faster than one key per row")
    live = hmax >= lo[:, None]  # some row of the tile drops something
    b0 = hmin.clamp_min(0) // block
    b1 = hmax.clamp_min(0) // block
    b_lo = ((lo - 1).clamp_min(0) // block)[:, None].expand_as(b0)
    kb = torch.stack(
        [
            torch.where(live, b0, _NO_EVENT),
            torch.where(live & (b1 != b0), b1, _NO_EVENT),
            torch.where(live & (lo[:, None] > 0), b_lo, _NO_EVENT),
        ]
    )  # (3, C, n_q)
    cand = torch.arange(n_cand, device=hi.device)[None, :, None].expand_as(kb)
    kind = torch.tensor([0, 0, 1], device=hi.device)[:, None, None].expand_as(kb)
    kb, cand, kind = (t.permute(2, 0, 1).reshape(n_q, -1) for t in (kb, cand, kind))
    order = kb.argsort(dim=1, stable=True)
    sentinel = torch.full((n_q, 1), _NO_EVENT, dtype=torch.int64, device=hi.device)
    return (
        torch.cat([kb.gather(1, order), sentinel], 1).to(torch.int32).contiguous(),
        torch.cat([cand.gather(1, order), sentinel * 0], 1).to(torch.int32).contiguous(),
        torch.cat([kind.gather(1, order), sentinel * 0], 1).to(torch.int32).contiguous(),
    )


def _on_device(device: torch.device):  # noqa: ANN202
    """Make ``device`` current for a launch (a no-op context on CPU / the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_events(
    hi: torch.Tensor, lo: torch.Tensor, block: int, device: torch.device | str
) -> list[tuple[torch.Tensor, ...]]:
    """Per launch (<= MAX_CANDIDATES candidates): int32 hi, lo and the :func:`tile_events`."""
    out = []
    for c0 in range(0, max(1, hi.shape[0]), MAX_CANDIDATES):  # one launch even for C=0
        hi_c = hi[c0 : c0 + MAX_CANDIDATES].to(device=device, dtype=torch.int32).contiguous()
        lo_c = lo[c0 : c0 + MAX_CANDIDATES].to(device=device, dtype=torch.int32).contiguous()
        out.append((hi_c, lo_c, *tile_events(hi_c.long(), lo_c.long(), block)))
    return out


def static_influence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    hi: torch.Tensor,
    lo: torch.Tensor,
    block_size: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    events: list[tuple[torch.Tensor, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Influence sums of every static candidate for one layer (see the module docstring).

    q, do: (H, N, D); k, v: (Hkv, N, D), any float dtype (dots accumulate in fp32);
    hi: (C, N) and lo: (C,) integer dropped ranges. N must be a multiple of ``block_size``
    (a power of two in 16..128). Returns float32 ``moa``, ``row``, ``signed`` (H, C) and
    ``blocks`` (H, N/B, N/B): the sums ``layer_influence`` documents. ``events``: what
    :func:`launch_events` returns for these ranges (computed here when not given; the
    profiler reuses one per length because building it syncs with the host).
    """
    heads, length, dim = q.shape
    if block_size not in (16, 32, 64, 128) or length % block_size:
        raise ValueError(f"block_size {block_size} must be 16..128 (a power of two) dividing N")
    q, do = q.contiguous(), do.contiguous()
    k, v = k.contiguous(), v.contiguous()
    n_q = length // block_size
    dev = q.device
    blocks = torch.zeros(heads, n_q, n_q, dtype=torch.float32, device=dev)
    moa, row, signed = [], [], []
    for hi_c, lo_c, ev_kb, ev_c, ev_kind in events or launch_events(hi, lo, block_size, dev):
        n_cand = hi_c.shape[0]
        c_pad = max(2, next_pow2(n_cand))
        outs = torch.empty(3, heads, n_q, c_pad, dtype=torch.float32, device=dev)
        up = interpreting() and q.dtype != torch.float32
        with _on_device(dev):  # Triton launches on the *current* device (sharded models)
            _static_influence_kernel[(heads, n_q)](
                q,
                k,
                v,
                do,
                hi_c,
                lo_c,
                ev_kb,
                ev_c,
                ev_kind,
                blocks,
                outs[0],
                outs[1],
                outs[2],
                scale * LOG2E,
                length,
                n_q,
                heads // k.shape[0],
                n_cand,
                ev_kb.shape[1],
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                HEAD_DIM=dim,
                BLOCK_D=max(16, next_pow2(dim)),
                BLOCK=block_size,
                C_PAD=c_pad,
                UPCAST=up,
                IEEE=q.dtype == torch.float32,
                num_warps=num_warps or TUNING["num_warps"],
                num_stages=num_stages or TUNING["num_stages"],
            )
        sums = outs.sum(2)[..., :n_cand]
        moa.append(sums[0])
        row.append(sums[1])
        signed.append(sums[2])
    return {
        "moa": torch.cat(moa, 1),
        "row": torch.cat(row, 1),
        "signed": torch.cat(signed, 1),
        "blocks": blocks,
    }
