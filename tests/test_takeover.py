"""attention_policy: installs a per-head attention on a model and restores it exactly, after a
normal exit and after an exception, nested and one after another."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from moa_search import MoaSearchError, apply_plan, uniform_plan
from moa_search.takeover import AttentionPolicy, attention_policy, configs, padding_mask
from tests.conftest import tiny_llama

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def _dense(call, q, k, v):
    call.state.append((call.layer, call.mask is None, call.scale))
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=call.scale, enable_gqa=True
    )


def _zero(call, q, k, v):
    return torch.zeros_like(q)


def _snapshot(model):
    """Everything a policy may touch, by identity where identity matters."""
    return {
        "impls": [(id(c), c._attn_implementation_internal) for c in configs(model)],
        "attn": dict(AttentionInterface._global_mapping),
        "mask": dict(AttentionMaskInterface._global_mapping),
        "pre_hooks": dict(model.model._forward_pre_hooks),
        "hooks": dict(model.model._forward_hooks),
        "generate": model.__dict__.get("generate", "absent"),
        "module_attrs": [sorted(m.__dict__) for m in model.model.layers],
        "attn_attrs": [sorted(layer.self_attn.__dict__) for layer in model.model.layers],
    }


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def model():
    return tiny_llama()


def _full_policy(model, name="takeover_test", fn=_dense, state=None, generated=None):
    def pre_hook(module, args, kwargs):
        return None

    def generate(original, *args, **kwargs):
        generated.append(True)
        return original(*args, **kwargs)

    return attention_policy(
        model, name, fn, state=[] if state is None else state, pre_hook=pre_hook,
        generate=generate if generated is not None else None,
    )  # fmt: skip


def test_policy_runs_and_restores_exactly(model):
    before, ref = _snapshot(model), _logits(model)
    calls: list = []
    generated: list = []
    with _full_policy(model, state=calls, generated=generated) as policy:
        assert isinstance(policy, AttentionPolicy) and policy.installed
        assert model.config._attn_implementation == "takeover_test"
        assert torch.allclose(_logits(model), ref, atol=1e-5)  # same math, through the policy
        assert [c[0] for c in calls] == [0, 1]
        assert all(c[2] == pytest.approx(16**-0.5) for c in calls)
        model.generate(IDS, max_new_tokens=2, do_sample=False)
        assert generated == [True]
        with attention_policy(model, "takeover_zero", _zero):  # nested: the inner one runs
            assert not torch.allclose(_logits(model), ref, atol=1e-3)
        assert model.config._attn_implementation == "takeover_test"  # ...and is undone to it
        assert torch.allclose(_logits(model), ref, atol=1e-5)
    assert not policy.installed
    assert _snapshot(model) == before
    assert torch.equal(_logits(model), ref)


def test_policy_restores_after_an_exception(model):
    before, ref = _snapshot(model), _logits(model)
    outer = _full_policy(model, generated=[])
    inner = attention_policy(model, "takeover_zero", _zero)
    with pytest.raises(RuntimeError, match="boom"), outer, inner:
        raise RuntimeError("boom")
    assert _snapshot(model) == before
    assert torch.equal(_logits(model), ref)


def test_policy_restores_after_an_exception_inside_attention(model):
    before = _snapshot(model)

    def broken(call, q, k, v):
        raise ValueError("inside attention")

    with pytest.raises(ValueError, match="inside attention"), attention_policy(model, "t", broken):
        _logits(model)
    assert _snapshot(model) == before


def test_half_installed_policy_is_undone(model, monkeypatch):
    """A failure half-way through install puts back what was already changed."""
    before = _snapshot(model)
    policy = _full_policy(model, generated=[])

    def fail(*args, **kwargs):
        raise RuntimeError("no hooks today")

    monkeypatch.setattr(type(model.model), "register_forward_pre_hook", fail)
    with pytest.raises(RuntimeError, match="no hooks today"):
        policy.install()
    monkeypatch.undo()
    assert not policy.installed
    assert _snapshot(model) == before


def test_sequential_uses_and_two_models(model):
    other = tiny_llama(seed=1)
    before, before_other = _snapshot(model), _snapshot(other)
    ref, ref_other = _logits(model), _logits(other)
    for _ in range(2):
        with attention_policy(model, "takeover_test", _dense, state=[]):
            assert torch.allclose(_logits(model), ref, atol=1e-5)
        assert _snapshot(model) == before
    # the same name on two models at once, removed out of order: each keeps working
    first = attention_policy(model, "takeover_test", _dense, state=[]).install()
    second = attention_policy(other, "takeover_test", _dense, state=[]).install()
    first.remove()
    assert "takeover_test" in AttentionInterface._global_mapping
    assert torch.allclose(_logits(other), ref_other, atol=1e-5)
    second.remove()
    second.remove()  # idempotent
    assert _snapshot(model) == before and _snapshot(other) == before_other


def test_a_previous_registration_under_the_name_comes_back(model):
    def theirs(*args, **kwargs):
        raise AssertionError("not called")

    AttentionInterface.register("takeover_taken", theirs)
    try:
        with attention_policy(model, "takeover_taken", _dense, state=[]):
            assert AttentionInterface._global_mapping["takeover_taken"] is not theirs
        assert AttentionInterface._global_mapping["takeover_taken"] is theirs
        assert "takeover_taken" not in AttentionMaskInterface._global_mapping
    finally:
        AttentionInterface._global_mapping.pop("takeover_taken", None)


def test_one_name_one_mask_function(model):
    other = tiny_llama(seed=1)
    with attention_policy(model, "takeover_test", _dense, state=[]):
        with pytest.raises(MoaSearchError, match="another mask function"):
            attention_policy(other, "takeover_test", _dense, mask=padding_mask).install()
        assert other.config._attn_implementation == "sdpa"


def test_padding_mask_reaches_the_policy(model):
    seen = []

    def record(call, q, k, v):
        seen.append(call.mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with attention_policy(model, "takeover_pad", record, mask=padding_mask), torch.no_grad():
        model(IDS, attention_mask=mask)
    assert len(seen) == 2 and all(torch.equal(m, mask.bool()) for m in seen)


def test_a_plan_inside_a_policy_and_back(model):
    before, ref = _snapshot(model), _logits(model)
    with attention_policy(model, "takeover_test", _dense, state=[]):
        with apply_plan(model, uniform_plan(model, "window:sink=1,span=4")):
            assert model.config._attn_implementation == "moa"
        assert model.config._attn_implementation == "takeover_test"
    assert _snapshot(model) == before
    assert torch.equal(_logits(model), ref)
