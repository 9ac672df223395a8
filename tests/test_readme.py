"""The README's two commands stay runnable: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    pytest_part = test_command.split("&&")[-1].strip().replace(".venv/bin/python", "python")
    ci = (ROOT / ".ci" / "run").read_text()
    assert pytest_part in ci
    assert "scripts/install.sh" in ci and "scripts/install.sh" in test_command


def test_cli_help_lists_every_command():
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("profile", "plan", "eval", "bench", "show", "card"):
        assert command in result.output
