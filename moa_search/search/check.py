"""The search checks its own plans: measure them for real, refine, report the fidelity.

Why: the knapsack adds up single-head effects measured with every other head dense, and
those do not simply add up (two heads may back each other up; a head may matter more once
its neighbours are windowed). So the best plans of the front are run for real on held-out
calibration samples (every task); then, with the current plan in place, the heads that
matter are re-measured for every candidate, their values replaced by these conditional
effects, the knapsack re-solved, and the loop stops when the measured objective stops
improving. Then, while the plan is measured worse than the uniform window on some task
family, that family's weight is raised and the values re-solved (balance). Plan-level
fidelity is the Spearman correlation of predicted vs measured objective over random plans
within the budget.

Measured here = the same quantity the profile stores: KL(dense || plan) per scored token,
mean per task family, weighted; plus the NLL change (reported as a perplexity ratio) and
the share of retrieval answers the plan still reproduces exactly under teacher forcing
(which is what greedy decoding of the answer would produce).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from moa_search.errors import MoaSearchError
from moa_search.evaluate.baselines import DEFAULT_SINK, baseline_method
from moa_search.objective import TASKS
from moa_search.patterns import Dense, Pattern
from moa_search.profile.ablation import FIDELITIES, Ablation, AblationEngine, BaseRun
from moa_search.profile.calib import Sample
from moa_search.search.costs import Problem
from moa_search.search.knapsack import Capacity, Infeasible, solve
from moa_search.search.study import UserCap

PlanHeads = Sequence[Sequence[Pattern]] | Mapping[int, Sequence[Sequence[Pattern]]]
HELD_OUT_SEED = 7919  # held-out calibration samples: another seed than any profile's
RETRIEVAL = "retrieval"  # the family whose answers a plan must keep wherever dense gets them


@dataclass(frozen=True)
class CheckConfig:
    """How plans are checked: held-out samples per planned length, refinement rounds and
    heads re-measured per round, front plans measured, random plans for the fidelity."""

    samples: int = 8
    rounds: int = 3
    heads: int = 12
    front: int = 5
    random_plans: int = 20
    fidelity: str = "scored"  # of the re-measure only; whole plans are always run exactly
    row_batch: int = 64
    max_scored: int = 128
    balance: int = 4  # re-weighting steps against the uniform window (0: off)
    time_limit: float | None = None  # seconds: refine / balance / fidelity stop when spent
    device: str = "cpu"  # where a model given by name is loaded
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("samples", "row_batch"):
            if int(getattr(self, name)) < 1:
                raise MoaSearchError(f"check.{name}: expected a positive integer")
        if self.fidelity not in FIDELITIES:
            raise MoaSearchError(
                f"check.fidelity: expected one of {', '.join(FIDELITIES)}, got {self.fidelity!r}"
            )
        if self.time_limit is not None and not self.time_limit > 0:
            raise MoaSearchError("check.time_limit: expected a positive number of seconds")
        for name in ("rounds", "heads", "front", "random_plans", "max_scored", "balance"):
            if int(getattr(self, name)) < 0:
                raise MoaSearchError(f"check.{name}: expected 0 or more")


@dataclass
class Measured:
    """One plan measured on the held-out samples."""

    objective: float
    by_task: dict[str, dict[str, float]]  # task -> kl, dnll, ppl_ratio, match, n (over lengths)

    def as_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "tasks": self.by_task}


@dataclass
class CheckReport:
    """What the check did: the plans it measured, the refinement history, the fidelity."""

    choice: np.ndarray
    start: dict[str, Any]
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    front: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    fidelity: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    stopped: list[str] = field(default_factory=list)  # stages cut short by the time limit

    def verdict(self) -> list[dict[str, Any]]:
        """The checked plan against each uniform baseline at the same budget, measured."""
        out = []
        for b in self.baselines:
            mine, theirs = self.final["measured_by_task"], b["measured_by_task"]
            out.append(
                {
                    "baseline": b["pattern"],
                    "objective": [self.final["measured"], b["measured"]],
                    "plan_lower_divergence": bool(self.final["measured"] < b["measured"]),
                    "plan_no_worse_on": sorted(
                        t for t in mine if t in theirs and mine[t]["kl"] <= theirs[t]["kl"]
                    ),
                    "tasks": {
                        t: {
                            "plan_kl": mine[t]["kl"],
                            "baseline_kl": theirs[t]["kl"],
                            "plan_match": mine[t]["match"],
                            "baseline_match": theirs[t]["match"],
                        }
                        for t in mine
                        if t in theirs
                    },  # fmt: skip
                }
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict(),
            "start": self.start,
            "final": self.final,
            "history": self.history,
            "front": self.front,
            "baselines": self.baselines,
            "fidelity": self.fidelity,
            "seconds": self.seconds,
            "stopped_by_time_limit": self.stopped,
        }


def held_out_samples(
    model: Any, tokenizer: Any, lengths: Sequence[int], n: int, mix: Mapping[str, float]
) -> dict[int, list[Sample]]:
    """Calibration-split samples the profile did not see (another seed), per length."""
    from moa_search.profile.calib import load_samples  # noqa: PLC0415

    return {
        length: load_samples(None, tokenizer, length, n, HELD_OUT_SEED, "answer", dict(mix), model)
        for length in lengths
    }


def _mean_by_length(rows: Sequence[tuple], column: int, lengths: Sequence[int]) -> dict[str, float]:
    return {
        str(n): float(np.mean(v)) for n in lengths if (v := [r[column] for r in rows if r[0] == n])
    }


class PlanChecker:
    """Measures whole plans (and one-head changes of them) against the dense model."""

    def __init__(
        self,
        model: torch.nn.Module,
        problem: Problem,
        samples: Mapping[int, Sequence[Sample]],
        config: CheckConfig,
        progress: bool = True,
    ):
        self.problem = problem
        self.config = config
        self.progress = progress
        self.engine = AblationEngine(model, config.fidelity, config.row_batch, config.max_scored)
        self.samples = {n: list(samples[n]) for n in problem.lengths}
        self.weights = problem.weights or {"text": 1.0}
        self._dense: dict[int, list[BaseRun]] = {}
        self._cache: dict[str, Measured] = {}
        self._refined: dict[str, np.ndarray] | None = None  # per-task values after refine
        self.cut_short = False  # the last re-measure stopped early (time limit)
        #: seconds held back from the limit for the stages still to come (see check_plans)
        self.reserve = 0.0
        limit = config.time_limit
        self._deadline = time.monotonic() + limit if limit else math.inf

    def out_of_time(self) -> bool:
        """Whether the check's time limit, less :attr:`reserve`, is spent (the stages then
        keep what they have)."""
        return time.monotonic() + self.reserve > self._deadline

    # --- measuring ----------------------------------------------------------------
    def _heads(self, choice: np.ndarray) -> list[list[Pattern]]:
        return self.problem.plan(choice).heads

    def _dense_runs(self, n: int) -> list[BaseRun]:
        """The dense reference of every held-out sample of length ``n`` (batched, once)."""
        if n not in self._dense:
            samples = self.samples[n]
            self._dense[n] = self.engine.references(
                [s.input_ids for s in samples], [s.loss_mask for s in samples]
            )
        return self._dense[n]

    def _runs(self, heads: PlanHeads):
        for n in self.problem.lengths:
            at_n = heads[n] if isinstance(heads, Mapping) else heads
            for s, ref in zip(self.samples[n], self._dense_runs(n), strict=True):
                yield n, s, self.engine.prepare(s.input_ids, s.loss_mask, at_n, reference=ref)

    def _summarise(self, per_sample: list[tuple[int, str, float, float, float, float]]) -> Measured:
        """(length, task, kl, dnll, match, dense match) rows -> objective and per-task means."""
        by_task: dict[str, dict[str, float]] = {}
        objective = 0.0
        lengths = self.problem.lengths
        for t in TASKS:
            rows = [r for r in per_sample if r[1] == t]
            if not rows:
                continue
            kl_at = _mean_by_length(rows, 2, lengths)
            dnll = float(np.mean([r[3] for r in rows]))
            by_task[t] = {
                "kl": float(np.mean(list(kl_at.values()))),
                "kl_by_length": kl_at,
                "dnll": dnll,
                "ppl_ratio": float(math.exp(dnll)),
                "match": float(np.mean([r[4] for r in rows])),
                "match_by_length": _mean_by_length(rows, 4, lengths),
                "dense_match_by_length": _mean_by_length(rows, 5, lengths),
                "n": len(rows),
            }
            objective += self.weights.get(t, 0.0) * by_task[t]["kl"]
        return Measured(objective, by_task)

    def measure(self, choice: np.ndarray) -> Measured:
        """The whole plan on every held-out sample (cached by plan)."""
        key = hashlib.sha1(np.asarray(choice, np.int64).tobytes()).hexdigest()
        if key not in self._cache:
            self._cache[key] = self.measure_heads(self._heads(choice))
        return self._cache[key]

    def measure_heads(self, heads: PlanHeads) -> Measured:
        """A plan given as per-layer patterns (e.g. a uniform baseline), or as a mapping
        length -> per-layer patterns for a baseline rebuilt at every length."""
        rows = []
        for n in self.problem.lengths:
            at_n = heads[n] if isinstance(heads, Mapping) else heads
            refs = self._dense_runs(n)
            logps = self.engine.plan_logp(
                [r.input_ids for r in refs], [r.scored for r in refs], at_n
            )
            for s, ref, logp in zip(self.samples[n], refs, logps, strict=True):
                kl, dnll, match = AblationEngine.compare(ref, logp[None])
                rows.append((n, s.task, kl[0], dnll[0], float(match[0]), float(ref.ref_match)))
        return self._summarise(rows)

    def neighbours(self, g: int, current: int, width: int = 2) -> list[int]:
        """Candidates re-measured for head ``g``: the current one, dense, and the ``width``
        next cheaper and next costlier ones by KV memory (a local search step)."""
        p = self.problem
        ok = [c for c in range(len(p.patterns)) if np.isfinite(p.loss[g, c]).all()]
        cost = p.head_costs("memory", min(p.lengths))[g]
        order = sorted(ok, key=lambda c: (cost[c], c))
        i = order.index(current) if current in order else 0
        near = order[max(0, i - width) : i + width + 1]
        dense = [c for c in ok if isinstance(p.patterns[c], Dense)]
        return sorted(set(near + dense))

    def conditional(self, choice: np.ndarray, heads: Sequence[int]) -> dict[str, np.ndarray]:
        """Per task family and re-measured head, (candidates, lengths) values: the divergence
        of the plan with that head switched to each nearby candidate, minus with it dense
        (clipped at 0, as the profile's values are); candidates not re-measured stay ``nan``
        (keep their old value). Kept per task so the balance step can re-weight them.

        When the time limit is spent mid-way, the samples measured so far (at least one)
        are used and :attr:`cut_short` is set: one round on a large model can take
        minutes."""
        p = self.problem
        n_kv = p.identity.num_key_value_heads
        rows, where = [], []
        for gi, g in enumerate(heads):
            for c in self.neighbours(g, int(choice[g])):
                rows.append(Ablation(g // n_kv, g % n_kv, p.patterns[c]))
                where.append((gi, c))
        dense_rows = [Ablation(g // n_kv, g % n_kv, Dense()) for g in heads]
        per: dict[tuple[int, int, int, str], list[float]] = {}
        total = sum(len(v) for v in self.samples.values())
        runs = tqdm(
            self._runs(self._heads(choice)), total=total, desc=f"re-measure {len(rows)} rows",
            leave=False, disable=not self.progress,
        )  # fmt: skip
        self.cut_short = False
        for n, s, run in runs:
            if per and self.out_of_time():
                self.cut_short = True
                break
            kl = self.engine.effects(run, rows + dense_rows).kl.numpy()
            base = kl[len(rows) :]
            for (gi, c), row_kl in zip(where, kl[: len(rows)], strict=True):
                per.setdefault((gi, c, n, s.task), []).append(row_kl - base[gi])
        shape = (len(heads), len(p.patterns), len(p.lengths))
        out = {t: np.full(shape, np.nan) for t in self.weights}
        for gi, c in where:
            for li, n in enumerate(p.lengths):
                for t, values in out.items():
                    if vals := per.get((gi, c, n, t)):
                        values[gi, c, li] = max(float(np.mean(vals)), 0.0)
        return out

    def _task_values(self) -> dict[str, np.ndarray]:
        """The profile's values per task family the check weighs (``inf`` = not allowed)."""
        p = self.problem
        allowed = np.isfinite(p.loss)
        return {
            t: np.where(allowed, p.task_loss.get(t, p.loss), np.inf) if p.task_loss else p.loss
            for t in self.weights
        }

    # --- refinement ---------------------------------------------------------------
    def _solve(self, values: np.ndarray, caps: Sequence[UserCap]) -> np.ndarray:
        p = self.problem
        capacities = [Capacity(c.name, p.bytes_per_head(c.kind, c.length), c.limit) for c in caps]
        return solve(values, capacities, rel_gap=1e-4).choice

    def _pick(self, values: np.ndarray, choice: np.ndarray, seen: set[int]) -> list[int]:
        """Heads most worth re-measuring: the costliest windowed heads of the plan and the
        dense heads whose cheapest alternative looks least harmful; unseen ones first."""
        k = self.config.heads
        rows = np.arange(len(choice))
        here = values[rows, choice]
        dense = np.array([isinstance(self.problem.patterns[c], Dense) for c in choice])
        sparse_order = [int(g) for g in np.argsort(-here) if not dense[g]]
        alt = np.where(np.isfinite(values), values, np.inf)
        alt[:, [i for i, pt in enumerate(self.problem.patterns) if isinstance(pt, Dense)]] = np.inf
        dense_order = [int(g) for g in np.argsort(alt.min(1)) if dense[g]]

        def fresh(order: list[int]) -> list[int]:
            return [g for g in order if g not in seen] + [g for g in order if g in seen]

        sparse_first, dense_first = fresh(sparse_order), fresh(dense_order)
        n_dense = min(k // 2, len(dense_first))
        picked = dense_first[:n_dense] + sparse_first[: k - n_dense]
        if len(picked) < k:
            picked += [g for g in dense_first if g not in picked][: k - len(picked)]
        return sorted(set(picked))

    def refine(
        self, choice: np.ndarray, caps: Sequence[UserCap], length_weights: np.ndarray
    ) -> CheckReport:
        """Re-measure the heads that matter with the plan in place, re-solve, keep the best
        measured plan; stops when the measured objective stops improving."""
        values = self._task_values()
        best = np.asarray(choice)
        best_m = self.measure(best)
        report = CheckReport(best, self.describe(best, best_m), {})
        seen: set[int] = set()
        bar = tqdm(range(self.config.rounds), desc="refine", disable=not self.progress)
        for r in bar:
            if self.out_of_time():
                if "refine" not in report.stopped:
                    report.stopped.append("refine")
                break
            heads = self._pick(self._combine(values, self.weights, length_weights), best, seen)
            if not heads:
                break
            seen.update(heads)
            for t, fresh in self.conditional(best, heads).items():
                values[t][heads] = np.where(np.isnan(fresh), values[t][heads], fresh)
            if self.cut_short and "refine" not in report.stopped:
                report.stopped.append("refine")
            try:
                new = self._solve(self._combine(values, self.weights, length_weights), caps)
            except Infeasible:
                break
            m = self.measure(new)
            step = {
                "round": r + 1,
                "heads": heads,
                "changed_heads": int((new != best).sum()),
                "measured": m.objective,
                "accepted": bool(m.objective < best_m.objective),
            }
            if self.cut_short:
                step["re_measure_cut_short"] = True
            report.history.append(step)
            bar.set_postfix(objective=f"{min(m.objective, best_m.objective):.4g}")
            if step["changed_heads"] == 0:
                continue  # these heads are placed right; the next round looks at others
            if not step["accepted"]:
                break  # the measured objective stopped improving: keep the best measured
            best, best_m = new, m
        bar.close()
        self._refined = values
        report.choice = best
        report.final = self.describe(best, best_m)
        return report

    # --- balance against the uniform window --------------------------------------
    def _losses(self, m: Measured, baselines: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
        """(task family, length) cells, of families with weight, where a measured plan
        diverges more than a baseline. A baseline measured without per-length values is
        compared on the family mean, and a loss there counts at every length."""
        lost = set()
        for b in baselines:
            for t, row in m.by_task.items():
                theirs = b["measured_by_task"].get(t)
                if self.weights.get(t, 0.0) <= 0 or theirs is None:
                    continue
                at = theirs.get("kl_by_length")
                for n in self.problem.lengths:
                    key = str(n)
                    if at is None or key not in at or key not in row.get("kl_by_length", {}):
                        worse = row["kl"] > theirs["kl"]
                    else:
                        worse = row["kl_by_length"][key] > at[key]
                    if worse:
                        lost.add((t, n))
        return sorted(lost | set(self._answers_lost(m)))

    def _answers_lost(self, m: Measured) -> list[tuple[str, int]]:
        """(retrieval, length) cells where the plan reproduces fewer retrieval answers than
        the dense model does: a uniform window loses them all, so beating it says nothing
        about the answers a plan drops that dense gets right."""
        row = m.by_task.get(RETRIEVAL)
        if row is None or self.weights.get(RETRIEVAL, 0.0) <= 0:
            return []
        mine, dense = row.get("match_by_length", {}), row.get("dense_match_by_length", {})
        return [
            (RETRIEVAL, n)
            for n in self.problem.lengths
            if str(n) in mine and str(n) in dense and mine[str(n)] < dense[str(n)] - 1e-9
        ]

    def _combine(
        self,
        values: Mapping[str, np.ndarray],
        weights: Mapping[str, np.ndarray],
        length_weights: np.ndarray,
    ) -> np.ndarray:
        """(heads, candidates) values: per-task (heads, candidates, lengths) values weighted
        per task (a number, or one per length) and by ``length_weights`` (``inf`` where a
        candidate is not allowed)."""
        total = sum(
            (values[t] * (np.asarray(w, float) * length_weights)).sum(-1)
            for t, w in weights.items()
            if np.any(np.asarray(w) > 0)
        )
        return np.where(np.isfinite(total), total, np.inf)

    def _weights_record(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Task weights for the report: one number per task, or one per length once the
        balance has raised a task at some lengths only."""
        out: dict[str, Any] = {}
        for t, w in weights.items():
            w = np.asarray(w, float)
            same = np.allclose(w, w[0])
            out[t] = (
                float(w[0]) if same else {str(n): float(x) for n, x in zip(self.problem.lengths, w)}
            )
        return out

    def balance(
        self,
        report: CheckReport,
        caps: Sequence[UserCap],
        length_weights: np.ndarray,
        baselines: Sequence[Mapping[str, Any]],
    ) -> None:
        """Make the checked plan no worse than the uniform baselines on any task family at
        any planned length, keeping every retrieval answer the dense model gets right.

        Why: one weighted sum lets a plan buy a large retrieval win with a small loss on
        text, and then it loses to a uniform window on perplexity. Why per length: the
        budget binds at the shortest length, and a plan can win there and still lose at a
        longer one, where the window matched to its memory is longer; raising the weight of
        that (task, length) cell is what moves memory to the heads that grow with the
        context (elastic spans). While the plan is measured worse than a baseline on some
        cell, that cell's weight is doubled and the (refined) values re-solved; a new plan
        is kept when it loses on fewer cells, or on as many with a lower objective at the
        user's weights."""
        values = self._refined if self._refined is not None else self._task_values()
        n_len = len(self.problem.lengths)
        weights = {t: np.full(n_len, float(w)) for t, w in self.weights.items()}
        best = np.asarray(report.choice)
        best_m = self.measure(best)
        lost = self._losses(best_m, baselines)
        solved_with = self._weights_record(weights)
        weighted = {(t, n) for t, w in self.weights.items() if w > 0 for n in self.problem.lengths}
        li = {n: i for i, n in enumerate(self.problem.lengths)}
        for step in range(self.config.balance):
            if not lost or weighted <= set(lost):
                break  # nothing to win back, or losing everywhere: re-weighting changes nothing
            if self.out_of_time():
                report.stopped.append("balance")
                break
            for t, n in lost:
                weights[t][li[n]] *= 2.0
            try:
                new = self._solve(self._combine(values, weights, length_weights), caps)
            except Infeasible:
                break
            m = self.measure(new)
            new_lost = self._losses(m, baselines)
            accepted = (len(new_lost), m.objective) < (len(lost), best_m.objective)
            report.history.append(
                {
                    "balance": step + 1,
                    "weights": self._weights_record(weights),
                    "changed_heads": int((new != best).sum()),
                    "measured": m.objective,
                    "worse_than_baseline": [f"{t}@{n}" for t, n in new_lost],
                    "accepted": bool(accepted),
                }
            )
            if accepted:
                best, best_m, lost = new, m, new_lost
                solved_with = self._weights_record(weights)
        report.choice = best
        report.final = {**self.describe(best, best_m), "solved_with_weights": solved_with}

    def describe(self, choice: np.ndarray, m: Measured) -> dict[str, Any]:
        p = self.problem
        n = max(p.lengths)
        li = p.lengths.index(n)
        rows = np.arange(p.num_heads)
        return {
            "predicted": float(p.loss[rows, choice, li].sum()),
            "predicted_by_task": p.predicted_by_task(choice, li),
            "measured": m.objective,
            "measured_by_task": m.by_task,
            "memory_density": {
                str(x): p.choice_bytes("memory", x, choice) / p.dense_bytes(x) for x in p.lengths
            },
        }

    # --- fidelity -----------------------------------------------------------------
    def fidelity(
        self, caps: Sequence[UserCap], length_weights: np.ndarray, seed: int = 0
    ) -> dict[str, Any]:
        """Spearman of predicted vs measured objective over random plans within budget."""
        n_plans = self.config.random_plans
        if n_plans < 3:
            return {}
        p = self.problem
        rng = np.random.default_rng(seed)
        values = p.loss @ length_weights
        records, stopped = [], False
        for _ in tqdm(range(n_plans), desc="plan fidelity", disable=not self.progress):
            if self.out_of_time():
                stopped = True
                break
            noisy = np.where(np.isfinite(values), rng.random(values.shape), np.inf)
            mix = rng.random()  # from random plans to nearly optimal ones
            trial = np.where(np.isfinite(values), mix * noisy + (1 - mix) * values, np.inf)
            try:
                choice = self._solve(trial, caps)
            except Infeasible:
                continue
            predicted = float(values[np.arange(p.num_heads), choice].sum())
            records.append({"predicted": predicted, "measured": self.measure(choice).objective})
        if len(records) < 3:
            return {"plans": len(records), "stopped": stopped}
        rho = spearmanr([r["predicted"] for r in records], [r["measured"] for r in records])
        return {
            "plans": len(records),
            "spearman": float(rho.statistic),
            "records": records,
            "stopped": stopped,
        }

    # --- baselines ----------------------------------------------------------------
    def uniform_window(self, fraction: float, choice: np.ndarray | None = None) -> dict[str, Any]:
        """The uniform window with sinks, measured like the plans, rebuilt at every planned
        length to the KV memory the plan ``choice`` holds there (to ``fraction`` without a
        plan), as eval rebuilds its baselines.

        Why per length: a budget binds at the shortest length, where a window's fraction of
        dense is largest; a plan's elastic and dense heads keep more at longer lengths, so a
        window fitted once at the shortest length holds less there than the plan, and the
        balance step then saw wins over it that eval, at equal memory, does not show."""
        p = self.problem
        heads, specs, density = {}, {}, {}
        for n in p.lengths:
            target = fraction
            if choice is not None:
                target = p.choice_bytes("memory", n, choice) / p.dense_bytes(n)
            # fitted to the fraction of what the model's own cache holds (sliding layers clip)
            plan = baseline_method("window", p.identity, n, target, 1.0, DEFAULT_SINK).plan
            heads[n], specs[str(n)] = plan.heads, plan.heads[0][0].spec()
            density[str(n)] = plan.memory_density(n)
        m = self.measure_heads(heads)
        return {
            "family": "window",
            "pattern": specs[str(min(p.lengths))],
            "patterns": specs,
            "budget": fraction,
            "memory_density": density,
            "measured": m.objective,
            "measured_by_task": m.by_task,
        }


class _Laps:
    """Wall seconds per stage, for check.json (where a slow check spends its time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


def check_plans(
    model: torch.nn.Module,
    tokenizer: Any,
    problem: Problem,
    caps: Sequence[UserCap],
    trials: Any,
    config: CheckConfig,
    progress: bool = True,
) -> CheckReport:
    """Measure the front's best plans (``trials``: the study's trials frame), refine the
    best measured one, then measure the fidelity and the uniform window at the budget.

    Held-out samples come from the built-in calibration mix (calibration split, another
    seed), whatever data the profile was made from."""
    from moa_search.profile.measured import MEASURED_MIX  # noqa: PLC0415

    within = trials[trials["pareto"] & trials["within_budget"]].sort_values("predicted_loss")
    if within.empty:
        raise MoaSearchError("check: no trial within budget to check (run more --trials)")
    lap = _Laps()
    samples = held_out_samples(model, tokenizer, problem.lengths, config.samples, MEASURED_MIX)
    lap("held_out_samples")
    checker = PlanChecker(model, problem, samples, config, progress)
    front, choices = [], []
    rows = within.head(max(1, config.front))
    bar = tqdm(rows.iterrows(), total=len(rows), desc="measure front", disable=not progress)
    for _, row in bar:
        choice = np.array([int(c) for c in row["choice"].split(",")])
        choices.append(choice)
        front.append(
            {"trial": int(row["number"]), **checker.describe(choice, checker.measure(choice))}
        )
    lap("front")
    start = min(range(len(front)), key=lambda i: front[i]["measured"])
    w = np.full(len(problem.lengths), 1 / len(problem.lengths))
    # Refinement may use the time limit only up to what the window baseline and the balance
    # steps will need (one whole-plan measure each, as long as a front plan took): without
    # this a tight limit spent everything on refinement and never compared the plan with
    # the window, the comparison the user judges it by.
    checker.reserve = (1 + config.balance) * lap.seconds["front"] / len(front)
    report = checker.refine(choices[start], caps, w)
    checker.reserve = 0.0
    lap("refine")
    report.start["trial"] = front[start]["trial"]
    report.front = front
    fractions = sorted(
        {c.budget.fraction for c in caps if c.kind == "memory" and c.budget.is_fraction}
    )
    report.baselines = [checker.uniform_window(f, report.choice) for f in fractions]
    lap("baselines")
    checker.balance(report, caps, w, report.baselines)
    lap("balance")
    report.fidelity = checker.fidelity(caps, w)
    lap("fidelity")
    if report.fidelity.pop("stopped", False):
        report.stopped.append("fidelity")
    report.seconds = lap.seconds
    return report
