"""The candidate grid: which patterns the profiler prices for every head.

Why a fixed grid: the search picks one pattern per KV head from a table, so every
(layer, kv_head, length) must carry a row for the same candidates. Static candidates are
priced exactly per attention entry, so any sink/span works; SparQ candidates are priced
by emulating their decode step at every position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from moa_search.errors import MoaSearchError
from moa_search.patterns import PATTERNS, Dense, Pattern, SparQ, parse


def default_candidates(lengths: Sequence[int], block_size: int, head_dim: int) -> list[Pattern]:
    """The gradient method's grid: every registered family's ``candidates`` (dense, windows
    at N/16..N/2, elastic (alpha, beta), SparQ (r, k_ratio) for the built-in ones)."""
    return [
        p
        for family in PATTERNS.values()
        for p in family.candidates(lengths, head_dim, "gradient", block_size)
    ]


def resolve_candidates(
    candidates: Iterable[str | Pattern] | None,
    lengths: Sequence[int],
    block_size: int,
    head_dim: int,
) -> list[Pattern]:
    """Parse user candidates (specs or patterns), always include dense, drop duplicates."""
    if candidates is None:
        found = default_candidates(lengths, block_size, head_dim)
    else:
        if isinstance(candidates, str):
            candidates = [c for c in candidates.split(";") if c.strip()]
        found = [Dense()] + [parse(c, head_dim) for c in candidates]
    unique: dict[str, Pattern] = {}
    for p in found:
        unique.setdefault(p.spec(), p)
    if len(unique) == 1 and candidates is not None and not list(candidates):
        raise MoaSearchError("candidates: expected at least one pattern spec, got none")
    return list(unique.values())


def keep_families(cands: Sequence[Pattern], families: Sequence[str]) -> list[Pattern]:
    """The default grid cut to ``families`` (dense always stays): e.g. a memory budget can
    never pick SparQ, which stores every key, so profiling it for one is wasted time."""
    unknown = [f for f in families if f not in PATTERNS]
    if unknown:
        raise MoaSearchError(
            f"families (--patterns): unknown pattern family {unknown[0]!r} (expected some of "
            f"{', '.join(PATTERNS)})"
        )
    return [c for c in cands if c.name == Dense.name or c.name in families]


def split_static(cands: Sequence[Pattern]) -> tuple[list[Pattern], list[SparQ]]:
    """Candidates priced by their mask and those priced as SparQ (``Pattern.pricing``), each
    in the given order; a dynamic pattern with neither has no gradient estimate."""
    static = [c for c in cands if c.static and c.pricing == "mask"]
    sparq = [c for c in cands if c.pricing == "sparq"]
    other = [c for c in cands if c not in static and c not in sparq]
    if other:
        raise MoaSearchError(f"candidates: no profiler estimate for pattern {other[0].spec()!r}")
    return static, sparq


def param_columns() -> tuple[str, ...]:
    """Parameter columns of the tidy table: the fields of every registered pattern, in order."""
    return tuple(dict.fromkeys(f.name for c in PATTERNS.values() for f in dataclasses.fields(c)))


def params(p: Pattern) -> dict[str, float | None]:
    """A candidate's parameter columns (None where its family has no such parameter)."""
    row: dict[str, float | None] = dict.fromkeys(param_columns())
    row.update({f.name: getattr(p, f.name) for f in dataclasses.fields(p)})
    return row
