"""quickstart chains profile -> plan -> eval with the configs the CLI built."""

from __future__ import annotations

from types import SimpleNamespace

from typer.testing import CliRunner

import moa_search.evaluate
import moa_search.profile
import moa_search.search
from cli import app


def test_cli_options_reach_each_stage(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake_profile(model, config, out):
        seen["profile"] = config

    def fake_search(profile_dir, **kw):
        seen["search"] = kw
        return SimpleNamespace(best=tmp_path / "best.yaml")

    def fake_eval(model, plan, config, out):
        seen["eval"] = config
        out.mkdir(parents=True)
        (out / "results.md").write_text("results\n")

    monkeypatch.setattr(moa_search.profile, "profile", fake_profile)
    monkeypatch.setattr(moa_search.search, "plan_search", fake_search)
    monkeypatch.setattr(moa_search.evaluate, "evaluate", fake_eval)
    args = ["quickstart", "--out", str(tmp_path), "--profile-lengths", "512,768",
            "--profile-samples", "3", "--eval-samples", "4", "--tasks", "ppl", "--full-grid",
            "--fidelity", "exact", "--trials", "5"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    prof, ev = seen["profile"], seen["eval"]
    assert prof.lengths == (512, 768) and prof.samples == 3 and prof.candidates is None
    assert prof.measure.fidelity == "exact" and prof.device == "cpu"
    assert ev.samples == 4 and ev.tasks == ("ppl",) and ev.baselines == ("dense", "window")
    assert seen["search"]["trials"] == 5 and seen["search"]["check"].fidelity == "exact"
