"""``method="measured"``: every (layer, KV head, candidate) applied alone and measured.

For each calibration sample one base run (dense) is kept, then every candidate pattern is
applied to one KV head with all others dense and the model's next-token distributions are
compared with dense at the sample's scored tokens (:mod:`moa_search.profile.ablation`).
One checkpoint per (length, sample) holds (layers, KV heads, candidates) arrays of KL,
NLL change and answer match, so a killed run loses at most one sample.

The tidy table keeps one row per (layer, KV head, pattern, length), as the gradient method
does, with a column per task family (``kl_text``, ``kl_retrieval``, ...) and
``delta_loss_mean`` = the default-weighted sum the search uses unless told other weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moa_search.errors import MoaSearchError
from moa_search.families import layer_windows
from moa_search.objective import DEFAULT_WEIGHTS, TASKS
from moa_search.patterns import PATTERNS, Dense, Pattern
from moa_search.profile import store
from moa_search.profile.ablation import (
    DEFAULT_MAX_SCORED,
    FIDELITIES,
    Ablation,
    AblationEngine,
)
from moa_search.profile.calib import Sample
from moa_search.profile.table import SORT_COLUMNS, add_pattern_columns

METHOD_VERSION = "moa-measured-1"
#: the built-in calibration mix of the measured method: text and code score every token,
#: retrieval and self-answer samples only their answers (the dense model's own, for self)
MEASURED_MIX = {"text": 0.25, "code": 0.15, "passkey": 0.3, "multivalue": 0.1, "self_text": 0.2}
METRICS = ("kl", "dnll", "match")


@dataclass(frozen=True)
class MeasureConfig:
    """How the measured method runs: fidelity ("exact" recomputes every later position,
    "scored" only the scored ones), ablation rows per batch, scored positions per sample."""

    fidelity: str = "exact"
    row_batch: int = 64
    max_scored: int = DEFAULT_MAX_SCORED

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITIES:
            raise MoaSearchError(
                f"fidelity: expected one of {', '.join(FIDELITIES)}, got {self.fidelity!r}"
            )
        if not isinstance(self.row_batch, int) or self.row_batch < 1:
            raise MoaSearchError(f"row_batch: expected a positive integer, got {self.row_batch!r}")
        if not isinstance(self.max_scored, int) or self.max_scored < 0:
            raise MoaSearchError(
                f"max_scored: expected 0 (every scored token) or more, got {self.max_scored!r}"
            )

    def as_dict(self) -> dict[str, object]:
        return {
            "fidelity": self.fidelity,
            "row_batch": self.row_batch,
            "max_scored": self.max_scored,
        }


def measured_candidates(lengths: Sequence[int], head_dim: int) -> list[Pattern]:
    """The measured method's grid: every registered family's ``candidates`` (dense, windows
    from 32 up to half the longest length, elastic spans and SparQ at the paper's 1/8 and 1/4
    transfer for the built-in ones)."""
    return [p for family in PATTERNS.values() for p in family.candidates(lengths, head_dim)]


def same_as_dense(p: Pattern, length: int, window: int | None) -> bool:
    """True when, inside the model's own ``window``, ``p`` keeps every key dense keeps at
    every query of a ``length``-token prompt (its span there >= min(length, window), the
    span taken at the prompt's length): on a sliding layer a window at least as wide as
    the model's changes nothing."""
    if window is None or not p.static:
        return False
    return int(p.span_at(length)) >= min(length, window)


def measure_sample(
    engine: AblationEngine, sample: Sample, cands: Sequence[Pattern]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(layers, kv_heads, candidates) KL / dNLL / match of one sample, and its meta."""
    start = time.perf_counter()
    run = engine.prepare(sample.input_ids, sample.loss_mask)
    n_layers, n_kv = len(engine.layers), engine.num_kv
    windows = layer_windows(engine.model.config)
    length = int(sample.input_ids.shape[-1])
    same = {  # (layer, candidate) pairs that attend exactly like dense: nothing to measure
        (layer, c)
        for layer in range(n_layers)
        for c, p in enumerate(cands)
        if isinstance(p, Dense) or same_as_dense(p, length, windows[layer])
    }
    ablations = [
        Ablation(layer, h, p)
        for layer in range(n_layers)
        for h in range(n_kv)
        for c, p in enumerate(cands)
        if (layer, c) not in same
    ]
    eff = engine.effects(run, ablations)
    shape = (n_layers, n_kv, len(cands))
    out = {m: torch.zeros(shape, dtype=torch.float64) for m in METRICS}
    out["match"] += float(run.ref_match)  # dense keeps whatever dense does
    j = 0
    for layer in range(n_layers):
        for h in range(n_kv):
            for c in range(len(cands)):
                if (layer, c) in same:
                    continue
                out["kl"][layer, h, c] = eff.kl[j]
                out["dnll"][layer, h, c] = eff.dnll[j]
                out["match"][layer, h, c] = float(eff.match[j])
                j += 1
    meta = {
        "task": sample.task,
        "ref_match": str(int(run.ref_match)),
        "ref_nll": f"{float(run.ref_nll.mean()):.6f}",
        "scored": str(int(run.scored.positions.numel())),
        "seconds": f"{time.perf_counter() - start:.3f}",
    }
    return out, meta


def run_job(
    engine: AblationEngine,
    sample: Sample,
    cands: Sequence[Pattern],
    length: int,
    index: int,
    out: Path,
) -> None:
    """Measure one (length, sample) and checkpoint it atomically."""
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        tensors, meta = measure_sample(engine, sample, cands)
    except torch.OutOfMemoryError:
        raise MoaSearchError(
            f"out of memory on {device} at length {length}: lower --row-batch, "
            f"--max-scored or --lengths"
        ) from None
    if device.type == "cuda":
        meta["peak_bytes"] = str(int(torch.cuda.max_memory_allocated(device)))
    meta["device"] = str(device)
    store.write_tensors(store.checkpoint_path(out, length, index), tensors, meta)


def build_table(
    out: Path,
    lengths: Sequence[int],
    counts: Mapping[int, int],
    cands: Sequence[Pattern],
    head_dim: int,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
) -> pd.DataFrame:
    """The tidy table (KV-head rows, ``head == -1``) with per-task columns."""
    frames = []
    for length in lengths:
        parts, tasks = [], []
        for i in range(counts[length]):
            path = store.checkpoint_path(out, length, i)
            parts.append(store.read_tensors(path))
            tasks.append(store.read_tensors_metadata(path).get("task", "text"))
        stacked = {m: torch.stack([p[m] for p in parts]).numpy() for m in METRICS}
        s, n_layers, n_kv, _ = stacked["kl"].shape
        layer, kv = np.meshgrid(np.arange(n_layers), np.arange(n_kv), indexing="ij")
        task_arr = np.array(tasks)
        present = [t for t in TASKS if (task_arr == t).any()]
        for c, p in enumerate(cands):
            cols: dict[str, object] = {
                "layer": layer.ravel(),
                "kv_head": kv.ravel(),
                "head": np.full(layer.size, -1),
            }
            total = np.zeros(layer.size)
            for t in present:
                sel = task_arr == t
                for m in METRICS:
                    cols[f"{m}_{t}"] = stacked[m][sel, :, :, c].reshape(sel.sum(), -1).mean(0)
                total += weights.get(t, 0.0) * np.asarray(cols[f"kl_{t}"])
            kl_all = stacked["kl"][..., c].reshape(s, -1)
            frame = pd.DataFrame(cols)
            frame.insert(3, "family", p.name)
            frame.insert(4, "pattern", p.spec())
            frame.insert(5, "delta_loss_mean", total)
            frame.insert(6, "delta_loss_std", kl_all.std(0, ddof=1) if s > 1 else 0.0)
            add_pattern_columns(frame, p, length, s, head_dim)
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(SORT_COLUMNS, kind="stable", ignore_index=True)


def task_counts(out: Path, lengths: Sequence[int], counts: Mapping[int, int]) -> dict:
    """Samples per task family and how many the dense model answers exactly, per length."""
    found: dict[str, dict[str, dict[str, int]]] = {}
    for n in lengths:
        per: dict[str, dict[str, int]] = {}
        for i in range(counts[n]):
            meta = store.read_tensors_metadata(store.checkpoint_path(out, n, i))
            t = per.setdefault(meta.get("task", "text"), {"n": 0, "dense_match": 0})
            t["n"] += 1
            t["dense_match"] += int(meta.get("ref_match", "0"))
        found[str(n)] = per
    return found
