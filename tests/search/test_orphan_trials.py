"""A plan study killed mid-trial leaves that trial RUNNING in its storage; the rerun marks
it failed (its process is gone) and the summary counts only finished trials."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pandas as pd

from moa_search.search import plan_search
from moa_search.search import study as study_mod

BUDGETS = ["memory=0.3"]


def _killed_worker(profile: str, trials: int, kill_at: int) -> None:
    """plan_search that SIGKILLs its own process in the middle of trial ``kill_at``."""
    real = study_mod.TrialRunner.run
    calls = []

    def run(self, trial):
        calls.append(trial.number)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, trial)

    study_mod.TrialRunner.run = run
    plan_search(profile, budgets=BUDGETS, trials=trials, progress=False)


def test_killed_study_resumes_without_an_orphan_trial(profile_copy):
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_killed_worker, args=(str(profile_copy), 6, 4))
    proc.start()
    proc.join(timeout=240)  # reaped: its pid no longer exists
    assert proc.exitcode == -signal.SIGKILL
    result = plan_search(profile_copy, budgets=BUDGETS, trials=6, progress=False)
    frame = result.trials
    assert "RUNNING" not in set(frame["state"])
    assert (frame["state"] == "FAIL").sum() == 1, "the killed trial is marked failed"
    assert frame["state"].isin(["COMPLETE", "PRUNED"]).sum() == 6
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["trials"] == 6 and summary["failed_trials"] == 1
    saved = pd.read_parquet(result.out / "trials.parquet")
    assert "RUNNING" not in set(saved["state"])


def test_running_trials_of_live_workers_are_left_alone(profile_copy):
    import optuna

    from moa_search.search.run import _fail_orphans

    first = plan_search(profile_copy, budgets=BUDGETS, trials=2, progress=False)
    storage = f"sqlite:///{(first.out / 'study.db').as_posix()}"
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    live = study.ask()  # owned by a live process (the parent of this one)
    live.set_user_attr(study_mod.WORKER_ATTR, {**study_mod.worker_id(), "pid": os.getppid()})
    other_host = study.ask()
    other_host.set_user_attr(study_mod.WORKER_ATTR, {"host": "elsewhere", "pid": 1})
    unknown = study.ask()  # no owner recorded (an older moa-search)
    assert _fail_orphans(study) == 0
    states = {t.number: t.state.name for t in study.get_trials()}
    assert {states[t.number] for t in (live, other_host, unknown)} == {"RUNNING"}
