"""Per-head sensitivity profiler: blockwise MoA influence, SparQ first-order, validation.

``profile(...)`` runs it end to end (see run.py); the modules are usable alone:
influence.py (tile-wise math), sparq_estimate.py, capture.py (the profiling attention), validate.py,
store.py (atomic files, resume), table.py (tidy parquet), plots.py.
"""

from moa_search.profile.run import METHOD_VERSION, ProfileConfig, ProfileResult, profile

__all__ = ["METHOD_VERSION", "ProfileConfig", "ProfileResult", "profile"]
