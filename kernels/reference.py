"""Plain PyTorch references of ``mixed_decode`` and ``sparq_decode``: simple loops over
(sequence, head), float64 math. Tests compare the Triton kernels to these."""

from __future__ import annotations

import torch

from ..patterns import sparq_side_keys


def head_positions(n: int, sink: int, span: int, window: int | None = None) -> torch.Tensor:
    """Positions the newest query of a head attends.

    [0, min(sink, n)) u [max(sink, n - span), n), then only those fewer than ``window``
    positions back (the model's own sliding window).
    """
    s0 = min(sink, n)
    w0 = min(max(sink, n - span), n)
    pos = torch.cat([torch.arange(s0), torch.arange(w0, n)])
    return pos if window is None else pos[n - 1 - pos < window]


def slot_of(pos: torch.Tensor, offset: int, sink: int, ring: int) -> torch.Tensor:
    """Cache slot of each position for a head with the given geometry."""
    in_ring = sink + torch.remainder(pos - sink, ring)
    return offset + torch.where(pos < sink, pos, in_ring)


def mixed_decode_ref(
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
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`moa_search.kernels.mixed_decode` (q: (B, Hq, D), caches
    (B, C_total, D), metadata int32); heads not in ``head_ids`` are left as in ``out``."""
    batch, hq, _ = q.shape
    hkv = head_offset.shape[0]
    group = hq // hkv
    out = torch.zeros_like(q) if out is None else out
    offs, sinks, rings = (t.tolist() for t in (head_offset, head_sink, head_ring))
    heads = range(hkv) if head_ids is None else head_ids.tolist()
    for b in range(batch):
        n = int(seq_len[b])
        for h in heads:
            pos = head_positions(n, sinks[h], int(span[b, h]), window)
            sl = slice(h * group, (h + 1) * group)
            if pos.numel() == 0:
                out[b, sl] = 0
                continue
            slots = slot_of(pos, offs[h], sinks[h], rings[h]).to(k_cache.device)
            k = k_cache[b, slots].double()  # (L, D)
            v = v_cache[b, slots].double()
            s = (q[b, sl].double() @ k.T) * scale  # (G, L)
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            out[b, sl] = (torch.softmax(s, -1) @ v).to(out.dtype)
    return out


def sparq_decode_ref(
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
    score_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as :func:`moa_search.kernels.sparq_decode` (dense layout: slot = off + p).

    ``score_dtype``: the side buffer's dtype; s_hat then uses K rounded to it (as the
    kernel's step 1 reads it), everything else the cache's K.

    Per listed head i (KV head h = head_ids[i]) and sequence b with n tokens: the top-r
    components of |q| summed over the group; s_hat = q[idx] . K[:, idx] / sqrt(D *
    sum|q[idx]| / sum|q|) per query head; p_hat = softmax(s_hat); selection = sum of p_hat
    over the group with the ``local`` newest positions forced in; the top k_eff positions
    (k_eff = min(max(k, min(local, n)), n)) get exact softmax(scale q.K) attention y;
    out = alpha y + (1 - alpha) v_sum[b, i] / n with alpha = sum of p_hat over the chosen.
    """
    batch, hq, dim = q.shape
    hkv = head_offset.shape[0]
    group = hq // hkv
    out = torch.zeros_like(q) if out is None else out
    for b in range(batch):
        n = int(seq_len[b])
        for i, h in enumerate(head_ids.tolist()):
            off = int(head_offset[h])
            sl = slice(h * group, (h + 1) * group)
            qh = q[b, sl].double()  # (G, D)
            kk = k_cache[b, off : off + n].double()  # (n, D)
            vv = v_cache[b, off : off + n].double()
            ks = (
                kk
                if score_dtype is None
                else sparq_side_keys(k_cache[b, off : off + n], score_dtype).double()
            )
            qa = qh.abs()
            idx = qa.sum(0).topk(min(r, dim)).indices
            approx = torch.sqrt(dim * qa[:, idx].sum(1) / qa.sum(1).clamp_min(1e-30))  # (G,)
            s_hat = (qh[:, idx] @ ks[:, idx].T) / approx.clamp_min(1e-30)[:, None]  # (G, n)
            p_hat = torch.softmax(s_hat, -1)
            sel = p_hat.sum(0)
            sel[max(0, n - local) :] = float("inf")
            kb = int(k[b, i]) if isinstance(k, torch.Tensor) else int(k)
            k_eff = min(max(kb, min(local, n)), n)
            chosen = sel.topk(k_eff).indices
            alpha = p_hat[:, chosen].sum(1)  # (G,)
            s = (qh @ kk[chosen].T) * scale
            y = torch.softmax(s, -1) @ vv[chosen]
            v_mean = v_sum[b, i].double() / n
            res = alpha[:, None] * y + (1 - alpha)[:, None] * v_mean[None, :]
            out[b, sl] = res.to(out.dtype)
    return out
