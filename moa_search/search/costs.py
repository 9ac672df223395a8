"""The search problem as arrays: predicted loss per (KV head, candidate, length) and byte costs.

Why arrays: every Optuna trial re-solves the assignment with other weights and caps, so the
profile is turned once into dense numpy arrays and each trial is a few vector operations
plus one knapsack solve. Byte costs come from the pattern classes (the single source of
truth shared with the runtime), so a budget can name any length, profiled or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from moa_search.errors import MoaSearchError
from moa_search.objective import TASKS
from moa_search.patterns import PATTERNS, Dense, Pattern, parse
from moa_search.plan import ModelIdentity, Plan
from moa_search.search.table import ProfileTable

if TYPE_CHECKING:
    from moa_search.search.latency import LatencyPricing

FAMILIES = tuple(PATTERNS)
DTYPE_BYTES = 2  # bf16, as the profile contract states


@dataclass
class Problem:
    """Candidates and their predicted losses for every KV head of one model.

    ``loss[g, c, i]``: predicted loss increase of candidate ``c`` on KV head ``g`` (flat
    index ``layer * num_kv_heads + kv_head``) at ``lengths[i]``; ``inf`` where the profile
    has no value (the candidate is then not allowed on that head).
    """

    identity: ModelIdentity
    lengths: list[int]
    patterns: list[Pattern]
    loss: np.ndarray
    #: per task family, the same shape as ``loss`` (measured profiles); ``loss`` is their
    #: weighted sum with ``weights``
    task_loss: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    #: prices the 'latency' kind (microseconds per decode step) when a search has a
    #: latency budget (``moa_search.search.latency.LatencyPricing``)
    latency: LatencyPricing | None = None

    def predicted_by_task(self, choice: np.ndarray, length_index: int) -> dict[str, float]:
        """Predicted divergence per task family of one plan at one planned length."""
        rows = np.arange(self.num_heads)
        return {t: float(v[rows, choice, length_index].sum()) for t, v in self.task_loss.items()}

    @property
    def num_heads(self) -> int:
        return self.identity.num_layers * self.identity.num_key_value_heads

    @cached_property
    def specs(self) -> list[str]:
        return [p.spec() for p in self.patterns]

    @cached_property
    def families(self) -> np.ndarray:
        return np.array([p.name for p in self.patterns])

    @cached_property
    def sinks(self) -> np.ndarray:
        """Sink size per candidate; -1 for patterns without sinks (``Pattern.has_sink``)."""
        return np.array([p.sink if p.has_sink else -1 for p in self.patterns])

    def bytes_per_head(self, kind: str, n: int) -> np.ndarray:
        """Bytes (stored for 'memory', read per decode step for 'bandwidth'; microseconds
        per decode step for 'latency') per candidate: (C,) when no layer of the model
        slides, else (G, C), each head's costs counted inside its layer's own window (what
        the model's cache would really hold)."""
        ident = self.identity
        if not ident.native_windows:
            return self._costs(kind, n, None)
        rows = {w: self._costs(kind, n, w) for w in set(ident.native_windows)}
        per_layer = [rows[ident.window(i)] for i in range(ident.num_layers)]
        return np.repeat(np.stack(per_layer), ident.num_key_value_heads, axis=0)

    def _costs(self, kind: str, n: int, window: int | None) -> np.ndarray:
        d = self.identity.head_dim
        if kind == "memory":
            cost = [p.bytes_stored(n, d, DTYPE_BYTES, window) for p in self.patterns]
        elif kind == "bandwidth":
            cost = [p.bytes_read(n, d, DTYPE_BYTES, window) for p in self.patterns]
        elif kind == "latency":
            pricing = self._pricing()
            cost = [pricing.head_us(p, n, window) for p in self.patterns]
        else:
            raise ValueError(kind)
        return np.array(cost, float)

    def head_costs(self, kind: str, n: int) -> np.ndarray:
        """(G, C) bytes of every candidate on every head (``bytes_per_head`` broadcast)."""
        cost = self.bytes_per_head(kind, n)
        return np.broadcast_to(cost, (self.num_heads, len(self.patterns)))

    def choice_bytes(self, kind: str, n: int, choice: np.ndarray) -> float:
        """Bytes of the plan that picks candidate ``choice[g]`` on head ``g``."""
        cost = self.head_costs(kind, n)
        return float(cost[np.arange(self.num_heads), np.asarray(choice, int)].sum())

    def uniform_bytes(self, kind: str, n: int, c: int) -> float:
        """Bytes of the plan that gives every head candidate ``c``."""
        return float(self.head_costs(kind, n)[:, c].sum())

    def dense_bytes(self, n: int) -> float:
        """Bytes the model's own cache holds for one sequence at length ``n`` (same for both
        kinds): every token on full layers, the window on sliding ones."""
        ident = self.identity
        per_layer = sum(min(n, ident.window(i) or n) for i in range(ident.num_layers))
        return float(per_layer * ident.num_key_value_heads * 2 * ident.head_dim * DTYPE_BYTES)

    def dense_cost(self, kind: str, n: int) -> float:
        """What the model's own dense attention costs at length ``n`` in ``kind``'s unit:
        ``dense_bytes`` for memory and bandwidth, predicted microseconds for latency."""
        if kind != "latency":
            return self.dense_bytes(n)
        from moa_search.search.latency import dense_latency  # noqa: PLC0415

        pricing = self._pricing()
        return dense_latency(pricing.table, self.identity, pricing.batch, n)

    def _pricing(self) -> LatencyPricing:
        if self.latency is None:
            raise MoaSearchError("latency costs need a cost table (--costs PATH)")
        return self.latency

    def layer_of(self) -> np.ndarray:
        return np.arange(self.num_heads) // self.identity.num_key_value_heads

    def plan(self, choice: np.ndarray, **fields) -> Plan:
        """Turn one candidate index per KV head into a Plan."""
        h = self.identity.num_key_value_heads
        heads = [
            [self.patterns[int(c)] for c in choice[i * h : (i + 1) * h]]
            for i in range(self.identity.num_layers)
        ]
        return Plan(model=self.identity, heads=heads, lengths=list(self.lengths), **fields)


def build_problem(
    table: ProfileTable,
    lengths: list[int] | None,
    families: tuple[str, ...] | list[str],
    weights: Mapping[str, float] | None = None,
) -> Problem:
    """Select planned lengths and allowed families from a profile; dense is free (loss 0).

    A measured profile has one ``kl_<task>`` column per task family: the loss is their sum
    with ``weights`` (default: the weights the profile was written with)."""
    families = check_families(families)
    profiled = table.lengths
    lengths = sorted(set(lengths)) if lengths else list(profiled)
    missing = [n for n in lengths if n not in profiled]
    if missing:
        raise MoaSearchError(
            f"{table.path / 'profile.parquet'}: length(s) {', '.join(map(str, missing))} not "
            f"profiled (profiled: {', '.join(map(str, profiled))})"
        )
    rows = table.rows[table.rows["family"].isin(families) & table.rows["length"].isin(lengths)]
    rows = rows[rows["family"] != "dense"]
    specs = sorted(rows["pattern"].unique())
    head_dim = table.identity.head_dim
    patterns: list[Pattern] = []
    for spec in specs:
        try:
            patterns.append(parse(spec, head_dim))
        except MoaSearchError as exc:
            raise MoaSearchError(f"{table.path / 'profile.parquet'}: pattern: {exc}") from None
    index = {s: i for i, s in enumerate(specs)}
    if "dense" in families:
        patterns.insert(0, Dense())
        index = {s: i + 1 for s, i in index.items()}
    if not patterns:
        raise MoaSearchError(
            f"{table.path / 'profile.parquet'}: no candidates of the allowed families "
            f"({', '.join(families)}) at lengths {', '.join(map(str, lengths))}"
        )
    ident = table.identity
    shape = (ident.num_layers * ident.num_key_value_heads, len(patterns), len(lengths))
    g = rows["layer"].to_numpy() * ident.num_key_value_heads + rows["kv_head"].to_numpy()
    c = rows["pattern"].map(index).to_numpy()
    li = rows["length"].map({n: i for i, n in enumerate(lengths)}).to_numpy()

    def gather(column: str) -> np.ndarray:
        out = np.full(shape, np.inf)
        if "dense" in families:
            out[:, 0, :] = 0.0
        if not rows.empty:
            # Dropping attention is never credited as a gain: a negative estimate is noise
            # the solver would otherwise exploit (it then prefers sparser heads to dense).
            values = np.maximum(rows[column].to_numpy(float), 0.0)
            ok = np.isfinite(values)
            out[g[ok], c[ok], li[ok]] = values[ok]
        return out

    tasks = [t for t in TASKS if f"kl_{t}" in rows.columns]
    task_loss = {t: gather(f"kl_{t}") for t in tasks}
    used: dict[str, float] = {}
    if tasks:
        from moa_search.objective import parse_weights  # noqa: PLC0415

        chosen = parse_weights(weights if weights is not None else table.meta.get("weights"))
        used = {t: chosen.get(t, 0.0) for t in tasks}
        if not any(used.values()):
            raise MoaSearchError(
                f"weights: no positive weight on the profiled tasks ({', '.join(tasks)})"
            )
        profiled = np.isfinite(gather("delta_loss_mean"))
        weighted = sum(w * np.where(profiled, task_loss[t], 0.0) for t, w in used.items() if w)
        loss = np.where(profiled, weighted, np.inf)
    else:
        if weights is not None:
            raise MoaSearchError(
                f"{table.path / 'profile.parquet'}: weights need a measured profile "
                f"(kl_<task> columns); this one was made by the gradient method"
            )
        loss = gather("delta_loss_mean")
    # a candidate must be profiled at every planned length to be comparable
    incomplete = ~np.isfinite(loss).all(axis=2, keepdims=True)
    loss = np.where(incomplete, np.inf, loss)
    problem = Problem(ident, lengths, patterns, loss, task_loss, used)
    _clip_to_native_windows(problem)
    return problem


def _clip_to_native_windows(problem: Problem) -> None:
    """On a layer the model itself makes sliding, a candidate that keeps at least the whole
    window at every planned length only clips to the window (what dense is there): it is
    not offered, so the budget goes where patterns really differ."""
    ident = problem.identity
    if not ident.native_windows or not any(isinstance(p, Dense) for p in problem.patterns):
        return
    for c, p in enumerate(problem.patterns):
        if isinstance(p, Dense) or not p.static:
            continue
        for layer in ident.sliding_layers:
            w = ident.window(layer)
            if all(min(n, w) <= p.stored_entries(n) for n in problem.lengths):
                rows = slice(
                    layer * ident.num_key_value_heads, (layer + 1) * ident.num_key_value_heads
                )
                problem.loss[rows, c, :] = np.inf
                for values in problem.task_loss.values():
                    values[rows, c, :] = np.inf


def check_families(families: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """Validate ``--patterns dense,window,...``; one-line error for an unknown family."""
    items = families.split(",") if isinstance(families, str) else list(families)
    items = [f.strip().lower() for f in items if f.strip()]
    unknown = [f for f in items if f not in PATTERNS]
    if unknown:
        raise MoaSearchError(
            f"patterns: unknown family {unknown[0]!r} (known: {', '.join(sorted(PATTERNS))})"
        )
    if not items:
        raise MoaSearchError("patterns: give at least one family (dense, window, elastic, sparq)")
    return tuple(dict.fromkeys(items))
