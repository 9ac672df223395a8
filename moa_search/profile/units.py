"""A profile's work units in a shared database, so that workers on many hosts split it.

Why a database: the plan search already joins workers through an RDB storage (SQLite on
one host, PostgreSQL across hosts); the profiler uses the same kind of URL. Every worker
runs the same ``moa-search profile ... --storage URL`` command: the units (one per length
and calibration sample) are keyed by the profile's arguments, a worker claims one unit at a
time, measures it, and uploads the checkpoint; every worker then pulls all finished units
into its own output folder and builds the same table. A unit claimed by a worker that died
is claimed again after ``stale_s``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from moa_search.errors import MoaSearchError
from moa_search.profile import store

TABLE = "moa_profile_units"
STALE_S = 3600.0  # a unit still running after this long is given to another worker


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class UnitStore:
    """(length, sample) units of the profile identified by ``key`` in the database ``url``."""

    def __init__(self, url: str, key: str, stale_s: float = STALE_S):
        from sqlalchemy import (  # noqa: PLC0415
            Column,
            Float,
            Integer,
            LargeBinary,
            MetaData,
            String,
            Table,
            Text,
            create_engine,
        )

        self.key, self.stale_s = key, stale_s
        kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as exc:  # unknown dialect, missing driver
            raise MoaSearchError(f"storage {url.split('@')[-1]}: {type(exc).__name__}") from None
        meta = MetaData()
        self.table = Table(
            TABLE, meta,
            Column("key", String(64), primary_key=True),
            Column("length", Integer, primary_key=True),
            Column("sample", Integer, primary_key=True),
            Column("state", String(16), nullable=False),
            Column("worker", String(200)),
            Column("claimed", Float),
            Column("result", LargeBinary),
            Column("meta", Text),
        )  # fmt: skip
        for attempt in range(5):  # workers starting together race to create the table
            try:
                meta.create_all(self.engine)
                break
            except Exception as exc:
                if attempt == 4:
                    raise MoaSearchError(
                        f"storage: cannot create table {TABLE} ({type(exc).__name__})"
                    ) from None
                time.sleep(0.2 * (attempt + 1))

    def add(self, jobs: Iterable[tuple[int, int]]) -> None:
        """Register the units (existing ones are kept, with their results)."""
        from sqlalchemy import select  # noqa: PLC0415
        from sqlalchemy.exc import IntegrityError  # noqa: PLC0415

        t = self.table
        with self.engine.begin() as con:
            have = {
                (r.length, r.sample)
                for r in con.execute(select(t.c.length, t.c.sample).where(t.c.key == self.key))
            }
        for length, sample in jobs:
            if (length, sample) in have:
                continue
            try:
                with self.engine.begin() as con:
                    con.execute(
                        t.insert().values(key=self.key, length=length, sample=sample, state="todo")
                    )
            except IntegrityError:  # another worker added it first
                pass

    def claim(self, worker: str) -> tuple[int, int] | None:
        """Take one unit to do (todo, or running for longer than ``stale_s``); None if none."""
        from sqlalchemy import and_, or_, select, update  # noqa: PLC0415

        t = self.table
        while True:
            now = time.time()
            free = or_(
                t.c.state == "todo",
                and_(t.c.state == "running", t.c.claimed < now - self.stale_s),
            )
            with self.engine.begin() as con:
                row = con.execute(
                    select(t.c.length, t.c.sample, t.c.state, t.c.claimed)
                    .where(t.c.key == self.key, free)
                    .order_by(t.c.length, t.c.sample)
                    .limit(1)
                ).first()
                if row is None:
                    return None
                same = and_(
                    t.c.key == self.key,
                    t.c.length == row.length,
                    t.c.sample == row.sample,
                    t.c.state == row.state,
                    t.c.claimed.is_(None) if row.claimed is None else t.c.claimed == row.claimed,
                )
                done = con.execute(
                    update(t).where(same).values(state="running", worker=worker, claimed=now)
                )
                if done.rowcount == 1:
                    return int(row.length), int(row.sample)
            # another worker took it between the select and the update: look again

    def finish(self, out: Path, length: int, sample: int) -> None:
        """Upload the unit's finished checkpoint file."""
        from sqlalchemy import update  # noqa: PLC0415

        t = self.table
        data = store.checkpoint_path(out, length, sample).read_bytes()
        with self.engine.begin() as con:
            con.execute(
                update(t)
                .where(t.c.key == self.key, t.c.length == length, t.c.sample == sample)
                .values(state="done", result=data)
            )

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func, select  # noqa: PLC0415

        t = self.table
        with self.engine.begin() as con:
            rows = con.execute(
                select(t.c.state, func.count()).where(t.c.key == self.key).group_by(t.c.state)
            ).all()
        return {str(s): int(n) for s, n in rows}

    def pull(self, out: Path) -> int:
        """Write every finished unit missing from ``out``'s checkpoints; returns how many."""
        from sqlalchemy import select  # noqa: PLC0415

        t = self.table
        written = 0
        with self.engine.begin() as con:
            done = con.execute(
                select(t.c.length, t.c.sample).where(t.c.key == self.key, t.c.state == "done")
            ).all()
        for length, sample in done:
            path = store.checkpoint_path(out, int(length), int(sample))
            if path.is_file():
                continue
            with self.engine.begin() as con:
                data = con.execute(
                    select(t.c.result).where(
                        t.c.key == self.key, t.c.length == length, t.c.sample == sample
                    )
                ).scalar_one()
            store.atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
            written += 1
        return written
