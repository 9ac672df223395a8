"""bench --calibrate-costs on CPU: the runtime's reference decode timed over a tiny grid."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from moa_search.bench.calibrate import COLUMNS, CalibrateConfig, calibrate_costs, grid, meta_path
from moa_search.errors import MoaSearchError
from moa_search.search.latency import load_costs
from moa_search.search.synthetic import synthetic_identity

TINY = CalibrateConfig(
    batches=(1,), contexts=(64, 128), stored=(32,), sparq=["r=4,k=8,local=4"],
    device="cpu", dtype="float32",
)  # fmt: skip


def test_calibration_writes_a_tidy_table_and_its_meta(tmp_path) -> None:
    ident = synthetic_identity(2, 2, 2, 16)
    path = calibrate_costs(ident, tmp_path / "costs.csv", TINY, progress=False)
    rows = pd.read_csv(path)
    assert tuple(rows.columns) == COLUMNS
    # per context: dense, the window keeping 32 entries, the SparQ setting
    assert sorted(rows["family"]) == ["dense", "dense", "sparq", "sparq", "window", "window"]
    assert set(rows["n"]) == {64, 128} and set(rows["batch"]) == {1}
    assert (rows["us"] > 0).all()
    assert (rows["us_per_head"] * 2 == rows["us"]).all()  # two KV heads per timed layer
    assert (rows[["group", "head_dim", "kv_heads"]].drop_duplicates().values == [2, 16, 2]).all()
    window = rows[rows["family"] == "window"]
    assert (window["stored"] == 32).all() and (window["read"] == 32).all()
    dense = rows[rows["family"] == "dense"]
    assert (dense["stored"] == dense["n"]).all()
    meta = json.loads(meta_path(path).read_text())
    assert {"device", "torch", "date"} <= set(meta) and meta["path"] == "pytorch reference"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["costs.csv", "costs.meta.json"]
    table = load_costs(path)  # what plan --costs reads
    assert table.head_dim == 16 and table.group == 2 and list(table.contexts) == [64, 128]


def test_stored_lengths_at_or_past_a_context_are_not_timed() -> None:
    cells = grid(synthetic_identity(1, 2, 2, 16), TINY)
    assert [(n, p.spec()) for _, n, p in cells if p.name == "window"] == [
        (64, "window:sink=16,span=16"),
        (128, "window:sink=16,span=16"),
    ]


@pytest.mark.parametrize(
    "change",
    [{"batches": (0,)}, {"contexts": ()}, {"stored": (1,)}, {"sparq": ["r=99,k=8"]}],
)
def test_bad_grid_is_a_one_line_error(change) -> None:
    config = CalibrateConfig(**{**TINY.__dict__, **change})
    with pytest.raises(MoaSearchError) as info:
        grid(synthetic_identity(1, 2, 2, 16), config)
    assert "\n" not in str(info.value)


def test_cli_calibrates_a_config_only_shape(tmp_path) -> None:
    from cli import app

    out = tmp_path / "t.csv"
    args = [
        "bench", "tiny-llama", "--calibrate-costs", str(out), "--device", "cpu",
        "--dtype", "float32", "--batch", "1", "--context", "64", "--stored", "32",
        "--sparq", "r=4,k=8,local=4",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert list(rows["family"]) == ["dense", "window", "sparq"]
    assert set(rows["head_dim"]) == {16} and set(rows["group"]) == {2}
