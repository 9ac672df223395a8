"""Exact multiple-choice knapsack: one candidate per KV head, minimal loss under byte caps.

Why a MILP: with two caps (memory, bandwidth), several lengths and an optional cap on
distinct patterns per layer, greedy or Lagrangian rules lose optimality; HiGHS (through
``scipy.optimize.milp``) solves the 32x8x40 case to a certified gap in well under a second,
and reports the dual bound so the gap is a proof, not a guess. Dominated candidates are
dropped first (never worse to keep the dominating one), which shrinks the model a lot.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from moa_search.errors import MoaSearchError
from moa_search.search.distinct import solve_distinct


@dataclass(frozen=True)
class Capacity:
    """``sum_g weights[choice[g]] <= limit``; ``weights`` is (C,) or per head (G, C)."""

    name: str
    weights: np.ndarray
    limit: float

    def per_head(self, num_heads: int) -> np.ndarray:
        w = np.asarray(self.weights, float)
        return np.broadcast_to(w, (num_heads, w.shape[-1]))


@dataclass(frozen=True)
class Solution:
    """Chosen candidate per head, its objective, a certified lower bound and the gap."""

    choice: np.ndarray
    objective: float
    bound: float
    seconds: float

    @property
    def gap(self) -> float:
        """Relative optimality gap, proven by the solver's dual bound (0 = optimal)."""
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-12)


DISTINCT_FALLBACK_GAP = 0.01  # above this certified gap the cap path re-solves by full MILP
DISTINCT_FALLBACK_VARS = 3000  # ... when the model is small enough for that to be quick


class Infeasible(MoaSearchError):
    """No assignment meets the caps; ``capacity`` names the cap, ``smallest`` its minimum."""

    def __init__(self, message: str, capacity: str | None = None, smallest: float | None = None):
        super().__init__(message)
        self.capacity = capacity
        self.smallest = smallest


def smallest_total(values: np.ndarray, capacity: Capacity) -> float:
    """Least possible left-hand side of one cap (each head takes its cheapest allowed option)."""
    w = capacity.per_head(values.shape[0])
    return float(np.where(np.isfinite(values), w, np.inf).min(axis=1).sum())


def solve(
    values: np.ndarray,
    capacities: list[Capacity],
    layer_of: np.ndarray | None = None,
    max_distinct: int | None = None,
    time_limit: float = 20.0,
    rel_gap: float = 1e-3,
) -> Solution:
    """Minimise ``sum_g values[g, choice[g]]`` under ``capacities``.

    ``values[g, c] = inf`` forbids candidate c on head g. With ``max_distinct``, heads with
    the same ``layer_of`` value may use at most that many distinct candidates.
    Raises :class:`Infeasible` when no assignment fits.

    Method: the LP relaxation gives a lower bound and reduced costs ``d``; a variable with
    ``d > UB - LB`` cannot be in any solution better than the incumbent ``UB``, so the MILP
    only needs the variables with small reduced cost (usually a few hundred of ~10k). The
    restricted MILP is re-solved with a wider set until that condition holds, which makes
    the answer exact up to HiGHS's ``rel_gap`` (reported in :attr:`Solution.gap`).
    """
    start = time.perf_counter()
    values = np.asarray(values, float)
    num_heads = values.shape[0]
    allowed = np.isfinite(values)
    if not allowed.any(axis=1).all():
        g = int(np.flatnonzero(~allowed.any(axis=1))[0])
        raise Infeasible(f"head {g} has no allowed candidate")
    for cap in capacities:
        least = smallest_total(values, cap)
        if least > cap.limit * (1 + 1e-12):
            raise Infeasible(
                f"{cap.name}: needs at least {least:.6g}, cap is {cap.limit:.6g}", cap.name, least
            )
    if layer_of is None or max_distinct is None:
        sets, max_distinct = np.arange(num_heads), None
    else:
        sets = np.asarray(layer_of)
        if np.bincount(sets).max() <= max_distinct:
            max_distinct = None
    keep = allowed & ~_dominated(values, capacities, sets)
    if max_distinct is not None and all(np.ndim(c.weights) == 1 for c in capacities):
        return _solve_distinct(
            np.where(keep, values, np.inf),
            capacities,
            sets,
            max_distinct,
            time_limit,
            rel_gap,
            start,
        )
    lower, reduced, prices = lagrangian_bound(np.where(keep, values, np.inf), capacities)
    quick = _greedy(np.where(keep, values, np.inf), capacities, reduced.argmin(axis=1))
    if quick is not None:
        upper = float(values[np.arange(num_heads), quick].sum())
        if upper - lower <= rel_gap * max(abs(upper), 1e-12):
            return Solution(quick, upper, min(lower, upper), time.perf_counter() - start)
    deadline = start + time_limit
    slack = max(1e-9, 1e-3 * abs(lower))
    while True:
        mask = keep & (reduced <= slack + 1e-12)
        result = _Model(values, capacities, mask, sets, max_distinct).integer(
            max(0.1, deadline - time.perf_counter()), rel_gap
        )
        if result is None:  # restricted set too small to be feasible: widen it
            if mask.sum() == keep.sum():
                names = ", ".join(c.name for c in capacities)
                extra = f" with at most {max_distinct} distinct per layer" if max_distinct else ""
                raise Infeasible(f"no assignment meets {names} together{extra}")
            slack *= 8
            continue
        choice, sub_bound = result
        upper = float(values[np.arange(num_heads), choice].sum())
        if upper - lower <= slack or time.perf_counter() > deadline:
            proven = upper - lower <= slack
            bound = max(lower, sub_bound) if proven else lower
            return Solution(choice, upper, min(bound, upper), time.perf_counter() - start)
        slack = upper - lower


def _solve_distinct(
    values: np.ndarray,
    capacities: list[Capacity],
    sets: np.ndarray,
    max_distinct: int,
    time_limit: float,
    rel_gap: float,
    start: float,
) -> Solution:
    scales = np.array([c.limit if c.limit > 0 else 1.0 for c in capacities])
    weights = (
        np.array([np.asarray(c.weights, float) for c in capacities]).reshape(
            len(capacities), values.shape[1]
        )
        / scales[:, None]
    )
    limits = np.array([c.limit for c in capacities]) / scales
    found = solve_distinct(values, weights, limits, sets, max_distinct, time_limit, rel_gap)
    if found is None:
        names = ", ".join(c.name for c in capacities)
        raise Infeasible(
            f"no assignment meets {names} together with at most {max_distinct} "
            "distinct patterns per layer"
        )
    choice, objective, bound = found
    loose = objective - bound > DISTINCT_FALLBACK_GAP * max(abs(objective), 1e-12)
    if loose and np.isfinite(values).sum() <= DISTINCT_FALLBACK_VARS:
        # the Lagrangian bound is loose (few heads per layer): prove optimality by MILP
        model = _Model(values, capacities, np.isfinite(values), sets, max_distinct)
        exact = model.integer(max(0.1, time_limit - (time.perf_counter() - start)), rel_gap)
        if exact is not None:
            other = float(values[np.arange(len(choice)), exact[0]].sum())
            if other <= objective:
                choice, objective = exact[0], other
            bound = max(bound, min(exact[1], objective))
    return Solution(choice, objective, bound, time.perf_counter() - start)


def _scaled_weights(
    values: np.ndarray, capacities: list[Capacity]
) -> tuple[np.ndarray, np.ndarray]:
    """Weights (K, G, C) and limits (K,) of every capacity, divided by its limit (1 where
    the limit is 0), so that every capacity reads 1 at its cap."""
    num_heads = values.shape[0]
    scales = np.array([c.limit if c.limit > 0 else 1.0 for c in capacities])
    per_head = np.array([c.per_head(num_heads) for c in capacities])
    w = per_head.reshape(len(capacities), *values.shape) / scales[:, None, None]
    return w, np.array([c.limit for c in capacities]) / scales


def lagrangian_bound(
    values: np.ndarray, capacities: list[Capacity], tol: float = 1e-7, max_iter: int = 200
) -> tuple[float, np.ndarray]:
    """Max over prices ``lam >= 0`` of ``sum_g min_c(v + lam.w) - lam.b`` and reduced costs.

    Equals the LP relaxation bound (each head's choice set is a simplex), found by Kelley's
    cutting planes in the few price dimensions instead of an LP over every (head, candidate):
    ~20 tiny LPs instead of one with 10k columns. ``reduced[g, c] = v + lam.w - min_c(...)``
    >= 0, and any assignment costs at least ``bound + sum_g reduced[g, choice[g]]``.
    """
    w, b = _scaled_weights(values, capacities)
    m = len(capacities)
    finite_max = np.where(np.isfinite(values), values, -np.inf).max(axis=1)
    box = 10.0 * float(np.abs(finite_max[np.isfinite(finite_max)]).sum()) + 1.0
    lam = np.zeros(m)
    cuts_a: list[float] = []
    cuts_s: list[np.ndarray] = []
    best, best_lam = -np.inf, lam
    rows = np.arange(values.shape[0])
    for _ in range(max_iter):
        priced = values + np.tensordot(lam, w, axes=1)
        choice = priced.argmin(axis=1)
        value = float(priced[rows, choice].sum() - lam @ b)
        if value > best:
            best, best_lam = value, lam
        cuts_a.append(float(values[rows, choice].sum()))
        cuts_s.append(w[:, rows, choice].sum(axis=1) - b)
        if m == 0:
            break
        a_ub = np.hstack([np.ones((len(cuts_a), 1)), -np.array(cuts_s)])
        res = linprog(
            np.r_[-1.0, np.zeros(m)],
            A_ub=a_ub,
            b_ub=np.array(cuts_a),
            bounds=[(None, None)] + [(0.0, box)] * m,
            method="highs",
        )
        if res.status != 0:
            raise MoaSearchError(f"knapsack price search failed ({res.message})")
        lam = res.x[1:]
        if -res.fun - best <= tol * max(1.0, abs(best)):
            break
    priced = values + np.tensordot(best_lam, w, axes=1)
    reduced = priced - priced.min(axis=1, keepdims=True)
    return best, np.where(np.isfinite(reduced), reduced, np.inf), best_lam


def _greedy(
    values: np.ndarray, capacities: list[Capacity], choice: np.ndarray
) -> np.ndarray | None:
    """Repair ``choice`` into a feasible assignment, then improve it by single-head moves.

    Repair takes the move with the least loss added per unit of over-cap bytes removed;
    improvement takes the feasible move with the largest loss saved. None if repair fails.
    """
    w, b = _scaled_weights(values, capacities)
    b = b + 1e-12
    num_heads = values.shape[0]
    rows = np.arange(num_heads)
    choice = choice.copy()
    load = w[:, rows, choice].sum(axis=1)
    for _ in range(4 * num_heads):
        over = load - b
        if (over <= 0).all():
            break
        delta_w = w - w[:, rows, choice][:, :, None]  # (m, G, C) load change of a move
        removed = np.minimum(-delta_w, over[:, None, None].clip(min=0)).clip(min=0)
        removed = removed[over > 0].sum(axis=0)
        new_load = load[:, None, None] + delta_w
        ok = (removed > 0) & ((new_load <= b[:, None, None]) | (delta_w <= 0)).all(axis=0)
        cost = values - values[rows, choice][:, None]
        score = np.where(ok & np.isfinite(values), cost / np.where(removed > 0, removed, 1), np.inf)
        g, c = np.unravel_index(np.argmin(score), score.shape)
        if not np.isfinite(score[g, c]):
            return None
        load += delta_w[:, g, c]
        choice[g] = c
    else:
        return None
    if (load > b).any():
        return None
    for _ in range(4 * num_heads):
        delta_w = w - w[:, rows, choice][:, :, None]
        fits = (load[:, None, None] + delta_w <= b[:, None, None]).all(axis=0)
        saving = np.where(fits & np.isfinite(values), values[rows, choice][:, None] - values, 0)
        g, c = np.unravel_index(np.argmax(saving), saving.shape)
        if saving[g, c] <= 1e-15:
            break
        load += delta_w[:, g, c]
        choice[g] = c
    return choice


class _Model:
    """The knapsack as LP/MILP matrices over the candidates marked in ``keep``."""

    def __init__(
        self,
        values: np.ndarray,
        capacities: list[Capacity],
        keep: np.ndarray,
        sets: np.ndarray,
        max_distinct: int | None,
    ):
        num_heads = values.shape[0]
        self.num_heads = num_heads
        self.g, self.c = np.nonzero(keep)
        nx = len(self.g)
        self.x_vars = np.arange(nx)
        self.cost = values[self.g, self.c]
        self.a_eq = sparse.csr_matrix((np.ones(nx), (self.g, np.arange(nx))), shape=(num_heads, nx))
        ub_rows, self.b_ub = [], []
        for cap in capacities:
            w = cap.per_head(num_heads)[self.g, self.c]
            scale = cap.limit if cap.limit > 0 else 1.0
            ub_rows.append(sparse.csr_matrix(w[None, :] / scale))
            self.b_ub.append(cap.limit / scale)
        self.ny = 0
        if max_distinct is not None and nx:
            pairs, y_of = np.unique(
                np.stack([sets[self.g], self.c], 1), axis=0, return_inverse=True
            )
            self.ny = ny = len(pairs)
            link = sparse.hstack(
                [
                    sparse.identity(nx, format="csr"),
                    sparse.csr_matrix(
                        (-np.ones(nx), (np.arange(nx), y_of.ravel())), shape=(nx, ny)
                    ),
                ]
            )
            layers, layer_of_pair = np.unique(pairs[:, 0], return_inverse=True)
            count = sparse.csr_matrix(
                (np.ones(ny), (layer_of_pair.ravel(), np.arange(ny))), shape=(len(layers), ny)
            )
            ub_rows = [sparse.hstack([r, sparse.csr_matrix((1, ny))]) for r in ub_rows]
            ub_rows += [link, sparse.hstack([sparse.csr_matrix((len(layers), nx)), count])]
            self.b_ub += [0.0] * nx + [float(max_distinct)] * len(layers)
            self.a_eq = sparse.hstack([self.a_eq, sparse.csr_matrix((num_heads, ny))])
            self.cost = np.concatenate([self.cost, np.zeros(ny)])
        self.a_ub = sparse.vstack(ub_rows, format="csr") if ub_rows else None
        self.b_ub = np.array(self.b_ub)

    def integer(self, time_limit: float, rel_gap: float) -> tuple[np.ndarray, float] | None:
        """Exact MILP over the kept candidates; None when infeasible."""
        if not np.isin(np.arange(self.num_heads), self.g).all():
            return None
        nvar = len(self.cost)
        constraints = [LinearConstraint(self.a_eq, 1.0, 1.0)]
        if self.a_ub is not None:
            constraints.append(LinearConstraint(self.a_ub, -np.inf, self.b_ub))
        # presolve costs more than it saves on these small restricted models
        res = milp(
            self.cost,
            constraints=constraints,
            integrality=np.ones(nvar),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit, "mip_rel_gap": rel_gap, "presolve": False},
        )
        if res.status == 2 or res.x is None:
            return None
        x = res.x[: len(self.g)] > 0.5
        choice = np.full(self.num_heads, -1)
        choice[self.g[x]] = self.c[x]
        bound = getattr(res, "mip_dual_bound", None)
        return choice, float(bound) if bound is not None and np.isfinite(bound) else -np.inf


def _dominated(values: np.ndarray, capacities: list[Capacity], sets: np.ndarray) -> np.ndarray:
    """(G, C) mask of candidates another candidate beats on every head of the same set.

    c' dominates c when it is no worse in loss (on every head of the set) and in every cap,
    and strictly better somewhere or equal with a lower index; replacing c by c' in the
    set never breaks a cap nor adds a distinct pattern, so c can be dropped.
    """
    num_heads, num_cands = values.shape
    if any(np.ndim(c.weights) != 1 for c in capacities):
        return np.zeros_like(values, bool)
    w = (
        np.stack([np.asarray(c.weights, float) for c in capacities])
        if capacities
        else np.zeros((0, num_cands))
    )
    w_le = (w[:, :, None] <= w[:, None, :]).all(axis=0)  # [c', c]
    w_lt = (w[:, :, None] < w[:, None, :]).any(axis=0)
    v = np.where(np.isfinite(values), values, np.inf)
    uniq, inverse = np.unique(sets, return_inverse=True)
    v_le = np.ones((len(uniq), num_cands, num_cands), bool)
    v_lt = np.zeros((len(uniq), num_cands, num_cands), bool)
    le = v[:, :, None] <= v[:, None, :]
    lt = v[:, :, None] < v[:, None, :]
    np.logical_and.at(v_le, inverse.ravel(), le)
    np.logical_or.at(v_lt, inverse.ravel(), lt)
    lower_index = np.arange(num_cands)[:, None] < np.arange(num_cands)[None, :]
    beats = v_le & w_le[None] & (v_lt | w_lt[None] | lower_index[None])
    diag = np.arange(num_cands)
    beats[:, diag, diag] = False  # a candidate never dominates itself
    return beats.any(axis=1)[inverse.ravel()]


def brute_force(
    values: np.ndarray,
    capacities: list[Capacity],
    layer_of: np.ndarray | None = None,
    max_distinct: int | None = None,
) -> tuple[np.ndarray, float] | None:
    """Enumerate every assignment (tests only: C**G grows fast); None when infeasible."""
    values = np.asarray(values, float)
    num_heads = values.shape[0]
    weights = [c.per_head(num_heads) for c in capacities]
    best: tuple[np.ndarray, float] | None = None
    options = [np.flatnonzero(np.isfinite(values[g])) for g in range(num_heads)]
    for combo in itertools.product(*options):
        choice = np.array(combo)
        if any(
            w[np.arange(num_heads), choice].sum() > c.limit * (1 + 1e-9)
            for w, c in zip(weights, capacities, strict=True)
        ):
            continue
        if (
            max_distinct is not None
            and layer_of is not None
            and any(len(set(choice[layer_of == lay])) > max_distinct for lay in np.unique(layer_of))
        ):
            continue
        total = float(values[np.arange(num_heads), choice].sum())
        if best is None or total < best[1]:
            best = (choice, total)
    return best
