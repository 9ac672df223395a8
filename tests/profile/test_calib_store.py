"""Calibration fitting (exact N tokens, loss masks) and atomic store helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moa_search.data.calibration import CalibSample
from moa_search.errors import MoaSearchError
from moa_search.profile import store
from moa_search.profile.calib import calibration_hash, from_tensors, load_samples, to_tensors


def test_answer_loss_keeps_data_mask_and_pads_short_samples():
    long = CalibSample(list(range(40)), [0] * 30 + [1] * 10, "qa")
    short = CalibSample(list(range(28)), [0] * 25 + [1] * 3, "qa")  # 4 short: left-padded
    tiny = CalibSample(list(range(5)), [0, 0, 0, 1, 1], "qa")  # far too short: dropped
    got = load_samples([long, short, tiny], None, 32, 5, loss="answer")
    assert [len(s.input_ids) for s in got] == [32, 32]
    assert got[0].loss_mask.sum() == 10 and got[0].input_ids[-1] == 39
    assert got[1].loss_mask[:4].sum() == 0 and got[1].loss_mask.sum() == 3
    every = load_samples([long], None, 32, 1, loss="all")[0]
    assert not every.loss_mask[0] and every.loss_mask[1:].all()


def test_too_short_calibration_says_tokens_exist_vs_needed():
    with pytest.raises(MoaSearchError, match="longest sample has 40 tokens, length 64 needs 64"):
        load_samples(torch.zeros(2, 40, dtype=torch.long), None, 64, 2)


def test_hash_roundtrip_and_atomic_files(tmp_path):
    samples = {32: load_samples(torch.arange(64).view(2, 32), None, 32, 2)}
    again = from_tensors(to_tensors(samples))
    assert calibration_hash(again) == calibration_hash(samples)
    other = {32: load_samples(torch.arange(64).view(2, 32) + 1, None, 32, 2)}
    assert calibration_hash(other) != calibration_hash(samples)
    path = tmp_path / "x.json"

    def broken(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-write")

    store.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        store.atomic_write(path, broken)
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
