"""Methods to compare: the plan, dense, and uniform baselines at the plan's own budget.

Why solved per length: a plan mixing dense and window heads holds a different fraction of
the dense KV cache at every length, so a fair uniform baseline is rebuilt at each eval
length to hold the SAME KV bytes there (window, elastic) or to read the SAME bytes per
decode step (SparQ, which stores the full cache and saves bandwidth only). Each baseline
records its exact spec and its achieved densities, so a reader can check the match.

Rules (T = target entries per KV head = density * n):
- window: StreamingLLM-style ``sink`` sinks + the most recent ``T - sink`` tokens.
- elastic: MoA's span alpha + beta*n with the same sinks. The split between the fixed and the
  growing part is a free choice: by default half of the non-sink budget grows with n
  (beta = (T - sink) / (2n)); pass ``elastic_beta`` to fix beta instead (clamped so alpha >= 0).
- sparq: the SparQ paper's split, half the bytes on step 1 (r components of every key) and
  half on the top-k rows: the largest r whose step 1 moves at most half, as the runtime's
  pipeline prices it (``SparQ.scan_entries``: two reads of r fp8 components of every key
  from the side buffer and the int32 selection keys), then k_ratio fills the rest exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from moa_search.errors import MoaSearchError
from moa_search.patterns import Elastic, Pattern, SparQ, Window
from moa_search.plan import ModelIdentity, Plan

BASELINES = ("dense", "window", "elastic", "sparq")
DEFAULT_SINK = 64  # MoA's sink size; StreamingLLM used 4, MoA found 64 safer at long context
DEFAULT_SPARQ_LOCAL = 16


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a plan to apply (None = the model's own attention)."""

    name: str
    plan: Plan | None
    description: str
    memory_density: float
    read_density: float

    @property
    def is_reference(self) -> bool:
        return self.plan is None


def dense_method() -> Method:
    """The unmodified model (its own SDPA attention): the reference every drop is measured to."""
    return Method("dense", None, "model's own attention (full KV cache)", 1.0, 1.0)


def plan_method(plan: Plan, n: int, name: str = "plan", source: str = "") -> Method:
    """Wrap a plan with its densities at length ``n`` and a short readable summary."""
    label = summarize(plan) + (f" ({source})" if source else "")
    return Method(name, plan, label, plan.memory_density(n), plan.read_density(n))


def summarize(plan: Plan, top: int = 3) -> str:
    """E.g. ``10x dense + 80x window:sink=64,span=256`` (most common patterns first)."""
    counts = Counter(p.spec() for row in plan.heads for p in row)
    parts = [f"{c}x {s}" for s, c in counts.most_common(top)]
    rest = sum(counts.values()) - sum(c for _, c in counts.most_common(top))
    if rest:
        parts.append(f"{rest}x other")
    return " + ".join(parts)


def _uniform(identity: ModelIdentity, pattern: Pattern) -> Plan:
    rows = [[pattern] * identity.num_key_value_heads for _ in range(identity.num_layers)]
    return Plan(model=identity, heads=rows, notes=f"uniform baseline {pattern.spec()}")


def _target(density: float, n: int, what: str) -> float:
    if not 0 < density <= 1:
        raise MoaSearchError(f"{what} density must be in (0, 1], got {density:.4g} at n={n}")
    return density * n


def uniform_window(n: int, memory: float, sink: int = DEFAULT_SINK) -> Window:
    """Window + sinks storing ``memory * n`` entries per head at length ``n``."""
    t = round(_target(memory, n, "memory"))
    if t >= n:
        return Window(sink=0, span=n)
    sink = min(sink, t // 2)
    return Window(sink=sink, span=max(1, t - sink))


def uniform_elastic(
    n: int, memory: float, sink: int = DEFAULT_SINK, beta: float | None = None
) -> Elastic:
    """Elastic span storing ``memory * n`` entries per head at length ``n`` (see module doc)."""
    t = round(_target(memory, n, "memory"))
    if t >= n:
        return Elastic(sink=0, alpha=float(n), beta=0.0)
    sink = min(sink, t // 2)
    free = t - sink
    b = free / (2 * n) if beta is None else min(max(beta, 0.0), free / n, 1.0)
    b = math.floor(b * 1e4) / 1e4
    alpha = round(free - b * n, 3)
    return Elastic(sink=sink, alpha=max(0.0, alpha), beta=b)


def uniform_sparq(
    n: int, read: float, head_dim: int, r: int | None = None, local: int = DEFAULT_SPARQ_LOCAL
) -> SparQ:
    """SparQ reading ``read * n`` KV rows per head per decode step at length ``n`` (r = 1
    and the fewest rows when even that reads more)."""
    t = _target(read, n, "read")

    def scan(q: int) -> float:  # rows' worth read besides the top-k at r = q
        return SparQ(r=q, k=1).scan_entries(n, head_dim)

    def largest_r(limit: float, top: int) -> int:
        return max((q for q in range(1, top + 1) if scan(q) <= limit), default=1)

    r = largest_r(t / 2, head_dim) if r is None else r
    if t - scan(r) < min(local, n):  # budget too small for step 1: shrink r so k covers `local`
        r = largest_r(t - min(local, n), r)
    k = t - scan(r)
    k_ratio = min(1.0, max(1.0 / n, math.floor(k / n * 1e5) / 1e5))
    return SparQ(r=r, k_ratio=k_ratio, local=local)


def baseline_method(
    name: str,
    identity: ModelIdentity,
    n: int,
    memory: float,
    read: float,
    sink: int = DEFAULT_SINK,
    elastic_beta: float | None = None,
    sparq_r: int | None = None,
) -> Method:
    """A uniform baseline at the given densities at length ``n`` (``name`` in BASELINES)."""
    if name == "dense":
        return dense_method()
    if name == "window":
        make = lambda x: uniform_window(n, x, sink)  # noqa: E731
        target, why = memory, f"same KV memory as target at n={n}"
    elif name == "elastic":
        make = lambda x: uniform_elastic(n, x, sink, elastic_beta)  # noqa: E731
        target, why = memory, f"same KV memory as target at n={n}"
    elif name == "sparq":
        make = lambda x: uniform_sparq(n, x, identity.head_dim, sparq_r)  # noqa: E731
        target = read
        why = f"same bytes read per decode step as target at n={n}; stores the full cache"
    else:
        raise MoaSearchError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    pattern: Pattern = make(target)
    if identity.native_windows:  # sliding layers clip a uniform pattern: fit the real density
        kind = "read" if name == "sparq" else "memory"
        pattern = _fit_density(identity, make, target, n, kind)
    plan = _uniform(identity, pattern)
    if name == "sparq" and plan.read_density(n) > target + 0.01:  # step 1 alone is more
        why = (
            f"reads {plan.read_density(n):.1%} of dense at n={n}, the least SparQ moves per "
            f"step: more than the target's {target:.1%}; stores the full cache"
        )
    desc = f"uniform {pattern.spec()} ({why})"
    return Method(name, plan, desc, plan.memory_density(n), plan.read_density(n))


def _fit_density(
    identity: ModelIdentity, make, target: float, n: int, kind: str, steps: int = 40
) -> Pattern:
    """The uniform pattern ``make(x)`` whose density at ``n`` (memory or read, counted
    against the model's own cache) is closest to ``target``; densities grow with x, and on
    a model with sliding layers a fraction of n is not a fraction of what it holds."""

    def density(x: float) -> float:
        return _density_of(identity, make(x), n, kind)

    lo, hi = 1.0 / n, 1.0
    if density(hi) <= target:
        return make(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if density(mid) < target:
            lo = mid
        else:
            hi = mid
    return min((make(lo), make(hi)), key=lambda p: abs(_density_of(identity, p, n, kind) - target))


def _density_of(identity: ModelIdentity, pattern: Pattern, n: int, kind: str) -> float:
    plan = _uniform(identity, pattern)
    return plan.memory_density(n) if kind == "memory" else plan.read_density(n)


def build_methods(
    plan: Plan,
    n: int,
    baselines: tuple[str, ...] | list[str],
    source: str = "",
    sink: int = DEFAULT_SINK,
    elastic_beta: float | None = None,
    sparq_r: int | None = None,
) -> list[Method]:
    """The plan plus each requested baseline matched to the plan's budget at length ``n``."""
    memory, read = plan.memory_density(n), plan.read_density(n)
    methods = [plan_method(plan, n, source=source)]
    for name in baselines:
        methods.append(
            baseline_method(name, plan.model, n, memory, read, sink, elastic_beta, sparq_r)
        )
    return methods


def _scaled(plan: Plan, factor: float, n: int) -> Plan:
    rows = [[p.scaled(factor, n) for p in row] for row in plan.heads]
    return dataclasses.replace(plan, heads=rows, notes=f"{plan.notes} scaled x{factor:.4g}".strip())


def scale_plan(plan: Plan, n: int, memory: float) -> Plan:
    """Shrink or grow the plan's window spans / elastic (alpha, beta) to ``memory`` at ``n``.

    Why: a quality-vs-budget curve needs the plan at several budgets; when the search's own
    Pareto plans are not at hand, scaling keeps the plan's choice of which heads stay dense
    and which get local windows, and moves only the sizes. Dense and SparQ heads keep their
    pattern, so budgets below what the dense heads alone hold are refused.
    """
    lo_plan = _scaled(plan, 0.0, n)
    if lo_plan.memory_density(n) > memory + 1e-9:
        raise MoaSearchError(
            f"cannot scale the plan to memory={memory:.3g} at n={n}: its dense/SparQ heads alone "
            f"hold {lo_plan.memory_density(n):.3g} of dense"
        )
    lo, hi = 0.0, 1.0
    while _scaled(plan, hi, n).memory_density(n) < memory and hi < 2.0**20:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        if _scaled(plan, mid, n).memory_density(n) < memory:
            lo = mid
        else:
            hi = mid
    a, b = _scaled(plan, lo, n), _scaled(plan, hi, n)
    return min((a, b), key=lambda p: abs(p.memory_density(n) - memory))


__all__ = [
    "BASELINES",
    "Method",
    "baseline_method",
    "build_methods",
    "dense_method",
    "plan_method",
    "scale_plan",
    "summarize",
    "uniform_elastic",
    "uniform_sparq",
    "uniform_window",
]
