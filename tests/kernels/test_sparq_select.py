"""The SparQ pipeline's parts that the plain comparison with the reference cannot pin down:
the side buffer's in-kernel rounding, the radix select across many chunks, ties, edge
lengths, and its byte count against what the pattern declares."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from moa_search.kernels import sparq as sparq_mod
from moa_search.kernels import sparq_decode, sparq_decode_ref
from moa_search.kernels.sparq import (
    _side_f32,
    sparq_kernel_bytes,
    sparq_kt_from_cache,
    sparq_side_append,
)
from moa_search.kernels.testing import HeadGeom, build_layer
from moa_search.patterns import SparQ, sparq_side_keys, sparq_step_bytes

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize(("kdtype", "side"), [(torch.float32, FP8), (torch.bfloat16, FP8),
                                              (torch.float32, torch.bfloat16)])  # fmt: skip
def test_side_append_rounds_like_torch(kdtype: torch.dtype, side: torch.dtype, device) -> None:
    """In-kernel rounding (plain int/fp32 ops) equals torch's conversion bit for bit, over
    normal, subnormal, exactly-halfway and saturating values; padding rows are skipped."""
    batch, hkv, dim, cap = 3, 4, 64, 10
    gen = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.empty(batch, hkv, dim).uniform_(-14, 10, generator=gen))
    k_new = mag * torch.randn(batch, hkv, dim, generator=gen).sign()
    k_new[0, 0, :8] = torch.tensor([0.5 + 1 / 32, 0.5 + 3 / 32, 2**-7 + 2**-10, 2**-10, 460.0,
                                    -500.0, 0.0, 3 * 2**-10])  # halfway cases, > 448  # fmt: skip
    k_new = k_new.to(kdtype).to(device)
    ids = torch.tensor([3, 1], dtype=torch.int32, device=device)
    ring = torch.tensor([cap, 4], dtype=torch.int32, device=device)
    pos = torch.tensor([7, -1, 13], device=device)
    kt = torch.zeros(batch, 2, dim, cap, device=device).to(side)
    sparq_side_append(kt, k_new, ids, pos, ring)
    want = sparq_side_keys(k_new, side)
    for b, p in enumerate(pos.tolist()):
        for i, (h, rg) in enumerate(zip(ids.tolist(), ring.tolist())):
            got = kt[b, i, :, p % rg] if p >= 0 else kt[b, i].float().abs().sum()
            if p < 0:
                assert got == 0, "padding must not be stored"
            else:
                assert torch.equal(got.float(), want[b, h].float()), (b, i)


def _case(lens, dim, group, dtype, device, seed=0, hkv=2):
    max_len = max(lens)
    heads = [HeadGeom.dense(max_len) for _ in range(hkv)]
    lay = build_layer(heads, lens, group, dim, dtype, device, seed)
    ids = torch.arange(hkv, dtype=torch.int32, device=device)
    args = dict(
        q=lay["q"], k_cache=lay["k_cache"], v_cache=lay["v_cache"],
        head_offset=lay["head_offset"], seq_len=lay["seq_len"], v_sum=lay["v_sum"],
        scale=dim**-0.5, head_ids=ids,
    )  # fmt: skip
    return args, max_len


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunks of 64 positions and radix blocks of 32: many split-K programs per row, so
    the histograms, the per-chunk counts and the compaction offsets all take part."""
    tiles = {"score_block": 32, "score_chunk_lo": 64, "score_chunk_hi": 64, "radix_block": 32,
             "select_chunk_lo": 64, "select_chunk_hi": 64, "attend_chunk_lo": 32,
             "attend_chunk_hi": 32}  # fmt: skip
    for key, value in tiles.items():
        monkeypatch.setitem(sparq_mod.TUNING, key, value)


@pytest.mark.parametrize(
    ("lens", "k", "local"),
    [([300, 129, 1], 40, 4), ([300, 64], 300, 0), ([257, 5], 3, 16), ([300, 200], 1, 0)],
    ids=["ragged", "k_is_n", "local_covers_k", "k1_no_local"],
)
def test_select_across_chunks(small_tiles, lens, k, local, device) -> None:
    args, max_len = _case(lens, 32, 2, torch.float32, device)
    kt = sparq_kt_from_cache(args["k_cache"], args["head_offset"], args["head_ids"], max_len)
    out = sparq_decode(**args, r=4, k=k, local=local, max_len=max_len, kt=kt)
    ref = sparq_decode_ref(**args, r=4, k=k, local=local, score_dtype=FP8)
    assert (out - ref).abs().max() <= 1e-4


def test_ties_pick_exactly_k_and_are_deterministic(small_tiles, device) -> None:
    """Runs of identical keys and values give equal selection scores: the kernel must still
    choose exactly k rows (alpha and y would be off otherwise) and choose the same ones
    every time. Tied rows are identical, so any choice gives the reference's output."""
    args, max_len = _case([300, 280], 32, 2, torch.float32, device, seed=3)
    for name in ("k_cache", "v_cache"):
        cache = args[name]
        cache[:, 20:200] = cache[:, 19:20]  # head 0: positions 20..199 equal position 19
        cache[:, 300 + 50 : 300 + 250] = 0.0  # head 1: a run of zero keys and values
    kt = sparq_kt_from_cache(args["k_cache"], args["head_offset"], args["head_ids"], max_len)
    outs = [sparq_decode(**args, r=4, k=90, local=2, max_len=max_len, kt=kt) for _ in range(2)]
    ref = sparq_decode_ref(**args, r=4, k=90, local=2, score_dtype=FP8)
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] - ref).abs().max() <= 1e-4


def test_declared_bytes_equal_the_kernels_count() -> None:
    """What the search prices (patterns) is what the launches move (kernels), per stage."""
    n, d = 65536, 128
    for p in (SparQ(r=16, k_ratio=1 / 16), SparQ(r=32, k_ratio=1 / 8), SparQ(r=8, k=100)):
        k_eff = p.k_at(n)
        declared = sparq_step_bytes(n, d, p.r, k_eff, 2)
        counted = sparq_kernel_bytes(n, d, p.r, k_eff, 2, side_bytes=1)
        for stage in declared:
            assert counted[stage] == pytest.approx(declared[stage], rel=0.02), stage
        total = sum(declared.values())
        assert p.bytes_read(n, d) == pytest.approx(total, rel=1e-6)
    # 1/8 transfer (r = d/8, k = n/16): 36 + 16 + 32 bytes a position against dense's 512
    dense = 2 * n * d * 2
    one_eighth = SparQ(r=16, k_ratio=1 / 16).bytes_read(n, d)
    assert one_eighth / dense == pytest.approx(84 / 512, abs=0.002)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_capture_at_length(device) -> None:
    """GPU only: a 20k-token step (many chunks per row, real tile sizes) replayed from a
    CUDA graph (no host sync anywhere in the pipeline) equals the float64 reference."""
    args, max_len = _case([20000, 13001], 128, 4, torch.bfloat16, device, seed=7)
    kt = sparq_kt_from_cache(args["k_cache"], args["head_offset"], args["head_ids"], max_len)
    kw = dict(r=16, k=max_len // 16, local=16, max_len=max_len, kt=kt)
    out = torch.empty_like(args["q"])
    sparq_decode(**args, **kw, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparq_decode(**args, **kw, out=out)
    out.zero_()
    graph.replay()
    ref = sparq_decode_ref(**args, r=16, k=max_len // 16, local=16, score_dtype=FP8)
    assert (out.double() - ref.double()).abs().max() <= 2e-2


@triton.jit
def _decode_kernel(Src, Out, FP8_BITS: tl.constexpr):
    j = tl.arange(0, 256)
    tl.store(Out + j, _side_f32(tl.load(Src + j), FP8_BITS))


def test_fp8_integer_decode_equals_torch(device) -> None:
    """The scoring pass's integer e4m3 decode gives torch's fp32 value for every byte
    (normals, subnormals, signed zeros, 448), NaN bytes aside."""
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    got = torch.empty(256, device=device)
    _decode_kernel[(1,)](raw, got, FP8_BITS=True)
    want = raw.view(FP8).float()
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok])
    assert torch.equal(got[ok].signbit(), want[ok].signbit())


CASES = {  # name: (lens, dim, group, dtype, transfer r = dim / rd, k = n / kd)
    "d64_g4_bf16_1of8": ([300, 129, 77], 64, 4, torch.bfloat16, 8, 16),
    "d128_g8_fp16_1of4": ([257, 190], 128, 8, torch.float16, 4, 8),
    "d128_g1_fp32_1of8": ([333], 128, 1, torch.float32, 8, 16),
    "d64_g2_fp32_1of4": ([200, 65, 31, 250], 64, 2, torch.float32, 4, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transfers_across_chunks(small_tiles, name, device) -> None:
    """The paper's 1/8 and 1/4 settings over many scoring/select chunks (lengths that are
    not multiples of the tiles), head dims 64/128, groups 1-8, every cache dtype."""
    lens, dim, group, dtype, rd, kd = CASES[name]
    args, max_len = _case(lens, dim, group, dtype, device, seed=len(name))
    kt = sparq_kt_from_cache(args["k_cache"], args["head_offset"], args["head_ids"], max_len)
    kw = dict(r=dim // rd, k=max(1, max_len // kd), local=4)
    out = sparq_decode(**args, **kw, max_len=max_len, kt=kt)
    ref = sparq_decode_ref(**args, **kw, score_dtype=FP8)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (out.double() - ref.double()).abs().max() <= tol
