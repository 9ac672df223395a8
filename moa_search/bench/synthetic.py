"""Synthetic plans at a given KV density, shaped like a searched plan (for speed benchmarks).

A searched plan keeps a few KV heads dense (retrieval heads, more of them in the first and
last layers), and gives the others windows with sinks or elastic spans whose sizes vary
from layer to layer; MoA allows at most two distinct sparse rules per layer. This module
builds such a plan from a seed and scales all sparse spans together (bisection) until the
plan's KV memory at ``length`` is ``density`` times dense. No model weights are needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Elastic, Pattern, Window
from moa_search.plan import ModelIdentity, Plan, save_plan

BETAS = (0.0625, 0.125, 0.25)


def _identity(model_or_config: Any, name_or_path: str | None) -> ModelIdentity:
    if isinstance(model_or_config, ModelIdentity):
        return model_or_config
    return ModelIdentity.from_config(model_or_config, name_or_path)


def _window(target: float, sink: int, length: int, grain: int) -> Pattern:
    span = max(grain, int(round((target - sink) / grain)) * grain)
    if sink + span >= length:
        return Dense()
    return Window(sink=sink, span=span)


def _elastic(target: float, sink: int, length: int, beta: float, grain: int) -> Pattern:
    room = target - sink  # entries at ``length`` beyond the sink
    if room >= length - sink:
        return Dense()
    beta = min(beta, max(room, 0.0) / length)
    beta = math.floor(beta * 256) / 256  # a short binary fraction: exact in YAML and float64
    alpha = max(float(grain), round((room - beta * length) / grain) * grain)
    return Elastic(sink=sink, alpha=float(alpha), beta=float(beta))


def synthetic_plan(
    model_or_config: Any,
    density: float = 0.25,
    length: int = 32768,
    *,
    dense_fraction: float | None = None,
    sink: int = 64,
    seed: int = 0,
    tolerance: float = 0.005,
    name_or_path: str | None = None,
) -> Plan:
    """A plan whose KV memory at ``length`` tokens is ``density`` x dense (within ``tolerance``,
    absolute), mixing dense, window+sink and elastic heads per layer like a searched plan.

    Args:
        model_or_config: a model, its config, or a :class:`ModelIdentity`.
        density: KV bytes of the plan / dense KV bytes at ``length`` (0 < density <= 1).
        length: context length the density is measured at (the bench's context).
        dense_fraction: share of KV heads kept dense (default ``density / 2``).
        sink: sink tokens of window / elastic heads.
        seed: layout and span draws.
        tolerance: allowed |achieved - density|; MoaSearchError when it cannot be reached.
    """
    ident = _identity(model_or_config, name_or_path)
    if not 0 < density <= 1:
        raise MoaSearchError(f"density must be in (0, 1], got {density}")
    if length <= 0:
        raise MoaSearchError(f"length must be > 0, got {length}")
    layers, hkv = ident.num_layers, ident.num_key_value_heads
    total = layers * hkv
    if density >= 1:
        plan = Plan(ident, [[Dense()] * hkv for _ in range(layers)], [length], {"memory": 1.0})
        plan.notes = "synthetic: dense"
        return plan
    frac = density / 2 if dense_fraction is None else float(dense_fraction)
    if not 0 <= frac < density:
        raise MoaSearchError(f"dense_fraction must be in [0, density), got {frac}")
    rng = np.random.default_rng(seed)
    grain = max(1, length // 512)
    sink = min(sink, max(0, length // 8))

    # Which heads stay dense: weighted towards the first two and the last two layers.
    n_dense = int(round(total * frac))
    weights = np.ones((layers, hkv))
    weights[: min(2, layers)] *= 3.0
    weights[max(0, layers - 2) :] *= 2.0
    weights[:, 0] *= 1.5  # some heads are more often retrieval heads than others
    flat = rng.choice(total, size=n_dense, replace=False, p=(weights / weights.sum()).ravel())
    is_dense = np.zeros(total, dtype=bool)
    is_dense[flat] = True
    is_dense = is_dense.reshape(layers, hkv)

    # Per layer: a size multiplier, an elastic slope, and which sparse heads are elastic.
    layer_scale = rng.lognormal(0.0, 0.5, size=layers)
    layer_scale /= layer_scale.mean()
    layer_beta = rng.choice(BETAS, size=layers)
    elastic_head = rng.random((layers, hkv)) < 0.5

    def build(scale: float) -> list[list[Pattern]]:
        rows = []
        for layer in range(layers):
            row: list[Pattern] = []
            for h in range(hkv):
                if is_dense[layer, h]:
                    row.append(Dense())
                elif elastic_head[layer, h]:
                    target = scale * layer_scale[layer] * 1.3
                    row.append(_elastic(target, sink, length, float(layer_beta[layer]), grain))
                else:
                    target = scale * layer_scale[layer] * 0.7
                    row.append(_window(target, sink, length, grain))
            rows.append(row)
        return rows

    def achieved(rows: list[list[Pattern]]) -> float:
        stored = sum(min(length, p.stored_entries(length)) for row in rows for p in row)
        return stored / (total * length)

    lo, hi = 0.0, float(length)
    best = build(hi)
    if achieved(build(lo)) > density + tolerance:
        raise MoaSearchError(
            f"density {density} is below what {n_dense} dense heads and sink={sink} need "
            f"at length {length}: lower dense_fraction or sink"
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        rows = build(mid)
        if achieved(rows) > density:
            hi = mid
        else:
            lo = mid
            best = rows
        if abs(achieved(best) - density) <= tolerance / 4:
            break
    # Step up once if rounding left the plan below the band.
    if abs(achieved(best) - density) > tolerance:
        rows = build(hi)
        if abs(achieved(rows) - density) < abs(achieved(best) - density):
            best = rows
    got = achieved(best)
    if abs(got - density) > tolerance:
        raise MoaSearchError(
            f"synthetic plan reached density {got:.4f}, not {density} +- {tolerance} "
            f"(too few heads or too short a length for the span grain {grain})"
        )
    plan = Plan(ident, best, lengths=[length], budget={"memory": float(density)})
    plan.metrics = {"synthetic": {"density": round(got, 6), "seed": seed, "length": length}}
    plan.notes = (
        f"synthetic plan: KV memory {got:.4f} of dense at {length} tokens, "
        f"{n_dense}/{total} dense heads, seed {seed}"
    )
    return plan


def parse_synthetic(text: str) -> dict[str, Any]:
    """``"density=0.25,length=32768,seed=1"`` (or just ``"0.25"``) -> synthetic_plan kwargs."""
    out: dict[str, Any] = {}
    kinds = {
        "density": float,
        "length": int,
        "seed": int,
        "sink": int,
        "dense_fraction": float,
        "tolerance": float,
    }
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, eq, raw = part.partition("=")
        if not eq:
            key, raw = "density", part
        key = key.strip()
        if key not in kinds:
            raise MoaSearchError(
                f"synthetic plan: unknown key {key!r} (allowed: {', '.join(kinds)})"
            )
        try:
            out[key] = kinds[key](raw.strip())
        except ValueError:
            raise MoaSearchError(f"synthetic plan: {key} must be a number, got {raw!r}") from None
    if "density" not in out:
        raise MoaSearchError("synthetic plan: give density=... (e.g. density=0.25)")
    return out


def make_synthetic_plan_file(model: str, text: str, out: str | os.PathLike[str] | None) -> Path:
    """``moa-search plan MODEL --synthetic density=0.25``: config-only shapes need no weights."""
    from moa_search.bench.models import SHAPES, shape_config
    from moa_search.models import load_config

    config = shape_config(model) if model in SHAPES else load_config(model)
    options = parse_synthetic(text)
    plan = synthetic_plan(config, name_or_path=model, **options)
    target = Path(out) if out is not None else Path(f"plan_synthetic_{options['density']}.yaml")
    if target.suffix not in (".yaml", ".yml"):
        target = target / "synthetic.yaml"
    return save_plan(plan, target)
