"""Every supported family (tests/families.py), through the same checks:

- an all-dense plan reproduces the model's own logits (prefill, cache, token-by-token
  decode) and its ``generate`` output, native sliding layers and soft-caps included;
- a mixed plan equals a brute-force reference built element by element from the pattern
  rule AND the model's own window (read from the ``sliding_window`` the model hands its
  attention function), with the model's ``scaling`` and ``softcap``, in prefill and decode;
- batched left-padded ``generate`` equals each sequence alone;
- the cache holds exactly the bytes the plan predicts, counted against the model's windows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moa_search import apply_plan, load_plan, uniform_plan
from moa_search.families import SUPPORTED_MODEL_TYPES, check_supported, layer_windows
from moa_search.patterns import parse
from moa_search.plan import save_plan
from tests.families import EOS, TINY, VOCAB, WINDOW, tiny_config, tiny_family_model
from tests.runtime.bruteforce import STEPWISE, bruteforce_logits, stepwise

FAMILY = pytest.mark.parametrize("model_type", list(TINY))
#: layer 2 asks for more than a sliding layer's window (span 12 > 8) and for sinks that
#: fall out of it; layer 0 is sliding too on the alternating families
MIXED = [
    ["window:sink=2,span=5", "elastic:sink=1,alpha=2,beta=0.5"],
    ["dense", "window:sink=0,span=3"],
    ["window:sink=3,span=12", "dense"],
]
N = 30
#: SparQ heads (their V sums count) and windows past the sequence: a span beyond it, a sink
#: longer than it; on a sliding layer they clip to the model's window
WITH_SPARQ = [
    ["sparq:r=4,k=4,local=2", "window:sink=4,span=28"],
    ["elastic:sink=40,alpha=2,beta=0.5", "sparq:r=16,k_ratio=0.25,local=0"],
    ["dense", "sparq:r=2,k=3,local=1"],
]


def _plan(model, rows):
    plan = uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in rows]
    return plan


def test_registry_covers_every_supported_family():
    assert set(TINY) == set(SUPPORTED_MODEL_TYPES)
    for model_type in TINY:
        config = tiny_config(model_type)
        check_supported(config)
        windows = layer_windows(config)
        if model_type in ("llama", "qwen3"):
            assert windows == (None, None, None)
        elif model_type in ("mistral", "phi3"):
            assert windows == (WINDOW,) * 3
        elif model_type == "qwen2":
            assert windows == (None, WINDOW, WINDOW)
        else:
            assert windows == (WINDOW, None, WINDOW)


@FAMILY
@torch.no_grad()
def test_tiny_model_exercises_what_makes_its_family_different(model_type):
    """Each tiny model really has the detail its family is listed for, and it changes the
    logits (so the other tests would catch a runtime or profiler that lost it)."""
    model = tiny_family_model(model_type)
    attn = model.model.layers[0].self_attn
    config = model.config
    feature = {
        "qwen2": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),  # Qwen2.5's q/k/v bias
        "qwen3": ("q_norm.weight", "k_norm.weight"),
        "gemma3_text": ("q_norm.weight", "k_norm.weight"),
    }.get(model_type, ())
    if model_type == "phi3":
        assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
    if model_type.startswith("gemma"):
        assert attn.scaling == config.query_pre_attn_scalar**-0.5 != config.head_dim**-0.5
    if model_type == "gemma2":
        assert config.attn_logit_softcapping and config.final_logit_softcapping
    if not feature:
        return
    ids = torch.randint(3, VOCAB, (1, N))
    own = model(ids).logits
    # the init's values are no-ops (zero bias, identity norm): put layer 0's back
    init = dict(
        AutoModelForCausalLM.from_config(config).model.layers[0].self_attn.named_parameters()
    )
    params = dict(attn.named_parameters())
    for name in feature:
        assert init[name].unique().numel() == 1, f"{name}: the init is a constant"
        assert (params[name] - init[name]).abs().max() > 0.1, f"{name}: left at its init"
        params[name].copy_(init[name])
    assert (model(ids).logits - own).abs().max() > 1e-3, f"{model_type}: {feature} change nothing"


@FAMILY
@torch.no_grad()
def test_dense_plan_reproduces_logits_and_generate(model_type):
    model = tiny_family_model(model_type)
    ids = torch.randint(3, VOCAB, (2, N))
    native = model(ids, use_cache=False).logits
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    native_gen = model.generate(ids, **kw)
    with apply_plan(model, uniform_plan(model, "dense")) as runtime:
        assert (model(ids, use_cache=False).logits - native).abs().max() <= 1e-4
        assert (model(ids, use_cache=True).logits - native).abs().max() <= 1e-4
        assert (stepwise(model, runtime, ids)[0] - native).abs().max() <= 1e-4
        assert torch.equal(model.generate(ids, **kw), native_gen)
    assert model.config._attn_implementation == "eager", "remove restores the model"


@FAMILY
@torch.no_grad()
def test_mixed_plan_matches_bruteforce_in_prefill_and_decode(model_type):
    model = tiny_family_model(model_type, seed=1)
    ids = torch.randint(3, VOCAB, (2, N))
    expected = bruteforce_logits(model, ids, MIXED)
    assert (expected - model(ids).logits).abs().max() > 1e-3, "the plan changes the model"
    with apply_plan(model, _plan(model, MIXED)) as runtime:
        assert (model(ids, use_cache=False).logits - expected).abs().max() <= 1e-4
        assert (model(ids, use_cache=True).logits - expected).abs().max() <= 1e-4
        stepped = bruteforce_logits(model, ids, MIXED, reach=STEPWISE)
        assert (stepwise(model, runtime, ids)[0] - stepped).abs().max() <= 1e-4
    with apply_plan(model, _plan(model, MIXED), backend="reference"):
        assert (model(ids, use_cache=True).logits - expected).abs().max() <= 1e-4


@FAMILY
@torch.no_grad()
def test_left_padded_generate_equals_each_sequence_alone(model_type):
    model = tiny_family_model(model_type, seed=2)
    a = torch.randint(3, VOCAB, (1, 24))
    b = torch.randint(3, VOCAB, (1, 15))
    batch = torch.zeros(2, 24, dtype=torch.long)
    mask = torch.zeros(2, 24, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 9:], mask[1, 9:] = b[0], 1
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with apply_plan(model, _plan(model, MIXED)):
        both = model.generate(batch, attention_mask=mask, **kw)
        alone = [model.generate(x, attention_mask=torch.ones_like(x), **kw) for x in (a, b)]
    # a sequence that ends (eos) stops alone; in the batch it goes on as padding
    assert _until_eos(both[0, 24:]) == _until_eos(alone[0][0, 24:])
    assert _until_eos(both[1, 24:]) == _until_eos(alone[1][0, 15:])


def _until_eos(tokens: torch.Tensor) -> list[int]:
    out = tokens.tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


@FAMILY
@torch.no_grad()
def test_cache_bytes_equal_plan_prediction(model_type, tmp_path):
    model = tiny_family_model(model_type)
    plan = _plan(model, MIXED)
    plan = load_plan(save_plan(plan, tmp_path / "plan.yaml"))  # windows survive the file
    assert list(plan.model.native_windows or [None] * 3) == list(layer_windows(model.config))
    ids = torch.randint(3, VOCAB, (3, N))
    for p in (plan, _plan(model, WITH_SPARQ), uniform_plan(model, "dense")):
        with apply_plan(model, p, max_cache_len=N) as runtime:
            cache = runtime.new_cache()
            model(ids[:, : N - 4], past_key_values=cache)  # prefill, then decode steps
            for t in range(N - 4, N):
                model(ids[:, t : t + 1], past_key_values=cache)
        assert cache.seq_lengths().tolist() == [N] * 3
        assert cache.nbytes() == p.kv_bytes(N, batch=3, dtype_bytes=4)
    # the model's own cache: N entries on a full layer, the window on a sliding one
    per_layer = [N if w is None else WINDOW for w in layer_windows(model.config)]
    dense = uniform_plan(model, "dense").dense_kv_bytes(N, batch=3, dtype_bytes=4)
    assert dense == sum(per_layer) * 2 * 16 * 4 * 2 * 3  # x KV heads x d x fp32 x (K, V) x B
