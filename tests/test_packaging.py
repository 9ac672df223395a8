"""The wheel holds every shipped file, and building it prints no setuptools package warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("moa_search", "kernels")


def _shipped_files() -> set[str]:
    """Wheel paths of the tracked files under moa_search/ and kernels/ (kernels/ installs as
    moa_search/kernels/)."""
    out = subprocess.run(
        ["git", "ls-files", *SHIPPED], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    notes = {"kernels/NOTES.md"}  # developer notes, not package data
    return {p.replace("kernels/", "moa_search/kernels/", 1) if p.startswith("kernels/") else p
            for p in out if p not in notes}  # fmt: skip


def test_wheel_ships_every_file_without_warnings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(ROOT / name, src / name)
    for folder in SHIPPED:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    log = build.stdout + build.stderr
    for alarm in ("would be ignored", "SetuptoolsDeprecationWarning", "is absent from"):
        assert alarm not in log, alarm
    (wheel,) = (tmp_path / "dist").glob("moa_search-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_shipped_files() - names)
    assert not missing, missing
