"""Several processes join one study through shared storage (SQLite here, PostgreSQL too).

Workers are forked so they inherit the imported modules (a fresh interpreter spends most of
its time importing torch); the predicted objective never runs torch, so forking is safe.
"""

import multiprocessing
import traceback
from pathlib import Path

import pandas as pd

from moa_search import load_plan
from moa_search.search import plan_search


def _worker(profile: str, storage: str, trials: int, out: str, seed: int, errors) -> None:
    try:
        plan_search(
            profile,
            budgets=["memory=0.3"],
            trials=trials,
            storage=storage,
            study_name="shared",
            out=out,
            seed=seed,
            progress=False,
        )
    except BaseException:
        errors.put(traceback.format_exc()[-2000:])
        raise


def run_workers(
    profile: Path, storage: str, out: Path, trials: int = 6, workers: int = 2
) -> pd.DataFrame:
    """Run ``workers`` processes on one study; return the final trials table."""
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(profile), storage, trials, str(out), seed, errors))
        for seed in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    assert errors.empty(), errors.get()
    assert all(proc.exitcode == 0 for proc in procs)
    frame = pd.read_parquet(out / "trials.parquet")
    for path in (out / "plans").glob("*.yaml"):
        load_plan(path)
    return frame


def check_shared(frame: pd.DataFrame, trials: int = 6) -> None:
    done = frame[frame["state"].isin(["COMPLETE", "PRUNED"])]
    # both stop once the shared study holds the requested trials (a worker may finish the
    # trial it had already started when the other reached the total)
    assert trials <= len(done) <= trials + 1
    assert frame["number"].is_unique


def test_two_workers_share_one_sqlite_study(small_profile, tmp_path):
    frame = run_workers(small_profile, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "out")
    check_shared(frame)
    assert (tmp_path / "out" / "best.yaml").is_file()
