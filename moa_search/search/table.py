"""Read and check a profile folder (profile.parquet + meta.json) written by the profiler.

Why here: the search trusts nothing it did not check; every problem with the profile
becomes one line naming the file and the column or field, before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from moa_search.errors import MoaSearchError
from moa_search.plan import ModelIdentity
from moa_search.profile.table import KEY_COLUMNS

REQUIRED_COLUMNS = (*KEY_COLUMNS, "length", "delta_loss_mean")


@dataclass
class ProfileTable:
    """The KV-head aggregate rows (``head == -1``) of a profile, with its meta and model."""

    path: Path
    meta: dict[str, Any]
    identity: ModelIdentity
    lengths: list[int]
    rows: pd.DataFrame


def load_profile(profile_dir: str | Path) -> ProfileTable:
    """Load and validate a profile folder; one-line MoaSearchError on any problem."""
    folder = Path(profile_dir)
    if not folder.is_dir():
        raise MoaSearchError(f"{folder}: profile folder not found")
    meta = _read_meta(folder / "meta.json")
    identity = _identity(meta, folder / "meta.json")
    table_path = folder / "profile.parquet"
    if not table_path.is_file():
        raise MoaSearchError(f"{table_path}: profile table not found")
    try:
        frame = pd.read_parquet(table_path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise MoaSearchError(f"{table_path}: cannot read parquet ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise MoaSearchError(f"{table_path}: missing column(s) {', '.join(missing)}")
    rows = frame[frame["head"] == -1].copy()
    if rows.empty:
        raise MoaSearchError(f"{table_path}: no KV-head aggregate rows (head == -1)")
    for col, upper in (("layer", identity.num_layers), ("kv_head", identity.num_key_value_heads)):
        bad = rows[(rows[col] < 0) | (rows[col] >= upper)]
        if not bad.empty:
            raise MoaSearchError(
                f"{table_path}: column {col} has {int(bad[col].iloc[0])}, "
                f"outside [0, {upper}) for {identity.name_or_path}"
            )
    if rows["delta_loss_mean"].isna().all():
        raise MoaSearchError(f"{table_path}: column delta_loss_mean is empty")
    lengths = meta.get("lengths") or sorted(int(n) for n in rows["length"].unique())
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n > 0 for n in lengths):
        raise MoaSearchError(f"{folder / 'meta.json'}: lengths: expected positive integers")
    rows["layer"] = rows["layer"].astype(int)
    rows["kv_head"] = rows["kv_head"].astype(int)
    rows["length"] = rows["length"].astype(int)
    return ProfileTable(folder, meta, identity, sorted(lengths), rows.reset_index(drop=True))


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MoaSearchError(f"{path}: profile meta not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MoaSearchError(f"{path}: cannot read JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise MoaSearchError(f"{path}: expected a JSON object")
    return meta


def _identity(meta: dict[str, Any], path: Path) -> ModelIdentity:
    model = meta.get("model")
    if not isinstance(model, dict):
        raise MoaSearchError(f"{path}: model: expected an object with the model identity")
    kwargs = {}
    for f in fields(ModelIdentity):
        if f.name == "native_windows":  # absent in profiles of models without sliding layers
            kwargs[f.name] = tuple(model.get(f.name) or ())
            continue
        if f.name not in model:
            raise MoaSearchError(f"{path}: model.{f.name}: missing")
        kwargs[f.name] = model[f.name]
    try:
        identity = ModelIdentity(**kwargs)
        for key in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(identity, key)) <= 0:
                raise ValueError(key)
    except (TypeError, ValueError):
        raise MoaSearchError(f"{path}: model: malformed identity") from None
    return identity
