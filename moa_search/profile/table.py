"""Merge per-sample checkpoints into the tidy table and the mean block tensors.

Why a tidy table: the search (and a person with pandas) filters rows, never indexes
nested arrays. One row per (layer, kv_head, head, pattern, length); ``head == -1`` is
the KV-head aggregate (sum over its query heads) that a plan, and hence the search, uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moa_search.patterns import Dense, Pattern, parse
from moa_search.profile.candidates import params, split_static
from moa_search.profile.store import checkpoint_path, read_tensors

#: estimator used for ``delta_loss_*`` (the others stay as their own columns; definitions in
#: influence.py). Spearman of single-head ablations, predicted vs measured: SmolLM2-135M at
#: 1024 tokens on CPU (M=30) signed 0.71, row 0.46, moa 0.13; at 2048 tokens on an H200
#: (M=20) signed 0.21, row 0.63, moa 0.20. "row" is the default because it is never negative:
#: the search sums these per head, and summed signed estimates went below zero (a plan
#: "better than dense"), which the knapsack exploited by picking noise-favoured sparse heads.
PRIMARY = "row"
ESTIMATORS = ("moa", "row", "signed")
DTYPE_BYTES = 2  # costs are reported for a bf16 KV cache
#: The columns naming a row of every profile table, whichever method made it (``head`` is
#: -1 on the KV-head aggregate rows, the only ones the measured method writes).
KEY_COLUMNS = ("layer", "kv_head", "head", "family", "pattern")
SORT_COLUMNS = ["length", *KEY_COLUMNS]


def load_length(out: Path, length: int, n_samples: int) -> dict[str, torch.Tensor]:
    """Stack the checkpoints of one length: (S, L, H, C) values, (S, L, H, nb, nb) blocks."""
    parts = [read_tensors(checkpoint_path(out, length, i)) for i in range(n_samples)]
    return {key: torch.stack([p[key] for p in parts]) for key in parts[0]}


def _values(stacked: dict[str, torch.Tensor], cands: Sequence[Pattern]) -> dict[str, torch.Tensor]:
    """Per estimator, (S, L, H, C) over all candidates in ``cands`` order (NaN if undefined)."""
    static, sparq = split_static(cands)
    s_idx = {p.spec(): i for i, p in enumerate(static)}
    q_idx = {p.spec(): i for i, p in enumerate(sparq)}
    shape = stacked["moa"].shape[:3]
    out = {}
    for est in ESTIMATORS:
        cols = []
        for p in cands:
            if p.spec() in s_idx:
                cols.append(stacked[est][..., s_idx[p.spec()]])
            elif est == "moa":
                cols.append(torch.full(shape, float("nan")))
            else:
                cols.append(stacked[f"sparq_{est}"][..., q_idx[p.spec()]])
        out[est] = torch.stack(cols, -1).double()
    return out


def add_pattern_columns(
    frame: pd.DataFrame, p: Pattern, length: int, n_samples: int, head_dim: int
) -> None:
    """The columns every profile table carries for a candidate, whichever method made it:
    its parameters, the length, the sample count and its bytes stored / read vs dense."""
    for key, value in params(p).items():
        frame[key] = np.nan if value is None else float(value)
    frame["length"] = length
    frame["n_samples"] = n_samples
    dense = Dense().bytes_stored(length, head_dim, DTYPE_BYTES)
    frame["stored_bytes"] = p.bytes_stored(length, head_dim, DTYPE_BYTES)
    frame["read_bytes"] = p.bytes_read(length, head_dim, DTYPE_BYTES)
    frame["density"] = frame["stored_bytes"] / dense
    frame["read_density"] = frame["read_bytes"] / dense


def count_against_windows(
    table: pd.DataFrame, windows: Sequence[int | None], head_dim: int
) -> pd.DataFrame:
    """Bytes columns of rows on a layer the model itself makes sliding, counted inside that
    window: what the model's own cache holds there (its "dense" is the window)."""
    if not windows or all(w is None for w in windows):
        return table
    table = table.copy()
    window = table["layer"].map(dict(enumerate(windows)))
    rows = window.notna()
    groups = table[rows].groupby(["pattern", window[rows], "length"]).groups
    for (spec, w, n), idx in groups.items():
        p, w, n = parse(spec, head_dim), int(w), int(n)
        dense = Dense().bytes_stored(n, head_dim, DTYPE_BYTES, w)
        table.loc[idx, "stored_bytes"] = p.bytes_stored(n, head_dim, DTYPE_BYTES, w)
        table.loc[idx, "read_bytes"] = p.bytes_read(n, head_dim, DTYPE_BYTES, w)
        table.loc[idx, "density"] = table.loc[idx, "stored_bytes"] / dense
        table.loc[idx, "read_density"] = table.loc[idx, "read_bytes"] / dense
    return table


def build_table(
    out: Path,
    lengths: Sequence[int],
    n_samples: dict[int, int],
    cands: Sequence[Pattern],
    num_kv_heads: int,
    head_dim: int,
) -> pd.DataFrame:
    """The tidy per-head + per-KV-head table over all lengths and candidates."""
    frames = []
    for length in lengths:
        vals = _values(load_length(out, length, n_samples[length]), cands)
        s, n_layers, heads, n_c = vals["row"].shape
        group = heads // num_kv_heads
        agg = {k: v.view(s, n_layers, num_kv_heads, group, n_c).sum(3) for k, v in vals.items()}
        for per, kind in ((vals, "head"), (agg, "kv")):
            width = heads if kind == "head" else num_kv_heads
            layer, idx = np.meshgrid(np.arange(n_layers), np.arange(width), indexing="ij")
            for c, p in enumerate(cands):
                cols = {
                    "layer": layer.ravel(),
                    "kv_head": (idx // group if kind == "head" else idx).ravel(),
                    "head": idx.ravel() if kind == "head" else np.full(idx.size, -1),
                }
                for est, v in per.items():
                    x = v[..., c].reshape(s, -1).numpy()
                    cols[f"delta_{est}_mean"] = x.mean(0)
                    cols[f"delta_{est}_std"] = x.std(0, ddof=1) if s > 1 else np.zeros(x.shape[1])
                frame = pd.DataFrame(cols)
                frame.insert(3, "family", p.name)
                frame.insert(4, "pattern", p.spec())
                add_pattern_columns(frame, p, length, s, head_dim)
                frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table.insert(5, "delta_loss_mean", table[f"delta_{PRIMARY}_mean"])
    table.insert(6, "delta_loss_std", table[f"delta_{PRIMARY}_std"])
    return table.sort_values(SORT_COLUMNS, kind="stable", ignore_index=True)


def mean_blocks(
    out: Path, lengths: Sequence[int], n_samples: dict[int, int]
) -> dict[str, torch.Tensor]:
    """influence.safetensors content: blocks.<N> (L, H, nb, nb) mean |entry effect| sums,
    distance.<N> (L, H, nb) the same summed along block diagonals (distance in blocks)."""
    out_t = {}
    for n in lengths:
        total = None
        for i in range(n_samples[n]):
            b = read_tensors(checkpoint_path(out, n, i))["blocks"]
            total = b if total is None else total + b
        blocks = total / n_samples[n]
        nb = blocks.shape[-1]
        dist = torch.stack([blocks.diagonal(-d, -2, -1).sum(-1) for d in range(nb)], -1)
        out_t[f"blocks.{n}"] = blocks
        out_t[f"distance.{n}"] = dist
    return out_t
