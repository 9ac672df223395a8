"""The main job end to end: profile -> plan search -> eval on the default model and texts.

Each stage writes its own folder (so any stage can be rerun, resumed or inspected alone);
this module only chains them with settings small enough for a CPU by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from moa_search.models import DEFAULT_MODEL
from moa_search.profile.measured import MeasureConfig
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


def quickstart(
    model: str = DEFAULT_MODEL,
    out: str | Path = "runs/quickstart",
    profile_lengths: tuple[int, ...] = (1024,),
    profile_samples: int = 6,
    budget: str = "memory=0.25",
    trials: int = 60,
    eval_lengths: tuple[int, ...] = (1024,),
    eval_samples: int = 2,
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    tasks: tuple[str, ...] = ("ppl", "passkey"),
    baselines: tuple[str, ...] = ("dense", "window"),
    validate: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    measure: MeasureConfig | None = None,
    check: CheckConfig | None = None,
    candidates: str | None = QUICK_CANDIDATES,
) -> QuickstartResult:
    """Profile ``model`` on the built-in calibration set (measured single-head ablations),
    search a plan under ``budget`` and check it on held-out samples, then evaluate the
    best plan against dense and equal-memory uniform baselines.

    The defaults are sized for a 2-core CPU: the "scored" fidelity, a small candidate
    grid, 1k tokens; pass ``measure`` / ``check`` / ``candidates=None`` for a GPU run."""
    from moa_search.evaluate import evaluate
    from moa_search.profile import profile
    from moa_search.search import plan_search

    measure = measure or MeasureConfig(fidelity="scored", row_batch=32, max_scored=16)
    check = check or CheckConfig(
        samples=2, rounds=1, heads=6, front=2, random_plans=0, fidelity=measure.fidelity,
        max_scored=measure.max_scored, device=device, dtype=dtype,
    )  # fmt: skip

    start = time.perf_counter()
    root = Path(out)
    profile_dir = root / "profile"
    print(f"[1/3] profile {model} at {list(profile_lengths)} -> {profile_dir}", flush=True)
    profile(model, lengths=list(profile_lengths), out=profile_dir, device=device, dtype=dtype,
            samples=profile_samples, seed=seed, validate=validate, measure=measure,
            candidates=candidates)  # fmt: skip
    print(f"[2/3] plan search under {budget} ({trials} trials), checked", flush=True)
    search = plan_search(profile_dir, budgets=[budget], trials=trials, out=root / "plans",
                         seed=seed, progress=True, model=model, check=check)  # fmt: skip
    eval_dir = root / "eval"
    print(f"[3/3] eval {search.best} at {list(eval_lengths)} -> {eval_dir}", flush=True)
    evaluate(model, search.best, baselines=baselines, tasks=tasks, lengths=eval_lengths,
             depths=depths, samples=eval_samples, out=eval_dir, device=device, dtype=dtype,
             seed=seed)  # fmt: skip
    seconds = time.perf_counter() - start
    print((eval_dir / "results.md").read_text())
    print(f"done in {seconds:.0f} s: profile {profile_dir}, plan {search.best}, eval {eval_dir}")
    return QuickstartResult(root, profile_dir, Path(search.best), eval_dir, seconds)
