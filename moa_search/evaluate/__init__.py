"""Evaluate a plan against dense and uniform baselines at equal KV budget.

Modules: tasks (perplexity, passkey, kv retrieval), baselines (uniform window / elastic /
SparQ solved to the plan's budget), stats (Wilson, bootstrap), aggregate (summary rows,
effective context, max drop), report (CSV, Markdown, PNG), run (``evaluate``).
"""

from moa_search.evaluate.baselines import BASELINES, Method, build_methods, scale_plan
from moa_search.evaluate.run import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    EvalConfig,
    EvalResult,
    evaluate,
)
from moa_search.evaluate.tasks import TASKS

__all__ = [
    "EvalConfig",
    "BASELINES",
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "TASKS",
    "EvalResult",
    "Method",
    "build_methods",
    "evaluate",
    "scale_plan",
]
