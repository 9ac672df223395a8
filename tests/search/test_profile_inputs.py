import json

import numpy as np
import pandas as pd
import pytest

from moa_search.errors import MoaSearchError
from moa_search.patterns import parse
from moa_search.search.costs import build_problem, check_families
from moa_search.search.table import load_profile


def test_synthetic_profile_has_the_contract_schema(small_profile):
    frame = pd.read_parquet(small_profile / "profile.parquet")
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
        "length",
        "delta_loss_mean",
        "delta_loss_std",
        "n_samples",
        "stored_bytes",
        "read_bytes",
        "density",
    ):
        assert col in frame.columns
    meta = json.loads((small_profile / "meta.json").read_text())
    assert meta["lengths"] == [1024, 2048] and meta["block_size"] == 64
    assert len(meta["candidates"]) == 40
    row = frame.iloc[100]
    p = parse(row["pattern"])
    assert p.bytes_stored(int(row["length"]), 64) == row["stored_bytes"]
    agg = frame[frame["head"] == -1]
    assert (agg[agg["family"] == "dense"]["delta_loss_mean"] == 0).all()


def test_sensitivity_falls_with_span(small_profile):
    frame = pd.read_parquet(small_profile / "profile.parquet")
    win = frame[
        (frame["head"] == -1)
        & (frame["family"] == "window")
        & (frame["sink"] == 64)
        & (frame["length"] == 2048)
        & (frame["span"] < 2048)
    ]
    mean_by_span = win.groupby("span")["delta_loss_mean"].mean()
    assert np.all(np.diff(mean_by_span.to_numpy()) < 0)


def test_missing_lengths_and_unknown_family(small_profile):
    table = load_profile(small_profile)
    with pytest.raises(MoaSearchError, match="8192 not profiled"):
        build_problem(table, [1024, 8192], ("dense", "window"))
    with pytest.raises(MoaSearchError, match="unknown family 'quest'"):
        check_families(["dense", "quest"])


def test_problem_excludes_families(small_profile):
    problem = build_problem(load_profile(small_profile), None, ("dense", "window"))
    assert set(problem.families) == {"dense", "window"}
    assert problem.loss.shape == (8, 13, 2)


def test_corrupt_profile_is_one_line(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(MoaSearchError, match="meta.json: cannot read JSON"):
        load_profile(tmp_path)


def test_negative_predicted_deltas_are_not_credited(small_profile):
    """A noisy negative first-order estimate must not make a sparse head 'better than dense'."""
    path = small_profile / "profile.parquet"
    frame = pd.read_parquet(path)
    sparse = frame["family"] != "dense"
    frame.loc[sparse, "delta_loss_mean"] = -frame.loc[sparse, "delta_loss_mean"].abs()
    frame.to_parquet(path)
    problem = build_problem(load_profile(small_profile), None, ("dense", "window"))
    assert np.nanmin(problem.loss) == 0.0
