"""Equal-memory batch search against a fake memory model (no GPU)."""

from __future__ import annotations

import pytest

from moa_search.bench.memory import MemoryModel, fit_margin, parse_bytes, search_max_batch
from moa_search.errors import MoaSearchError

GIB = 2**30


def test_parse_bytes():
    assert parse_bytes("60GiB") == 60 * GIB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(123) == 123
    with pytest.raises(MoaSearchError):
        parse_bytes("lots")


def test_memory_model_max_batch():
    m = MemoryModel(weights=16 * GIB, kv_per_seq=4 * GIB, fixed=1 * GIB, per_seq=GIB // 4)
    assert m.max_batch(60 * GIB) == 10  # (60 - 17) / 4.25 = 10.1
    assert m.peak(10) <= 60 * GIB < m.peak(11)
    assert m.max_batch(17 * GIB) == 0


def test_fit_margin_recovers_linear_overhead():
    true = MemoryModel(weights=16 * GIB, kv_per_seq=GIB, fixed=3 * GIB // 2, per_seq=GIB // 8)
    fitted = fit_margin(true.weights, true.kv_per_seq, {b: true.peak(b) for b in (1, 8, 32)})
    assert abs(fitted.fixed - true.fixed) < 2**20 and abs(fitted.per_seq - true.per_seq) < 2**20
    one = fit_margin(true.weights, true.kv_per_seq, {8: true.peak(8)})
    assert one.per_seq == 0 and one.peak(8) == true.peak(8)


def _fake(true: MemoryModel, capacity: int):
    calls = []

    def try_batch(b: int):
        calls.append(b)
        peak = true.peak(b)
        return None if peak > capacity else peak

    return try_batch, calls


@pytest.mark.parametrize("error", [-0.3, -0.05, 0.0, 0.05, 0.3])
def test_search_finds_true_max_when_prediction_is_off(error):
    budget = 60 * GIB
    true = MemoryModel(weights=16 * GIB, kv_per_seq=GIB, fixed=2 * GIB, per_seq=GIB // 10)
    guess = MemoryModel(true.weights, int(true.kv_per_seq * (1 + error)), true.fixed, true.per_seq)
    try_batch, calls = _fake(true, capacity=80 * GIB)
    res = search_max_batch(budget, guess, try_batch, max_tries=8)
    want = true.max_batch(budget)
    if error < -0.1:  # far too optimistic: steps down by the measured excess
        assert res.batch == want
    else:
        assert want - 1 <= res.batch <= want
    assert true.peak(res.batch) <= budget
    assert len(calls) <= 8


def test_search_handles_out_of_memory_and_nothing_fits():
    true = MemoryModel(weights=16 * GIB, kv_per_seq=GIB, fixed=2 * GIB)
    try_batch, calls = _fake(true, capacity=40 * GIB)  # device smaller than the budget
    res = search_max_batch(60 * GIB, true, try_batch, max_tries=40)
    assert res.batch == 22 and res.tries[0] == (42, False, None)
    assert (23, False, None) in res.tries  # 22 fits, 23 ran out of memory
    none = search_max_batch(10 * GIB, true, lambda b: None)
    assert none.batch == 0 and none.tries == []
