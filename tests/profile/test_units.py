"""Workers sharing one profile through a database: claims never collide, results merge."""

from __future__ import annotations

import multiprocessing as mp

import pandas as pd
import torch

from moa_search.profile import profile
from moa_search.profile.measured import MeasureConfig
from moa_search.profile.units import UnitStore

CANDS = "window:sink=2,span=8;elastic:sink=2,alpha=4,beta=0.25"


def _calib() -> torch.Tensor:
    return torch.randint(3, 96, (3, 64), generator=torch.Generator().manual_seed(0))


def _profile(model, out, storage=None):
    return profile(
        model, calib=_calib(), lengths=[32, 64], samples=3, candidates=CANDS, out=out,
        progress=False, plots=False, measure=MeasureConfig(max_scored=0), storage=storage,
    )  # fmt: skip


def _worker(model_path: str, out: str, storage: str) -> None:
    torch.set_num_threads(1)
    _profile(model_path, out, storage)


def test_claims_never_collide_and_stale_units_return(tmp_path):
    url = f"sqlite:///{tmp_path / 'units.db'}"
    a, b = UnitStore(url, "k"), UnitStore(url, "k")
    a.add([(32, 0), (32, 1), (64, 0)])
    b.add([(32, 0), (32, 1), (64, 0)])  # adding twice keeps one of each
    got = [a.claim("a"), b.claim("b"), a.claim("a"), b.claim("b")]
    assert sorted(g for g in got if g) == [(32, 0), (32, 1), (64, 0)] and got[-1] is None
    assert UnitStore(url, "other").claim("c") is None  # another profile's key
    stale = UnitStore(url, "k", stale_s=-1)  # every running unit counts as abandoned
    assert stale.claim("c") == (32, 0)
    assert a.counts() == {"running": 3}


def test_two_worker_processes_make_one_profile(saved_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'units.db'}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(saved_model, str(tmp_path / f"w{i}"), url))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    alone = _profile(saved_model, tmp_path / "alone").table
    cols = ["layer", "kv_head", "pattern", "length", "delta_loss_mean"]
    for i in range(2):
        mine = pd.read_parquet(tmp_path / f"w{i}" / "profile.parquet")
        pd.testing.assert_frame_equal(mine[cols], alone[cols], rtol=1e-6)
    assert UnitStore(url, _key(tmp_path / "w0")).counts() == {"done": 6}


def _key(out) -> str:
    import hashlib
    import json

    args = json.loads((out / "args.json").read_text())
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:32]


def test_a_unit_finished_by_another_worker_while_waiting_is_pulled(tmp_path, monkeypatch):
    """The last unit may finish between a waiting worker's pull and its count: it must
    still land in that worker's folder before the worker builds its table."""
    import moa_search.profile.units as units_module
    from moa_search.profile import run as run_module
    from moa_search.profile import store

    jobs = [(32, 0), (32, 1)]
    state = {"done": [(32, 0)]}

    class OtherWorkerFinishing:  # (32, 1) runs elsewhere and finishes when next counted
        def __init__(self, url, key):
            pass

        def add(self, jobs):
            pass

        def claim(self, worker):
            return None

        def finish(self, out, length, sample):
            raise AssertionError("nothing was claimed")

        def counts(self):
            state["done"] = list(jobs)  # it finishes just before this count
            return {"done": len(jobs)}

        def pull(self, out):
            for job in state["done"]:
                store.atomic_write(
                    store.checkpoint_path(out, *job), lambda p: open(p, "wb").close()
                )
            return len(state["done"])

    monkeypatch.setattr(units_module, "UnitStore", OtherWorkerFinishing)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

        def set_postfix(self, **kw):
            pass

    run_module._run_shared("sqlite://", "k", jobs, tmp_path, Bar(), lambda *j: None, poll_s=0)
    assert store.done_jobs(tmp_path, jobs) == set(jobs)
