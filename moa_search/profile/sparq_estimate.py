"""SparQ decode emulated at every query position of a prefill, one query tile at a time.

Why: SparQ picks keys from the data, so no mask describes it; the honest price is the
output a decode step at position p would produce (``runtime.reference.sparq_decode``
semantics: group-shared top-r components of |q|, group-summed approximate softmax for
the top-k positions, the ``local`` newest always kept, mix with mean(V) by the
approximate mass). Exact attention over a subset equals the dense softmax renormalised
over that subset, so the tile's dense probabilities ``a`` are reused instead of gathering.

Shapes: ``Hkv`` KV heads, ``G`` query heads per KV head, ``t`` query rows of the tile,
``nk`` keys (the tile's causal horizon), ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moa_search.patterns import SparQ


def running_v_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean of V over positions 0..p for every p. v: (Hkv, N, D) -> (Hkv, N, D) float32."""
    count = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=torch.float32)
    return v.float().cumsum(1) / count[None, :, None]


def sparq_tile_outputs(
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    a: torch.Tensor,
    pos: torch.Tensor,
    vmean_t: torch.Tensor,
    patterns: Sequence[SparQ],
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (candidate index, decode-style output) for each SparQ candidate.

    qt: (Hkv, G, t, D) queries; kt, vt: (Hkv, nk, D) keys/values; a: (Hkv, G, t, nk) dense
    causal softmax; pos: (t,) query positions; vmean_t: (Hkv, t, D) running mean of V.
    Output: (Hkv, G, t, D) float32.
    """
    dim = qt.shape[-1]
    nk = kt.shape[1]
    keys = torch.arange(nk, device=qt.device)
    causal = keys[None, :] <= pos[:, None]  # (t, nk)
    n = pos + 1
    qa = qt.abs()
    q_l1 = qa.sum(-1)  # (Hkv, G, t)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(patterns):
        groups.setdefault((min(p.r, dim), p.local), []).append(i)
    for (r, local), members in groups.items():
        idx_r = qa.sum(1).topk(r, dim=-1).indices  # (Hkv, t, r) shared by the group
        keep_r = torch.zeros_like(qa[:, 0]).scatter_(-1, idx_r, 1.0)  # (Hkv, t, D)
        q_r = qt * keep_r[:, None]
        approx_scale = torch.sqrt(dim * q_r.abs().sum(-1) / q_l1.clamp_min(1e-30))
        s_hat = torch.einsum("hgtd,hnd->hgtn", q_r, kt)
        s_hat /= approx_scale.clamp_min(1e-30)[..., None]
        s_hat.masked_fill_(~causal, float("-inf"))
        p_hat = torch.softmax(s_hat, dim=-1).nan_to_num_(0.0)
        del s_hat
        select = p_hat.sum(1)  # (Hkv, t, nk)
        select.masked_fill_(causal & (keys[None, :] > pos[:, None] - local), float("inf"))
        select.masked_fill_(~causal, float("-inf"))
        k_rows = {i: patterns[i].k_at(n) for i in members}
        kmax = int(max(int(k.max()) for k in k_rows.values()))
        top = select.topk(kmax, dim=-1).indices  # sorted, (Hkv, t, kmax)
        del select
        rank = torch.full(top.shape[:2] + (nk,), nk, dtype=torch.int32, device=qt.device)
        ranks = torch.arange(kmax, dtype=torch.int32, device=qt.device).expand_as(top)
        rank.scatter_(-1, top, ranks.contiguous())
        for i in members:
            chosen = (rank < k_rows[i].to(torch.int32)[None, :, None]) & causal
            weight = chosen[:, None].to(a.dtype)
            alpha = (p_hat * weight).sum(-1)  # (Hkv, G, t)
            ac = a * weight
            y = torch.einsum("hgtn,hnd->hgtd", ac, vt)
            y /= ac.sum(-1, keepdim=True).clamp_min(1e-30)
            del ac, weight
            out = alpha[..., None] * y + (1 - alpha)[..., None] * vmean_t[:, None]
            yield i, out


def sparq_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparQ,
    scale: float,
    tile_rows: int = 256,
) -> torch.Tensor:
    """Every position of one GQA group decoded with SparQ (teacher forcing), exactly.

    q: (G, N, D); k, v: (N, D). Returns (G, N, D) float32: what the runtime's token-by-token
    SparQ decode would output at each position, without running N decode steps.
    """
    group, length, dim = q.shape
    out = torch.empty(group, length, dim, dtype=torch.float32, device=q.device)
    kf, vf = k.float()[None], v.float()[None]
    vmean = running_v_mean(vf)
    for q0 in range(0, length, tile_rows):
        q1 = min(length, q0 + tile_rows)
        pos = torch.arange(q0, q1, device=q.device)
        qt = q[None, :, q0:q1].float()
        causal = torch.arange(q1, device=q.device)[None, :] <= pos[:, None]
        s = torch.einsum("hgtd,hnd->hgtn", qt, kf[:, :q1]) * scale
        a = torch.softmax(s.masked_fill_(~causal, float("-inf")), dim=-1)
        for _, o_p in sparq_tile_outputs(
            qt, kf[:, :q1], vf[:, :q1], a, pos, vmean[:, q0:q1], [pattern]
        ):
            out[:, q0:q1] = o_p[0]
    return out
