"""device_tensor: the runtime's constant index tensors are made once per (values, dtype,
device) and are the values asked for."""

from __future__ import annotations

import torch

from moa_search.runtime.constants import device_tensor


def test_same_values_share_one_tensor() -> None:
    a = device_tensor([0, 3, 5], torch.long, "cpu")
    assert device_tensor((0, 3, 5), torch.long, torch.device("cpu")) is a
    assert torch.equal(a, torch.tensor([0, 3, 5]))


def test_dtype_and_values_are_part_of_the_key() -> None:
    a = device_tensor([1, 2], torch.long, "cpu")
    b = device_tensor([1, 2], torch.int32, "cpu")
    c = device_tensor([1, 3], torch.long, "cpu")
    assert b.dtype == torch.int32 and a is not b and not torch.equal(a, c)


def test_nested_rows_are_accepted() -> None:
    rows = [[0.5, 1.0], [2.0, 0.25]]
    t = device_tensor(rows, torch.float64, "cpu")
    assert t.shape == (2, 2) and torch.equal(t, torch.tensor(rows, dtype=torch.float64))
    assert device_tensor([(0.5, 1.0), (2.0, 0.25)], torch.float64, "cpu") is t
