"""One Optuna trial: choose what the profile cannot decide, solve the knapsack, score the plan.

Why Optuna on top of an exact solver: the knapsack is exact only for fixed weights over the
profiled lengths, fixed byte caps and a fixed candidate set, and the profile cannot say
which of those generalises to longer text. Each trial picks them (length weights, the share
of each byte budget it uses, the sink size, a cap on distinct patterns per layer, the
allowed families), the solver returns the best plan for that choice, and the objectives
(loss, KV memory, KV bytes read) place it on the Pareto front.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna

from moa_search.errors import MoaSearchError
from moa_search.plan import Plan
from moa_search.search.budget import Budget
from moa_search.search.costs import Problem
from moa_search.search.knapsack import Capacity, Infeasible, smallest_total, solve

DISTINCT_CHOICES = (0, 1, 2)  # 0 = no cap on distinct patterns per layer (MoA uses <= 2)
TRIAL_SOLVE_LIMIT_S = 2.0  # a trial reports the certified gap it reached by then
#: the kinds the Pareto front spans (a latency cap is always the user's: budget.KINDS has it)
FRONT_KINDS = ("memory", "bandwidth")
#: user attribute naming the process that runs a trial, so a rerun can tell a trial left
#: RUNNING by a killed process (an orphan) from one another live worker is running
WORKER_ATTR = "worker"


def worker_id() -> dict[str, object]:
    """This process as a trial's owner: host name and process id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True)
class UserCap:
    """The user's budget as one byte cap per sequence on one kind at one length."""

    kind: str
    length: int
    limit: float
    budget: Budget

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.length}"


def user_caps(problem: Problem, budgets: list[Budget]) -> list[UserCap]:
    """Fractions apply at every planned length; absolute bytes at their length (or the longest)."""
    caps = []
    for b in budgets:
        lengths = problem.lengths if b.is_fraction else [b.length or max(problem.lengths)]
        caps += [UserCap(b.kind, n, b.cap(problem.dense_cost(b.kind, n)), b) for n in lengths]
    return caps


def check_feasible(problem: Problem, caps: list[UserCap]) -> None:
    """One-line error naming the smallest feasible budget when a cap cannot be met."""
    values = problem.loss.min(axis=2)
    for cap in caps:
        least = smallest_total(
            values, Capacity(cap.name, problem.bytes_per_head(cap.kind, cap.length), 0)
        )
        if least > cap.limit * (1 + 1e-9):
            raise MoaSearchError(
                f"budget {cap.budget.text()} is infeasible at {cap.length} tokens: the smallest "
                f"feasible {cap.kind} budget with these patterns is "
                f"{_describe(least, cap, problem)}"
            )
    try:
        solve(
            values,
            [Capacity(c.name, problem.bytes_per_head(c.kind, c.length), c.limit) for c in caps],
        )
    except Infeasible:
        mem = [c for c in caps if c.kind == "memory"]
        bw = [c for c in caps if c.kind == "bandwidth"]
        if not mem or not bw or any(c.kind == "latency" for c in caps):
            raise MoaSearchError(
                f"budgets {', '.join(sorted({c.budget.text() for c in caps}))} cannot hold at "
                f"all planned lengths ({', '.join(str(c.length) for c in caps)}) together"
            ) from None
        least = _least_bandwidth(problem, mem, bw[0].length)
        raise MoaSearchError(
            f"budgets {', '.join(sorted({c.budget.text() for c in caps}))} cannot hold together: "
            f"under the memory budget the smallest feasible bandwidth budget is "
            f"{_describe(least, bw[0], problem)}"
        ) from None


def _least_bandwidth(problem: Problem, mem: list[UserCap], length: int) -> float:
    cost = problem.bytes_per_head("bandwidth", length)
    values = np.broadcast_to(cost, problem.loss.shape[:2]).copy()
    values[~np.isfinite(problem.loss.min(axis=2))] = np.inf
    caps = [Capacity(c.name, problem.bytes_per_head(c.kind, c.length), c.limit) for c in mem]
    return solve(values, caps, rel_gap=1e-6).objective


def _describe(least: float, cap: UserCap, problem: Problem) -> str:
    if cap.budget.is_fraction:
        return f"{cap.kind}={least / problem.dense_cost(cap.kind, cap.length):.4f} (of dense)"
    if cap.kind == "latency":
        return f"latency={least:.1f}us@{cap.length},batch={cap.budget.batch}"
    total = least * cap.budget.batch
    return f"{cap.kind}={total / 2**30:.3f}GiB@{cap.length},batch={cap.budget.batch}"


@dataclass
class TrialOutcome:
    """What one trial produced (also stored as trial user attributes)."""

    choice: np.ndarray
    predicted: float
    memory: float
    read: float
    gap: float
    seconds: float


class TrialRunner:
    """Callable objective for ``study.optimize``; returns (loss, memory, bytes read)."""

    def __init__(
        self, problem: Problem, caps: list[UserCap], measure: Callable[[Plan], float] | None = None
    ):
        self.problem = problem
        self.caps = caps
        self.measure = measure
        self.report_length = max(problem.lengths)
        self.sinks = sorted({int(s) for s in problem.sinks if s >= 0})
        self.families = sorted({f for f in problem.families if f != "dense"})
        self.has_dense = "dense" in set(problem.families)
        lengths = {*problem.lengths, *(c.length for c in caps)}
        wanted = {(k, n) for k in FRONT_KINDS for n in lengths} | {(c.kind, c.length) for c in caps}
        self.cost = {(k, n): problem.bytes_per_head(k, n) for k, n in wanted}

    # --- search space -----------------------------------------------------------------
    def suggest(
        self, trial: optuna.Trial
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float], int | None]:
        """Length weights, allowed-candidate mask, budget shares and distinct cap."""
        p = self.problem
        if len(p.lengths) > 1:
            w = np.array([trial.suggest_float(f"weight_{n}", 0.0, 1.0) for n in p.lengths])
            w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
        else:
            w = np.ones(1)
        allowed = np.ones(len(p.patterns), bool)
        if len(self.sinks) > 1:
            sink = trial.suggest_categorical("sink", self.sinks)
            allowed &= (p.sinks < 0) | (p.sinks == sink)
        if len(self.families) + self.has_dense > 1:
            chosen = [
                f for f in self.families if trial.suggest_categorical(f"use_{f}", [True, False])
            ]
            if not chosen:
                chosen = self.families
            allowed &= np.isin(p.families, [*chosen, "dense"])
        shares = {k: trial.suggest_float(f"share_{k}", 0.0, 1.0) for k in FRONT_KINDS}
        distinct = None
        if p.identity.num_key_value_heads > 1:
            distinct = trial.suggest_categorical("max_distinct", list(DISTINCT_CHOICES)) or None
        return w, allowed, shares, distinct

    def capacities(self, values: np.ndarray, shares: dict[str, float]) -> list[Capacity]:
        """Trial caps between the cheapest plan (share 0) and the user budget (share 1);
        a latency cap is always the user's (the front spans memory and bytes read)."""
        caps = []
        targets = [(c.kind, c.length, c.limit) for c in self.caps]
        for kind in FRONT_KINDS:
            if not any(c.kind == kind for c in self.caps):
                targets.append((kind, self.report_length, None))
        for kind, n, limit in targets:
            cost = self.cost[(kind, n)]
            least = smallest_total(values, Capacity("", cost, 0))
            most = float(np.where(np.isfinite(values), cost, -np.inf).max(axis=1).sum())
            hi = most if limit is None else min(limit, most)
            if least > hi * (1 + 1e-9):
                raise optuna.TrialPruned(f"{kind}@{n}: allowed patterns cannot meet the budget")
            share = shares.get(kind, 1.0)
            caps.append(Capacity(f"{kind}@{n}", cost, least + share * (hi - least)))
        return caps

    # --- objective --------------------------------------------------------------------
    def run(self, trial: optuna.Trial) -> TrialOutcome:
        w, allowed, shares, distinct = self.suggest(trial)
        p = self.problem
        values = np.where(allowed[None, :], p.loss @ w, np.inf)
        caps = self.capacities(values, shares)
        try:
            sol = solve(values, caps, p.layer_of(), distinct, time_limit=TRIAL_SOLVE_LIMIT_S)
        except Infeasible as exc:
            raise optuna.TrialPruned(str(exc)) from None
        rows = np.arange(p.num_heads)
        n = self.report_length
        li = p.lengths.index(n)
        dense = p.dense_bytes(n)
        return TrialOutcome(
            choice=sol.choice,
            predicted=float(p.loss[rows, sol.choice, li].sum()),
            memory=p.choice_bytes("memory", n, sol.choice) / dense,
            read=p.choice_bytes("bandwidth", n, sol.choice) / dense,
            gap=sol.gap,
            seconds=sol.seconds,
        )

    def within_budget(self, choice: np.ndarray) -> bool:
        """Whether a plan meets every user cap (recomputed, not assumed)."""
        return all(
            self.problem.choice_bytes(c.kind, c.length, choice) <= c.limit * (1 + 1e-9)
            for c in self.caps
        )

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        start = time.perf_counter()
        trial.set_user_attr(WORKER_ATTR, worker_id())
        out = self.run(trial)
        measured = None
        if self.measure is not None:
            measured = self.measure(self.problem.plan(out.choice))
        trial.set_user_attr(
            "result",
            {  # one attribute = one storage write
                "choice": ",".join(map(str, out.choice.tolist())),
                "predicted_loss": out.predicted,
                "measured_loss": measured,
                "solver_gap": out.gap,
                "solver_s": out.seconds,
                "trial_s": time.perf_counter() - start,
                "within_budget": self.within_budget(out.choice),
            },
        )
        loss = measured if measured is not None else out.predicted
        return loss, out.memory, out.read
