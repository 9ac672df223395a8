"""Plain PyTorch attention for one KV head under its pattern: the reference every fast path
(Triton kernels, FlexAttention) is checked against. Works on any device and dtype."""

from __future__ import annotations

import math

import torch

from moa_search.patterns import (
    Pattern,
    SparQ,
    dense_causal,
    sparq_query_components,
    sparq_side_keys,
)
from moa_search.runtime.scores import Logits, cap_logits, sdpa


def attend_head(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: Pattern,
    logits: Logits,
    v_mean: torch.Tensor | None = None,
    reach: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the G query heads of one KV group.

    q: (B, G, Lq, D); k, v: (B, M, D); q_pos: (B, Lq) and k_pos: (B, M) token positions,
    -1 for padding / empty slots. SparQ runs its decode algorithm when Lq == 1 and is dense
    otherwise (SparQ is a decode method). ``logits``: the layer's scale and logit cap
    (Gemma 2); ``reach``: the length the sequence reaches in this forward, (B, 1) or an
    int (None: the last query's position + 1), where every query's span is taken.
    Returns (B, G, Lq, D); padded queries get zeros.
    """
    if isinstance(pattern, SparQ) and q.shape[2] == 1:
        return sparq_decode(q, k, v, k_pos, pattern, logits, v_mean)
    rule = dense_causal if not pattern.static else pattern.allowed
    if reach is None:
        reach = q_pos.max(1, keepdim=True).values + 1
    mask = rule(q_pos, k_pos, reach) & (k_pos >= 0)[:, None, :] & (q_pos >= 0)[:, :, None]
    has_key = mask.any(-1, keepdim=True)  # (B, Lq, 1)
    mask = mask | ~has_key  # keep softmax finite on rows with nothing to attend
    kk = k[:, None].expand(-1, q.shape[1], -1, -1)
    vv = v[:, None].expand(-1, q.shape[1], -1, -1)
    out = sdpa(
        q, kk.to(q.dtype), vv.to(q.dtype), mask=mask[:, None], scale=logits.scale,
        softcap=logits.softcap,
    )  # fmt: skip
    return out * has_key[:, None].to(out.dtype)


def sparq_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: SparQ,
    logits: Logits,
    v_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparQ (arXiv 2312.04985) for one decode token of one GQA group.

    q: (B, G, 1, D); k, v: (B, M, D); k_pos: (B, M) with -1 for empty slots; v_mean: (B, D)
    mean of V over the sequence (computed here when not given). The G query heads share
    the top-r components (|q| summed over the group) and the top-k positions (approximate
    softmax summed over the group); the ``local`` most recent positions are always kept.
    ``logits.softcap`` caps the exact logits; the approximate step keeps SparQ's own
    temperature and scores keys as the side buffer holds them (``sparq_side_keys``: fp8).
    """
    batch, group, _, dim = q.shape
    qf = q[:, :, 0].float()  # (B, G, D)
    kf, vf = k.float(), v.float()
    valid = k_pos >= 0
    n = valid.sum(1)  # (B,) tokens in the sequence
    newest = k_pos.max(1).values  # (B,)

    r = min(pattern.r, dim)
    idx_r, q_r, approx_scale = sparq_query_components(qf, r, group_dim=1)  # idx_r: (B, r)
    k_side = sparq_side_keys(k).float()  # step 1 reads the cache's fp8 side buffer
    k_r = k_side.gather(2, idx_r[:, None, :].expand(batch, k.shape[1], r))
    s_hat = torch.einsum("bgr,bmr->bgm", q_r, k_r) / approx_scale[..., None]
    s_hat = s_hat.masked_fill(~valid[:, None, :], float("-inf"))
    p_hat = torch.softmax(s_hat, dim=-1).nan_to_num(0.0)  # (B, G, M)

    select = p_hat.sum(1)
    is_local = valid & (k_pos > (newest - pattern.local)[:, None])
    select = torch.where(is_local, torch.full_like(select, math.inf), select)
    select = select.masked_fill(~valid, float("-inf"))
    k_each = pattern.k_at(n)  # (B,); 1 for an empty sequence
    top = int(min(k.shape[1], int(k_each.max()) if k_each.numel() else 1))
    idx = select.topk(top, dim=-1).indices  # (B, top)
    rank_ok = torch.arange(top, device=k.device)[None, :] < k_each[:, None]
    chosen = valid.gather(1, idx) & rank_ok  # (B, top)

    alpha = (p_hat.gather(2, idx[:, None, :].expand(batch, group, top)) * chosen[:, None]).sum(-1)
    k_sel = kf.gather(1, idx[..., None].expand(batch, top, dim))
    v_sel = vf.gather(1, idx[..., None].expand(batch, top, dim))
    scores = torch.einsum("bgd,btd->bgt", qf, k_sel) * logits.scale
    scores = cap_logits(scores, logits.softcap)
    scores = scores.masked_fill(~chosen[:, None, :], float("-inf"))
    y = torch.einsum("bgt,btd->bgd", torch.softmax(scores, -1).nan_to_num(0.0), v_sel)
    if v_mean is None:
        v_mean = (vf * valid[..., None]).sum(1) / n.clamp_min(1)[:, None]
    out = alpha[..., None] * y + (1 - alpha)[..., None] * v_mean.float()[:, None, :]
    return out[:, :, None, :].to(q.dtype)
