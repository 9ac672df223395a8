"""The profile folder on disk: atomic files, per-(sample, length) checkpoints, resume rules.

Layout of ``out/``::

    args.json                   what the profile was asked for (a rerun must match)
    calibration.safetensors     the exact token ids + loss masks profiled
    checkpoints/len{N}/s{i}.safetensors   one finished (sample, length): kill-safe unit
    profile.parquet  influence.safetensors  meta.json  plots/*.png   the results

Every file is written to a temp name in the same folder and renamed, so a kill leaves
either the old file or the new one, never half of one; no pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moa_search.errors import MoaSearchError
from moa_search.files import atomic_write, write_json

ARGS = "args.json"
CALIB = "calibration.safetensors"
CHECKPOINTS = "checkpoints"
RESULTS = ("profile.parquet", "influence.safetensors", "meta.json", "validation.json")


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def checkpoint_path(out: Path, length: int, sample: int) -> Path:
    return out / CHECKPOINTS / f"len{length}" / f"s{sample:05d}.safetensors"


def done_jobs(out: Path, jobs: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """(length, sample) pairs whose checkpoint exists (complete: writes are atomic)."""
    return {j for j in jobs if checkpoint_path(out, *j).is_file()}


def prepare_folder(out: Path, args: dict[str, Any], overwrite: bool) -> bool:
    """Claim ``out`` for these args. Returns True when resuming earlier work.

    Refuses (one line) when the folder holds a profile made with other arguments,
    unless ``overwrite``, which deletes only the files this module writes.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / ARGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old == args:
            return True
        if not overwrite:
            diff = _first_difference(old, args)
            raise MoaSearchError(
                f"{path}: folder holds a profile made with other arguments "
                f"({diff}); pass --overwrite or choose another --out"
            )
    elif any(out.iterdir()) and not overwrite and (out / CHECKPOINTS).exists():
        raise MoaSearchError(f"{out}: has checkpoints but no {ARGS}; pass --overwrite")
    if overwrite:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / "plots", ignore_errors=True)
        for name in (*RESULTS, CALIB):
            (out / name).unlink(missing_ok=True)
    write_json(path, args)
    return False


#: args.json keys a user sets, in the order a difference is reported, with their option:
#: a changed --samples also changes calibration_hash, and the message must name --samples.
_OPTIONS = {
    "model": "MODEL",
    "lengths": "--lengths",
    "samples": "--samples",
    "seed": "--seed",
    "loss": "--loss",
    "block_size": "--block-size",
    "dtype": "--dtype",
    "candidates": "--candidates",
    "sparq_rows": "--sparq-rows",
}
#: keys derived from the options or the code, reported only when no option differs
_DERIVED = {
    "calibration_hash": "the calibration tokens differ (--calib contents or the tokenizer)",
    "method_version": "made by another version of the profiler",
}


def _first_difference(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return f"unreadable {ARGS}"
    keys = set(old) | set(new)
    rest = sorted(keys - set(_OPTIONS) - set(_DERIVED))
    for key in [*(k for k in _OPTIONS if k in keys), *rest, *(k for k in _DERIVED if k in keys)]:
        if old.get(key) == new.get(key):
            continue
        a, b = json.dumps(old.get(key)), json.dumps(new.get(key))
        name = f"{key} ({_OPTIONS[key]})" if key in _OPTIONS else key
        if key in _DERIVED:
            return f"{key}: {_DERIVED[key]}"
        if len(a) > 60 or len(b) > 60:
            return f"{name} differs"
        return f"{name}: was {a}, now {b}"
    return "unknown difference"


def read_tensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without loading its tensors."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
