"""Tile-wise influence against brute force over the full N x N attention of tiny heads."""

from __future__ import annotations

import pytest
import torch

from moa_search.patterns import Dense, Elastic, SparQ, Window
from moa_search.profile.influence import (
    LayerAttention,
    layer_influence,
    sampled_rows,
    sparq_stride_for,
)
from moa_search.profile.sparq_estimate import running_v_mean, sparq_tile_outputs
from moa_search.runtime.reference import attend_head, sparq_decode
from moa_search.runtime.scores import Logits

STATIC = [
    Dense(),
    Window(sink=4, span=8),
    Window(sink=0, span=16),
    Elastic(sink=2, alpha=3.0, beta=0.25),
    Elastic(sink=0, alpha=0.0, beta=0.5),
    Window(sink=40, span=1),
]


def _heads(n: int = 64, hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(hkv, n, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(hkv, n, d, generator=g, dtype=torch.float64)
    do = torch.randn(hq, n, d, generator=g, dtype=torch.float64)
    return q, k, v, do


def _probs(q, k, scale):
    group = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(group, 0)
    s = torch.einsum("hid,hjd->hij", q, kk) * scale
    n = q.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1), causal


def test_entry_effects_and_blocks_match_brute_force():
    q, k, v, do = _heads()
    scale, bs = 0.35, 16
    a, causal = _probs(q, k, scale)
    group = q.shape[0] // k.shape[0]
    vv = v.repeat_interleave(group, 0)
    # G = dL/dA by autograd for the linear surrogate L = sum(dO * (A V))
    a_leaf = a.clone().requires_grad_(True)
    (do * torch.einsum("hij,hjd->hid", a_leaf, vv)).sum().backward()
    g = a_leaf.grad
    d = (a * g).sum(-1, keepdim=True)
    e = (a * (d - g) / (1 - a).clamp_min(1e-6)).abs() * causal
    att = LayerAttention(q.float(), k.float(), v.float(), do.float(), scale)
    res = layer_influence(att, STATIC, block_size=bs, tile_rows=32)
    nb = q.shape[1] // bs
    want_blocks = e.view(4, nb, bs, nb, bs).sum((2, 4))
    torch.testing.assert_close(res.blocks.double(), want_blocks, rtol=2e-4, atol=1e-5)
    for c, p in enumerate(STATIC):
        pos = torch.arange(q.shape[1])
        dropped = causal & ~p.allowed(pos, pos, q.shape[1])
        torch.testing.assert_close(
            res.moa[:, c].double(), (e * dropped).sum((1, 2)), rtol=2e-4, atol=1e-5
        )


def test_row_estimate_is_exact_for_linear_loss():
    """For L = <dO, o> the first-order row estimate is exact: compare with the runtime's
    own masked attention (attend_head) for every static pattern."""
    q, k, v, do = _heads(seed=1)
    scale = 0.3
    hq, n, _ = q.shape
    group = hq // k.shape[0]
    pos = torch.arange(n)[None]
    att = LayerAttention(q.float(), k.float(), v.float(), do.float(), scale)
    res = layer_influence(att, STATIC, block_size=16, tile_rows=16)
    for c, p in enumerate(STATIC):
        for h in range(k.shape[0]):
            sl = slice(h * group, (h + 1) * group)
            dense = attend_head(
                q[None, sl], k[None, h], v[None, h], pos, pos, Dense(), Logits(scale)
            )
            masked = attend_head(q[None, sl], k[None, h], v[None, h], pos, pos, p, Logits(scale))
            per_row = (do[sl] * (masked - dense)[0]).sum(-1)  # (G, N)
            torch.testing.assert_close(
                res.signed[sl, c].double(), per_row.sum(-1), rtol=1e-3, atol=1e-4
            )
            torch.testing.assert_close(
                res.row[sl, c].double(), per_row.abs().sum(-1), rtol=1e-3, atol=1e-4
            )
    assert torch.all(res.moa[:, 0] == 0) and torch.all(res.row[:, 0] == 0)


def test_single_entry_first_order_close_for_small_weight():
    """Nonlinear loss: masking one low-weight entry changes it by about the predicted e_j."""
    q, k, v, _ = _heads(n=32, hq=2, hkv=1, seed=2)
    scale = 0.4
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss_of(mask):
        a, causal = _probs(q, k, scale)
        a = a * mask
        a = a / a.sum(-1, keepdim=True)
        o = torch.einsum("hij,hjd->hid", a, v.expand(2, -1, -1))
        return torch.tanh(o @ w).pow(2).sum(), o

    ones = torch.ones(2, 32, 32, dtype=torch.float64)
    base, o = loss_of(ones)
    o_leaf = o.detach().requires_grad_(True)
    torch.tanh(o_leaf @ w).pow(2).sum().backward()
    res = layer_influence(
        LayerAttention(q.float(), k.float(), v.float(), o_leaf.grad.float(), scale),
        [Dense()],
        block_size=1,
        tile_rows=8,
    )
    a, _ = _probs(q, k, scale)
    checked = 0
    for h, i, j in [(0, 31, 3), (1, 30, 10), (0, 25, 0), (1, 20, 19)]:
        mask = ones.clone()
        mask[h, i, j] = 0
        true = (loss_of(mask)[0] - base).abs().item()
        pred = res.blocks[h, i, j].item()
        if a[h, i, j] < 0.2:
            assert pred == pytest.approx(true, rel=0.1, abs=1e-6)
            checked += 1
    assert checked >= 2


def test_sparq_tile_outputs_match_reference_decode():
    q, k, v, _ = _heads(n=48, hq=4, hkv=2, d=16, seed=4)
    scale = 0.25
    cands = [SparQ(r=4, k_ratio=0.25, local=4), SparQ(r=4, k=5, local=2), SparQ(r=16, k=48)]
    hkv, group, n = 2, 2, 48
    qf = q.float().view(hkv, group, n, 16)
    a, _ = _probs(q.float(), k.float(), scale)
    a = a.view(hkv, group, n, n)
    pos = torch.arange(n)
    vmean = running_v_mean(v.float())
    outs = dict(sparq_tile_outputs(qf, k.float(), v.float(), a, pos, vmean, cands))
    for c, p in enumerate(cands):
        for i in (0, 5, 17, 47):
            for h in range(hkv):
                ref = sparq_decode(
                    qf[h][None, :, i : i + 1],
                    k[h, : i + 1].float()[None],
                    v[h, : i + 1].float()[None],
                    pos[None, : i + 1],
                    p,
                    Logits(scale),
                )
                torch.testing.assert_close(outs[c][h, :, i], ref[0, :, 0], rtol=1e-4, atol=1e-5)


def test_sparq_estimate_zero_when_nothing_is_dropped():
    q, k, v, do = _heads(n=64, d=8, seed=5)
    res = layer_influence(
        LayerAttention(q.float(), k.float(), v.float(), do.float(), 0.3),
        [Dense()],
        [SparQ(r=8, k_ratio=1.0, local=16), SparQ(r=2, k_ratio=0.125)],
        block_size=16,
    )
    typical = (do.abs().sum() / 4).item()
    assert res.sparq_row[:, 0].abs().max().item() < 1e-5 * typical
    assert res.sparq_row[:, 1].min().item() > 1e-3  # a real SparQ setting does change outputs


def test_sampled_rows_end_at_the_last_row():
    assert sampled_rows(10, 1).tolist() == list(range(10))
    assert sampled_rows(10, 4).tolist() == [1, 5, 9]
    assert sampled_rows(3, 16).tolist() == [2]
    assert sparq_stride_for(4096, 256) == 16 and sparq_stride_for(100, 0) == 1
    assert sparq_stride_for(100, 256) == 1
    assert len(sampled_rows(1000, sparq_stride_for(1000, 64))) >= 64
    with pytest.raises(ValueError, match="stride"):
        sampled_rows(10, 0)
    with pytest.raises(ValueError, match="sparq_rows"):
        sparq_stride_for(10, -1)


@pytest.mark.parametrize(("n_rows", "stride"), [(0, 1), (16, 3), (3, 16)])
def test_sparq_sums_sampled_rows_scaled_to_all(n_rows, stride):
    """Strided pricing = the per-row decode-style change at the sampled rows, times N/rows."""
    q, k, v, do = (t.float() for t in _heads(n=48, hq=4, hkv=2, d=16, seed=6))
    scale, n, cands = 0.25, 48, [SparQ(r=4, k_ratio=0.25, local=4), SparQ(r=8, k=6, local=2)]
    res = layer_influence(
        LayerAttention(q, k, v, do, scale), [], cands, block_size=16, sparq_rows=n_rows
    )
    a, _ = _probs(q, k, scale)
    qv, dov, a = q.view(2, 2, n, 16), do.view(2, 2, n, 16), a.view(2, 2, n, n)
    dense = torch.einsum("hgtn,hnd->hgtd", a, v)
    rows = sampled_rows(n, stride)
    outs = dict(sparq_tile_outputs(qv, k, v, a, torch.arange(n), running_v_mean(v), cands))
    for c in range(len(cands)):
        per_row = (dov * (outs[c] - dense)).sum(-1)[..., rows]  # (Hkv, G, R)
        factor = n / rows.numel()
        torch.testing.assert_close(
            res.sparq_row[:, c], per_row.abs().sum(-1).view(4) * factor, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            res.sparq_signed[:, c], per_row.sum(-1).view(4) * factor, rtol=1e-4, atol=1e-4
        )


def test_unknown_backend_is_refused():
    q, k, v, do = (t.float() for t in _heads(n=32, d=8))
    with pytest.raises(ValueError, match="backend"):
        layer_influence(LayerAttention(q, k, v, do, 0.3), STATIC, block_size=16, backend="cuda")


def test_dropped_ranges_take_every_span_at_the_sample_length():
    """A sample is one forward: every query's span is the one at the sample's length (as
    the runtime prefills it), so an elastic head's dropped range moves one key per row and
    the kernel can always walk it."""
    from moa_search.profile.influence import _kernel_ranges, dropped_range  # noqa: PLC0415

    p = Elastic(sink=2, alpha=3.0, beta=0.25)
    pos = torch.arange(64)
    lo, hi = dropped_range((p,), pos, 64)
    assert lo.tolist() == [2]
    assert hi[0].tolist() == (pos - int(p.span_at(64))).tolist()
    assert _kernel_ranges((p, Window(sink=4, span=8)), 64, 16, "cpu") is not None
