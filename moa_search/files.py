"""Atomic files and folders: a crash or a concurrent reader never sees half a result.

Every writer in moa-search goes through here: write to a temp name in the same folder, then
rename onto the target (``os.replace`` is atomic within one file system).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; the temp file never survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` to ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """``data`` as indented JSON (unknown types as ``str``), atomically."""
    return write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def atomic_folder(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_dir)`` then put that folder at ``path``, replacing what was there."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0o700; the folder is shared like any other
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110, **savefig: Any) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - only plotting callers pay for it

    try:
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", **savefig))
    finally:
        plt.close(fig)
