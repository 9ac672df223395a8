"""Tile-wise first-order influence of attention entries on the loss (MoA's profile).

For one query row with softmax ``A`` and ``G = dL/dA`` (``G_j = dO . v_j``), dropping a
set S of keys and renormalising the rest changes the output by
``sum_{j in S} A_j (o - v_j) / (1 - A_S)``, hence the loss by about

    row(S)   = (D * A_S - sum_{j in S} A_j G_j) / (1 - A_S),     D = dO . o = sum_j A_j G_j

and, for S = {j}, MoA's entry effect ``e_j = A_j (D - G_j) / (1 - A_j)``.

What is stored, per (layer, query head) and candidate pattern:
  * ``moa``    sum over rows of sum_{j in S_i} |e_ij|   (MoA's estimate; also in blocks),
  * ``row``    sum over rows of |row_i(S_i)|            (joint drop per row, then |.|),
  * ``signed`` sum over rows of row_i(S_i)              (plain first-order Taylor term),
  * ``blocks`` sum of |e_ij| over block_size x block_size tiles (any mask, block-aligned).

Static patterns drop one contiguous key range per row, ``[sink, i - span(i+1)]``, so the
three sums come exactly, per element, from prefix sums along the key axis: no
block-diagonal approximation for the candidate grid. Memory is O(H * tile * N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moa_search.patterns import Pattern, SparQ
from moa_search.profile.sparq_estimate import running_v_mean, sparq_tile_outputs

_EPS = 1e-6
TILE_ELEMENTS = 1 << 26  # elements of one (H, tile, N) float32 temporary on GPU: 256 MiB
CPU_TILE_ELEMENTS = 1 << 21  # on CPU, tiles that stay in cache are ~2x faster


@dataclass
class LayerInfluence:
    """Per-layer results for one sample; H = query heads, Cs/Cq static/SparQ candidates."""

    moa: torch.Tensor  # (H, Cs)
    row: torch.Tensor  # (H, Cs)
    signed: torch.Tensor  # (H, Cs)
    sparq_row: torch.Tensor  # (H, Cq)
    sparq_signed: torch.Tensor  # (H, Cq)
    blocks: torch.Tensor  # (H, N/B, N/B)


def default_tile_rows(heads: int, length: int, block_size: int, on_cpu: bool = False) -> int:
    """Query rows per tile: a multiple of the block size keeping temporaries ~TILE_ELEMENTS."""
    rows = (CPU_TILE_ELEMENTS if on_cpu else TILE_ELEMENTS) // max(1, heads * length)
    rows = max(block_size, min(1024, rows) // block_size * block_size)
    return min(rows, length)


def dropped_range(patterns: Sequence[Pattern], pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Dropped keys of each row are ``[lo, hi]`` (empty when hi < lo).

    pos: (t,) query positions. Returns lo: (C,) and hi: (C, t), int64.
    """
    lo = torch.tensor([p.sink for p in patterns], dtype=torch.int64, device=pos.device)
    span = torch.stack(
        [
            torch.as_tensor(p.span_at(pos + 1), device=pos.device).to(torch.int64).expand_as(pos)
            for p in patterns
        ]
    )
    return lo, pos[None, :] - span


def range_sum(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sum of x over [lo, hi] per row from inclusive prefix sums along the last axis.

    prefix: (..., t, nk); lo: (C,); hi: (C, t). Returns (..., t, C).
    """
    nk = prefix.shape[-1]
    lead = prefix.shape[:-2]
    idx_hi = hi.clamp(0, nk - 1).T.expand(*lead, -1, -1)
    idx_lo = (lo - 1).clamp(0, nk - 1)[None, :].expand(hi.shape[1], -1).expand(*lead, -1, -1)
    total = prefix.gather(-1, idx_hi)
    before = prefix.gather(-1, idx_lo) * (lo > 0).to(prefix.dtype)
    empty = (hi < lo[:, None]).T  # (t, C)
    return (total - before).masked_fill(empty, 0.0)


def layer_influence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    static: Sequence[Pattern],
    sparq: Sequence[SparQ] = (),
    block_size: int = 64,
    tile_rows: int | None = None,
) -> LayerInfluence:
    """Influence of every static and SparQ candidate for one layer of one sample.

    q, do: (H, N, D) queries and dL/d(attention output) per query head; k, v: (Hkv, N, D)
    after RoPE. N must be a multiple of ``block_size``; computation is float32.
    """
    heads, length, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    nb = length // block_size
    tile = tile_rows or default_tile_rows(heads, length, block_size, q.device.type == "cpu")
    if tile % block_size:
        raise ValueError(f"tile_rows {tile} must be a multiple of block_size {block_size}")
    dev = q.device
    cs, cq = len(static), len(sparq)
    moa = torch.zeros(kv_heads, group, cs, device=dev)
    row = torch.zeros_like(moa)
    signed = torch.zeros_like(moa)
    sq_row = torch.zeros(kv_heads, group, cq, device=dev)
    sq_signed = torch.zeros_like(sq_row)
    blocks = torch.zeros(kv_heads, group, nb, nb, device=dev)
    kf, vf = k.float(), v.float()
    vmean = running_v_mean(v) if cq else None

    for q0 in range(0, length, tile):
        q1 = min(length, q0 + tile)
        t, nk = q1 - q0, q1
        pos = torch.arange(q0, q1, device=dev)
        qt = q[:, q0:q1].float().view(kv_heads, group, t, dim)
        dot = do[:, q0:q1].float().view(kv_heads, group, t, dim)
        kt, vt = kf[:, :nk], vf[:, :nk]
        causal = torch.arange(nk, device=dev)[None, :] <= pos[:, None]

        s = torch.einsum("hgtd,hnd->hgtn", qt, kt).mul_(scale)
        s.masked_fill_(~causal, float("-inf"))
        a = torch.softmax(s, dim=-1)
        del s
        if cq:
            ot = torch.einsum("hgtn,hnd->hgtd", a, vt)  # dense output, same numerics as a
            for i, o_p in sparq_tile_outputs(qt, kt, vt, a, pos, vmean[:, q0:q1], sparq):
                diff = (dot * (o_p - ot)).sum(-1)  # (Hkv, G, t)
                sq_row[..., i] += diff.abs().sum(-1)
                sq_signed[..., i] += diff.sum(-1)
                del o_p
            del ot

        ag = torch.einsum("hgtd,hnd->hgtn", dot, vt).mul_(a)  # A_j G_j
        # D_i = dO . o as the row sum of A G: for a one-hot row D - G_j is then exactly 0
        delta = ag.sum(-1, keepdim=True)  # (Hkv, G, t, 1)
        e = a * delta
        e.sub_(ag).div_((1.0 - a).clamp_min_(_EPS)).abs_()  # |e_ij|; 0 above the diagonal
        blocks[:, :, q0 // block_size : q1 // block_size, : nk // block_size] += e.view(
            kv_heads, group, t // block_size, block_size, nk // block_size, block_size
        ).sum((3, 5))
        if cs:
            lo, hi = dropped_range(static, pos)
            moa += range_sum(e.cumsum_(-1), lo, hi).sum(-2)
            del e
            a_s = range_sum(a.cumsum_(-1), lo, hi)  # (Hkv, G, t, C)
            ag_s = range_sum(ag.cumsum_(-1), lo, hi)
            est = (delta * a_s - ag_s) / (1.0 - a_s).clamp_min(_EPS)
            row += est.abs().sum(-2)
            signed += est.sum(-2)
        del a, ag
    return LayerInfluence(
        moa=moa.view(heads, cs),
        row=row.view(heads, cs),
        signed=signed.view(heads, cs),
        sparq_row=sq_row.view(heads, cq),
        sparq_signed=sq_signed.view(heads, cq),
        blocks=blocks.view(heads, nb, nb),
    )
