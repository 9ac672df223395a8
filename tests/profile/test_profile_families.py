"""Both profilers on every supported family (tests/families.py): they must see the model as
the model computes itself (per-layer RoPE, soft-caps, query scaling, native windows).

- measured: the dense base run equals the model's own log-probs, and a one-head ablation
  equals running the model with that one-head plan through the runtime;
- gradient: the profiled forward gives the model's own loss, and a window that only drops
  keys outside a sliding layer's own window has exactly zero influence there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa_search import apply_plan, uniform_plan
from moa_search.families import layer_windows
from moa_search.patterns import parse
from moa_search.profile.ablation import Ablation, AblationEngine
from moa_search.profile.capture import InfluenceRecorder, profile_sample, sample_loss
from tests.families import TINY, VOCAB, WINDOW, tiny_family_model

FAMILY = pytest.mark.parametrize("model_type", list(TINY))
N = 32


def _sample(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (N,), generator=g)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[N // 2 :] = True
    return ids, mask


@FAMILY
@torch.no_grad()
def test_measured_ablation_matches_the_runtime(model_type):
    model = tiny_family_model(model_type, seed=3)
    ids, mask = _sample()
    engine = AblationEngine(model, fidelity="exact")
    run = engine.prepare(ids, mask)
    own = F.log_softmax(model(ids[None]).logits[0].float(), -1)[run.scored.positions]
    torch.testing.assert_close(run.ref_logp, own, atol=2e-5, rtol=0)

    spec = "window:sink=1,span=3"
    layers = range(len(layer_windows(model.config)))
    effects = engine.effects(run, [Ablation(i, 1, parse(spec)) for i in layers])
    for i in layers:
        plan = uniform_plan(model, "dense")
        plan.heads[i] = [plan.heads[i][0], parse(spec)]
        with apply_plan(model, plan):
            logp = F.log_softmax(model(ids[None], use_cache=False).logits[0].float(), -1)
        logp = logp[run.scored.positions]
        kl = (own.exp() * (own - logp)).sum(-1).clamp_min(0).mean()
        assert abs(float(effects.kl[i]) - float(kl)) <= 1e-5 + 1e-3 * float(kl)
        assert float(kl) > 1e-6, "the ablation changes the model"


@FAMILY
def test_gradient_profile_sees_the_model_and_its_windows(model_type):
    model = tiny_family_model(model_type, seed=4)
    ids, mask = _sample(1)
    with torch.no_grad():
        own = float(sample_loss(model, ids, mask, need_grad=False))
    # drops only keys at least WINDOW back: nothing a sliding layer's own window still sees
    far = [parse(f"window:sink=0,span={WINDOW}"), parse("window:sink=0,span=2")]
    recorder = InfluenceRecorder(far, [], block_size=16, backend="torch")
    loss, out = profile_sample(model, ids, mask, recorder)
    assert abs(loss - own) <= 1e-5 * max(1.0, abs(own))
    windows = layer_windows(model.config)
    for i, w in enumerate(windows):
        row = out["row"][i]
        assert torch.isfinite(row).all()
        short, far_keys = float(row[:, 1].abs().sum()), float(row[:, 0].abs().sum())
        assert short > 0, "a short window matters everywhere"
        if w is not None:  # zero up to rounding: those keys have no attention weight
            assert far_keys <= 1e-5 * short, f"layer {i} never sees those keys"
        else:
            assert far_keys > 1e-3 * short, f"layer {i} is global"


@pytest.mark.parametrize("model_type", ["gemma3_text", "mistral"])
@torch.no_grad()
def test_measured_profile_skips_what_a_sliding_layer_already_drops(model_type):
    from moa_search.profile.calib import Sample
    from moa_search.profile.measured import measure_sample, same_as_dense

    model = tiny_family_model(model_type, seed=5)
    ids, mask = _sample(2)
    wide, short = parse(f"window:sink=2,span={WINDOW}"), parse("window:sink=0,span=3")
    engine = AblationEngine(model, fidelity="exact")
    seen: list = []
    effects = engine.effects
    engine.effects = lambda run, rows: seen.extend(rows) or effects(run, rows)
    out, _ = measure_sample(engine, Sample(ids, mask, "text"), [parse("dense"), wide, short])
    windows = layer_windows(model.config)
    for i, w in enumerate(windows):
        measured = {(a.kv_head, a.pattern.spec()) for a in seen if a.layer == i}
        assert (0, short.spec()) in measured
        assert ((0, wide.spec()) in measured) == (w is None)
        assert same_as_dense(wide, N, w) == (w is not None)
        if w is not None:  # not measured, and truly nothing to measure
            assert (out["kl"][i, :, 1] == 0).all()
            run = engine.prepare(ids, mask)
            assert float(effects(run, [Ablation(i, 0, wide)]).kl[0]) <= 1e-7
        else:
            assert (out["kl"][i, :, 1] > 0).all()
