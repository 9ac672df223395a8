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
from moa_search.patterns import PATTERNS, Dense, Elastic, Pattern, SparQ, Window, parse

DEFAULT_SINK = 64
WINDOW_FRACTIONS = (16, 8, 4, 2)  # spans of N/16 .. N/2 of every profiled length
ELASTIC_ALPHAS = (0, 512, 1024, 2048, 4096, 8192, 16384)
ELASTIC_BETAS = (0.0, 0.125, 0.25, 0.5)
SPARQ_RS = (8, 16, 32)
SPARQ_K_RATIOS = (1 / 16, 1 / 8, 1 / 4)
SPARQ_LOCAL = 16


def default_candidates(lengths: Sequence[int], block_size: int, head_dim: int) -> list[Pattern]:
    """Dense + windows at N/16..N/2 + elastic (alpha, beta) + SparQ (r, k_ratio) grid."""
    out: list[Pattern] = [Dense()]
    spans = sorted(
        {
            max(block_size, (n // f) // block_size * block_size)
            for n in lengths
            for f in WINDOW_FRACTIONS
        }
    )
    out += [Window(sink=DEFAULT_SINK, span=s) for s in spans]
    longest = max(lengths)
    for alpha in ELASTIC_ALPHAS:
        if alpha and alpha >= longest // 2:
            continue
        for beta in ELASTIC_BETAS:
            if alpha == 0 and beta == 0:
                continue  # sink + the token itself only
            out.append(Elastic(sink=DEFAULT_SINK, alpha=float(alpha), beta=beta))
    for r in SPARQ_RS:
        if r <= head_dim:
            out += [SparQ(r=r, k_ratio=kr, local=SPARQ_LOCAL) for kr in SPARQ_K_RATIOS]
    return out


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


def split_static(cands: Sequence[Pattern]) -> tuple[list[Pattern], list[SparQ]]:
    """Static (mask) candidates and SparQ candidates, each in the given order."""
    static = [c for c in cands if c.static]
    sparq = [c for c in cands if isinstance(c, SparQ)]
    other = [c for c in cands if not c.static and not isinstance(c, SparQ)]
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
