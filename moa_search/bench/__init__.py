"""End-to-end speed and memory benchmark: dense vs plan, side by side (issue 9).

- :mod:`.models` -- build a model from a config alone (random weights, on the GPU) or load one.
- :mod:`.synthetic` -- a plan at a given KV density, mixing patterns per layer like a search.
- :mod:`.decode_loop` -- static preallocated caches and a CUDA-graph captured decode step.
- :mod:`.memory` -- equal-memory mode: the largest batch that fits a GPU memory budget.
- :mod:`.run` -- :func:`bench`, the entry point the CLI calls.
- :mod:`.report` -- CSV, plots and a markdown table.
"""

from moa_search.bench.models import SHAPES, build_model
from moa_search.bench.synthetic import synthetic_plan

__all__ = ["SHAPES", "bench", "build_model", "synthetic_plan"]


def __getattr__(name: str):  # lazy: run.py pulls in the runtime and the kernels
    if name == "bench":
        from moa_search.bench.run import bench  # noqa: PLC0415

        return bench
    raise AttributeError(name)
