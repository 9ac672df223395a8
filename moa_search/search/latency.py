"""Predicted decode-attention latency of a plan, from a measured cost table.

The table is what ``moa-search bench --calibrate-costs`` writes
(:mod:`moa_search.bench.calibrate`): microseconds of one decode step of one layer per KV
head (``us_per_head``), by pattern, batch and context, on the user's device.

How a plan is priced (additive over heads, so the knapsack can cap it like bytes):

- a head's cost is the table's ``us_per_head`` at the plan's batch and length: dense and
  window/elastic heads (one mixed-kernel launch, whose time follows the entries each head
  reads) by their read entries, interpolated on the curve of every static row of that
  batch (dense at each context, windows at each stored length); SparQ heads on the rows of
  their own setting, interpolated in the context;
- between two calibrated batches the cost is linear in the batch;
- a plan's step latency is the sum over every head of every layer. Decode attention at
  serving batch sizes is bound by memory traffic, which adds up over heads; a layer's
  launch overhead is in the table spread over its heads, as the runtime shares one launch
  among them.

Each curve is made non-decreasing (running maximum) before interpolating, so timing noise
never makes a longer read look cheaper, and linear interpolation of a non-decreasing curve
is monotone between table points and exact on them. Entries below the smallest calibrated
read are priced as the smallest (the kernel's floor; never an underestimate); a context,
entry count or batch past the table is an error, never an extrapolation. Known gap: a
layer whose SparQ heads use several settings runs one SparQ pipeline per setting, each
with its own launch overhead, which this per-head share does not charge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Pattern, SparQ
from moa_search.plan import ModelIdentity, Plan

REQUIRED = ("group", "head_dim", "family", "pattern", "batch", "n", "stored", "read")
HOW = "write one with 'moa-search bench MODEL --calibrate-costs PATH'"


@dataclass
class CostTable:
    """A loaded cost table: rows, and the head geometry and device it was measured on."""

    path: Path
    rows: pd.DataFrame
    group: int
    head_dim: int
    device: str = "?"
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def batches(self) -> np.ndarray:
        return np.sort(self.rows["batch"].unique())

    @cached_property
    def contexts(self) -> np.ndarray:
        return np.sort(self.rows["n"].unique())

    @cached_property
    def _curves(self) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        """(key, batch) -> (x, us) with x sorted and us made non-decreasing; key "static"
        (x = entries read) or a SparQ spec (x = context)."""
        curves = {}
        rows = self.rows
        static = rows[rows["family"].isin(["dense", "window", "elastic"])]
        for b, part in static.groupby("batch"):
            curves[("static", int(b))] = _curve(part["read"], part["us_per_head"])
        for (spec, b), part in rows[rows["family"] == "sparq"].groupby(["pattern", "batch"]):
            curves[(spec, int(b))] = _curve(part["n"], part["us_per_head"])
        return curves

    def check_geometry(self, identity: ModelIdentity) -> None:
        """One-line error when the table was measured for another head shape."""
        group = identity.num_attention_heads // identity.num_key_value_heads
        for name, mine, theirs in (
            ("head_dim", self.head_dim, identity.head_dim),
            ("group", self.group, group),
        ):
            if mine != theirs:
                raise MoaSearchError(
                    f"{self.path}: {name}: table was measured at head_dim {self.head_dim} with "
                    f"{self.group} query heads per KV head; {identity.name_or_path} has "
                    f"head_dim {identity.head_dim} with {group} (calibrate for this model)"
                )

    def head_us(self, pattern: Pattern, batch: int, n: int, window: int | None = None) -> float:
        """Predicted microseconds of one decode step of one KV head at (batch, n)."""
        lo, hi = self.contexts[0], self.contexts[-1]
        if not lo <= n <= hi:
            raise MoaSearchError(
                f"{self.path}: n: length {n} is outside the table's contexts {lo}..{hi} "
                "(calibrate with --context covering it)"
            )
        b = self.batches
        if not b[0] <= batch <= b[-1]:
            raise MoaSearchError(
                f"{self.path}: batch: {batch} is outside the table's batches {b[0]}..{b[-1]} "
                "(calibrate with --batch covering it)"
            )
        j = int(np.searchsorted(b, batch))
        if b[j] == batch:
            return self._at(pattern, int(b[j]), n, window)
        b0, b1 = int(b[j - 1]), int(b[j])
        t = (batch - b0) / (b1 - b0)
        return (1 - t) * self._at(pattern, b0, n, window) + t * self._at(pattern, b1, n, window)

    def _at(self, pattern: Pattern, batch: int, n: int, window: int | None) -> float:
        if isinstance(pattern, SparQ):
            key, x = pattern.spec(), min(n, window or n)
            if (key, batch) not in self._curves:
                known = sorted({k for k, _ in self._curves if k != "static"})
                raise MoaSearchError(
                    f"{self.path}: pattern: no rows for {key} at batch {batch} (SparQ settings "
                    f"in the table: {', '.join(known) or 'none'}; calibrate with --sparq)"
                )
        elif pattern.static:
            key, x = "static", pattern.read_entries(n, self.head_dim)
            x = min(x, window) if window is not None else x
            if (key, batch) not in self._curves:
                raise MoaSearchError(f"{self.path}: family: no dense/window rows at batch {batch}")
        else:
            raise MoaSearchError(f"{self.path}: pattern: no cost rows for {pattern.spec()}")
        xs, us = self._curves[(key, batch)]
        if x > xs[-1] * (1 + 1e-9):
            raise MoaSearchError(
                f"{self.path}: read: {pattern.spec()} reads {x:g} entries at length {n}, past "
                f"the table's largest {xs[-1]:g} at batch {batch}"
            )
        return float(np.interp(x, xs, us))


def _curve(x: pd.Series, us: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique x (largest time kept for repeats), times as a running maximum."""
    frame = pd.DataFrame({"x": x.to_numpy(float), "us": us.to_numpy(float)})
    frame = frame.groupby("x", sort=True)["us"].max()
    return frame.index.to_numpy(), np.maximum.accumulate(frame.to_numpy())


def load_costs(path: str | os.PathLike[str]) -> CostTable:
    """Read a cost table; one-line errors for a missing file or a malformed table."""
    import json  # noqa: PLC0415

    from moa_search.bench.calibrate import meta_path  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise MoaSearchError(f"costs {path}: no such file ({HOW})")
    try:
        rows = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoaSearchError(f"{path}: not a cost table CSV ({first})") from None
    missing = [c for c in (*REQUIRED, "us_per_head") if c not in rows.columns]
    if missing:
        raise MoaSearchError(f"{path}: missing column(s) {', '.join(missing)} ({HOW})")
    if rows.empty:
        raise MoaSearchError(f"{path}: no rows ({HOW})")
    for col in ("group", "head_dim", "batch", "n"):
        values = pd.to_numeric(rows[col], errors="coerce")
        if values.isna().any() or (values <= 0).any():
            raise MoaSearchError(f"{path}: {col}: expected positive integers")
    us = pd.to_numeric(rows["us_per_head"], errors="coerce")
    if us.isna().any() or (us < 0).any() or not np.isfinite(us).all():
        raise MoaSearchError(f"{path}: us_per_head: expected finite times >= 0")
    for col in ("group", "head_dim"):
        if rows[col].nunique() != 1:
            raise MoaSearchError(f"{path}: {col}: the table mixes head shapes (one per table)")
    if not (rows["family"] == "dense").any():
        raise MoaSearchError(f"{path}: family: no dense rows ({HOW})")
    meta: dict[str, Any] = {}
    if meta_path(path).is_file():
        try:
            meta = json.loads(meta_path(path).read_text())
        except ValueError:
            meta = {}
    device = str(rows["device"].iloc[0]) if "device" in rows.columns else "?"
    return CostTable(
        path, rows, int(rows["group"].iloc[0]), int(rows["head_dim"].iloc[0]), device, meta
    )


@dataclass(frozen=True)
class LatencyPricing:
    """A cost table at one batch size: what ``Problem.bytes_per_head('latency', n)`` uses."""

    table: CostTable
    batch: int = 1

    def head_us(self, pattern: Pattern, n: int, window: int | None = None) -> float:
        return self.table.head_us(pattern, self.batch, n, window)


def plan_latency(table: CostTable, plan: Plan, batch: int, n: int) -> float:
    """Predicted attention microseconds of one decode step of ``plan`` (all layers)."""
    table.check_geometry(plan.model)
    return sum(
        table.head_us(p, batch, n, plan.model.window(i))
        for i, row in enumerate(plan.heads)
        for p in row
    )


def dense_latency(table: CostTable, identity: ModelIdentity, batch: int, n: int) -> float:
    """Predicted attention microseconds of one decode step of the model's own dense
    attention (each sliding layer inside its window): what latency fractions are of."""
    return sum(
        identity.num_key_value_heads * table.head_us(Dense(), batch, n, identity.window(i))
        for i in range(identity.num_layers)
    )


def pricing_for(budgets: list, costs: str | os.PathLike[str] | None, identity: ModelIdentity):
    """The latency pricing a search needs: None without a latency budget; a one-line error
    when a latency budget has no table or the table is for another head shape."""
    latency = [b for b in budgets if b.kind == "latency"]
    if not latency:
        return None
    if costs is None:
        raise MoaSearchError(
            f"budget {latency[0].text()}: a latency budget needs a cost table (--costs PATH; {HOW})"
        )
    table = load_costs(costs)
    table.check_geometry(identity)
    return LatencyPricing(table, latency[0].batch)
