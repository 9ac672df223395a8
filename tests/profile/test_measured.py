"""profile(method="measured"): table entries are real single-head ablations; resume; errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa_search.errors import MoaSearchError
from moa_search.patterns import parse
from moa_search.plan import dense_plan
from moa_search.profile import measured as measured_mod
from moa_search.profile import profile
from moa_search.profile.calib import Sample
from moa_search.profile.measured import MeasureConfig, measured_candidates
from moa_search.runtime import apply_plan

CANDS = "window:sink=2,span=8;elastic:sink=2,alpha=4,beta=0.25;sparq:r=4,k_ratio=0.25,local=4"
N = 64


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, task in enumerate(("text", "retrieval", "text", "retrieval")):
        ids = torch.randint(3, 96, (N,), generator=g)
        mask = torch.zeros(N, dtype=torch.bool)
        if task == "text":
            mask[1:] = True
        else:
            mask[-3 - i :] = True
        out.append(Sample(ids, mask, task))
    return out


def _kl(model, sample: Sample, layer: int, kv: int, spec: str) -> float:
    """KL(dense || one head changed) per scored token, from two whole-model runs."""
    pos = torch.nonzero(sample.loss_mask[1:])[:, 0]
    plan = dense_plan(model)
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        ref = F.log_softmax(model(sample.input_ids[None]).logits[0, pos].float(), -1)
    plan.heads = [list(r) for r in plan.heads]
    plan.heads[layer][kv] = parse(spec, 16)
    with torch.no_grad(), apply_plan(model, plan, backend="reference"):
        got = F.log_softmax(model(sample.input_ids[None]).logits[0, pos].float(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def _run(model, out, **kw):
    args = dict(
        calib=_samples(), lengths=[N], samples=4, candidates=CANDS, progress=False,
        plots=False, measure=MeasureConfig(max_scored=0, row_batch=4),
    )  # fmt: skip
    args.update(kw)
    args.setdefault("method", "measured")
    return profile(model, out=out, **args)


def test_entries_are_measured_single_head_ablations(model, tmp_path):
    res = _run(model, tmp_path / "p")
    table = res.table
    assert res.meta["method"] == "measured"
    assert res.meta["tasks"][str(N)] == {
        "text": {"n": 2, "dense_match": 0},
        "retrieval": {"n": 2, "dense_match": 0},
    }
    samples = _samples()
    for layer, kv, spec in ((0, 1, "window:sink=2,span=8"), (1, 0, CANDS.split(";")[1])):
        canon = parse(spec, 16).spec()
        row = table[(table.layer == layer) & (table.kv_head == kv) & (table.pattern == canon)]
        assert len(row) == 1
        for task in ("text", "retrieval"):
            want = sum(_kl(model, s, layer, kv, spec) for s in samples if s.task == task) / 2
            assert row[f"kl_{task}"].item() == pytest.approx(want, rel=1e-4, abs=1e-7)
            assert want > 1e-5
        weighted = row["kl_text"].item() + row["kl_retrieval"].item()
        assert row["delta_loss_mean"].item() == pytest.approx(weighted, rel=1e-9)
    dense = table[table.family == "dense"]
    assert (dense["delta_loss_mean"] == 0).all()
    from moa_search.profile.plots import measured_heatmap

    assert measured_heatmap(table, tmp_path / "hm.png").stat().st_size > 1000


def test_resume_after_a_kill_loses_no_finished_sample(model, tmp_path, monkeypatch):
    whole = _run(model, tmp_path / "whole").table
    real = measured_mod.run_job
    calls = []

    def dying(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(measured_mod, "run_job", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tmp_path / "cut")
    monkeypatch.setattr(measured_mod, "run_job", real)
    done = sorted((tmp_path / "cut" / "checkpoints").rglob("s*.safetensors"))
    assert len(done) == 2
    again = _run(model, tmp_path / "cut")
    assert again.meta["resumed"]
    cols = ["delta_loss_mean", "kl_text", "kl_retrieval"]
    assert (again.table[cols].to_numpy() == whole[cols].to_numpy()).all()


def test_bad_input_is_one_line(model, tmp_path):
    with pytest.raises(MoaSearchError, match="method"):
        _run(model, tmp_path / "a", method="guess")
    with pytest.raises(MoaSearchError, match="validate"):
        _run(model, tmp_path / "v", validate=3)
    with pytest.raises(MoaSearchError, match="fidelity"):
        MeasureConfig(fidelity="rough")
    with pytest.raises(MoaSearchError, match="row_batch"):
        MeasureConfig(row_batch=0)
    _run(model, tmp_path / "b")
    with pytest.raises(MoaSearchError, match="measure"):
        _run(model, tmp_path / "b", measure=MeasureConfig(fidelity="scored"))


def test_default_grid_spans_every_family():
    cands = measured_candidates([2048, 4096], 64)
    names = {c.name for c in cands}
    assert names == {"dense", "window", "elastic", "sparq"}
    spans = sorted(c.span for c in cands if c.name == "window")
    assert spans[0] == 32 and spans[-1] == 2048


def test_several_lengths_add_a_proportional_twin_of_every_short_window():
    """A fraction budget binds at the shortest length, where a twin costs its window's
    bytes; at the longer ones it keeps the window's share of the context."""
    cands = measured_candidates([2048, 4096], 64)
    twins = [c for c in cands if c.name == "elastic" and c.alpha == 0]
    windows = [c.span for c in cands if c.name == "window" and c.span <= 1024]
    assert sorted(round(c.beta * 2048) for c in twins) == windows
    for c in twins:
        w = parse(f"window:sink=32,span={round(c.beta * 2048)}", 64)
        assert c.floor == w.span, "the twin is its window up to the shortest length"
        assert all(c.span_at(n) == w.span_at(n) for n in (1, 100, w.span, 2048))
        assert c.span_at(4096) == 2 * w.span_at(2048)
    assert len({c.spec() for c in cands}) == len(cands)
    one = measured_candidates([2048], 64)
    assert not [c for c in one if c.name == "elastic" and c.alpha == 0 and c.beta < 0.125]


def test_families_cut_the_default_grid_and_keep_dense(model, tmp_path):
    res = profile(
        model, out=tmp_path / "f", calib=_samples(), lengths=[N], samples=4, progress=False,
        plots=False, families=("window",), measure=MeasureConfig(max_scored=0, row_batch=8),
    )  # fmt: skip
    names = {spec.split(":")[0] for spec in res.meta["config"]["candidates"]}
    assert names == {"dense", "window"}
    with pytest.raises(
        MoaSearchError, match=r"families \(--patterns\): unknown pattern family 'windw'"
    ):
        _run(model, tmp_path / "g", candidates=None, families=("windw",))
    with pytest.raises(MoaSearchError, match="either candidates or families"):
        _run(model, tmp_path / "h", families=("window",))
