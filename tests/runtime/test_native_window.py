"""A model's own sliding window bounds every plan: no head attends further than the model.

Mistral with ``sliding_window=16`` on 40 tokens: an all-dense plan must give the native
model's logits in every path (no cache, fresh prefill, chunked / token-by-token decode,
generate, a user's DynamicCache), mixed plans must equal a brute-force reference of
"the pattern AND the model's window", and the per-head cache keeps no more than the window.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from moa_search import apply_plan, uniform_plan
from moa_search.patterns import parse
from tests.runtime.bruteforce import STEPWISE, bruteforce_logits, stepwise
from tests.runtime.test_apply import _rule, forward_ends

WINDOW = 16
N = 40
MIXED = [
    ["window:sink=2,span=5", "elastic:sink=1,alpha=2,beta=0.5"],
    ["dense", "window:sink=3,span=30"],
]


def tiny_mistral(window: int | None = WINDOW, seed: int = 0):
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
        max_position_embeddings=512,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).eval()


def _plan(model, rows):
    plan = uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in rows]
    return plan


@torch.no_grad()
def test_dense_plan_equals_native_sliding_window_model():
    model = tiny_mistral()
    ids = torch.randint(3, 128, (2, N))
    native = model(ids, use_cache=False).logits
    assert (native - tiny_mistral(window=None)(ids).logits).abs().max() > 1e-3, "window matters"
    gen_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    native_gen = model.generate(ids, **gen_kw)
    with apply_plan(model, uniform_plan(model, "dense")) as runtime:
        assert (model(ids, use_cache=False).logits - native).abs().max() <= 1e-5
        assert (model(ids, use_cache=True).logits - native).abs().max() <= 1e-5
        stepped, cache = stepwise(model, runtime, ids)
        assert (stepped - native).abs().max() <= 1e-5
        dynamic = DynamicCache(config=model.config)
        first = model(ids[:, :30], past_key_values=dynamic).logits
        rest = [model(ids[:, t : t + 1], past_key_values=dynamic).logits for t in range(30, N)]
        assert (torch.cat([first, *rest], 1) - native).abs().max() <= 1e-5
        assert torch.equal(model.generate(ids, **gen_kw), native_gen)
    for layer in cache.layers:  # a dense head keeps the window, not the sequence
        assert layer.layout.total_slots == WINDOW * model.config.num_key_value_heads


@pytest.mark.parametrize("path", ["no_cache", "fresh_prefill", "reference", "stepwise", "dynamic"])
@torch.no_grad()
def test_mixed_plan_is_pattern_and_model_window(path):
    model = tiny_mistral(seed=1)
    ids = torch.randint(3, 128, (2, N))
    reach = {"stepwise": STEPWISE, "dynamic": forward_ends(25)}.get(path)
    expected = bruteforce_logits(model, ids, MIXED, WINDOW, reach)
    backend = "reference" if path == "reference" else "auto"
    with apply_plan(model, _plan(model, MIXED), backend=backend) as runtime:
        if path == "no_cache":
            got = model(ids, use_cache=False).logits
        elif path in ("fresh_prefill", "reference"):
            got = model(ids, use_cache=True).logits
        elif path == "stepwise":
            got, _ = stepwise(model, runtime, ids)
        else:
            cache = DynamicCache(config=model.config)
            got = torch.cat(
                [model(ids[:, :25], past_key_values=cache).logits]
                + [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(25, N)],
                1,
            )
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_cache_stores_no_more_than_the_window():
    model = tiny_mistral()
    plan = _plan(model, MIXED)
    ids = torch.randint(3, 128, (1, N))
    with apply_plan(model, plan, max_cache_len=300) as runtime:
        cache = runtime.new_cache()
        model(ids, past_key_values=cache)
    for layer in cache.layers:
        for h in range(layer.num_heads):
            assert layer.layout.capacity(h) <= WINDOW
    # window:sink=2,span=5 keeps its own 2 + 5 slots, smaller than the window
    assert cache.layers[0].layout.capacity(0) == 7


@torch.no_grad()
def test_sparq_full_r_and_k_equals_native_window():
    model = tiny_mistral(seed=2)
    ids = torch.randint(3, 128, (1, N))
    native = model(ids, use_cache=False).logits
    plan = uniform_plan(model, f"sparq:r={model.config.head_dim},k=4096,local=0")
    with apply_plan(model, plan) as runtime:
        got, _ = stepwise(model, runtime, ids)
    assert (got - native).abs().max() <= 1e-4


@torch.no_grad()
def test_model_without_window_is_unchanged():
    model = tiny_mistral(window=None)
    ids = torch.randint(3, 128, (2, N))
    expected = bruteforce_logits(model, ids, MIXED, window=10**9, reach=STEPWISE)
    with apply_plan(model, _plan(model, MIXED)) as runtime:
        assert runtime.windows == [None, None]
        got, _ = stepwise(model, runtime, ids)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk", [16, 33, 1024])
@pytest.mark.parametrize("window", [5, 16, 40])
def test_fresh_prefill_with_window_matches_bruteforce_rule(chunk, window):
    """The chunked prefill (several chunks, bands narrower than the prompt) against masks
    built element by element from the pattern rule AND i - j < window."""
    from moa_search.runtime.prefill import fresh_prefill
    from moa_search.runtime.scores import Logits

    specs = [
        "dense",
        "window:sink=4,span=16",
        "elastic:sink=2,alpha=3,beta=0.25",
        "sparq:r=4,k=8,local=4",  # dense in prefill
    ]
    torch.manual_seed(0)
    batch, kv, group, length, dim = 2, 4, 2, 90, 16
    q = torch.randn(batch, kv * group, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv, length, dim, dtype=torch.float64)
    want = torch.empty_like(q)
    for h, spec in enumerate(specs):
        rule = "dense" if spec.startswith("sparq") else spec
        m = torch.tensor(
            [
                [_rule(rule, i, j, length) and i - j < window for j in range(length)]
                for i in range(length)
            ]
        )
        s = (q[:, h * group : (h + 1) * group] @ k[:, h, None].transpose(-1, -2)) * dim**-0.5
        want[:, h * group : (h + 1) * group] = (
            torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v[:, h, None]
        )
    got = fresh_prefill(
        q, k, v, [parse(s) for s in specs], Logits(dim**-0.5), chunk=chunk, window=window
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_left_padded_generate_matches_unpadded_runs():
    model = tiny_mistral(seed=3)
    plan = _plan(model, MIXED)
    a = torch.randint(3, 128, (1, 30))
    b = torch.randint(3, 128, (1, 21))
    batch = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 9:], mask[1, 9:] = b[0], 1
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with apply_plan(model, plan):
        both = model.generate(batch, attention_mask=mask, **kw)
        alone = [model.generate(x, attention_mask=torch.ones_like(x), **kw) for x in (a, b)]
    assert torch.equal(both[0, 30:], alone[0][0, 30:])
    assert torch.equal(both[1, 30:], alone[1][0, 21:])
