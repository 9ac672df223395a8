"""The fused static-influence kernel against a float64 brute force over full N x N heads.

The plain PyTorch profiler loop (``layer_influence``, float32) is checked against the same
brute force in tests/profile; on rows that drop almost all attention mass (1 - A_S tiny)
the fused kernel is the closer of the two, so float64 is the reference here. CPU runs go
through Triton's interpreter, so shapes stay small there.
"""

from __future__ import annotations

import pytest
import torch

from moa_search.kernels.influence import MAX_CANDIDATES, static_influence, tile_events
from moa_search.patterns import Dense, Elastic, Window
from moa_search.profile.influence import dropped_range

STATIC = [
    Dense(),
    Window(sink=4, span=8),
    Window(sink=0, span=16),
    Window(sink=16, span=32),
    Elastic(sink=2, alpha=3.0, beta=0.25),
    Elastic(sink=0, alpha=0.0, beta=0.5),
    Elastic(sink=16, alpha=40.0, beta=1.0),
    Window(sink=40, span=1),
    Window(sink=200, span=4),  # sink past every row: nothing dropped
]


def _heads(n, hq, hkv, d, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=g) * 1.5
    k = torch.randn(hkv, n, d, generator=g) * 1.5
    v = torch.randn(hkv, n, d, generator=g)
    do = torch.randn(hq, n, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def brute_force(q, k, v, do, scale, cands, block):
    """Every entry effect and every candidate's row estimate from full float64 matrices."""
    q, k, v, do = (t.double().cpu() for t in (q, k, v, do))
    heads, n, _ = q.shape
    group = heads // k.shape[0]
    kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    s = torch.einsum("hid,hjd->hij", q, kk) * scale
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    g = torch.einsum("hid,hjd->hij", do, vv)  # dL/dA
    d = (a * g).sum(-1, keepdim=True)
    e = (a * (d - g) / (1 - a).clamp_min(1e-6)).abs() * causal
    pos = torch.arange(n)
    out = {"moa": [], "row": [], "signed": []}
    for p in cands:
        drop = causal & ~p.allowed(pos, pos, n)
        a_s = (a * drop).sum(-1)
        est = (d[..., 0] * a_s - (a * g * drop).sum(-1)) / (1 - a_s).clamp_min(1e-6)
        out["moa"].append((e * drop).sum((1, 2)))
        out["row"].append(est.abs().sum(-1))
        out["signed"].append(est.sum(-1))
    res = {
        key: torch.stack(val, 1) if val else torch.zeros(heads, 0, dtype=torch.float64)
        for key, val in out.items()
    }
    nb = n // block
    res["blocks"] = e.view(heads, nb, block, nb, block).sum((2, 4))
    return res


def _compare(n, hq, hkv, d, block, dtype, device, seed=0, cands=STATIC, scale=0.3):
    q, k, v, do = _heads(n, hq, hkv, d, seed, dtype, device)
    lo, hi = dropped_range(cands, torch.arange(n, device=device), n)
    got = static_influence(q, k, v, do, scale, hi, lo, block)
    want = brute_force(q, k, v, do, scale, cands, block)
    rtol = 5e-4 if dtype == torch.float32 else 3e-2
    # |e| = A (D - G) / (1 - A) of an entry holding nearly all the mass loses digits in
    # float32 1 - A (more so with the GPU's exp2), so the |e| sums get a looser bound
    for name, r in (("row", rtol), ("moa", 4 * rtol), ("blocks", 4 * rtol)):
        torch.testing.assert_close(got[name].double().cpu(), want[name], rtol=r, atol=1e-4)
    # signed sums cancel: judge their error against the size of the terms (the row sums)
    scale_of_terms = want["row"].abs().max().item()
    torch.testing.assert_close(
        got["signed"].double().cpu(), want["signed"], rtol=0, atol=rtol * scale_of_terms
    )
    return got


@pytest.mark.parametrize(
    ("n", "hq", "hkv", "d", "block"),
    [(64, 2, 1, 16, 16), (96, 4, 2, 8, 32), (128, 3, 3, 24, 16), (64, 6, 2, 64, 64)],
)
def test_matches_reference_fp32(n, hq, hkv, d, block, device):
    _compare(n, hq, hkv, d, block, torch.float32, device)


def test_head_dim_256(device):
    """Gemma's head_dim (its global layers take the fused kernel) at its scale 256 ** -0.5."""
    _compare(64, 2, 1, 256, 32, torch.float32, device, scale=256**-0.5)


def test_bf16_inputs(device):
    _compare(64, 4, 2, 32, 16, torch.bfloat16, device, seed=3)


def test_more_candidates_than_one_launch(device):
    cands = [Dense()] + [Window(sink=s % 3, span=4 + s) for s in range(MAX_CANDIDATES + 3)]
    got = _compare(64, 2, 1, 16, 16, torch.float32, device, seed=4, cands=cands)
    assert got["row"].shape == (2, len(cands))


def test_no_candidates_still_gives_blocks(device):
    q, k, v, do = _heads(32, 2, 1, 16, 5, torch.float32, device)
    empty = torch.zeros(0, 32, dtype=torch.int64)
    got = static_influence(q, k, v, do, 0.3, empty, torch.zeros(0, dtype=torch.int64), 16)
    want = brute_force(q, k, v, do, 0.3, [], 16)
    torch.testing.assert_close(got["blocks"].double().cpu(), want["blocks"], rtol=1e-3, atol=1e-5)
    assert got["row"].shape == (2, 0)


def test_events_cover_every_boundary():
    n, block = 256, 32
    lo, hi = dropped_range(STATIC, torch.arange(n), n)
    ev_kb, ev_c, ev_kind = tile_events(hi, lo, block)
    for qb in range(n // block):
        rows = slice(qb * block, (qb + 1) * block)
        events = {
            (int(b), int(c), int(t))
            for b, c, t in zip(ev_kb[qb], ev_c[qb], ev_kind[qb])
            if b < n // block
        }
        assert list(ev_kb[qb]) == sorted(ev_kb[qb].tolist())  # the kernel walks them in order
        for c in range(len(STATIC)):
            live = hi[c, rows] >= lo[c]
            for h in hi[c, rows][live].tolist():
                assert (h // block, c, 0) in events
            if live.any() and lo[c] > 0:
                assert ((int(lo[c]) - 1) // block, c, 1) in events


def test_rejects_bad_block():
    q, k, v, do = _heads(48, 2, 1, 16, 0, torch.float32, "cpu")
    lo, hi = dropped_range(STATIC, torch.arange(48), 48)
    with pytest.raises(ValueError, match="block_size"):
        static_influence(q, k, v, do, 0.3, hi, lo, 32)


def test_layer_influence_backends_agree(device):
    """The profiler's entry point gives the same numbers through either backend."""
    from moa_search.patterns import SparQ  # noqa: PLC0415
    from moa_search.profile.influence import LayerAttention, layer_influence  # noqa: PLC0415

    q, k, v, do = _heads(64, 4, 2, 16, 7, torch.float32, device)
    sparq = [SparQ(r=4, k_ratio=0.25, local=4)]
    kw = {"block_size": 16, "sparq_rows": 16}
    att = LayerAttention(q, k, v, do, 0.25)
    fused = layer_influence(att, STATIC[:5], sparq, backend="triton", **kw)
    plain = layer_influence(att, STATIC[:5], sparq, backend="torch", **kw)
    for name in ("moa", "row", "blocks", "sparq_row", "sparq_signed"):
        torch.testing.assert_close(
            getattr(fused, name).cpu(), getattr(plain, name).cpu(), rtol=5e-4, atol=1e-4
        )
