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

from moa_search.patterns import SparQ, sparq_query_components, sparq_side_keys


def running_v_mean(v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Mean of V over positions 0..p for every p (over the last ``window`` of them under a
    model's own sliding window). v: (Hkv, N, D) -> (Hkv, N, D) float32."""
    count = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=torch.float32)
    # scan along the innermost axis: CUDA's outer-axis scan took 1.5 ms for (3, 8192, 64)
    total = v.float().transpose(1, 2).cumsum(-1).transpose(1, 2)
    if window is not None and window < v.shape[1]:
        total[:, window:] -= total[:, :-window].clone()
        count = count.clamp(max=window)
    return total / count[None, :, None]


def visible(pos: torch.Tensor, nk: int, window: int | None = None) -> torch.Tensor:
    """(t, nk) bool: key j is causal for the row at ``pos`` and inside the model's window."""
    j = torch.arange(nk, device=pos.device)[None, :]
    ok = j <= pos[:, None]
    return ok if window is None else ok & (pos[:, None] - j < window)


def causal_softmax(
    qt: torch.Tensor,
    kt: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dense attention probabilities of rows at ``pos``: (Hkv, G, t, D) x (Hkv, nk, D), as
    the model computes them (its own sliding window and logit soft-cap, if any)."""
    s = torch.einsum("hgtd,hnd->hgtn", qt, kt).mul_(scale)
    if softcap is not None:
        s = torch.tanh(s / softcap).mul_(softcap)
    s.masked_fill_(~visible(pos, kt.shape[1], window), float("-inf"))
    return torch.softmax(s, dim=-1)


def _selection_groups(patterns: Sequence[SparQ], dim: int) -> dict[tuple[int, int], list[int]]:
    """Candidate indices by (r, local): members of a group share one key selection."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(patterns):
        groups.setdefault((min(p.r, dim), p.local), []).append(i)
    return groups


def _select(
    qt: torch.Tensor,
    kt: torch.Tensor,
    pos: torch.Tensor,
    r: int,
    local: int,
    kmax: int,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparQ's key choice for every row: (p_hat (Hkv, G, t, nk), top (Hkv, t, kmax)).

    Group-shared top-r components of |q|, approximate softmax ``p_hat`` per query head,
    its group sum as the score, the ``local`` newest keys (clamped at key 0) always first;
    ``top`` is sorted by score, so a row's k chosen keys are ``top[..., :k]`` (all causal,
    as causal keys score >= 0, the others -inf, and k <= n).
    """
    nk, t = kt.shape[1], qt.shape[2]
    dev = qt.device
    # x + 0 = x and x + -inf = -inf: a masked_fill(~causal, -inf), faster on broadcast
    causal = visible(pos, nk, window)  # (t, nk)
    bias = torch.zeros(t, nk, dtype=qt.dtype, device=dev).masked_fill_(~causal, float("-inf"))
    del causal
    idx_r, _, approx_scale = sparq_query_components(qt, r, group_dim=1)  # idx_r: (Hkv, t, r)
    keep_r = torch.zeros_like(qt[:, 0]).scatter_(-1, idx_r, 1.0)  # (Hkv, t, D)
    k_side = sparq_side_keys(kt).to(qt.dtype)  # step 1 reads the cache's fp8 side buffer
    s_hat = torch.einsum("hgtd,hnd->hgtn", qt * keep_r[:, None], k_side)
    s_hat /= approx_scale[..., None]
    s_hat += bias
    p_hat = torch.softmax(s_hat, dim=-1).nan_to_num_(0.0)
    del s_hat
    select = p_hat.sum(1)  # (Hkv, t, nk)
    if local > 0:
        newest = pos[:, None] - torch.arange(local, device=dev)
        first = pos[:, None] - (window - 1) if window is not None else 0
        newest = torch.maximum(newest, torch.as_tensor(first, device=dev)).clamp_min_(0)
        select.scatter_(-1, newest.expand(qt.shape[0], -1, -1), float("inf"))
    select += bias
    return p_hat, select.topk(kmax, dim=-1).indices


def sparq_tile_outputs(
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    a: torch.Tensor,
    pos: torch.Tensor,
    vmean_t: torch.Tensor,
    patterns: Sequence[SparQ],
    window: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (candidate index, decode-style output) for each SparQ candidate.

    qt: (Hkv, G, t, D) queries; kt, vt: (Hkv, nk, D) keys/values; a: (Hkv, G, t, nk) dense
    causal softmax; pos: (t,) query positions; vmean_t: (Hkv, t, D) running mean of V;
    window: the model's own sliding window (SparQ then works over the keys inside it).
    Output: (Hkv, G, t, D) float32.
    """
    nk = kt.shape[1]
    n = pos + 1 if window is None else (pos + 1).clamp(max=window)
    for (r, local), members in _selection_groups(patterns, qt.shape[-1]).items():
        k_rows = {i: patterns[i].k_at(n) for i in members}
        kmax = int(max(int(k.max()) for k in k_rows.values()))
        p_hat, top = _select(qt, kt, pos, r, local, kmax, window)
        rank = torch.full(top.shape[:2] + (nk,), nk, dtype=torch.int32, device=qt.device)
        ranks = torch.arange(kmax, dtype=torch.int32, device=qt.device).expand_as(top)
        rank.scatter_(-1, top, ranks.contiguous())
        del top
        for i in members:
            weight = (rank < k_rows[i].to(torch.int32)[None, :, None])[:, None].to(a.dtype)
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
    window: int | None = None,
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
    hkv, group, t = a.shape[:3]
    n = pos + 1 if window is None else (pos + 1).clamp(max=window)
    dense = torch.einsum("hgtn,hgtn->hgt", a, g)  # <dO, o>
    for (r, local), members in _selection_groups(patterns, qt.shape[-1]).items():
        k_rows = {i: patterns[i].k_at(n) for i in members}
        kmax = int(max(int(k.max()) for k in k_rows.values()))
        p_hat, top = _select(qt, kt, pos, r, local, kmax, window)
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
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Every position of one GQA group decoded with SparQ (teacher forcing), exactly.

    q: (G, N, D); k, v: (N, D), or with a leading batch dim (B, G, N, D) / (B, N, D), each
    row independent. Returns float32 of q's shape: what the runtime's token-by-token SparQ
    decode would output at each position, without running N decode steps. ``window`` /
    ``softcap``: the model's own sliding window and logit cap, as the runtime applies them.
    """
    batched = q.dim() == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    rows, group, length, dim = q.shape
    tile_rows = max(16, tile_rows // rows)  # bound the (B, G, tile, N) scores
    out = torch.empty(rows, group, length, dim, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    vmean = running_v_mean(vf, window)
    for q0 in range(0, length, tile_rows):
        q1 = min(length, q0 + tile_rows)
        pos = torch.arange(q0, q1, device=q.device)
        qt = q[:, :, q0:q1].float()
        a = causal_softmax(qt, kf[:, :q1], pos, scale, window, softcap)
        for _, o_p in sparq_tile_outputs(
            qt, kf[:, :q1], vf[:, :q1], a, pos, vmean[:, q0:q1], [pattern], window
        ):
            out[:, :, q0:q1] = o_p
    return out if batched else out[0]
