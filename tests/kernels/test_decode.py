"""mixed_decode and sparq_decode against the PyTorch references.

CPU (TRITON_INTERPRET=1): a few hand-picked small cases covering every code path.
GPU: the same plus a randomized sweep of $MOA_KERNEL_SWEEP cases per kernel.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from moa_search.kernels import mixed_decode, mixed_decode_ref, sparq_decode, sparq_decode_ref
from moa_search.kernels.sparq import sparq_kt_from_cache
from moa_search.kernels.testing import HeadGeom, build_layer, random_heads

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SENTINEL = 7.0  # written into ``out`` rows the kernel must leave alone


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return (out.double() - ref.double()).abs().max().item()


def run_mixed(
    heads: list[HeadGeom],
    lens: list[int],
    group: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    head_ids: list[int] | None = None,
    max_len: int | None = None,
    chunk: int | None = None,
    capacity: bool = False,
    seed: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> float:
    """Run kernel and reference on one case; return max abs error (asserts untouched rows)."""
    lay = build_layer(heads, lens, group, dim, dtype, device, seed)
    lay.pop("v_sum")
    ids = None if head_ids is None else torch.tensor(head_ids, dtype=torch.int32, device=device)
    scale = scale if scale is not None else dim**-0.5
    native = dict(window=window, softcap=softcap)
    out = torch.full_like(lay["q"], SENTINEL)
    listed = head_ids if head_ids is not None else range(len(heads))
    caps = tuple(heads[h].cap for h in listed) if capacity else None
    mixed_decode(**lay, scale=scale, head_ids=ids, out=out, max_len=max_len, chunk=chunk,
                 capacity=caps, **native)  # fmt: skip
    ref = mixed_decode_ref(
        **lay, scale=scale, head_ids=ids, out=torch.full_like(out, SENTINEL), **native
    )
    if head_ids is not None:
        keep = torch.ones(len(heads), dtype=torch.bool)
        keep[head_ids] = False
        rows = keep.repeat_interleave(group).to(device)
        assert (out[:, rows] == SENTINEL).all(), "kernel wrote heads outside head_ids"
    return _max_err(out, ref)


def run_sparq(
    lens: list[int],
    hkv: int,
    sparq_ids: list[int],
    group: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    r: int,
    k: int | list[list[int]],
    local: int,
    max_len: int,
    side: torch.dtype | None,
    seed: int = 0,
) -> float:
    """``side``: the side buffer's dtype (None: step 1 gathers from the packed cache)."""
    heads = [HeadGeom.dense(max_len) for _ in range(hkv)]
    lay = build_layer(heads, lens, group, dim, dtype, device, seed)
    ids = torch.tensor(sparq_ids, dtype=torch.int32, device=device)
    v_sum = lay["v_sum"][:, sparq_ids].contiguous()
    args = dict(
        q=lay["q"],
        k_cache=lay["k_cache"],
        v_cache=lay["v_cache"],
        head_offset=lay["head_offset"],
        seq_len=lay["seq_len"],
        v_sum=v_sum,
        r=r,
        local=local,
        scale=dim**-0.5,
        head_ids=ids,
    )
    kk = torch.tensor(k, dtype=torch.int32, device=device) if isinstance(k, list) else k
    out = torch.full_like(lay["q"], SENTINEL)
    kt = None
    if side is not None:
        kt = sparq_kt_from_cache(lay["k_cache"], lay["head_offset"], ids, max_len, side)
    k_max = max(max(row) for row in k) if isinstance(k, list) else None
    sparq_decode(**args, k=kk, out=out, max_len=max_len, k_max=k_max, kt=kt)
    ref = sparq_decode_ref(**args, k=kk, out=torch.full_like(out, SENTINEL), score_dtype=side)
    keep = torch.ones(hkv, dtype=torch.bool)
    keep[sparq_ids] = False
    assert (out[:, keep.repeat_interleave(group).to(device)] == SENTINEL).all()
    return _max_err(out, ref)


# --- small fixed cases (CPU interpreter and GPU) -------------------------------------------
N = 150
MIXED_CASES = {
    # name: (heads, lens, group, dim, kwargs)
    "dense_gqa4_split": ([HeadGeom.dense(N)] * 2, [150, 37], 4, 64, {"chunk": 64}),
    "dense_mha_nosplit": ([HeadGeom.dense(N)], [150, 1, 80], 1, 64, {}),
    "window_wrap_sink": (
        [HeadGeom.window(4, 40, N), HeadGeom.window(0, 17, N, 3)],
        [150, 45, 3],
        2,
        64,
        {"chunk": 64},
    ),
    "sink_gt_n_span_ge_n": (
        [HeadGeom.window(200, 16, N), HeadGeom.window(2, 500, N)],
        [150, 9],
        2,
        128,
        {"chunk": 64},
    ),
    "elastic_mix_ids": (
        [
            HeadGeom.dense(N),
            HeadGeom.elastic(3, 4.0, 0.3, N),
            HeadGeom.window(1, 33, N),
            HeadGeom.dense(N),
        ],
        [150, 77],
        2,
        64,
        {"chunk": 64, "head_ids": [1, 2]},
    ),
    "max_len_hint": (
        [HeadGeom.elastic(0, 0.0, 0.5, N), HeadGeom.dense(N)],
        [150, 150],
        8,
        64,
        {"max_len": 150},
    ),
}


#: the model's own attention: sliding window W, Gemma 2's logit cap, Gemma's head_dim 256 and
#: a query_pre_attn_scalar scale that is not head_dim ** -0.5
NATIVE_CASES = {
    # name: (heads, lens, group, dim, kwargs)
    "window_sinks_fall_out": (
        [HeadGeom.window(4, 40, N), HeadGeom.dense(N), HeadGeom.elastic(3, 4.0, 0.3, N)],
        [150, 45, 9],
        2,
        64,
        {"chunk": 64, "window": 24},
    ),
    "softcap_split_d256": (
        [HeadGeom.dense(N), HeadGeom.window(2, 33, N)],
        [150, 70],
        2,
        256,
        {"chunk": 64, "softcap": 5.0, "scale": 0.3},
    ),
    "window_softcap_d256_ids": (
        [HeadGeom.window(4, 40, N), HeadGeom.dense(N), HeadGeom.window(0, 7, N)],
        [150, 31],
        4,
        256,
        {"window": 32, "softcap": 2.0, "head_ids": [0, 1]},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(NATIVE_CASES))
@pytest.mark.parametrize("capacity", [False, True], ids=["grid", "items"])
def test_mixed_native_window_softcap_d256(name: str, dtype: torch.dtype, capacity, device) -> None:
    heads, lens, group, dim, kw = NATIVE_CASES[name]
    err = run_mixed(heads, lens, group, dim, dtype, device, capacity=capacity, **kw)
    assert err <= TOL[dtype], f"{name}: max abs err {err:.3g}"


def test_reference_window_and_cap_change_the_output(device: torch.device) -> None:
    """The reference the kernel is held to really applies both (so the test can fail)."""
    heads = [HeadGeom.window(4, 40, N), HeadGeom.dense(N)]
    lay = build_layer(heads, [150], 2, 64, torch.float32, device, 0)
    lay.pop("v_sum")
    plain = mixed_decode_ref(**lay, scale=0.125)
    for kw in ({"window": 24}, {"softcap": 1.0}):
        assert (mixed_decode_ref(**lay, scale=0.125, **kw) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MIXED_CASES))
@pytest.mark.parametrize("capacity", [False, True], ids=["grid", "items"])
def test_mixed_fixed(name: str, dtype: torch.dtype, capacity: bool, device: torch.device) -> None:
    heads, lens, group, dim, kw = MIXED_CASES[name]
    err = run_mixed(heads, lens, group, dim, dtype, device, capacity=capacity, **kw)
    assert err <= TOL[dtype], f"{name}: max abs err {err:.3g}"


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize(
    ("dtype", "side", "k"),
    [
        (torch.float32, None, 24),
        (torch.bfloat16, FP8, 24),
        (torch.float32, torch.bfloat16, [[30, 8], [5, 200]]),
        (torch.float32, FP8, [[30, 8], [5, 200]]),
        (torch.float16, torch.float16, 24),
    ],
    ids=["fp32_gather", "bf16_fp8", "fp32_bf16_k_tensor", "fp32_fp8_k_tensor", "fp16_same"],
)
def test_sparq_fixed(
    dtype: torch.dtype, side: torch.dtype | None, k: int | list[list[int]], device: torch.device
) -> None:
    err = run_sparq(
        [120, 20], 3, [0, 2], 2, 64, dtype, device, r=16, k=k, local=4, max_len=128, side=side
    )
    assert err <= TOL[dtype], f"max abs err {err:.3g}"


@pytest.mark.parametrize("dim", [16, 32, 64, 128, 256])
def test_sparq_head_dims(dim: int, device: torch.device) -> None:
    """Every power-of-two head size, fp8 side buffer (Gemma's 256 included: SparQ heads
    on a global layer decode through the kernels)."""
    r = max(1, dim // 8)
    err = run_sparq(
        [100, 37], 2, [1], 4, dim, torch.bfloat16, device, r=r, k=20, local=4, max_len=100,
        side=FP8, seed=dim,
    )  # fmt: skip
    assert err <= TOL[torch.bfloat16], f"max abs err {err:.3g}"


def test_graph_capturable_no_sync(device: torch.device) -> None:
    """The decode path must not synchronise with the host (CUDA-graph capture)."""
    if device.type != "cuda":
        pytest.skip("needs CUDA")
    heads = [HeadGeom.dense(512), HeadGeom.window(4, 64, 512)]
    lay = build_layer(heads, [512, 300], 4, 128, torch.bfloat16, device)
    lay.pop("v_sum")
    out = torch.empty_like(lay["q"])
    caps = tuple(h.cap for h in heads)
    mixed_decode(**lay, scale=0.1, out=out, max_len=512, capacity=caps)  # compile, work items
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mixed_decode(**lay, scale=0.1, out=out, max_len=512, capacity=caps)
    graph.replay()
    ref = mixed_decode_ref(**lay, scale=0.1)
    assert _max_err(out, ref) <= 2e-2


# --- randomized sweep (GPU; size from $MOA_KERNEL_SWEEP) ------------------------------------
def _random_mixed(rng: random.Random, device: torch.device) -> tuple[dict, float]:
    dtype = rng.choice([torch.bfloat16, torch.bfloat16, torch.float16, torch.float32])
    dim = rng.choice([64, 128])
    group = rng.choice([1, 2, 4, 8])
    hkv = rng.randint(1, 6)
    max_len = rng.choice([16, 200, 1000, 3000, 9000] if device.type == "cuda" else [16, 200])
    batch = rng.randint(1, 5)
    lens = [rng.randint(1, max_len) for _ in range(batch)]
    if rng.random() < 0.5:
        lens[0] = max_len
    heads = random_heads(rng, hkv, max_len)
    ids = sorted(rng.sample(range(hkv), rng.randint(1, hkv))) if rng.random() < 0.3 else None
    hint = rng.choice([None, max_len])
    desc = {
        "dtype": str(dtype),
        "dim": dim,
        "group": group,
        "lens": lens,
        "ids": ids,
        "heads": [(h.kind, h.sink, h.ring) for h in heads],
    }
    err = run_mixed(
        heads,
        lens,
        group,
        dim,
        dtype,
        device,
        head_ids=ids,
        max_len=hint,
        seed=rng.randint(0, 1 << 30),
    )
    return desc, err / TOL[dtype]


def _random_sparq(rng: random.Random, device: torch.device) -> tuple[dict, float]:
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    dim = rng.choice([16, 32, 64, 128, 256])
    group = rng.choice([1, 2, 4, 8])
    hkv = rng.randint(1, 4)
    ids = sorted(rng.sample(range(hkv), rng.randint(1, hkv)))
    max_len = rng.choice([64, 500, 2000, 6000] if device.type == "cuda" else [64, 200])
    batch = rng.randint(1, 4)
    lens = [rng.randint(1, max_len) for _ in range(batch)]
    r = min(dim, rng.choice([1, 4, 8, 16, 32]))
    local = rng.choice([0, 4, 16])
    if rng.random() < 0.3:
        k: int | list[list[int]] = [[rng.randint(1, max_len) for _ in ids] for _ in lens]
    else:
        k = rng.choice([1, 16, 64, max(1, max_len // 8)])
    side = rng.choice([None, FP8, FP8, torch.bfloat16, dtype])
    desc = {
        "dtype": str(dtype),
        "dim": dim,
        "group": group,
        "lens": lens,
        "ids": ids,
        "r": r,
        "k": k if isinstance(k, int) else "tensor",
        "local": local,
        "side": str(side),
    }
    err = run_sparq(
        lens,
        hkv,
        ids,
        group,
        dim,
        dtype,
        device,
        r=r,
        k=k,
        local=local,
        max_len=max_len,
        side=side,
        seed=rng.randint(0, 1 << 30),
    )
    return desc, err / TOL[dtype]


@pytest.mark.parametrize("kind", ["mixed", "sparq"])
def test_random_sweep(kind: str, sweep_size: int, device: torch.device) -> None:
    if sweep_size <= 0:
        pytest.skip("sweep disabled (set MOA_KERNEL_SWEEP; runs on GPU by default)")
    rng = random.Random(1234 if kind == "mixed" else 4321)
    make = _random_mixed if kind == "mixed" else _random_sparq
    results = [make(rng, device) for _ in range(sweep_size)]
    worst = max(results, key=lambda x: x[1])
    bad = [r for r in results if r[1] > 1.0]
    summary = {
        "kind": kind,
        "cases": len(results),
        "failed": len(bad),
        "worst_err_over_tol": worst[1],
        "worst_case": worst[0],
    }
    for dt in ("torch.bfloat16", "torch.float16", "torch.float32"):
        errs = [e for d, e in results if d["dtype"] == dt]
        if errs:
            summary[f"max_abs_err_{dt[6:]}"] = max(errs) * TOL[getattr(torch, dt[6:])]
            summary[f"cases_{dt[6:]}"] = len(errs)
    print(json.dumps(summary))
    log = os.environ.get("MOA_KERNEL_REPORT")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(summary) + "\n")
    assert not bad, f"{len(bad)} of {len(results)} cases over tolerance, e.g. {bad[:3]}"


def test_launch_tiles_fit_shared_memory() -> None:
    """fp32 K/V at d=256 with the bf16-tuned tiles needed 282 KB of shared memory on an
    H200 (limit 227 KB) and the launch failed: the tiles now shrink to fit."""
    from moa_search.kernels._common import fit_tiles_to

    budget = 227 * 1024 - 32 * 1024
    assert fit_tiles_to(budget, 64, 128, 2, 3) == (64, 3)  # the tuned bf16 case: unchanged
    block, stages = fit_tiles_to(budget, 64, 256, 4, 3)
    assert (stages - 1 or 1) * 2 * block * 256 * 4 <= budget and (block, stages) == (64, 2)
    block, stages = fit_tiles_to(99 * 1024 - 32 * 1024, 64, 256, 4, 3)  # a consumer card
    assert stages == 1 and block == 32


def test_work_items_cover_each_heads_chunks_once() -> None:
    """One (head, chunk) pair per chunk a head can fill, every head's first chunk included
    (a head shorter than a chunk, or empty, still needs its program to write its count)."""
    from moa_search.kernels.decode import work_items  # noqa: PLC0415

    pairs = work_items((3000, 64, 0, 1024), 1024, "cpu").view(-1, 2).tolist()
    assert sorted(map(tuple, pairs)) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (3, 0)]
    assert [s for _, s in pairs] == sorted(s for _, s in pairs)  # chunk-major


def test_capacity_must_match_the_listed_heads(device: torch.device) -> None:
    heads = [HeadGeom.dense(64), HeadGeom.window(2, 8, 64)]
    lay = build_layer(heads, [64], 2, 16, torch.float32, device, 0)
    lay.pop("v_sum")
    with pytest.raises(ValueError, match="capacity has 1 entries for 2 listed heads"):
        mixed_decode(**lay, scale=0.25, capacity=(64,))
