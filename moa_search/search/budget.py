"""Budgets: how much KV memory, how many KV bytes and how much attention time per decode
step a plan may use.

Why a small grammar: users think either in fractions of dense ("a quarter of the KV
cache") or in bytes on their GPU ("8 GiB for 8 sequences of 32k tokens"); both end up as
one byte cap per sequence at one or more lengths, which is what the knapsack needs.

Grammar (one ``--budget`` each, or several joined by commas)::

    memory=0.25                 fraction of dense KV bytes, at every planned length
    bandwidth=20%               fraction of dense bytes read per decode step
    memory=8GiB@32k,batch=8     absolute bytes for ``batch`` sequences at 32k tokens
    latency=0.5                 fraction of the dense plan's predicted attention time per
                                decode step (``,batch=8``: at batch 8; default 1)
    latency=300us@32k,batch=8   absolute attention time of one decode step of ``batch``
                                sequences at 32k tokens (units us, ms, s)

Lengths take ``k`` (x1024) or ``m`` (x1024**2) suffixes. Byte units: B, KB/MB/GB/TB
(powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024). Latency is predicted from a measured
cost table (``moa_search.search.latency``; the search takes it as ``--costs``), summed over
heads like bytes, so the knapsack caps it the same way; a latency cap is per step of the
whole batch, not per sequence.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from moa_search.errors import MoaSearchError, finite_float

KINDS = ("memory", "bandwidth", "latency")
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}
_BYTES_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """One cap: ``fraction`` of dense, or ``total_bytes`` (``total_us`` for latency) for
    ``batch`` sequences at ``length``."""

    kind: str
    fraction: float | None = None
    total_bytes: int | None = None
    length: int | None = None
    batch: int = 1
    total_us: float | None = None

    @property
    def is_fraction(self) -> bool:
        return self.fraction is not None

    def cap(self, dense: float) -> float:
        """The cap, given what dense would cost at the same length: bytes for one sequence
        (memory, bandwidth), or microseconds of one step of the batch (latency)."""
        if self.fraction is not None:
            return self.fraction * dense
        if self.total_us is not None:
            return self.total_us
        assert self.total_bytes is not None
        return self.total_bytes / self.batch

    def to_plan_field(self) -> Any:
        """What the plan's ``made_for.budget`` records for this cap."""
        if self.fraction is not None:
            if self.batch != 1:
                return {"fraction": self.fraction, "batch": self.batch}
            return self.fraction
        if self.total_us is not None:
            return {"us": self.total_us, "length": self.length, "batch": self.batch}
        return {"bytes": self.total_bytes, "length": self.length, "batch": self.batch}

    def text(self) -> str:
        """Canonical text form, parseable again."""
        batch = f",batch={self.batch}" if self.batch != 1 else ""
        if self.fraction is not None:
            return f"{self.kind}={self.fraction:g}{batch}"
        extra = f"@{self.length}" if self.length else ""
        if self.total_us is not None:
            return f"{self.kind}={self.total_us:g}us{extra}{batch}"
        return f"{self.kind}={self.total_bytes}B{extra}{batch}"


def parse_length(text: str, what: str = "length") -> int:
    """``"32k"`` -> 32768, ``"4096"`` -> 4096; one-line error otherwise."""
    raw = text.strip().lower()
    scale = 1
    if raw.endswith("k"):
        raw, scale = raw[:-1], 1024
    elif raw.endswith("m"):
        raw, scale = raw[:-1], 1024**2
    try:
        value = float(raw) * scale
    except ValueError:
        raise MoaSearchError(
            f"{what} must be a token count like 4096 or 32k, got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0 or not value.is_integer():
        raise MoaSearchError(f"{what} must be a positive whole token count, got {text!r}")
    return int(value)


def parse_bytes(text: str) -> int:
    """``"8GiB"`` -> 8589934592; a unit is required so fractions and bytes never mix up."""
    match = _BYTES_RE.match(text.strip())
    if not match or match.group(2).lower() not in _UNITS:
        raise MoaSearchError(
            f"budget size {text!r}: expected a number with a unit (B, KB, MB, GB, KiB, MiB, GiB)"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise MoaSearchError(f"budget size {text!r} must be positive")
    return int(value)


def parse_time(text: str) -> float:
    """``"300us"`` -> 300.0, ``"1.5ms"`` -> 1500.0 (microseconds); a unit is required."""
    match = _BYTES_RE.match(text.strip())
    if not match or match.group(2).lower() not in _TIME_UNITS:
        raise MoaSearchError(f"budget time {text!r}: expected a number with a unit (us, ms, s)")
    value = float(match.group(1)) * _TIME_UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise MoaSearchError(f"budget time {text!r} must be positive")
    return value


def _parse_value(kind: str, raw: str, source: str) -> Budget:
    value, at, length_text = raw.partition("@")
    value = value.strip()
    length = parse_length(length_text, f"budget {source!r}: length") if at else None
    if value.endswith("%"):
        number = _float(value[:-1], source) / 100
        return _fraction(kind, number, length, source)
    if re.search(r"[a-zA-Z]$", value):
        if kind == "latency":
            return Budget(kind, total_us=parse_time(value), length=length)
        return Budget(kind, total_bytes=parse_bytes(value), length=length)
    return _fraction(kind, _float(value, source), length, source)


def _float(text: str, source: str) -> float:
    return finite_float(text, f"budget {source!r}: value")


def _fraction(kind: str, value: float, length: int | None, source: str) -> Budget:
    if not 0 < value <= 1:
        raise MoaSearchError(
            f"budget {source!r}: a fraction of dense must be in (0, 1], got {value:g} "
            "(give bytes with a unit, e.g. 8GiB, or a time, e.g. 300us, for an absolute budget)"
        )
    if length is not None:
        raise MoaSearchError(
            f"budget {source!r}: '@length' is only for absolute budgets (fractions apply at "
            "every planned length)"
        )
    return Budget(kind, fraction=value)


def parse_budget(text: str) -> list[Budget]:
    """Parse one budget string (possibly several comma-joined caps) into Budgets."""
    if not isinstance(text, str) or not text.strip():
        raise MoaSearchError(f"budget must be a non-empty string like 'memory=0.25', got {text!r}")
    budgets: list[Budget] = []
    for part in (p.strip() for p in text.split(",")):
        key, eq, raw = part.partition("=")
        key = key.strip().lower()
        if not eq or not raw.strip():
            raise MoaSearchError(f"budget {text!r}: expected key=value, got {part!r}")
        if key in KINDS:
            budgets.append(_parse_value(key, raw, text))
        elif key == "batch":
            # a latency fraction depends on the batch too (launch overhead is shared)
            if not budgets or (budgets[-1].is_fraction and budgets[-1].kind != "latency"):
                raise MoaSearchError(
                    f"budget {text!r}: 'batch' must follow an absolute budget like "
                    "memory=8GiB@32k, or a latency budget"
                )
            batch = _float(raw, text)
            if batch < 1 or not batch.is_integer():
                raise MoaSearchError(f"budget {text!r}: batch must be a whole number >= 1")
            budgets.append(dataclasses.replace(budgets.pop(), batch=int(batch)))
        else:
            raise MoaSearchError(
                f"budget {text!r}: unknown key {key!r} (expected memory, bandwidth, latency "
                "or batch)"
            )
    return budgets


def parse_budgets(texts: str | list[str] | tuple[str, ...]) -> list[Budget]:
    """Parse every budget string; at most one cap per kind."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise MoaSearchError("give at least one budget, e.g. --budget memory=0.25")
    budgets = [b for item in items for b in parse_budget(item)]
    kinds = [b.kind for b in budgets]
    for kind in KINDS:
        if kinds.count(kind) > 1:
            raise MoaSearchError(
                f"budget: {kind} is given {kinds.count(kind)} times (give it once)"
            )
    return budgets
