"""End-to-end profile(): outputs, resume after a kill, refusal on changed args, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import moa_search.profile.run as run_mod
from moa_search.errors import MoaSearchError
from moa_search.plan import ModelIdentity
from moa_search.profile import profile
from moa_search.profile.table import PRIMARY

CANDS = "window:sink=4,span=32;elastic:sink=4,alpha=16,beta=0.25;sparq:r=8,k_ratio=0.25,local=8"
KW = dict(
    lengths=[64, 128],
    samples=2,
    block_size=32,
    candidates=CANDS,
    progress=False,
    plots=False,
    method="gradient",
)


def random_tokens(n_samples: int, length: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    """Token ids for calibration (a name under tests/kernels/conftest.py would shadow an import)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_samples, length), generator=g)


def _run(model, tmp_path, name="p", **over):
    kw = {**KW, **over}
    return profile(model, calib=random_tokens(3, 128), out=tmp_path / name, **kw)


def test_outputs_schema_and_aggregates(model, tmp_path):
    res = _run(model, tmp_path, plots=True, validate=4)
    table = pd.read_parquet(tmp_path / "p" / "profile.parquet")
    for col in (
        "layer",
        "kv_head",
        "head",
        "family",
        "pattern",
        "sink",
        "span",
        "alpha",
        "beta",
        "r",
        "k",
        "k_ratio",
        "local",
        "length",
        "delta_loss_mean",
        "delta_loss_std",
        "n_samples",
        "stored_bytes",
        "read_bytes",
        "density",
    ):
        assert col in table.columns, col
    agg = table[table["head"] == -1]
    # one KV-head row for every (layer, kv_head, pattern, length)
    assert len(agg) == 2 * 2 * 4 * 2
    assert agg.groupby(["layer", "kv_head", "pattern", "length"]).size().eq(1).all()
    dense = table[table["family"] == "dense"]
    assert (dense["delta_loss_mean"] == 0).all() and (dense["density"] == 1).all()
    sparse = table[table["family"] != "dense"]
    assert (sparse["delta_row_mean"] > 0).all()
    assert (sparse["delta_loss_mean"] == sparse[f"delta_{PRIMARY}_mean"]).all()
    assert sparse["delta_moa_mean"].isna().eq(sparse["family"] == "sparq").all()
    # aggregate = sum over the query heads of the group
    heads = (
        table[table["head"] >= 0]
        .groupby(["layer", "kv_head", "pattern", "length"])["delta_row_mean"]
        .sum()
    )
    merged = agg.set_index(["layer", "kv_head", "pattern", "length"])["delta_row_mean"]
    pd.testing.assert_series_equal(
        heads.sort_index(), merged.sort_index(), check_names=False, rtol=1e-9
    )
    w = table[(table["pattern"] == "window:sink=4,span=32") & (table["length"] == 128)].iloc[0]
    assert w["stored_bytes"] == 2 * 36 * 16 * 2 and w["density"] == pytest.approx(36 / 128)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    ident = ModelIdentity.from_config(model)
    assert meta["model"]["fingerprint"] == ident.fingerprint
    assert meta["lengths"] == [64, 128] and meta["block_size"] == 32
    assert meta["validation"]["pairs"] == 4 and "spearman" in meta
    blocks = load_file(str(tmp_path / "p" / "influence.safetensors"))
    assert blocks["blocks.128"].shape == (2, 4, 4, 4)
    assert (tmp_path / "p" / "plots" / "sensitivity_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "p" / "plots" / "influence_distance.png").stat().st_size > 1000
    assert res.table.shape == table.shape


def test_resume_after_kill_recomputes_only_missing(model, tmp_path, monkeypatch):
    clean = _run(model, tmp_path, "clean").table
    real = run_mod.run_job
    calls = []

    def dying(*args, **kwargs):
        calls.append(args[2:4])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third sample is in flight
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "run_job", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tmp_path, "p")
    assert len(list((tmp_path / "p" / "checkpoints").rglob("*.safetensors"))) == 2
    assert not list((tmp_path / "p").rglob("*.tmp"))
    calls.clear()
    monkeypatch.setattr(run_mod, "run_job", lambda *a, **k: (calls.append(a[2:4]), real(*a, **k)))
    resumed = _run(model, tmp_path, "p")
    assert calls == [(128, 0), (128, 1)]
    assert resumed.meta["resumed"] is True
    pd.testing.assert_frame_equal(resumed.table, clean, rtol=1e-6)


def test_changed_arguments_are_refused_unless_overwrite(model, tmp_path):
    _run(model, tmp_path)
    with pytest.raises(MoaSearchError, match="other arguments.*block_size.*--overwrite") as err:
        _run(model, tmp_path, block_size=64)
    assert "\n" not in str(err.value)
    res = _run(model, tmp_path, block_size=64, overwrite=True)
    assert res.meta["block_size"] == 64
    with pytest.raises(MoaSearchError, match="other arguments.*sparq_rows"):
        _run(model, tmp_path, block_size=64, sparq_rows=8)
    res = _run(model, tmp_path, block_size=64, sparq_rows=8, overwrite=True)
    assert res.meta["sparq_rows"] == 8


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(lengths=[100]), "100 is not a positive multiple of the block size 32"),
        (dict(lengths=[256]), "longest sample has 128 tokens, length 256 needs 256"),
        (dict(candidates="window:span=-3"), "span must be > 0"),
        (dict(loss="some"), "loss must be 'all' or 'answer'"),
        (dict(sparq_rows=-1), "sparq_rows: expected 0 \\(all rows\\) or more, got -1"),
    ],
)
def test_bad_input_one_line_errors(model, tmp_path, kwargs, pattern):
    with pytest.raises(MoaSearchError, match=pattern) as err:
        _run(model, tmp_path, **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_model_and_unsupported_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoaSearchError, match="cannot load model") as err:
        profile(
            str(tmp_path / "no-such-model"),
            calib=random_tokens(1, 64),
            out=tmp_path / "x",
            **{**KW, "lengths": [64]},
        )
    assert "\n" not in str(err.value)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=96))
    with pytest.raises(MoaSearchError, match="model type 'gpt2' is not supported"):
        profile(gpt2, calib=random_tokens(1, 64), out=tmp_path / "y", **{**KW, "lengths": [64]})


def test_out_of_memory_becomes_one_line_hint(model, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore")

    monkeypatch.setattr(run_mod, "profile_sample", oom)
    with pytest.raises(MoaSearchError, match="out of memory on cpu at length 64.*--lengths") as err:
        _run(model, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_two_cpu_workers_match_single_process(saved_model, tmp_path):
    one = profile(saved_model, calib=random_tokens(3, 128), out=tmp_path / "one", **KW)
    two = profile(
        saved_model, calib=random_tokens(3, 128), out=tmp_path / "two", devices="cpu,cpu", **KW
    )
    pd.testing.assert_frame_equal(one.table, two.table, rtol=1e-5)
    assert two.meta["devices"] == ["cpu", "cpu"]


def test_config_is_stored_and_resume_ignores_run_only_fields(model, tmp_path):
    from moa_search.profile import ProfileConfig

    kw = {k: v for k, v in KW.items() if k != "progress"}
    config = ProfileConfig(**kw)
    first = profile(model, config, calib=random_tokens(3, 128), out=tmp_path / "p", progress=False)
    stored = json.loads((tmp_path / "p" / "meta.json").read_text())["config"]
    assert stored["lengths"] == [64, 128] and stored["dtype"] == "float32"
    assert stored["candidates"] == first.meta["candidates"] and stored["method"] == "gradient"
    again = profile(
        model, config, calib=random_tokens(3, 128), out=tmp_path / "p", progress=False, plots=True
    )
    assert again.meta["resumed"]
    with pytest.raises(MoaSearchError, match=r"sparq_rows \(--sparq-rows\): was 256, now 8"):
        profile(model, config, calib=random_tokens(3, 128), out=tmp_path / "p", sparq_rows=8)
