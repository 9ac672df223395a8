"""moa-search: find and run per-head sparse attention plans for transformers LLMs."""

from moa_search.errors import MoaSearchError
from moa_search.patterns import PATTERNS, Dense, Elastic, Pattern, SparQ, Window, parse
from moa_search.plan import Plan, load_plan, save_plan, uniform_plan, validate
from moa_search.runtime import MoACache, apply_plan, remove_plan

__version__ = "0.1.0"
__all__ = [
    "PATTERNS",
    "Dense",
    "Elastic",
    "MoACache",
    "MoaSearchError",
    "Pattern",
    "Plan",
    "SparQ",
    "Window",
    "apply_plan",
    "load_plan",
    "parse",
    "remove_plan",
    "save_plan",
    "uniform_plan",
    "validate",
]
