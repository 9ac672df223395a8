"""The ablation engine against the plain definition: run the whole changed model, compare."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Window, parse
from moa_search.plan import dense_plan
from moa_search.profile.ablation import Ablation, AblationEngine, Scored
from moa_search.profile.validate import sparq_losses
from moa_search.runtime import apply_plan

N = 48


def _data(seed: int = 0, answer_only: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (N,), generator=g)
    mask = torch.zeros(N, dtype=torch.bool)
    if answer_only:
        mask[-4:] = True
    else:
        mask[1:] = True
    return ids, mask


def _logp_with(model, ids, plan) -> torch.Tensor:
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        logits = model(ids[None], use_cache=False).logits[0]
    return F.log_softmax(logits.float(), -1)


def _brute(model, ids, mask, changes, base=None):
    """KL(dense || changed), dNLL and match at the scored positions, by full runs."""
    sc = Scored.from_mask(ids, mask, 0)
    ref = _logp_with(model, ids, dense_plan(model))[sc.positions]
    plan = dense_plan(model)
    plan.heads = [list(r) for r in (base or plan.heads)]
    for layer, kv, p in changes:
        plan.heads[layer][kv] = p
    got = _logp_with(model, ids, plan)[sc.positions]
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    nll = lambda lp: -lp.gather(-1, sc.targets[:, None])[:, 0]  # noqa: E731
    dnll = (nll(got) - nll(ref)).mean()
    return float(kl), float(dnll), bool((got.argmax(-1) == sc.targets).all())


@pytest.mark.parametrize("answer_only", [False, True])
def test_exact_effect_equals_full_rerun(make_model, answer_only):
    model = make_model(num_hidden_layers=3)
    ids, mask = _data(1, answer_only)
    engine = AblationEngine(model, "exact", row_batch=3, max_scored=0)
    run = engine.prepare(ids, mask)
    abl = [
        Ablation(0, 1, Window(sink=2, span=6)),
        Ablation(1, 0, parse("elastic:sink=1,alpha=2,beta=0.25")),
        Ablation(2, 1, Window(sink=0, span=3)),
        Ablation(2, 0, Dense()),
        None,
    ]
    eff = engine.effects(run, abl)
    for j, a in enumerate(abl[:3]):
        kl, dnll, match = _brute(model, ids, mask, [(a.layer, a.kv_head, a.pattern)])
        assert eff.kl[j].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert eff.dnll[j].item() == pytest.approx(dnll, rel=1e-4, abs=1e-6)
        assert bool(eff.match[j]) == match
        assert kl > 1e-4  # the change is visible: the test could fail
    assert eff.kl[3].abs().item() < 1e-6 and eff.kl[4].abs().item() < 1e-6


def test_exact_effect_with_a_base_plan(make_model):
    model = make_model(num_hidden_layers=3)
    ids, mask = _data(2)
    base = [[Window(sink=1, span=8), Dense()], [Dense(), Window(sink=0, span=5)], [Dense()] * 2]
    engine = AblationEngine(model, "exact", max_scored=0)
    run = engine.prepare(ids, mask, base=base)
    eff = engine.effects(run, [None, Ablation(2, 0, Window(sink=2, span=4))])
    kl0, _, _ = _brute(model, ids, mask, [], base=base)
    kl1, _, _ = _brute(model, ids, mask, [(2, 0, Window(sink=2, span=4))], base=base)
    assert eff.kl[0].item() == pytest.approx(kl0, rel=1e-4)
    assert eff.kl[1].item() == pytest.approx(kl1, rel=1e-4)
    assert kl1 > kl0 > 1e-4


def test_sparq_effect_equals_teacher_forced_decode(make_model):
    model = make_model(num_hidden_layers=2)
    ids, mask = _data(3)
    p = parse("sparq:r=4,k_ratio=0.25,local=2", 16)
    engine = AblationEngine(model, "exact", max_scored=0)
    eff = engine.effects(engine.prepare(ids, mask), [Ablation(1, 1, p)])
    from moa_search.profile.calib import Sample

    s = Sample(ids, mask)
    base = sparq_losses(model, [s], None, 0, None)
    changed = sparq_losses(model, [s], 1, 1, p)
    assert eff.dnll[0].item() == pytest.approx(float(changed[0] - base[0]), rel=1e-3, abs=1e-6)
    assert eff.kl[0].item() > 1e-5


def test_scored_fidelity_is_exact_for_the_last_layer_and_close_elsewhere(make_model):
    model = make_model(num_hidden_layers=3)
    ids, mask = _data(4, answer_only=True)
    exact = AblationEngine(model, "exact", max_scored=0)
    scored = AblationEngine(model, "scored", max_scored=0)
    sparq = parse("sparq:r=4,k_ratio=0.25,local=2", 16)
    abl = [
        Ablation(2, 0, Window(sink=1, span=4)),
        Ablation(0, 1, Window(sink=1, span=4)),
        Ablation(2, 1, sparq),
    ]
    e = exact.effects(exact.prepare(ids, mask), abl)
    s = scored.effects(scored.prepare(ids, mask), abl)
    # at the last layer nothing downstream reads other positions: both are the same
    assert s.kl[0].item() == pytest.approx(e.kl[0].item(), rel=1e-4)
    # SparQ scores fp8-rounded keys (the runtime's side buffer): at r=4 of d=16 some keys
    # tie exactly, and the two paths' topk may keep different ones of a tie
    assert s.kl[2].item() == pytest.approx(e.kl[2].item(), rel=3e-3)
    assert e.kl[2].item() > 1e-6
    assert s.kl[1].item() > 0 and e.kl[1].item() > 0


def test_bad_input_is_one_line(make_model):
    model = make_model()
    with pytest.raises(MoaSearchError, match="fidelity"):
        AblationEngine(model, "approximate")
    ids, _ = _data()
    with pytest.raises(MoaSearchError, match="no scored token"):
        AblationEngine(model).prepare(ids, torch.zeros(N, dtype=torch.bool))


def test_answer_match_ignores_the_end_of_turn_token():
    ids = torch.tensor([5, 6, 7, 8, 2])
    mask = torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool)
    sc = Scored.from_mask(ids, mask, 0, stop_ids=[2])
    assert sc.targets.tolist() == [8, 2] and sc.content.tolist() == [True, False]
    logp = torch.full((2, 2, 10), -9.0)
    logp[0, 0, 8] = logp[0, 1, 3] = 0.0  # right answer, then a period instead of stopping
    logp[1, 0, 4] = logp[1, 1, 2] = 0.0  # wrong answer, then stops
    assert sc.matches(logp).tolist() == [True, False]


def test_scored_rows_measured_together_equal_each_alone(make_model):
    model = make_model(num_hidden_layers=3)
    ids, mask = _data(5, answer_only=True)
    engine = AblationEngine(model, "scored", row_batch=2, max_scored=0)
    run = engine.prepare(ids, mask)
    abl = [
        Ablation(1, 0, Window(sink=1, span=4)),
        None,
        Ablation(0, 1, parse("elastic:sink=1,alpha=2,beta=0.25")),
        Ablation(2, 1, Window(sink=0, span=3)),
        Ablation(0, 0, Window(sink=2, span=5)),
    ]
    together = engine.effects(run, abl)
    for j, a in enumerate(abl):
        alone = engine.effects(run, [a])
        assert together.kl[j].item() == pytest.approx(
            alone.kl[0].item(), rel=1e-3, abs=1e-6
        )  # fp32, batch-shaped matmuls
    assert together.kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert (together.kl[[0, 2, 3, 4]] > 1e-6).all()


def test_whole_plans_of_many_samples_batched_equal_each_sample_run_alone(make_model):
    model = make_model(num_hidden_layers=2)
    engine = AblationEngine(model, "exact", row_batch=2, max_scored=0)
    plan = [[Window(sink=2, span=5), Dense()], [parse("elastic:sink=1,alpha=2,beta=0.25"), Dense()]]
    samples = [_data(s, answer_only=s % 2 == 1) for s in range(5)]
    samples.append((samples[0][0][:30], samples[0][1][:30]))  # another length, its own batch
    ids = [x for x, _ in samples]
    scored = [Scored.from_mask(x, m, 0) for x, m in samples]
    batched = engine.plan_logp(ids, scored, plan)
    refs = engine.references(ids, [m for _, m in samples])
    for (x, m), got, ref in zip(samples, batched, refs, strict=True):
        alone = engine.prepare(x, m, plan)
        torch.testing.assert_close(got, alone.base_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref.ref_logp, alone.ref_logp, atol=1e-5, rtol=1e-5)
        assert ref.ref_match == alone.ref_match
        torch.testing.assert_close(ref.ref_nll, alone.ref_nll, atol=1e-5, rtol=1e-5)
    assert (batched[0] - batched[2]).abs().max() > 1e-3  # distinct samples, distinct rows
