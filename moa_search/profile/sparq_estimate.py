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
    # scan along the innermost axis: CUDA's outer-axis scan took 1.5 ms for (3, 8192, 64)
    total = v.float().transpose(1, 2).cumsum(-1).transpose(1, 2)
    return total / count[None, :, None]


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


def sparq_tile_deltas(
    qt: torch.Tensor,
    kt: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    dvm: torch.Tensor,
    pos: torch.Tensor,
    patterns: Sequence[SparQ],
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (candidate index, diff) with diff = <dO, o_p - o> of shape (Hkv, G, t).

    The same decode-style SparQ output o_p as ``sparq_tile_outputs`` (same selection, so
    the same keys), but only its projection on dO is formed, without V:

        <dO, o_p> = alpha * sum_S a_j g_j / sum_S a_j + (1 - alpha) * dvm,   <dO, o> = sum_j a_j g_j

    with S the chosen keys and alpha = sum_S p_hat_j. Per (r, local) group the selection
    (one ``topk(kmax)``, sorted) is shared; p_hat, a and a*g are gathered at the top
    indices and summed cumulatively, so every member's k (``k_at(pos + 1)``, per row) is
    one read at index k - 1.

    qt: (Hkv, G, t, D) queries; kt: (Hkv, nk, D) keys; a: (Hkv, G, t, nk) dense causal
    softmax (zero above each row's horizon); g: (Hkv, G, t, nk) = dO_i . v_j;
    dvm: (Hkv, G, t) = dO_i . mean(v_0..v_pos_i); pos: (t,) query positions, any
    increasing subset with nk > max(pos). Output in the dtype of ``a`` (float32 in use).
    """
    dim = qt.shape[-1]
    nk = kt.shape[1]
    hkv, group, t = a.shape[:3]
    dev = qt.device
    causal = torch.arange(nk, device=dev)[None, :] <= pos[:, None]  # (t, nk)
    # x + 0 = x and x + -inf = -inf: the reference's masked_fill(~causal, -inf), faster
    bias = torch.zeros(t, nk, dtype=qt.dtype, device=dev).masked_fill_(~causal, float("-inf"))
    del causal
    n = pos + 1
    qa = qt.abs()
    q_l1 = qa.sum(-1)  # (Hkv, G, t)
    dense = torch.einsum("hgtn,hgtn->hgt", a, g)  # <dO, o>
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(patterns):
        groups.setdefault((min(p.r, dim), p.local), []).append(i)
    for (r, local), members in groups.items():
        # selection: the operations of sparq_tile_outputs, so the same keys in the same order
        idx_r = qa.sum(1).topk(r, dim=-1).indices  # (Hkv, t, r) shared by the group
        keep_r = torch.zeros_like(qa[:, 0]).scatter_(-1, idx_r, 1.0)  # (Hkv, t, D)
        q_r = qt * keep_r[:, None]
        approx_scale = torch.sqrt(dim * q_r.abs().sum(-1) / q_l1.clamp_min(1e-30))
        s_hat = torch.einsum("hgtd,hnd->hgtn", q_r, kt)
        s_hat /= approx_scale.clamp_min(1e-30)[..., None]
        s_hat += bias
        p_hat = torch.softmax(s_hat, dim=-1).nan_to_num_(0.0)
        del s_hat
        select = p_hat.sum(1)  # (Hkv, t, nk)
        if local > 0:  # the `local` newest keys of each row (clamped at key 0) always win
            newest = (pos[:, None] - torch.arange(local, device=dev)).clamp_min_(0)
            select.scatter_(-1, newest.expand(hkv, -1, -1), float("inf"))
        select += bias
        k_rows = {i: patterns[i].k_at(n) for i in members}
        kmax = int(max(int(k.max()) for k in k_rows.values()))
        top = select.topk(kmax, dim=-1).indices  # sorted, (Hkv, t, kmax)
        del select
        # Causal keys score >= 0 and the others -inf, and k <= n: the first k of a row
        # are causal, so rank < k alone is the chosen set.
        idx = top[:, None].expand(-1, group, -1, -1)  # (Hkv, G, t, kmax)
        del top
        # p_hat, a and a*g summed over the first 1..kmax chosen keys of each row
        p_s = p_hat.gather(-1, idx).cumsum_(-1)
        del p_hat
        a_top = a.gather(-1, idx)
        ag_s = g.gather(-1, idx).mul_(a_top).cumsum_(-1)
        a_s = a_top.cumsum_(-1)
        del idx, a_top
        for i in members:
            last = (k_rows[i] - 1).to(torch.int64)[None, None, :, None].expand(hkv, group, t, 1)
            alpha = p_s.gather(-1, last)[..., 0]
            ratio = ag_s.gather(-1, last)[..., 0] / a_s.gather(-1, last)[..., 0].clamp_min(1e-30)
            diff = alpha * ratio + (1 - alpha) * dvm - dense
            yield i, diff


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
