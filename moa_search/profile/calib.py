"""Calibration samples of exactly N tokens for each profiled length.

Why exact: blocks tile N x N, and samples of one length are averaged entry by entry.
Sources: the built-in mixed set (``moa_search.data.calibration``), a user's file or folder
(``moa_search.data.user_data``), or token ids given directly (tests, notebooks).
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moa_search.errors import MoaSearchError

PAD_SLACK = 16  # retrieval samples may come a few tokens short: left-pad them, unscored


@dataclass
class Sample:
    """input_ids: (N,) int64; loss_mask: (N,) bool, True where token i is a scored target;
    task: the task family it stands for (``moa_search.objective.TASKS``)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    task: str = "text"


def _fit(
    ids: list[int], mask: list[int], length: int, pad_id: int, task: str = "text"
) -> Sample | None:
    if len(ids) >= length:
        ids, mask = ids[-length:], mask[-length:]
    elif len(ids) >= length - PAD_SLACK:
        extra = length - len(ids)
        ids, mask = [pad_id] * extra + list(ids), [0] * extra + list(mask)
    else:
        return None
    mask = list(mask)
    mask[0] = 0
    return Sample(torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool), task)


def _task_of(sample: Any) -> str:
    """A given Sample's task, or a CalibSample's kind mapped to its family."""
    from moa_search.objective import family_of  # noqa: PLC0415

    task = getattr(sample, "task", None)
    return task if isinstance(task, str) else family_of(getattr(sample, "kind", "text"))


def _raw_samples(
    calib: Any,
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int,
    mix: dict[str, float] | None = None,
    model: Any = None,
) -> tuple[list[tuple[list[int], list[int], str]], str]:
    if isinstance(calib, torch.Tensor):
        rows = calib.reshape(-1, calib.shape[-1]).tolist()
        return [(r, [1] * len(r), "text") for r in rows], "given token ids"
    if isinstance(calib, (list, tuple)) and calib and hasattr(calib[0], "input_ids"):
        return [(list(s.input_ids), list(s.loss_mask), _task_of(s)) for s in calib], "given samples"
    if tokenizer is None:
        raise MoaSearchError(
            "calib: a tokenizer is needed to read text data (pass a model "
            "name or path, or token ids)"
        )
    if calib is None:
        from moa_search.data.calibration import build_calibration_set  # noqa: PLC0415
        from moa_search.objective import family_of  # noqa: PLC0415

        found = build_calibration_set(tokenizer, length, n_samples, mix, seed=seed, model=model)
        return [
            (s.input_ids, s.loss_mask, family_of(s.kind)) for s in found
        ], "built-in calibration set"
    from moa_search.data.user_data import read_user_samples  # noqa: PLC0415

    found = read_user_samples(Path(calib), tokenizer, length)
    return [(s.input_ids, s.loss_mask, "text") for s in found], f"calibration data {str(calib)!r}"


def load_samples(
    calib: Any,
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int = 0,
    loss: str = "all",
    mix: dict[str, float] | None = None,
    model: Any = None,
) -> list[Sample]:
    """``n_samples`` samples of exactly ``length`` tokens (fewer, with a warning, if short).

    loss="all" scores every next-token target; "answer" keeps the data's own loss mask
    (answers only, where the data marks them). ``mix`` / ``model``: the built-in set's
    kinds and the dense model that answers its self-answer samples.
    """
    if loss not in ("all", "answer"):
        raise MoaSearchError(f"loss must be 'all' or 'answer', got {loss!r}")
    raw, source = _raw_samples(calib, tokenizer, length, n_samples, seed, mix, model)
    pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    fitted = [
        s
        for ids, mask, task in raw
        if (s := _fit(ids, [1] * len(ids) if loss == "all" else mask, length, pad_id, task))
    ]
    if not fitted:
        longest = max((len(ids) for ids, _, _ in raw), default=0)
        raise MoaSearchError(
            f"{source}: longest sample has {longest} tokens, length {length} "
            f"needs {length} (give longer texts or smaller --lengths)"
        )
    if loss == "answer":
        fitted = [s for s in fitted if s.loss_mask.any()] or fitted
    if len(fitted) > n_samples:
        keep = sorted(random.Random(f"{seed}:{length}").sample(range(len(fitted)), n_samples))
        fitted = [fitted[i] for i in keep]
    elif len(fitted) < n_samples:
        print(
            f"warning: {source} yields {len(fitted)} samples of {length} tokens, "
            f"{n_samples} requested; using {len(fitted)}",
            file=sys.stderr,
        )
    return fitted


def calibration_hash(samples: dict[int, list[Sample]]) -> str:
    """sha256 over every sample's ids and loss mask, by length: identifies the data."""
    h = hashlib.sha256()
    for length in sorted(samples):
        for s in samples[length]:
            h.update(f"{length}:".encode())
            h.update(s.input_ids.numpy().astype("<i8").tobytes())
            h.update(s.loss_mask.numpy().astype("u1").tobytes())
            if s.task != "text":  # older profiles (text only) keep their hash
                h.update(s.task.encode())
    return h.hexdigest()[:16]


def to_tensors(samples: dict[int, list[Sample]]) -> dict[str, torch.Tensor]:
    """Flatten for safetensors: ids.<N> (S, N) int64, mask.<N> (S, N) uint8 and task.<N>
    (S,) uint8 codes into ``moa_search.objective.TASKS``."""
    from moa_search.objective import TASKS  # noqa: PLC0415

    out = {}
    for n, rows in samples.items():
        out[f"ids.{n}"] = torch.stack([s.input_ids for s in rows])
        out[f"mask.{n}"] = torch.stack([s.loss_mask for s in rows]).to(torch.uint8)
        out[f"task.{n}"] = torch.tensor([TASKS.index(s.task) for s in rows], dtype=torch.uint8)
    return out


def from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, list[Sample]]:
    """Inverse of :func:`to_tensors`."""
    from moa_search.objective import TASKS  # noqa: PLC0415

    out: dict[int, list[Sample]] = {}
    for key, ids in tensors.items():
        if key.startswith("ids."):
            n = int(key[4:])
            mask = tensors[f"mask.{n}"].bool()
            codes = tensors.get(f"task.{n}", torch.zeros(ids.shape[0], dtype=torch.uint8))
            out[n] = [
                Sample(ids[i].clone(), mask[i].clone(), TASKS[int(codes[i])])
                for i in range(ids.shape[0])
            ]
    return out
