"""Knapsack with a cap on distinct patterns per layer, by column generation.

Why not the plain MILP: linking each head to a per-layer "pattern used" flag makes the LP
relaxation weak and HiGHS needs tens of seconds on 32x8x40. Seen per layer instead, the
problem is "pick one whole-layer configuration per layer" under the byte caps: the master
LP over configurations prices the caps (duals ``lam``), each layer's best configuration at
those prices is found exactly by enumerating the <= K-subsets of candidates, and the
Lagrangian value ``sum_l min_config(v + lam.w) - lam.b`` is a certified lower bound. A
final MILP over the generated configurations gives the assignment; the gap is proven.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from moa_search.errors import MoaSearchError

BIG = 1e6  # penalty per unit of violated (scaled) cap in the master LP's phase one
MAX_ROUNDS = 60
TOP = 3  # configurations per layer offered to the final MILP


def solve_distinct(
    values: np.ndarray,
    weights: np.ndarray,
    limits: np.ndarray,
    layer_of: np.ndarray,
    max_distinct: int,
    time_limit: float = 20.0,
    rel_gap: float = 1e-6,
) -> tuple[np.ndarray, float, float] | None:
    """Return ``(choice, objective, lower_bound)``, or None when no assignment fits.

    ``weights``: (K, C) byte cost per candidate for each cap, ``limits``: (K,), both
    already scaled so limits are ~1.
    """
    deadline = time.perf_counter() + time_limit
    layers = [np.flatnonzero(layer_of == lay) for lay in np.unique(layer_of)]
    subsets = [_subsets(values[idx], max_distinct) for idx in layers]
    cols: list[list[np.ndarray]] = [[] for _ in layers]
    keys: list[set[bytes]] = [set() for _ in layers]

    def add(li: int, assign: np.ndarray) -> bool:
        key = assign.tobytes()
        if key in keys[li] or not np.isfinite(values[layers[li], assign]).all():
            return False
        keys[li].add(key)
        cols[li].append(assign)
        return True

    num_caps = len(limits)
    for li, idx in enumerate(layers):  # seed: cheapest per cap, and best loss, per layer
        for lam in [np.zeros(num_caps), *np.eye(num_caps) * 1e3]:
            add(li, _price(values[idx], weights, lam, subsets[li])[1])
    if not all(cols):  # some layer has no configuration within the cap at all
        return None
    best_lower = -np.inf
    for _ in range(MAX_ROUNDS):
        lam, mu, infeasible_lp = _master_lp(values, weights, limits, layers, cols)
        lower = -float(lam @ limits)
        added = 0
        for li, idx in enumerate(layers):
            cost, assign = _price(values[idx], weights, lam, subsets[li])
            lower += cost
            if cost < mu[li] - 1e-12 * max(1.0, abs(cost)):
                added += add(li, assign)
        if not infeasible_lp:
            best_lower = max(best_lower, lower)
        if not added or time.perf_counter() > deadline:
            break
    if infeasible_lp:
        return None
    for li, idx in enumerate(layers):  # near-best configurations at the final prices
        for assign in _price(values[idx], weights, lam, subsets[li], TOP)[1]:
            add(li, assign)
    picked = _master_milp(
        values, weights, limits, layers, cols, max(0.1, deadline - time.perf_counter()), rel_gap
    )
    if picked is None:
        return None
    choice = np.empty(values.shape[0], int)
    for li, idx in enumerate(layers):
        choice[idx] = cols[li][picked[li]]
    objective = float(values[np.arange(len(choice)), choice].sum())
    return choice, objective, min(best_lower, objective)


def _subsets(values: np.ndarray, k: int) -> np.ndarray:
    """All candidate subsets of size <= k usable on every head of the layer, as index rows."""
    usable = np.flatnonzero(np.isfinite(values).any(axis=0))
    rows = [
        list(s) + [s[-1]] * (k - len(s))
        for size in range(1, k + 1)
        for s in itertools.combinations(usable, size)
    ]
    return np.array(rows, int)


def _price(
    values: np.ndarray, weights: np.ndarray, lam: np.ndarray, subsets: np.ndarray, top: int = 1
):
    """Best configuration of one layer at prices ``lam``: (its priced cost, assignment).

    With ``top > 1``: the ``top`` best subsets' assignments (list) instead of one.
    """
    priced = values + (lam @ weights)[None, :]  # (H, C)
    per = priced[:, subsets]  # (H, S, k)
    arg = per.argmin(axis=2)
    best = np.take_along_axis(per, arg[..., None], 2)[..., 0].sum(axis=0)  # (S,)
    if top > 1:
        order = np.argsort(best)[:top]
        return float(best[order[0]]), [subsets[s][arg[:, s]] for s in order]
    s = int(np.argmin(best))
    return float(best[s]), subsets[s][arg[:, s]]


def _columns(values, weights, layers, cols):
    costs, wcols, rows = [], [], []
    for li, idx in enumerate(layers):
        for assign in cols[li]:
            costs.append(values[idx, assign].sum())
            wcols.append(weights[:, assign].sum(axis=1))
            rows.append(li)
    return np.array(costs), np.array(wcols).T, np.array(rows)


def _master_lp(values, weights, limits, layers, cols):
    costs, w, rows = _columns(values, weights, layers, cols)
    n, k = len(costs), len(limits)
    c = np.concatenate([costs, np.full(k, BIG)])
    a_eq = sparse.hstack(
        [
            sparse.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(len(layers), n)),
            sparse.csr_matrix((len(layers), k)),
        ]
    )
    a_ub = sparse.hstack([sparse.csr_matrix(w), -sparse.identity(k)])
    res = linprog(
        c,
        A_ub=a_ub,
        b_ub=limits,
        A_eq=a_eq,
        b_eq=np.ones(len(layers)),
        bounds=(0, None),
        method="highs",
    )
    if res.status != 0:
        raise MoaSearchError(f"distinct-cap master LP failed ({res.message})")
    lam = np.maximum(-res.ineqlin.marginals, 0.0)
    slack = res.x[n:]
    return lam, res.eqlin.marginals, bool((slack > 1e-9).any())


def _master_milp(values, weights, limits, layers, cols, time_limit, rel_gap):
    costs, w, rows = _columns(values, weights, layers, cols)
    n = len(costs)
    one = sparse.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(len(layers), n))
    res = milp(
        costs,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one, 1, 1),
            LinearConstraint(sparse.csr_matrix(w), -np.inf, limits),
        ],
        options={"time_limit": time_limit, "mip_rel_gap": rel_gap},
    )
    if res.x is None:
        return None
    chosen = np.flatnonzero(res.x > 0.5)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cols])])
    return [int(chosen[rows[chosen] == li][0] - offsets[li]) for li in range(len(layers))]
