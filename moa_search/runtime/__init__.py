"""Run a transformers model with a plan: attention function, per-head cache, apply/remove."""

from moa_search.runtime.apply import PlanRuntime, apply_plan, remove_plan
from moa_search.runtime.cache import HeadLayout, MoACache, MoALayerCache

__all__ = ["HeadLayout", "MoACache", "MoALayerCache", "PlanRuntime", "apply_plan", "remove_plan"]
