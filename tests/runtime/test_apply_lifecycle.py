"""apply_plan / remove_plan as a lifecycle: any sequence of uses leaves the model exactly as
it was, a second plan on a model is refused, and generate's cache options are checked."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache

from moa_search import MoACache, MoaSearchError, apply_plan, remove_plan, uniform_plan
from tests.conftest import tiny_llama

P1 = "window:sink=1,span=4"
P2 = "window:sink=0,span=2"


def _greedy(model, ids):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, 1)


def _assert_pristine(model, fresh):
    """No trace of a plan: hooks, attributes, attention implementation, cache type, tokens."""
    assert not model.model._forward_pre_hooks, "a forward pre-hook was left on the model"
    assert "_moa_runtime" not in model.__dict__
    assert "generate" not in model.__dict__
    assert not [m for m in model.modules() if "_moa_runtime" in m.__dict__]
    assert model.config._attn_implementation == fresh.config._attn_implementation
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert not isinstance(out.past_key_values, MoACache)
        assert torch.equal(out.logits, fresh(ids, use_cache=True).logits)
        seq, logits = _greedy(model, ids)
        ref_seq, ref_logits = _greedy(fresh, ids)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)


def _apply_inside_with(model, p1, p2):
    """The issue's sequence; replacing or refusing are both fine, leftovers are not."""
    with apply_plan(model, p1), contextlib.suppress(MoaSearchError):
        apply_plan(model, p2)


def _remove_then_apply_inside_with(model, p1, p2):
    with apply_plan(model, p1):
        remove_plan(model)
        apply_plan(model, p2)  # the outer block no longer owns the model...
    assert model._moa_runtime.plan is p2  # ...so its exit leaves the new plan alone


def _twice_without_remove(model, p1, p2):
    apply_plan(model, p1)
    with contextlib.suppress(MoaSearchError):
        apply_plan(model, p2)


def _nested_withs(model, p1, p2):
    with apply_plan(model, p1) as outer:
        outer.remove()
        with apply_plan(model, p2):
            pass
        outer.remove()  # idempotent


def _double_remove(model, p1, p2):
    runtime = apply_plan(model, p1)
    runtime.remove()
    runtime.remove()
    remove_plan(model)
    with apply_plan(model, p2):
        pass


SEQUENCES = [_apply_inside_with, _remove_then_apply_inside_with, _twice_without_remove]
SEQUENCES += [_nested_withs, _double_remove]


@pytest.mark.parametrize("sequence", SEQUENCES, ids=lambda f: f.__name__.strip("_"))
def test_any_apply_remove_sequence_restores_the_model(sequence):
    model, fresh = tiny_llama(seed=1), tiny_llama(seed=1)
    p1, p2 = uniform_plan(model, P1), uniform_plan(model, P2)
    with torch.no_grad():
        sequence(model, p1, p2)
    remove_plan(model)
    _assert_pristine(model, fresh)


def test_refused_second_plan_keeps_the_first_running(model):
    ids = torch.randint(3, 128, (1, 12))
    p1 = uniform_plan(model, P1)
    with torch.no_grad(), apply_plan(model, p1):
        before = model(ids).logits
        with pytest.raises(MoaSearchError, match="already runs a plan") as err:
            apply_plan(model, uniform_plan(model, P2))
        assert "\n" not in str(err.value)
        assert torch.equal(model(ids).logits, before)


def test_failed_install_leaves_no_trace(monkeypatch):
    model, fresh = tiny_llama(seed=1), tiny_llama(seed=1)

    def broken(*args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(type(model.model), "register_forward_pre_hook", broken)
    with pytest.raises(RuntimeError, match="hook registration failed"):
        apply_plan(model, uniform_plan(model, P1))
    monkeypatch.undo()
    _assert_pristine(model, fresh)


def test_remove_restores_a_users_own_generate(model):
    def mine(*args, **kwargs):
        return "mine"

    model.generate = mine
    with apply_plan(model, uniform_plan(model, P1)):
        assert model.generate is not mine
    assert model.generate is mine


@pytest.mark.parametrize("where", ["kwarg", "generation_config"])
def test_generate_refuses_a_cache_implementation_it_cannot_read(model, where):
    from transformers import GenerationConfig

    ids = torch.randint(3, 128, (1, 8))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    if where == "kwarg":
        kwargs["cache_implementation"] = "static"
    else:
        kwargs["generation_config"] = GenerationConfig(
            cache_implementation="static", max_new_tokens=2, do_sample=False
        )
    with apply_plan(model, uniform_plan(model, P1)), pytest.raises(MoaSearchError) as err:
        model.generate(ids, **kwargs)
    msg = str(err.value)
    assert "cache_implementation='static'" in msg and "'dynamic'" in msg and "\n" not in msg


@torch.no_grad()
def test_generate_honours_dynamic_cache_implementation(model):
    ids = torch.randint(3, 128, (1, 10))
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with apply_plan(model, uniform_plan(model, P1)):
        per_head = model.generate(ids, **kwargs)
        dynamic = model.generate(ids, cache_implementation="dynamic", **kwargs)
    assert isinstance(per_head.past_key_values, MoACache)
    assert isinstance(dynamic.past_key_values, DynamicCache)
    assert torch.equal(per_head.sequences, dynamic.sequences)
    for a, b in zip(per_head.logits, dynamic.logits, strict=True):
        assert (a - b).abs().max() <= 1e-5
