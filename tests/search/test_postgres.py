"""Two workers on one study in a real PostgreSQL server that this test starts and stops.

Skipped (with the reason) only where the server binaries or the driver are absent; .ci/run
installs both (apt: postgresql, pip: psycopg2-binary). initdb refuses to run as root, so
as root the server runs as the ``postgres`` system user via runuser.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_workers import check_shared, run_workers


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    bin_dir = _pg_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; "
            "install with `apt-get install postgresql`"
        )
    pytest.importorskip("psycopg2", reason="driver missing: pip install psycopg2-binary")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="moa-pg-")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log = Path(root) / "data", Path(root) / "server.log"
    port = _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        pg(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pg(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -h 127.0.0.1 -c fsync=off",
            "start",
        )
        import psycopg2  # noqa: PLC0415

        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE moa")
        con.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/moa"
    finally:
        if data.exists():
            subprocess.run(
                [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgres_study(small_profile, tmp_path, postgres_url):
    frame = run_workers(small_profile, postgres_url, tmp_path / "out")
    check_shared(frame)
    assert (tmp_path / "out" / "best.yaml").is_file()
    assert not (tmp_path / "out" / "study.db").exists()  # the study lives in PostgreSQL
