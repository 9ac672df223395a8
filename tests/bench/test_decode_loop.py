"""Decode loops produce model.generate's greedy tokens (CPU, tiny random model)."""

from __future__ import annotations

import pytest
import torch

from moa_search.bench.compiled import CompileSettings
from moa_search.bench.decode_loop import DenseLoop, DynamicLoop, PlanLoop
from moa_search.bench.models import build_model, weight_bytes
from moa_search.bench.synthetic import synthetic_plan
from moa_search.plan import uniform_plan
from moa_search.runtime import apply_plan


@pytest.fixture(scope="module")
def model():
    return build_model("tiny-llama", dtype=torch.float32, device="cpu", seed=0)


def _prompt(model, batch=2, length=40, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)


def _generate(model, ids, n):
    # no min_new_tokens / eos: min_new_tokens would forbid the EOS id, which greedy decoding
    # of a random model may pick
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, ids.shape[1] :]


def test_build_model_shape_and_weights(model):
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert weight_bytes(model) > 0
    assert torch.isfinite(model.model.layers[0].self_attn.q_proj.weight).all()


def test_dense_loop_matches_generate(model):
    ids = _prompt(model)
    want = _generate(model, ids, 12)
    loop = DenseLoop(model, batch=2, max_cache_len=64)
    try:
        loop.allocate()
        loop.capture()  # no-op on CPU, but exercises the reset path
        got = loop.generate(ids, 12)
        assert loop.kv_nbytes() == loop.predicted_kv_bytes()
    finally:
        loop.close()
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["synthetic", "dense-plan", "sparq-plan"])
def test_plan_loop_matches_generate(model, kind):
    ids = _prompt(model, length=48)
    if kind == "synthetic":
        plan = synthetic_plan(model, density=0.5, length=64, sink=4, tolerance=0.1)
    elif kind == "sparq-plan":  # its V sums count in both the allocation and the prediction
        plan = uniform_plan(model, "sparq:r=4,k=8,local=2")
    else:
        plan = uniform_plan(model, "dense")
    with apply_plan(model, plan, backend="reference"):
        want = _generate(model, ids, 10)
    loop = PlanLoop(model, plan, batch=2, max_cache_len=64, backend="reference")
    try:
        loop.allocate()
        got = loop.generate(ids, 10)
        assert loop.kv_nbytes() == loop.predicted_kv_bytes()
    finally:
        loop.close()
    assert getattr(model, "_moa_runtime", None) is None
    assert torch.equal(got, want)


def test_synthetic_fill_and_run(model):
    plan = synthetic_plan(model, density=0.5, length=32, sink=4, tolerance=0.1)
    makers = (
        lambda: DenseLoop(model, 3, 48),
        lambda: DynamicLoop(model, 3, 48),
        lambda: PlanLoop(model, plan, 3, 48, backend="reference"),
    )
    for make in makers:
        loop = make()
        try:
            loop.allocate()
            loop.fill_synthetic(32)
            seconds = loop.run(5)
            assert seconds > 0 and loop.length == 37
            assert loop.out_tokens[:, :5].max() < model.config.vocab_size
            # rewind and replay from the same state: the same tokens again
            first = loop.out_tokens[:, :5].clone()
            loop.fill_synthetic(32)
            loop.run(5)
            assert torch.equal(loop.out_tokens[:, :5], first)
        finally:
            loop.close()


# aot_eager: dynamo traces and partitions exactly as for inductor, without code generation
# (minutes on a CPU); what inductor generates is exercised in tests/bench/test_compiled.py.
TRACE_ONLY = CompileSettings(backend="aot_eager")


def test_dynamic_loop_matches_generate(model):
    """transformers' default cache in the loop: the tokens generate gives, the mask grown by
    a column per step, and the cache growing by one token per step (nothing preallocated)."""
    ids = _prompt(model)
    want = _generate(model, ids, 12)
    loop = DynamicLoop(model, batch=2, max_cache_len=64)
    try:
        loop.allocate()
        loop.capture()
        got = loop.generate(ids, 12)
        assert loop.graph is None and not loop.preallocates
        assert loop.mask.shape == (2, 40 + 11)
        assert loop.kv_nbytes() == loop.predicted_kv_bytes() > 0
        assert loop.cache.layers[0].keys.shape[2] == 40 + 11
    finally:
        loop.close()
    assert torch.equal(got, want)


def test_compiled_static_loop_matches_generate(model):
    """transformers' torch.compile recipe (fullgraph over model.forward with a StaticCache)
    traces in one graph and gives generate's tokens; the model's own forward is untouched."""
    ids = _prompt(model)
    want = _generate(model, ids, 10)
    settings = CompileSettings(backend="aot_eager", mode="reduce-overhead")
    loop = DenseLoop(model, batch=2, max_cache_len=64, compile=settings)
    try:
        loop.allocate()
        loop.capture()
        got = loop.generate(ids, 10)
        assert loop._compiled is not None
    finally:
        loop.close()
    assert "forward" not in model.__dict__
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["synthetic", "sparq-plan"])
def test_plan_loop_with_compiled_pieces_matches_eager(model, kind):
    """Norms, MLPs and rotary compiled around the eager moa attention: the same tokens as
    the plan's own generate, and every compiled piece taken off again on close."""
    if kind == "synthetic":
        plan = synthetic_plan(model, density=0.5, length=64, sink=4, tolerance=0.1)
    else:
        plan = uniform_plan(model, "sparq:r=4,k=8,local=2")
    ids = _prompt(model, length=48)
    with apply_plan(model, plan, backend="reference"):
        want = _generate(model, ids, 10)
    loop = PlanLoop(
        model, plan, batch=2, max_cache_len=64, backend="reference", compile_settings=TRACE_ONLY
    )
    try:
        assert loop.compiled.pieces == 3 * model.config.num_hidden_layers + 3
        loop.allocate()
        got = loop.generate(ids, 10)
    finally:
        loop.close()
    layer = model.model.layers[0]
    assert "forward" not in layer.mlp.__dict__ and "forward" not in layer.input_layernorm.__dict__
    assert getattr(model, "_moa_runtime", None) is None
    assert torch.equal(got, want)


@pytest.mark.parametrize(("make", "repeats"), [(DenseLoop, True), (DynamicLoop, False)])
def test_static_cache_decode_repeats_kv_over_the_whole_cache(model, monkeypatch, make, repeats):
    """Why dense-sdpa is slow at long context: with a StaticCache transformers keeps a mask
    at decode, so its SDPA path copies K/V to every query head over all max_cache_len
    slots (repeat_kv) each step; with a DynamicCache there is no mask and SDPA runs GQA."""
    from transformers.integrations import sdpa_attention

    seen: list[tuple[int, ...]] = []
    original = sdpa_attention.repeat_kv

    def counting(hidden, n_rep):
        seen.append(tuple(hidden.shape))
        return original(hidden, n_rep)

    loop = make(model, batch=2, max_cache_len=64)
    try:
        loop.allocate()
        loop.fill_synthetic(32)
        monkeypatch.setattr(sdpa_attention, "repeat_kv", counting)
        loop.run(1)
    finally:
        loop.close()
    layers = model.config.num_hidden_layers
    if repeats:  # K and V of every layer, all 64 slots (not the 33 tokens held)
        assert seen == [(2, 2, 64, 16)] * (2 * layers)
    else:
        assert seen == []


def test_compiled_static_loop_falls_back_to_graph_breaks(model, monkeypatch):
    """If transformers' forward does not trace in one graph (another torch or transformers
    version), the loop compiles with graph breaks, as generate's own compile does, and
    says so instead of failing the row."""
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.repeat_kv

    def breaking(hidden, n_rep):
        torch._dynamo.graph_break()
        return original(hidden, n_rep)

    ids = _prompt(model)
    want = _generate(model, ids, 6)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", breaking)
    loop = DenseLoop(model, batch=2, max_cache_len=64, compile=TRACE_ONLY)
    try:
        loop.allocate()
        got = loop.generate(ids, 6)
        note = loop.compile_note
    finally:
        loop.close()
    assert note is not None and note.startswith("fullgraph failed")
    assert torch.equal(got, want)


def test_step_ms_times_from_a_fresh_fill(model):
    """``step_ms``: positive ms a step, the loop left after the last timed run (fill at
    ``length`` + ``steps``), the same tokens as a plain fill + run from that state."""
    loop = DenseLoop(model, 2, 48)
    try:
        ms = loop.step_ms(32, 5, warm=2, repeats=2)
        assert ms > 0 and loop.length == 37
        timed = loop.out_tokens[:, :5].clone()
        loop.fill_synthetic(32)
        loop.run(5)
        assert torch.equal(loop.out_tokens[:, :5], timed)
    finally:
        loop.close()
