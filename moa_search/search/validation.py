"""Measured objective: a plan's loss on held-out text, longer than any profiled length.

Why: the profile predicts additive per-head losses at the profiled lengths; what matters is
the real model at a longer context (MoA picks its plan the same way). Samples are bounded
and each plan's result is cached by a hash of its patterns, so a resumed or parallel study
never measures the same plan twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from moa_search.errors import MoaSearchError
from moa_search.files import write_json
from moa_search.nll import token_stream, window_nll
from moa_search.plan import Plan


def plan_hash(plan: Plan) -> str:
    """Stable hash of what decides the loss: the model fingerprint and every head's pattern."""
    blob = json.dumps([plan.model.fingerprint, [[p.spec() for p in row] for row in plan.heads]])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def validation_windows(tokenizer: Any, length: int, samples: int) -> torch.Tensor:
    """``samples`` windows of ``length`` tokens from the built-in validation split."""
    ids = token_stream(tokenizer, "validation")
    count = min(samples, len(ids) // length)
    if count == 0:
        raise MoaSearchError(
            f"validation text has {len(ids)} tokens, fewer than one window of {length}"
        )
    return torch.from_numpy(ids[: count * length].copy()).view(count, length)


class ValidationLoss:
    """Callable plan -> mean next-token loss on ``windows``; results cached in ``cache_dir``."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, cache_dir: Path):
        self.model = model
        self.windows = windows
        samples, length = windows.shape
        self.cache_dir = Path(cache_dir) / f"len{length}_n{samples}"

    def __call__(self, plan: Plan) -> float:
        path = self.cache_dir / f"{plan_hash(plan)}.json"
        if path.is_file():
            try:
                return float(json.loads(path.read_text())["loss"])
            except (ValueError, KeyError, OSError):
                pass  # a damaged cache entry is measured again
        loss = self.measure(plan)
        write_json(path, {"loss": loss, "windows": list(self.windows.shape)})
        return loss

    @torch.no_grad()
    def measure(self, plan: Plan) -> float:
        from moa_search.runtime import apply_plan  # noqa: PLC0415 - heavy import

        with apply_plan(self.model, plan, backend="reference"):
            total = sum(window_nll(self.model, row.tolist())[0] for row in self.windows)
        return total / len(self.windows)
