"""The main job end to end: profile -> plan search -> eval on the default model and texts.

Each stage writes its own folder (so any stage can be rerun, resumed or inspected alone);
this module only chains them with settings small enough for a CPU by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from moa_search.evaluate.run import EvalConfig
from moa_search.models import DEFAULT_MODEL
from moa_search.profile.measured import MeasureConfig
from moa_search.profile.run import ProfileConfig
from moa_search.search.check import CheckConfig

#: a CPU-sized candidate grid: windows (sink 32) of 64 to 512 keys; at one profiled length an
#: elastic span is one of these windows, so the full grid's elastic candidates are left out
QUICK_CANDIDATES = ";".join(f"window:sink=32,span={s}" for s in (64, 128, 256, 512))


@dataclass
class QuickstartResult:
    out: Path
    profile_dir: Path
    best_plan: Path
    eval_dir: Path
    seconds: float


#: the CPU-sized profile of ``quickstart``: the "scored" fidelity, a small candidate grid,
#: eight calibration samples of 1k tokens
QUICK_PROFILE = ProfileConfig(
    lengths=(1024,),
    samples=8,  # 6 kept 6/10 passkeys at 1k once prose was its own family; 8 kept 9/10
    candidates=QUICK_CANDIDATES,
    device="cpu",
    dtype="float32",
    measure=MeasureConfig(fidelity="scored", row_batch=32, max_scored=16),
)
#: the CPU-sized eval of ``quickstart``: perplexity and passkey at 1k against the window
QUICK_EVAL = EvalConfig(
    lengths=(1024,), samples=2, tasks=("ppl", "passkey"), baselines=("dense", "window")
)


def quickstart(
    model: str = DEFAULT_MODEL,
    out: str | Path = "runs/quickstart",
    profile_config: ProfileConfig = QUICK_PROFILE,
    eval_config: EvalConfig = QUICK_EVAL,
    budget: str = "memory=0.25",
    trials: int = 60,
    check: CheckConfig | None = None,
) -> QuickstartResult:
    """Profile ``model`` on the built-in calibration set (measured single-head ablations),
    search a plan under ``budget`` and check it on held-out samples, then evaluate the
    best plan against dense and equal-memory uniform baselines.

    The defaults are sized for a 2-core CPU; pass other configs for a GPU run. The check
    defaults to two held-out samples per length at the profile's fidelity and device."""
    from moa_search.evaluate import evaluate
    from moa_search.profile import profile
    from moa_search.search import plan_search

    measure, device = profile_config.measure, profile_config.device or "cpu"
    check = check or CheckConfig(
        samples=2, rounds=1, heads=6, front=2, random_plans=0, balance=2, fidelity=measure.fidelity,
        max_scored=measure.max_scored, device=device, dtype=profile_config.dtype or "float32",
    )  # fmt: skip

    start = time.perf_counter()
    root = Path(out)
    profile_dir = root / "profile"
    lengths = list(profile_config.lengths)
    print(f"[1/3] profile {model} at {lengths} -> {profile_dir}", flush=True)
    profile(model, profile_config, out=profile_dir)
    print(f"[2/3] plan search under {budget} ({trials} trials), checked", flush=True)
    search = plan_search(
        profile_dir, budgets=[budget], trials=trials, out=root / "plans",
        seed=profile_config.seed, progress=True, model=model, check=check,
    )  # fmt: skip
    eval_dir = root / "eval"
    print(f"[3/3] eval {search.best} at {list(eval_config.lengths)} -> {eval_dir}", flush=True)
    evaluate(model, search.best, eval_config, out=eval_dir)
    seconds = time.perf_counter() - start
    print((eval_dir / "results.md").read_text())
    print(f"done in {seconds:.0f} s: profile {profile_dir}, plan {search.best}, eval {eval_dir}")
    return QuickstartResult(root, profile_dir, Path(search.best), eval_dir, seconds)
