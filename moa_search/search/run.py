"""``plan_search``: profile folder in, Pareto plans + best.yaml + tables + plots out.

Order matters for "nothing written half": every input is checked (profile, budgets,
lengths, families, model fingerprint, feasibility) before the output folder or the study
storage is touched; every file is written to a temp name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from sqlalchemy import event
from tqdm.auto import tqdm

from moa_search.errors import MoaSearchError
from moa_search.files import atomic_write as _atomic
from moa_search.objective import parse_weights
from moa_search.plan import ModelIdentity, save_plan
from moa_search.search.budget import parse_budgets
from moa_search.search.check import CheckConfig, check_plans
from moa_search.search.costs import Problem, build_problem, check_families
from moa_search.search.latency import pricing_for
from moa_search.search.pareto import OBJECTIVES, pareto_mask, pick_best, uniform_baselines
from moa_search.search.plots import plot_checked, plot_pareto, plot_plan_map
from moa_search.search.study import (
    WORKER_ATTR,
    TrialRunner,
    UserCap,
    check_feasible,
    user_caps,
    worker_id,
)
from moa_search.search.table import ProfileTable, load_profile

DEFAULT_PATTERNS = ("dense", "window", "elastic", "sparq")
SQLITE_TIMEOUT_S = 30.0  # how long a worker waits for a SQLite lock held by another
METHOD_VERSION = 1
OPEN_ATTEMPTS = 5


@dataclass
class SearchResult:
    """Where the outputs went and the trials table."""

    out: Path
    best: Path | None
    pareto_plans: list[Path]
    trials: pd.DataFrame
    study_name: str
    storage: str


@dataclass(frozen=True)
class SearchConfig:
    """What ``plan_search`` searches: built by the CLI ``plan`` command, stored in
    summary.json (``config``); the fields that shape results also name and guard the study.

    ``trials`` is the total the study should reach (a rerun resumes; several workers on one
    ``storage`` share the count). ``objective="measured"`` applies each plan to the model
    on ``val_samples`` held-out windows of ``val_length`` tokens (default 1.5x the longest
    profiled length); ``"predicted"`` uses the profile's predicted loss only.
    ``weights`` ("text=1,retrieval=1") weigh a measured profile's task families.
    ``costs`` is the measured cost table a ``latency=`` budget is priced with.
    ``check`` (needs the model) measures the best plans of the front on held-out
    calibration samples, refines the best one with conditional re-measurements and
    reports plan-level fidelity; ``best.yaml`` is then the checked plan (check.json says
    what was measured).
    """

    budgets: Sequence[str] | str = ("memory=0.25",)
    lengths: Sequence[int] | None = None
    trials: int = 200
    storage: str | None = None
    study_name: str | None = None
    patterns: Sequence[str] | str = DEFAULT_PATTERNS
    objective: str = "predicted"
    val_samples: int = 4
    val_length: int | None = None
    seed: int = 0
    sampler: str = "nsga2"
    weights: str | dict[str, float] | None = None
    check: CheckConfig | None = None
    #: cost table (``bench --calibrate-costs``) pricing a latency budget
    costs: str | None = None

    def stored(self) -> dict[str, Any]:
        """The config as summary.json records it (no storage password)."""
        out = asdict(self)
        out["storage"] = _safe(self.storage) if self.storage else None
        return out


def plan_search(
    profile_dir: str | os.PathLike[str],
    config: SearchConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
    **settings: Any,
) -> SearchResult:
    """Search per-KV-head plans for a profiled model under memory/bandwidth budgets.

    ``config`` says what (:class:`SearchConfig`); any of its fields may also be given as a
    keyword (``plan_search(profile, budgets=["memory=0.25"], trials=50)``), over ``config``.
    ``model`` (a name, path or loaded model; then pass ``tokenizer`` for a measured
    objective) is checked against the profile's fingerprint and runs measured trials and
    the check. Writes plans/, best.yaml, trials.parquet/csv, summary.json and plots to
    ``out`` (default PROFILE/plans).
    """
    cfg = replace(config or SearchConfig(), **settings)
    budgets, lengths, trials, storage = cfg.budgets, cfg.lengths, cfg.trials, cfg.storage
    objective, sampler, weights, check = cfg.objective, cfg.sampler, cfg.weights, cfg.check
    table = load_profile(profile_dir)
    families = check_families(cfg.patterns)
    if objective not in ("predicted", "measured"):
        raise MoaSearchError(f"objective must be 'predicted' or 'measured', got {objective!r}")
    if sampler not in ("nsga2", "tpe"):
        raise MoaSearchError(f"sampler must be 'nsga2' or 'tpe', got {sampler!r}")
    if not isinstance(trials, int) or trials < 1:
        raise MoaSearchError(f"trials must be a positive integer, got {trials!r}")
    parsed = parse_budgets(budgets)
    problem = build_problem(table, lengths, families, parse_weights(weights) if weights else None)
    problem.latency = pricing_for(parsed, cfg.costs, problem.identity)
    caps = user_caps(problem, parsed)
    check_feasible(problem, caps)
    if check is not None and model is None:
        raise MoaSearchError("check: checking plans needs the model (--model)")
    placement = (check.device, check.dtype) if check is not None else ("cpu", "float32")
    needs = "measured" if check is not None else objective
    loaded = _target_model(model, tokenizer, needs, table, placement)
    val_length = cfg.val_length or _default_val_length(problem.lengths)
    if objective == "measured" and val_length <= max(table.lengths):
        raise MoaSearchError(
            f"val_length {val_length} must exceed the longest profiled length "
            f"{max(table.lengths)} (validation checks that the plan generalises)"
        )
    study_settings = {
        "method_version": METHOD_VERSION,
        "profile": {k: table.meta.get(k) for k in ("calibration_hash", "method_version")},
        "fingerprint": table.identity.fingerprint,
        "lengths": problem.lengths,
        "budgets": [b.text() for b in parsed],
        "patterns": list(families),
        "objective": objective,
        "validation": [val_length, cfg.val_samples] if objective == "measured" else None,
        "weights": problem.weights or None,
    }
    if problem.latency is not None:  # only then, so older studies keep their settings
        costs_file = problem.latency.table.path.read_bytes()
        study_settings["costs"] = hashlib.sha256(costs_file).hexdigest()
    digest = hashlib.sha256(json.dumps(study_settings, sort_keys=True).encode()).hexdigest()[:10]
    out_dir = Path(out) if out is not None else table.path / "plans"
    study_name = cfg.study_name or f"plan-{digest}"
    created = not out_dir.exists()
    url = storage or f"sqlite:///{(out_dir / 'study.db').as_posix()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = _open_study(url, study_name, study_settings, cfg.seed, sampler)
    except BaseException:
        if created and storage is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    measure = None
    if objective == "measured":
        from moa_search.search.validation import ValidationLoss, validation_windows  # noqa: PLC0415

        windows = validation_windows(loaded[1], val_length, cfg.val_samples)
        measure = ValidationLoss(loaded[0], windows, out_dir / "val_cache")
    runner = TrialRunner(problem, caps, measure)
    _fail_orphans(study)
    _optimize(study, runner, trials, progress)
    report = None
    if check is not None:
        frame = _trials_frame(study)
        report = check_plans(loaded[0], loaded[1], problem, caps, frame, check, progress)
    return _write_outputs(study, runner, out_dir, url, cfg, report)


def _default_val_length(lengths: list[int]) -> int:
    return int(math.ceil(1.5 * max(lengths) / 64) * 64)


def _target_model(
    model: Any,
    tokenizer: Any,
    objective: str,
    table: ProfileTable,
    placement: tuple[str, str] = ("cpu", "float32"),
):
    """Load the model if needed and refuse a profile made for another model."""
    if model is None:
        if objective == "measured":
            raise MoaSearchError("objective 'measured' needs a model (name, path or loaded model)")
        return None
    if isinstance(model, (str, os.PathLike)):
        from moa_search.models import load_model, load_tokenizer  # noqa: PLC0415

        name = str(model)
        if objective == "measured":
            model = load_model(name, dtype=placement[1], device=placement[0])
            tokenizer = tokenizer or load_tokenizer(name)
        else:
            from moa_search.models import load_config  # noqa: PLC0415

            model = load_config(name)
    other = model if isinstance(model, ModelIdentity) else ModelIdentity.from_config(model)
    mine = table.identity
    if other.fingerprint != mine.fingerprint:
        raise MoaSearchError(
            f"{table.path / 'meta.json'}: model.fingerprint: profile was made for "
            f"{mine.name_or_path} ({mine.fingerprint}), target model {other.name_or_path} has "
            f"{other.fingerprint}"
        )
    if objective == "measured" and tokenizer is None:
        raise MoaSearchError("objective 'measured' with a loaded model needs its tokenizer")
    return model, tokenizer


def _open_study(url: str, name: str, settings: dict, seed: int, sampler: str) -> optuna.Study:
    """Create or resume the study; one-line errors for corrupt/locked storage or a clash."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    chosen = (
        optuna.samplers.NSGAIISampler(seed=seed)
        if sampler == "nsga2"
        else optuna.samplers.TPESampler(seed=seed, multivariate=True)
    )
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with _opening_lock(url):
                store = _rdb_storage(url, kwargs)
                study = optuna.create_study(
                    storage=store,
                    study_name=name,
                    sampler=chosen,
                    directions=["minimize"] * 3,
                    load_if_exists=True,
                )
                stored = study.user_attrs.get("settings")
                if stored is None:
                    study.set_user_attr("settings", settings)
            break
        except Exception as exc:
            # workers starting together race to create the schema (IntegrityError on a
            # fresh PostgreSQL database, "table ... already exists" or "database is
            # locked" on SQLite, whose busy handler is skipped when a reader must upgrade
            # to a writer): the loser retries and finds the tables made
            text = str(exc)
            racing = type(exc).__name__ in ("IntegrityError", "ProgrammingError") or (
                "already exists" in text or "database is locked" in text
            )
            if racing and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise MoaSearchError(
                f"storage {_safe(url)}: cannot open study {name!r} ({_first_line(exc)})"
            ) from None
    if stored is not None and stored != settings:
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        raise MoaSearchError(
            f"storage {_safe(url)}: study {name!r} was made with other settings "
            f"({', '.join(changed)} differ); pick another --study or --out"
        )
    return study


def _sqlite_path(url: str) -> str:
    """The database file of a ``sqlite:///`` URL ("" for other storages)."""
    return url.split(":///", 1)[1] if url.startswith("sqlite:///") else ""


@contextlib.contextmanager
def _opening_lock(url: str):
    """Serialize schema creation between processes sharing one local SQLite file.

    Several workers starting at once otherwise race through SQLite's lock upgrade, which
    fails at once with "database is locked" instead of waiting. The lock file lives in the
    temp folder, keyed by the database's path, so the user's folder holds only what the
    run writes. Other URLs (PostgreSQL,
    MySQL) serialize inside the server, and platforms without ``fcntl`` rely on retries.
    """
    path = _sqlite_path(url)
    try:
        import fcntl  # noqa: PLC0415  (POSIX only)
    except ImportError:
        fcntl = None
    if not path or path == ":memory:" or fcntl is None:
        yield
        return
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"moa-search-study-{key}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """RDB storage; SQLite in WAL mode with relaxed fsync (a commit per trial param is
    otherwise ~20 ms on a busy disk, and WAL lets several worker processes read while one
    writes)."""
    path = _sqlite_path(url)
    if path and path != ":memory:":
        con = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    store = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    if path:
        event.listen(
            store.engine,
            "connect",
            lambda dbapi, _record: dbapi.execute("PRAGMA synchronous=NORMAL"),
        )
        store.engine.dispose()
    return store


def _optimize(study: optuna.Study, runner: TrialRunner, trials: int, progress: bool) -> None:
    done = _counted(study)
    left = max(0, trials - done)
    if not left:
        return
    logging.getLogger("optuna").setLevel(logging.WARNING)
    bar = tqdm(total=left, desc="plan search", unit="trial", disable=not progress)
    try:
        study.optimize(
            runner,
            n_trials=left,
            callbacks=[
                MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                lambda s, t: bar.update(1),
            ],
            gc_after_trial=False,
        )
    except MoaSearchError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlalchemy", "optuna.exceptions", "sqlite3")):
            raise MoaSearchError(
                f"study storage failed during the search ({_first_line(exc)})"
            ) from None
        raise
    finally:
        bar.close()


def _fail_orphans(study: optuna.Study) -> int:
    """Mark FAIL the trials left RUNNING by a killed process of this machine (resume).

    A trial records its owner (host, pid) when it starts; one whose process no longer
    exists can never finish. Trials of live workers and of other hosts are left alone.
    Returns how many were marked."""
    me = worker_id()
    marked = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR)
        if not isinstance(owner, dict) or owner.get("host") != me["host"]:
            continue
        pid = owner.get("pid")
        if isinstance(pid, int) and (pid == me["pid"] or not _pid_alive(pid)):
            with contextlib.suppress(ValueError, RuntimeError):  # finished meanwhile
                study.tell(trial.number, state=TrialState.FAIL)
                marked += 1
    return marked


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # no cheap, safe liveness check: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _trials_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values if t.values is not None else [np.nan] * 3
        row = {"number": t.number, "state": t.state.name}
        row.update(dict(zip(OBJECTIVES, values, strict=True)))
        attrs = t.user_attrs.get("result", {})
        for key in ("predicted_loss", "measured_loss", "solver_gap", "solver_s", "trial_s"):
            row[key] = attrs.get(key)
        row["within_budget"] = bool(attrs.get("within_budget", False))
        row.update({f"param_{k}": v for k, v in t.params.items()})
        row["choice"] = attrs.get("choice", "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=["number", "state", *OBJECTIVES, "within_budget", "choice"])
    for col in ("predicted_loss", "measured_loss", "solver_gap", "solver_s", "trial_s"):
        frame[col] = pd.to_numeric(frame.get(col), errors="coerce")
    complete = frame["state"] == "COMPLETE"
    first = ~frame.duplicated("choice") | ~complete  # identical plans count once
    mask = np.zeros(len(frame), bool)
    idx = np.flatnonzero(complete & first)
    if len(idx):
        mask[idx] = pareto_mask(frame.loc[idx, list(OBJECTIVES)].to_numpy(float))
    frame["pareto"] = mask
    frame["best"] = False
    best = pick_best(frame)
    if best is not None:
        frame.loc[best, "best"] = True
    frame["plan_file"] = np.where(
        frame["pareto"], "plans/trial_" + frame["number"].astype(str) + ".yaml", ""
    )
    return frame


def _write_outputs(
    study: optuna.Study, runner: TrialRunner, out: Path, url: str, cfg: SearchConfig, report=None
) -> SearchResult:
    """Plans, best.yaml, trials tables, plots and summary.json of the study so far."""
    problem, caps, objective = runner.problem, runner.caps, cfg.objective
    frame = _trials_frame(study)
    budget_field = {c.budget.kind: c.budget.to_plan_field() for c in caps}
    plans_tmp = Path(tempfile.mkdtemp(prefix=".plans-", dir=out))
    written: list[Path] = []
    best_path = None
    try:
        for _, row in frame[frame["pareto"]].iterrows():
            plan = _plan_of(problem, row, budget_field, study.study_name, objective)
            save_plan(plan, plans_tmp / f"trial_{int(row['number'])}.yaml")
            written.append(out / "plans" / f"trial_{int(row['number'])}.yaml")
            if row["best"] and report is None:
                best_path = save_plan(plan, out / "best.yaml")
                plot_plan_map(
                    plan,
                    runner.report_length,
                    out / "plan_map.png",
                    f"best.yaml (trial {int(row['number'])}): memory density at "
                    f"{runner.report_length} tokens, D/W/E/S = family",
                )
        _swap_dir(plans_tmp, out / "plans")
    finally:
        shutil.rmtree(plans_tmp, ignore_errors=True)
    if report is not None:
        best_path = _write_checked(problem, report, budget_field, study.study_name, out)
        plot_checked(report, out / "pareto_measured.png")
    _atomic(out / "trials.parquet", lambda p: frame.to_parquet(p, index=False))
    _atomic(out / "trials.csv", lambda p: frame.to_csv(p, index=False))
    baselines = uniform_baselines(problem, caps, runner.measure)
    n = runner.report_length
    label = (
        "validation loss (measured)"
        if objective == "measured"
        else f"predicted loss increase at {n} tokens"
    )
    at = _binding_length(problem, caps)
    shown, shown_base = _costs_at(problem, frame, baselines, at)
    fractions = {c.kind: c.limit / problem.dense_bytes(at) for c in caps if c.length == at}
    plot_pareto(shown, shown_base, fractions, label, out / "pareto.png", at)
    summary = {
        "study": study.study_name,
        "storage": _portable(url, out),
        "objective": objective,
        "report_length": n,
        "budgets": sorted({c.budget.text() for c in caps}),
        "trials": int(frame["state"].isin(["COMPLETE", "PRUNED"]).sum()),
        "failed_trials": int((frame["state"] == "FAIL").sum()),
        "pareto": int(frame["pareto"].sum()),
        "best": str(best_path.relative_to(out)) if best_path else None,
        "best_rule": (
            "lowest measured objective of the front's best plans after refinement (check.json)"
            if report is not None
            else "lowest loss among Pareto trials within budget; ties: memory, read, number"
        ),
        "baselines": baselines,
        "config": cfg.stored(),
    }
    _atomic(
        out / "summary.json",
        lambda p: Path(p).write_text(json.dumps(summary, indent=1, default=float) + "\n"),
    )
    return SearchResult(out, best_path, written, frame, study.study_name, _safe(url))


def _binding_length(problem: Problem, caps: list[UserCap]) -> int:
    """The length the plot's cost axes use: where the user's caps are tightest for the
    chosen plans (a window's fraction of dense is largest at the shortest length)."""
    lengths = sorted({c.length for c in caps}) or [max(problem.lengths)]
    return lengths[0]


def _costs_at(problem: Problem, frame: pd.DataFrame, baselines: list[dict], n: int):
    """Trials and baselines with memory / read densities recomputed at length ``n``."""
    dense = problem.dense_bytes(n)
    shown = frame.copy()
    for col, kind in (("memory_density", "memory"), ("read_density", "bandwidth")):
        shown[col] = [
            problem.choice_bytes(kind, n, [int(c) for c in ch.split(",")]) / dense if ch else np.nan
            for ch in frame["choice"].fillna("")
        ]
    index = {s: i for i, s in enumerate(problem.specs)}
    shown_base = [
        {**b, "memory_density": problem.uniform_bytes("memory", n, index[b["pattern"]]) / dense,
         "read_density": problem.uniform_bytes("bandwidth", n, index[b["pattern"]]) / dense}
        for b in baselines
    ]  # fmt: skip
    return shown, shown_base


def _write_checked(problem: Problem, report, budget: dict, study: str, out: Path) -> Path:
    """best.yaml = the checked plan, with predicted and measured values per task."""
    final = report.final
    n = max(problem.lengths)
    metrics = {
        "predicted_delta_loss": final["predicted"],
        "predicted_by_task": final["predicted_by_task"],
        "measured_objective": final["measured"],
        "measured_by_task": final["measured_by_task"],
        "memory_density": final["memory_density"][str(n)],
        "read_density": problem.choice_bytes("bandwidth", n, report.choice)
        / problem.dense_bytes(n),
        "report_length": n,
        "weights": problem.weights,
        "refinement_rounds": sum("round" in h for h in report.history),
        "balance_steps": sum("balance" in h for h in report.history),
        "solved_with_weights": final.get("solved_with_weights", problem.weights),
    }
    notes = (
        f"moa-search plan: study {study}, trial {report.start.get('trial')} measured on "
        f"held-out calibration samples, refined and balanced against the uniform window; "
        f"see check.json"
    )
    plan = problem.plan(report.choice, budget=budget, metrics=metrics, notes=notes)
    path = save_plan(plan, out / "best.yaml")
    _atomic(
        out / "check.json",
        lambda p: Path(p).write_text(json.dumps(report.as_dict(), indent=1, default=float) + "\n"),
    )
    plot_plan_map(
        plan, n, out / "plan_map.png", f"best.yaml (checked): memory density at {n} tokens"
    )
    return path


def _plan_of(problem: Problem, row: pd.Series, budget: dict, study: str, objective: str):
    choice = np.array([int(c) for c in row["choice"].split(",")])
    metrics = {
        "trial": int(row["number"]),
        "predicted_delta_loss": float(row["predicted_loss"]),
        "memory_density": float(row["memory_density"]),
        "read_density": float(row["read_density"]),
        "report_length": max(problem.lengths),
        "solver_gap": float(row["solver_gap"]),
    }
    if pd.notna(row.get("measured_loss")):
        metrics["validation_loss"] = float(row["measured_loss"])
    notes = (
        f"moa-search plan: study {study}, trial {int(row['number'])}, Pareto-optimal "
        f"({objective} loss, KV memory, KV bytes read)"
    )
    return problem.plan(choice, budget=budget, metrics=metrics, notes=notes)


def _swap_dir(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new``; the old folder is removed only after the rename."""
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    try:
        os.replace(target, old)
    except FileNotFoundError:  # first run, or another worker is swapping right now
        old = None
    with contextlib.suppress(OSError):  # another worker put its equally complete folder first
        os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _portable(url: str, folder: Path) -> str:
    """The storage as the summary records it: the default study file by its name, so that a
    copied plans folder names no path of the machine that made it."""
    own = f"sqlite:///{(folder / 'study.db').as_posix()}"
    return "sqlite:///study.db (in this folder)" if url == own else _safe(url)


def _safe(url: str) -> str:
    """Storage URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url
