"""``moa_search.kernels`` must coexist with transformers and never shadow the PyPI ``kernels``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"


def test_coexists_with_transformers() -> None:
    import transformers
    from transformers.utils import is_kernels_available

    import moa_search.kernels as mk

    assert callable(mk.mixed_decode) and callable(mk.sparq_decode)
    assert Path(mk.__file__).resolve().parent == KERNELS_DIR
    assert transformers.__version__
    available = is_kernels_available()  # must not crash on our folder
    top = sys.modules.get("kernels")
    if top is not None and Path(getattr(top, "__file__", "") or "").resolve().parent == KERNELS_DIR:
        # The repo root is on sys.path (python -m pytest): the folder is importable as
        # ``kernels`` but stays an empty shell that transformers does not take for PyPI's.
        assert not hasattr(top, "mixed_decode")
        assert not available


def test_kernels_folder_uses_relative_imports_only() -> None:
    for path in KERNELS_DIR.glob("*.py"):
        text = path.read_text()
        assert "import kernels" not in text and "from kernels" not in text, path.name
    spec = importlib.util.find_spec("moa_search.kernels")
    assert spec is not None


def test_every_entry_point_imports_the_installed_package() -> None:
    """No hand loader (spec_from_file_location) or symlink stands in for the installed
    ``moa_search.kernels``: benchmarks, scripts, tests and the library import it one way."""
    root = KERNELS_DIR.parent
    files = [root / "cli.py"]
    for folder in ("benchmarks", "moa_search", "scripts", "tests"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".sh")]
    for path in files:
        if path == Path(__file__):
            continue
        text = path.read_text()
        assert "spec_from_file_location" not in text, path
        assert "../kernels" not in text, path
