"""Atomic writes: the target is whole or untouched, and no temp file is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_search.files import atomic_folder, atomic_write, write_json, write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "a.txt", "old")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_json_creates_folders_and_reads_back(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x" / "y.json", {"a": 1, "p": Path("z")})
    assert json.loads(path.read_text()) == {"a": 1, "p": "z"}


def test_atomic_folder_replaces_the_old_folder_only_when_filled(tmp_path: Path) -> None:
    out = tmp_path / "out"
    atomic_folder(out, lambda d: (d / "one").write_text("1"))
    with pytest.raises(RuntimeError):
        atomic_folder(out, lambda d: (_ for _ in ()).throw(RuntimeError("crash")))
    assert [p.name for p in out.iterdir()] == ["one"]
    atomic_folder(out, lambda d: (d / "two").write_text("2"))
    assert [p.name for p in out.iterdir()] == ["two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
