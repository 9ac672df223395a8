"""Plan search: profile -> exact per-head assignment under byte budgets -> Pareto plans."""

from moa_search.search.budget import Budget, parse_budget, parse_budgets
from moa_search.search.importers import import_duo, import_moa, import_plan
from moa_search.search.run import SearchConfig, SearchResult, plan_search

__all__ = [
    "Budget",
    "SearchConfig",
    "SearchResult",
    "import_duo",
    "import_moa",
    "import_plan",
    "parse_budget",
    "parse_budgets",
    "plan_search",
]
