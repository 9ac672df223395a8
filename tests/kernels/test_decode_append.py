"""The fused decode append (kernels.decode.decode_append through MoALayerCache.append_decode)
leaves the cache exactly as the PyTorch append does and returns the same metadata.
CPU: Triton's interpreter (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

import moa_search as ms
from moa_search.kernels.decode import decode_append
from moa_search.kernels.sparq import sparq_side_append
from moa_search.patterns import parse
from moa_search.runtime.cache import MoALayerCache
from tests.conftest import tiny_llama

HEADS = [
    "dense",
    "window:sink=2,span=5",  # a ring of 5 that wraps many times over the steps below
    "elastic:sink=1,alpha=2,beta=0.5",
    "window:sink=0,span=3",
    "sparq:r=4,k=6,local=2",  # dense storage plus a running sum of V
    "elastic:sink=2,alpha=0,beta=0.25,floor=6",  # a floored twin: max(6, n / 4)
]


def _pair(window: int | None, max_len: int = 40):
    patterns = [parse(s) for s in HEADS]
    return [MoALayerCache(patterns, max_len, window) for _ in range(2)]


def _token(gen, batch, heads, dim, dtype, device="cpu"):
    # (B, Hkv, 1, D) laid out as the model makes it: a transpose of (B, 1, Hkv, D)
    x = torch.randn(batch, 1, heads, dim, generator=gen).to(device, dtype)
    return x.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
def test_fused_append_matches_pytorch_append(
    dtype: torch.dtype, window: int | None, device: torch.device
) -> None:
    batch, dim, steps = 3, 16, 23
    gen = torch.Generator().manual_seed(0)
    torch_cache, fused_cache = _pair(window)
    heads = len(HEADS)
    for step in range(steps):
        k, v = (_token(gen, batch, heads, dim, dtype, device) for _ in range(2))
        for cache in (torch_cache, fused_cache):
            if not cache.is_initialized:
                cache.lazy_initialization(k, v)
        # every fourth step the middle sequence is padding (position -1): nothing stored
        padded = step % 4 == 3
        if padded:
            pos = torch_cache.lengths[:, None].clone()
            pos[1] = -1
        else:
            pos = torch_cache.lengths[:, None].clone()
        torch_cache.append(k, v, pos)
        want = torch_cache.decode_metadata()
        got = fused_cache.append_decode(
            decode_append, k, v, pos.clone() if padded else None, side_kernel=sparq_side_append
        )
        assert torch.equal(fused_cache.lengths, torch_cache.lengths)
        for name in ("span", "seq_len", "head_offset", "head_sink", "head_ring"):
            assert torch.equal(got[name], want[name]), (step, name)
        rule = [torch.as_tensor(p.span_at(torch_cache.lengths)) for p in torch_cache.patterns]
        assert torch.equal(got["span"].cpu(), torch.stack(rule, 1).to(torch.int32).cpu()), step
        assert torch.equal(fused_cache.keys, torch_cache.keys), step
        assert torch.equal(fused_cache.values, torch_cache.values), step
        assert torch.allclose(fused_cache.v_sum, torch_cache.v_sum)
        assert fused_cache.processed == torch_cache.processed
        # the SparQ side buffer: same values either way (the interpreter stores -0 as +0),
        # and what K rebuilds it to
        side = fused_cache.sparq_kt.float()
        assert torch.equal(side, torch_cache.sparq_kt.float()), step
    torch_cache.sync_side()
    assert torch.equal(side, torch_cache.sparq_kt.float())
    # the padded sequence fell behind by the padded steps: padding really was skipped
    assert torch_cache.lengths.tolist() == [steps, steps - steps // 4, steps]


def test_fused_append_keeps_its_metadata_buffers(device: torch.device) -> None:
    """A CUDA graph replays fixed addresses: every step writes the same span / seq_len."""
    cache = MoALayerCache([parse(s) for s in HEADS], 16)
    gen = torch.Generator().manual_seed(1)
    k = _token(gen, 2, len(HEADS), 16, torch.float32, device)
    cache.lazy_initialization(k, k)
    first = cache.append_decode(decode_append, k, k)
    second = cache.append_decode(decode_append, k, k)
    assert first["span"].data_ptr() == second["span"].data_ptr()
    assert first["seq_len"].data_ptr() == second["seq_len"].data_ptr()
    assert second["seq_len"].tolist() == [2, 2]


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_generate_through_the_fused_append_matches_the_reference(
    padded: bool, device: torch.device
) -> None:
    """The whole decode path (fused append, then the kernels reading its metadata) gives
    the reference backend's greedy tokens, with and without left padding."""
    model = tiny_llama(seed=3).to(device)
    ids = torch.randint(3, 128, (2, 19)).to(device)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    plan = ms.uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in (HEADS[:2], HEADS[2:4])]
    kw = dict(
        attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    with ms.apply_plan(model, plan, backend="reference"):
        ref = model.generate(ids, **kw)
    calls: list[int] = []
    with ms.apply_plan(model, plan, backend="reference") as runtime:
        from moa_search import kernels

        original = kernels.decode.decode_append

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        runtime._kernels = kernels
        runtime.use_kernels = lambda query, q_len, *args: q_len == 1
        kernels.decode.decode_append = counting
        try:
            got = model.generate(ids, **kw)
        finally:
            kernels.decode.decode_append = original
    assert len(calls) == 5 * 2  # decode steps x layers
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits, strict=True):
        assert (a - b).abs().max() <= 1e-3


def test_pdl_off_switches_launches_and_restores() -> None:
    """``pdl_off`` (what bench's profiled steps use) turns PDL off inside and puts the
    setting back, also when the block raises."""
    from moa_search.kernels import decode  # noqa: PLC0415

    before = decode.TUNING["pdl"]
    with pytest.raises(RuntimeError), decode.pdl_off():
        assert decode.TUNING["pdl"] == 0
        raise RuntimeError
    assert decode.TUNING["pdl"] == before
