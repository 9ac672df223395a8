"""sparq_tile_deltas (projection on dO only) against the full decode-style outputs."""

from __future__ import annotations

import pytest
import torch

from moa_search.patterns import SparQ
from moa_search.profile.sparq_estimate import (
    running_v_mean,
    sparq_tile_deltas,
    sparq_tile_outputs,
)


def _tile(hkv, group, d, n, pos=None, seed=0, dtype=torch.float64, sharp=1.5):
    """Random tile: queries at ``pos`` (default all n rows), keys/values 0..max(pos)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(n) if pos is None else pos
    nk = int(pos.max()) + 1
    t = pos.numel()
    qt = torch.randn(hkv, group, t, d, generator=gen, dtype=dtype) * sharp
    kt = torch.randn(hkv, nk, d, generator=gen, dtype=dtype) * sharp
    vt = torch.randn(hkv, nk, d, generator=gen, dtype=dtype)
    do = torch.randn(hkv, group, t, d, generator=gen, dtype=dtype)
    causal = torch.arange(nk)[None, :] <= pos[:, None]
    s = torch.einsum("hgtd,hnd->hgtn", qt, kt) / d**0.5
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    vmean_t = running_v_mean(vt).to(dtype)[:, pos]  # (Hkv, t, D)
    return qt, kt, vt, a, do, vmean_t, pos


def _reference(qt, kt, vt, a, do, vmean_t, pos, cands):
    o = torch.einsum("hgtn,hnd->hgtd", a, vt)
    outs = sparq_tile_outputs(qt, kt, vt, a, pos, vmean_t, cands)
    return {i: (do * (o_p - o)).sum(-1) for i, o_p in outs}


def _deltas(qt, kt, vt, a, do, vmean_t, pos, cands):
    g = torch.einsum("hgtd,hnd->hgtn", do, vt)
    dvm = (do * vmean_t[:, None]).sum(-1)
    return dict(sparq_tile_deltas(qt, kt, a, g, dvm, pos, cands))


CANDS = [
    SparQ(r=2, k=3, local=0),
    SparQ(r=2, k_ratio=0.125, local=2),
    SparQ(r=2, k_ratio=0.25, local=2),
    SparQ(r=4, k=7, local=2),
    SparQ(r=4, k_ratio=0.5, local=16),
    SparQ(r=64, k_ratio=0.125, local=16),  # r >= D: full query
    SparQ(r=64, k=5, local=0),
    SparQ(r=64, k=500, local=16),  # k >= n: nothing dropped
]


def _check(tile, cands, rtol=1e-4):
    want = _reference(*tile, cands)
    got = _deltas(*tile, cands)
    assert sorted(got) == sorted(want) == list(range(len(cands)))
    for i in want:
        scale = want[i].abs().max().item()  # ~0 when nothing is dropped: float64 noise
        torch.testing.assert_close(got[i], want[i], rtol=rtol, atol=rtol * scale + 1e-10)
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d", [8, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_deltas_match_full_outputs(seed, d, group):
    tile = _tile(2, group, d, 48, seed=seed + 10 * d + group)
    got = _check(tile, CANDS)
    assert got[0].abs().max() > 1e-3  # a real SparQ setting changes the output


@pytest.mark.parametrize("seed", [0, 1])
def test_deltas_match_on_strided_rows(seed):
    """Non-contiguous query rows (a strided subset), keys up to max(pos)."""
    pos = torch.arange(7, 96, 8)
    tile = _tile(2, 3, 16, 96, pos=pos, seed=seed)
    _check(tile, CANDS)


def test_deltas_match_in_float32():
    """float32 as the profiler passes it: same selection, sums in another order."""
    tile = _tile(3, 2, 32, 80, seed=7, dtype=torch.float32)
    cands = [SparQ(r=8, k_ratio=0.125, local=4), SparQ(r=16, k=9, local=16)]
    want = _reference(*tile, cands)
    got = _deltas(*tile, cands)
    for i in want:
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i], want[i], rtol=1e-3, atol=1e-5)


def test_nothing_dropped_gives_zero():
    """k >= n (any r) or r = D with k_ratio = 1: all keys chosen, alpha = 1, o_p = o."""
    tile = _tile(2, 3, 16, 64, seed=3)
    cands = [
        SparQ(r=16, k_ratio=1.0, local=16),
        SparQ(r=16, k_ratio=1.0, local=0),
        SparQ(r=3, k=64, local=2),
    ]
    got = _deltas(*tile, cands)
    for diff in got.values():
        assert diff.abs().max().item() < 1e-10
    tile32 = _tile(2, 3, 16, 64, pos=torch.arange(3, 64, 4), seed=4, dtype=torch.float32)
    for diff in _deltas(*tile32, cands).values():
        assert diff.abs().max().item() < 1e-5
