"""Equal-memory mode: the largest batch a configuration fits in a GPU memory budget.

Prediction first, from bytes we know and a margin we measured: ``peak(B) = weights + KV(B)
+ margin(B)`` with KV(B) = B x the plan's (or dense) KV bytes per sequence and
margin(B) = fixed + per_seq x B fitted to the peaks measured at the sweep's batches
(activations, logits, the CUDA graph's pool, split-K workspaces). Then verification: the
candidate batch is really allocated and run; if it does not fit (out of memory, or a
measured peak above the budget) the batch shrinks and is tried again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from moa_search.errors import MoaSearchError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int | float) -> int:
    """``"60GiB"`` -> 64424509440; ``"80GB"`` -> 8e10; plain numbers are bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MoaSearchError(f"cannot read a memory size from {text!r} (e.g. 60GiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class MemoryModel:
    """peak(B) = weights + fixed + (kv_per_seq + per_seq) * B, all in bytes."""

    weights: int
    kv_per_seq: int
    fixed: int = 0
    per_seq: int = 0

    def peak(self, batch: int) -> int:
        return self.weights + self.fixed + (self.kv_per_seq + self.per_seq) * batch

    def max_batch(self, budget: int, limit: int = 1 << 16) -> int:
        """Largest B with peak(B) <= budget (0 if not even one sequence fits)."""
        room = budget - self.weights - self.fixed
        per = self.kv_per_seq + self.per_seq
        if room < per or per <= 0:
            return 0 if room < per else limit
        return min(limit, int(room // per))


def fit_margin(weights: int, kv_per_seq: int, measured: dict[int, int]) -> MemoryModel:
    """Fit fixed + per_seq x B to measured peaks {batch: peak bytes} (least squares on the
    margin peak - weights - KV; one point: all fixed; slopes < 0 clamp to 0)."""
    points = [(b, p - weights - kv_per_seq * b) for b, p in sorted(measured.items())]
    if not points:
        return MemoryModel(weights, kv_per_seq)
    if len(points) == 1:
        return MemoryModel(weights, kv_per_seq, fixed=max(0, points[0][1]))
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mm = sum(m for _, m in points) / n
    var = sum((b - mb) ** 2 for b, _ in points)
    slope = sum((b - mb) * (m - mm) for b, m in points) / var if var else 0.0
    slope = max(0.0, slope)
    fixed = max(0.0, max(m - slope * b for b, m in points))  # conservative: cover every point
    return MemoryModel(weights, kv_per_seq, fixed=int(fixed), per_seq=int(math.ceil(slope)))


@dataclass
class FitResult:
    batch: int
    predicted: int
    tries: list[tuple[int, bool, int | None]]  # (batch, fitted, measured peak)


def search_max_batch(
    budget: int,
    model: MemoryModel,
    try_batch: Callable[[int], int | None],
    *,
    max_tries: int = 5,
    limit: int = 1 << 16,
) -> FitResult:
    """Largest batch that really fits: start at the model's prediction, verify with
    ``try_batch(B)`` (returns the measured peak in bytes, or None when it ran out of memory).
    Each measured peak re-estimates the bytes per sequence, which picks the next batch (down
    after a miss, up when a fit leaves room); stops when the fitting and failing batches
    meet or after ``max_tries``. Returns batch 0 when nothing fits."""
    start = model.max_batch(budget, limit)
    tries: list[tuple[int, bool, int | None]] = []
    if start == 0:
        return FitResult(0, start, tries)
    base = model.weights + model.fixed
    best, fail = 0, limit + 1
    batch = start
    while len(tries) < max_tries and 1 <= batch <= limit:
        peak = try_batch(batch)
        ok = peak is not None and peak <= budget
        tries.append((batch, ok, peak))
        if ok:
            best = max(best, batch)
        else:
            fail = min(fail, batch)
        if peak is not None:
            per = max(1.0, (peak - base) / batch)
            nxt = int((budget - base) // per)
        else:  # out of memory: no measurement, shrink by 5%
            nxt = batch - max(1, math.ceil(batch * 0.05))
        if ok:
            nxt = max(nxt, batch + 1) if nxt > batch else batch
        nxt = min(nxt, fail - 1)
        if nxt <= best or nxt == batch:
            if not ok and best == 0 and nxt >= 1 and nxt < batch:
                batch = nxt
                continue
            break
        batch = nxt
    return FitResult(best, start, tries)


def paged_kv_bytes(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    batch: int,
    max_len: int,
    page_size: int,
) -> int:
    """Bytes of a paged KV cache (FlashInfer's, vLLM's) sized for ``max_len`` tokens per
    sequence: whole pages of K and V, so ``max_len`` rounds up to ``page_size``."""
    slots = max(1, math.ceil(max_len / page_size)) * page_size
    return layers * batch * slots * kv_heads * head_dim * 2 * dtype_bytes
