"""Chunked prefill (``DecodeLoop.prefill(ids, chunk=...)``, ``runtime.prefill.cached_prefill``)
gives what one-shot prefill gives: last-token logits, the next greedy tokens and every
head's compact cache (slots, lengths, SparQ side buffers), for dense, window, elastic and
SparQ heads, chunk sizes that do not divide the prompt and chunks shorter than a span."""

from __future__ import annotations

import pytest
import torch

from moa_search.bench.decode_loop import PlanLoop, check_chunk, chunk_bounds
from moa_search.errors import MoaSearchError
from moa_search.patterns import parse
from moa_search.plan import uniform_plan
from moa_search.runtime import prefill
from tests.conftest import tiny_llama
from tests.families import tiny_family_model

ROWS = [
    ["dense", "window:sink=3,span=12", "elastic:sink=2,alpha=4.0,beta=0.25",
     "sparq:r=4,k=8,local=4"],
    ["window:sink=0,span=5", "elastic:sink=5,alpha=9.0,beta=0.125", "dense",
     "window:sink=3,span=12"],
]  # fmt: skip
LENGTH = 45


def _plan(model, rows):
    plan = uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in rows]
    return plan


@pytest.fixture(scope="module")
def model():
    return tiny_llama(heads=8, kv_heads=4, head_dim=16, vocab=96)


def _run(model, plan, ids, chunk, steps=4):
    """(last logits, next greedy tokens, per-layer cache state) after a prefill."""
    loop = PlanLoop(model, plan, batch=ids.shape[0], max_cache_len=ids.shape[1] + steps + 1)
    try:
        first = loop.prefill(ids, chunk=chunk)
        logits = loop.last_logits.clone()
        state = [_layer_state(layer) for layer in loop.cache.layers]
        loop.run(steps)
        tokens = torch.cat([first[:, None], loop.out_tokens[:, :steps]], 1)
    finally:
        loop.close()
    return logits, tokens, state


def _layer_state(layer):
    """What a head keeps: its slots' positions, keys and values (empty slots zeroed)."""
    out = {"lengths": layer.lengths.clone(), "processed": layer.processed}
    for h in range(layer.num_heads):
        k, v, pos = layer.gather(h)
        live = (pos >= 0)[..., None]
        out[h] = (pos.clone(), (k * live).clone(), (v * live).clone())
    if layer.v_sum is not None:
        out["v_sum"] = layer.v_sum.clone()
        out["side"] = layer.sparq_kt.view(torch.uint8).clone()
    return out


def _same_state(got, want):
    assert got.keys() == want.keys()
    for key, a in want.items():
        b = got[key]
        if isinstance(a, tuple):
            assert torch.equal(b[0], a[0]), f"head {key}: positions differ"
            torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b[2], a[2], rtol=1e-5, atol=1e-5)
        elif key == "side":
            assert (b.int() - a.int()).abs().max() <= 1  # fp8 of keys equal to ~1e-6
        elif torch.is_tensor(a):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        else:
            assert b == a


def check_chunked_equals_one_shot(model, chunk: int, path: str) -> None:
    """The ROWS plan prefilled in chunks of ``chunk`` against one piece: every later chunk
    of every layer took ``path`` (a PATH_COUNTS key); logits, next tokens and each head's
    cache are the one-shot ones."""
    plan = _plan(model, ROWS)
    ids = torch.randint(0, 96, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    want = _run(model, plan, ids, None)
    before = prefill.PATH_COUNTS[path]
    got = _run(model, plan, ids, chunk)
    later = len(chunk_bounds(LENGTH, chunk)) - 1
    assert prefill.PATH_COUNTS[path] - before == later * len(ROWS)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], want[1])
    for g, w in zip(got[2], want[2], strict=True):
        _same_state(g, w)


@pytest.mark.parametrize("chunk", [7, 16, 43, 44, 64])
def test_chunked_prefill_equals_one_shot(model, chunk):
    check_chunked_equals_one_shot(model, chunk, "chunk")


def test_chunked_prefill_matches_the_reference_backend(model):
    """The plain per-head path (backend "reference") fed the same chunks: same logits."""
    plan = _plan(model, ROWS)
    ids = torch.randint(0, 96, (1, LENGTH), generator=torch.Generator().manual_seed(4))
    got = _run(model, plan, ids, 10)[0]
    loop = PlanLoop(model, plan, batch=1, max_cache_len=LENGTH + 2, backend="reference")
    try:
        loop.prefill(ids, chunk=10)
        want = loop.last_logits
    finally:
        loop.close()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_chunked_prefill_inside_the_model_window(family):
    """Layers with their own sliding window (every head clamped) and Gemma 2's softcap."""
    model = tiny_family_model(family)
    rows = [["dense", "window:sink=2,span=5"]] * model.config.num_hidden_layers
    plan = _plan(model, rows)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    want = _run(model, plan, ids, None, steps=3)
    got = _run(model, plan, ids, 6, steps=3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], want[1])
    for g, w in zip(got[2], want[2], strict=True):
        _same_state(g, w)


def test_chunk_bounds_never_leave_a_one_token_tail():
    assert chunk_bounds(45, 44) == [(0, 45)]
    assert chunk_bounds(45, 16) == [(0, 16), (16, 32), (32, 45)]
    assert chunk_bounds(1, 8) == [(0, 1)]


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_chunk_is_a_one_line_error(bad):
    with pytest.raises(MoaSearchError, match="positive number of tokens") as info:
        check_chunk(bad, 10)
    assert "\n" not in str(info.value)


def test_bad_chunk_refused_before_any_work(model):
    loop = PlanLoop(model, _plan(model, ROWS), batch=1, max_cache_len=16)
    try:
        with pytest.raises(MoaSearchError, match="positive"):
            loop.prefill(torch.zeros(1, 8, dtype=torch.long), chunk=0)
        assert loop.cache is None
    finally:
        loop.close()
