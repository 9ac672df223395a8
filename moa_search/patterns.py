"""Sparse attention patterns: which keys a query sees, and what a KV head stores and reads.

Every pattern is a small frozen dataclass registered by name, so plans, the CLI, the
profiler, the search and the generic tests can iterate over ``PATTERNS`` and a new
pattern is covered everywhere by adding one class here: besides its geometry and costs it
declares its share of the profiler's candidate grid (``candidates``), how the gradient
profiler prices it (``pricing``), whether the search groups it by sink (``has_sink``) and
compares plans to its uniform baseline (``uniform_baseline``), its plot style (``style``)
and how eval's budget sweep resizes it (``scaled``).

Positions are 0-based. A query at position ``i`` has seen ``i + 1`` tokens. All patterns
are causal (key ``j <= i``). A span is taken at the length ``n`` the sequence reaches in
the forward that computes the query (``reach``): the prompt's length for every query of a
prefill, ``i + 1`` for a decode step. That is how MoA sizes an elastic head (its span
alpha + beta*N for an input of N tokens, every query of the prompt included), and what the
memory is counted at: after the forward a head holds ``sink + span_at(n)`` entries, so the
prompt's early queries may see that many keys at no extra memory.

Cache geometry shared by the runtime and the Triton kernels: a KV head keeps its first
``sink`` positions in place, and later positions in a ring of ``ring`` slots
(slot = sink + (p - sink) % ring). A query attends to the sink positions and to the most
recent ``span_at(n)`` positions. Dense heads are the special case sink=0, ring >= n,
span = n.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from moa_search.errors import MoaSearchError, finite_float

PATTERNS: dict[str, type[Pattern]] = {}
#: Largest value any numeric pattern parameter may take: positions, spans and counts are
#: 32-bit in the runtime's metadata and kernels, and larger values overflow tensor maths.
MAX_PARAM = 2**31 - 1
#: sinks of the default candidate grids: the measured profiler's, and the gradient one's
#: (MoA's 64)
MEASURED_SINK = 32
GRADIENT_SINK = 64
#: GPU global memory moves in 32-byte sectors (the L2 / DRAM access granularity of NVIDIA
#: GPUs): reading any byte of a sector costs the whole sector, so a gather of scattered
#: components is priced by the sectors it touches, not by the bytes it uses.
SECTOR_BYTES = 32
#: SparQ heads keep a running sum of V per sequence in fp32 whatever the cache's dtype
#: (``MoALayerCache.v_sum``): head_dim of these per head, stored, and read every step.
V_SUM_BYTES = 4
#: SparQ heads keep their keys a second time, transposed (head_dim rows of positions) and
#: in fp8 e4m3, in a side buffer of the runtime cache (``MoALayerCache.sparq_kt``): step 1
#: then reads r contiguous bytes per position instead of r scattered sectors of K.
SPARQ_SIDE_DTYPE = torch.float8_e4m3fn
SPARQ_SIDE_BYTES = 1
#: SparQ's decode workspace: one int32 selection key per position, written by the scoring
#: pass and read by the three radix-select levels and the compaction (``kernels.sparq``)
SPARQ_KEY_BYTES = 4
SPARQ_KEY_PASSES = 4


class PlotStyle(NamedTuple):
    """How plots draw a family: matplotlib marker of its uniform baseline, plan-map letter."""

    marker: str
    letter: str


def register(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make a pattern known to parse(), plans, CLI and generic tests."""
    PATTERNS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses set ``name`` and implement the geometry methods."""

    name: ClassVar[str] = ""
    #: True when the kept keys depend on positions only (maskable in prefill, storable in
    #: a ring). False for data-dependent patterns such as SparQ (full KV stays).
    static: ClassVar[bool] = True
    #: how the gradient profiler prices it: "mask" (from its position rule; any static
    #: pattern) or "sparq" (SparQ's decode emulated at every row). The measured profiler runs
    #: every static pattern through the runtime's masked prefill and needs nothing here.
    pricing: ClassVar[str] = "mask"
    #: sink positions are part of its shape (the search's per-candidate sink column)
    has_sink: ClassVar[bool] = False
    #: a uniform plan of this family is a baseline the search's Pareto plot shows
    uniform_baseline: ClassVar[bool] = True
    #: plot style: marker of its uniform baseline (Pareto plot), letter on the plan map
    style: ClassVar[PlotStyle] = PlotStyle(marker="o", letter="?")

    # --- candidates -----------------------------------------------------------------
    @classmethod
    def candidates(
        cls, lengths: Sequence[int], head_dim: int, grid: str = "measured", block_size: int = 64
    ) -> list[Pattern]:
        """This family's share of the profiler's default candidates at ``lengths``:
        ``grid`` is "measured" (the default method's grid) or "gradient" (spans on
        ``block_size`` multiples). None by default: such a pattern is profiled when named."""
        return []

    def scaled(self, factor: float, n: int) -> Pattern:
        """This pattern with its size (not its shape) times ``factor``, at length ``n``: how
        eval's budget sweep moves a plan to another memory. Unchanged by default."""
        return self

    # --- geometry -------------------------------------------------------------------
    @property
    def sink(self) -> int:
        return 0

    def span_at(self, n: int | torch.Tensor) -> int | torch.Tensor:
        """Recent positions a query attends to when its sequence reaches ``n`` tokens in
        the forward that computes it (itself included; see the module docstring)."""
        return n

    def allowed(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, reach: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bool mask, broadcast over ``q_pos[..., :, None]`` and ``k_pos[..., None, :]``.
        ``reach``: the length the forward's sequence reaches (an int, or a tensor that
        broadcasts against ``q_pos``); None takes each query's own ``i + 1``."""
        q = q_pos.unsqueeze(-1)
        k = k_pos.unsqueeze(-2)
        span = self.span_at(seen_length(q_pos, reach).unsqueeze(-1))
        return (k <= q) & ((k < self.sink) | (q - k < span))

    def span_affine(self) -> tuple[float, float] | None:
        """(a, b) with span_at(n) == min(n, max(span_least(), floor(a + b*n + 1/2))), or None
        if the span has no such form. Lets decode compute a whole layer's spans in the
        append kernel instead of a few torch ops per head and step."""
        return (0.0, 1.0)

    def span_least(self) -> int:
        """The smallest span ``span_affine``'s form gives (before the clamp to n): 1, or an
        elastic head's ``floor``."""
        return 1

    def stored_entries(self, n: int) -> int:
        """KV entries a head must hold after ``n`` tokens so that later steps stay exact."""
        return min(n, self.sink + int(self.span_at(n)))

    def held_from(self, n: int | torch.Tensor, reach: int = 0) -> int | torch.Tensor:
        """First position past the sink a head still holds after ``n`` tokens: it keeps its
        sink and the last ``span_at`` positions, whatever its ring could physically hold,
        so a later forward's results never depend on how the cache was allocated.
        ``reach``: the length of a prompt being fed in chunks, whose span the head keeps
        from its first chunk on. Not static (SparQ): every key is held (0)."""
        if isinstance(n, torch.Tensor):
            if not self.static:
                return torch.zeros_like(n)
            span = torch.as_tensor(self.span_at(n.clamp(min=max(1, reach))), device=n.device)
            return (n - span).clamp_min(0)
        if not self.static:
            return 0
        return max(0, n - int(self.span_at(max(n, reach, 1))))

    def sink_slots(self, max_len: int) -> int:
        """Slots kept in place by a cache able to reach ``max_len`` tokens. A sink of
        ``max_len`` or more leaves the newest position to the ring's one slot, so the head
        never allocates more than ``max_len`` slots."""
        return max(0, min(self.sink, max_len - 1))

    def ring_size(self, max_len: int) -> int:
        """Slots after the sink that a cache able to reach ``max_len`` tokens allocates: the
        recent positions its largest span keeps past the sink (at least one)."""
        return max(1, min(max_len, self.sink + int(self.span_at(max_len))) - self.sink)

    def capacity(self, max_len: int) -> int:
        """Total slots (sink + ring) allocated for a cache that can reach ``max_len`` tokens:
        ``stored_entries(max_len)``, what the costs count."""
        return self.sink_slots(max_len) + self.ring_size(max_len)

    def read_entries(self, n: int, head_dim: int, dtype_bytes: int = 2) -> float:
        """KV rows (K and V each ``head_dim`` wide) read by one decode step at length ``n``;
        fractional where a pattern reads parts of rows (``dtype_bytes`` then matters)."""
        return float(self.stored_entries(n))

    # --- costs ----------------------------------------------------------------------
    def bytes_stored(
        self, n: int, head_dim: int, dtype_bytes: int = 2, window: int | None = None
    ) -> int:
        """Bytes one KV head of one sequence holds after ``n`` tokens: K and V, plus any side
        buffer its pattern keeps (``side_bytes``); what ``MoACache`` allocates for
        ``max_cache_len=n``.

        ``window``: the model layer's own sliding window; no head then holds more than it
        (a dense head on a sliding layer is that window)."""
        entries = self.stored_entries(n)
        if window is not None:
            entries = min(entries, window)
        return 2 * entries * head_dim * dtype_bytes + self.side_bytes(n, head_dim, window)

    def side_bytes(self, n: int, head_dim: int, window: int | None = None) -> int:
        """Bytes besides K and V that the runtime cache keeps for one head of one sequence
        after ``n`` tokens (``MoALayerCache.nbytes`` counts the same buffers). None here."""
        return 0

    def bytes_read(
        self, n: int, head_dim: int, dtype_bytes: int = 2, window: int | None = None
    ) -> int:
        """Bytes of K and V one decode step reads for one KV head of one sequence
        (``window`` as in :meth:`bytes_stored`; SparQ then works over the window)."""
        if window is None:
            entries = self.read_entries(n, head_dim, dtype_bytes)
        elif self.static:
            entries = min(self.read_entries(n, head_dim, dtype_bytes), window)
        else:
            entries = self.read_entries(min(n, window), head_dim, dtype_bytes)
        return int(round(2 * entries * head_dim * dtype_bytes))

    # --- text form ------------------------------------------------------------------
    def spec(self) -> str:
        """Short string that ``parse`` turns back into an equal pattern."""
        fields = [f for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if not fields:
            return self.name
        args = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields)
        return f"{self.name}:{args}"

    def validate(self, head_dim: int | None = None) -> None:
        """Raise ValueError naming the offending parameter."""

    def check(self, head_dim: int | None = None) -> None:
        """``validate`` plus the range every numeric parameter must fit (``MAX_PARAM``);
        ValueError naming the parameter. What plans, parse and importers call."""
        self.validate(head_dim)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not abs(value) <= MAX_PARAM:  # also catches nan
                shown = f"{value:.3g}" if abs(value) >= 1e15 else repr(value)
                raise ValueError(f"{f.name} must be at most {MAX_PARAM}, got {shown}")

    def __str__(self) -> str:
        return self.spec()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else f"{value:.1f}"
    return str(value)


@register
@dataclass(frozen=True)
class Dense(Pattern):
    """Full causal attention: the baseline every plan is measured against."""

    name: ClassVar[str] = "dense"
    uniform_baseline: ClassVar[bool] = False  # the reference itself
    style: ClassVar[PlotStyle] = PlotStyle("o", "D")

    @classmethod
    def candidates(cls, lengths, head_dim, grid="measured", block_size=64) -> list[Pattern]:
        return [cls()]

    def ring_size(self, max_len: int) -> int:
        return max_len


@register
@dataclass(frozen=True)
class Window(Pattern):
    """Sliding window with attention sinks (StreamingLLM): key j<sink or i-j<span."""

    name: ClassVar[str] = "window"
    has_sink: ClassVar[bool] = True
    style: ClassVar[PlotStyle] = PlotStyle("s", "W")
    sink: int = 0  # type: ignore[assignment]
    span: int = 256

    @classmethod
    def candidates(cls, lengths, head_dim, grid="measured", block_size=64) -> list[Pattern]:
        """measured: spans 32, 64, ... up to half the longest length (sink 32); gradient:
        spans N/16 .. N/2 of every length on ``block_size`` multiples (sink 64)."""
        if grid == "gradient":
            spans = {max(block_size, (n // f) // block_size * block_size) for n in lengths
                     for f in (16, 8, 4, 2)}  # fmt: skip
            return [cls(sink=GRADIENT_SINK, span=s) for s in sorted(spans)]
        spans, s = [], 32
        while s <= max(lengths) // 2:
            spans.append(s)
            s *= 2
        return [cls(sink=MEASURED_SINK, span=s) for s in spans]

    def scaled(self, factor: float, n: int) -> Pattern:
        return dataclasses.replace(self, span=max(1, min(n, round(self.span * factor))))

    def span_at(self, n: int | torch.Tensor) -> int | torch.Tensor:
        if isinstance(n, torch.Tensor):
            return torch.clamp(n, max=self.span)
        return min(n, self.span)

    def span_affine(self) -> tuple[float, float]:
        return (float(self.span), 0.0)

    def validate(self, head_dim: int | None = None) -> None:
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.span <= 0:
            raise ValueError(f"span must be > 0, got {self.span}")


@register
@dataclass(frozen=True)
class Elastic(Pattern):
    """MoA's elastic span: window of span(n) = max(floor, floor(alpha + beta*n + 1/2)),
    clamped to [1, n]; ``floor`` is optional.

    ``n`` is the length the sequence reaches in the forward (the module docstring): every
    query of an N-token prompt sees span(N), as in MoA, and the span keeps growing by beta
    per generated token. beta <= 1 guarantees an evicted key is never needed again (the
    max of two such spans moves forward too).

    Why a floor: with ``floor`` set to its span at the shortest planned length, a head is
    that window up to there (a shorter prompt does not shrink it) and keeps the same share
    of the context beyond it, at the same memory at every planned length.
    """

    name: ClassVar[str] = "elastic"
    has_sink: ClassVar[bool] = True
    style: ClassVar[PlotStyle] = PlotStyle("^", "E")
    sink: int = 0  # type: ignore[assignment]
    alpha: float = 0.0
    beta: float = 0.25
    floor: int | None = None

    @classmethod
    def candidates(cls, lengths, head_dim, grid="measured", block_size=64) -> list[Pattern]:
        """measured: (alpha, beta) = (256, 1/8), (512, 1/4) and, over several lengths, the
        proportional twin (0, s / shortest, floor s) of every window span s from 32 to half
        the shortest length (sink 32); gradient: alpha 0 .. 16k x beta 0 .. 0.5 (sink 64).
        Alphas from half the longest length up are left out.

        Why twins: a fraction-of-dense budget always binds at the shortest length (no
        pattern's share of dense grows with n), where a twin costs what its window costs,
        while at the longer lengths it keeps the same share of the context, as the
        equal-memory uniform baseline does. The floor keeps it the window up to the shortest
        length. One length has no twins: there they are the windows."""
        half = max(lengths) // 2
        if grid == "gradient":
            pairs = [(a, b) for a in (0, 512, 1024, 2048, 4096, 8192, 16384) if not a or a < half
                     for b in (0.0, 0.125, 0.25, 0.5) if a or b]  # fmt: skip
            return [cls(sink=GRADIENT_SINK, alpha=float(a), beta=b) for a, b in pairs]
        floors: dict[tuple[float, float], int | None] = {
            (float(a), b): None
            for a, b in ((0, 0.125), (0, 0.25), (256, 0.125), (512, 0.25))
            if a < half
        }
        if len(set(lengths)) > 1:  # a twin replaces the unfloored rule of the same beta
            shortest, span = min(lengths), 32
            while span <= shortest // 2:
                floors[(0.0, span / shortest)] = span
                span *= 2
        return [cls(sink=MEASURED_SINK, alpha=a, beta=b, floor=floors[(a, b)])
                for a, b in sorted(floors)]  # fmt: skip

    def scaled(self, factor: float, n: int) -> Pattern:
        beta = min(1.0, round(self.beta * factor, 4))
        floor = None if self.floor is None else max(1, round(self.floor * factor))
        return dataclasses.replace(
            self, alpha=round(self.alpha * factor, 3), beta=beta, floor=floor
        )

    def span_at(self, n: int | torch.Tensor) -> int | torch.Tensor:
        least = max(1, self.floor or 0)
        if isinstance(n, torch.Tensor):
            raw = torch.floor(self.alpha + self.beta * n.to(torch.float64) + 0.5).to(n.dtype)
            return torch.minimum(torch.clamp(raw, min=least), n)
        raw = math.floor(self.alpha + self.beta * n + 0.5)
        return max(1, min(n, max(least, raw)))

    def span_affine(self) -> tuple[float, float] | None:
        return (float(self.alpha), float(self.beta))

    def span_least(self) -> int:
        return max(1, self.floor or 0)

    def validate(self, head_dim: int | None = None) -> None:
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.floor is not None and self.floor < 0:
            raise ValueError(f"floor must be >= 0, got {self.floor}")
        if not 0 <= self.beta <= 1:
            raise ValueError(
                f"beta must be in [0, 1] (so evicted keys are never needed again), got {self.beta}"
            )


@register
@dataclass(frozen=True)
class SparQ(Pattern):
    """SparQ decode (arXiv 2312.04985): bandwidth-saving, data-dependent; full KV is stored.

    Per decode step: the top-r components of |q| (summed over the GQA group) select r
    columns of K, approximate scores pick the top-k positions (the ``local`` most recent
    always kept), exact attention runs over those, and the result is mixed with mean(V) by
    the approximate softmax mass of the chosen positions. Prefill is dense.
    """

    name: ClassVar[str] = "sparq"
    static: ClassVar[bool] = False
    pricing: ClassVar[str] = "sparq"
    style: ClassVar[PlotStyle] = PlotStyle("D", "S")
    r: int = 16
    k: int | None = None
    k_ratio: float | None = None
    local: int = 16

    @classmethod
    def candidates(cls, lengths, head_dim, grid="measured", block_size=64) -> list[Pattern]:
        """measured: the paper's 1/8 and 1/4 transfer (r = d/8, k = N/16; r = d/4, k = N/8);
        gradient: r 8, 16, 32 (at most d) x k_ratio 1/16, 1/8, 1/4."""
        if grid == "gradient":
            return [cls(r=r, k_ratio=kr, local=16) for r in (8, 16, 32) if r <= head_dim
                    for kr in (1 / 16, 1 / 8, 1 / 4)]  # fmt: skip
        return [cls(r=head_dim // q, k_ratio=1 / (2 * q), local=16) for q in (8, 4)
                if head_dim // q >= 1]  # fmt: skip

    def k_at(self, n: int | torch.Tensor) -> int | torch.Tensor:
        """Positions attended exactly at length n (elementwise for a tensor of lengths)."""
        if isinstance(n, torch.Tensor):
            if self.k is not None:
                want = torch.full_like(n, self.k)
            else:
                want = torch.ceil((self.k_ratio or 0.0) * n.to(torch.float64)).to(n.dtype)
            keep = torch.maximum(want, torch.clamp(n, max=self.local))
            return torch.clamp(torch.minimum(n, keep), min=1)
        want = self.k if self.k is not None else math.ceil((self.k_ratio or 0.0) * n)
        return max(1, min(n, max(want, min(self.local, n))))

    def ring_size(self, max_len: int) -> int:
        return max_len

    def read_entries(self, n: int, head_dim: int, dtype_bytes: int = 2) -> float:
        """K+V rows' worth of bytes one decode step moves, under the layout the runtime
        decodes from (``sparq_step_bytes``): the side buffer's r rows twice, the selection
        keys, k full K and V rows and the fp32 sum of V."""
        return self.scan_entries(n, head_dim, dtype_bytes) + self.k_at(n)

    def scan_entries(self, n: int, head_dim: int, dtype_bytes: int = 2) -> float:
        """The part of ``read_entries`` that does not depend on k (scoring, selection, the
        sum of V), in K+V rows' worth of bytes."""
        parts = sparq_step_bytes(n, head_dim, min(self.r, head_dim), 0, dtype_bytes)
        return sum(parts.values()) / (2 * head_dim * dtype_bytes)

    def side_bytes(self, n: int, head_dim: int, window: int | None = None) -> int:
        """The fp32 running sum of V and the fp8 transposed copy of K (``SPARQ_SIDE_DTYPE``,
        one slot per K slot) that step 1 reads; the full K and V are stored besides."""
        if n <= 0:
            return 0
        slots = min(n, window) if window is not None else n
        return head_dim * V_SUM_BYTES + slots * head_dim * SPARQ_SIDE_BYTES

    def validate(self, head_dim: int | None = None) -> None:
        if self.r <= 0:
            raise ValueError(f"r must be > 0, got {self.r}")
        if head_dim is not None and self.r > head_dim:
            raise ValueError(f"r must be <= head_dim ({head_dim}), got {self.r}")
        if (self.k is None) == (self.k_ratio is None):
            raise ValueError("give exactly one of k or k_ratio")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"k must be > 0, got {self.k}")
        if self.k_ratio is not None and not 0 < self.k_ratio <= 1:
            raise ValueError(f"k_ratio must be in (0, 1], got {self.k_ratio}")
        if self.local < 0:
            raise ValueError(f"local must be >= 0, got {self.local}")


def sparq_side_keys(k: torch.Tensor, dtype: torch.dtype = SPARQ_SIDE_DTYPE) -> torch.Tensor:
    """Keys as SparQ's side buffer holds them: rounded to ``dtype`` (nearest even), fp8
    saturating at +-448 instead of turning into NaN. The one torch home of the rounding
    the Triton kernels emulate (``kernels.sparq._round_side``)."""
    if dtype == torch.float8_e4m3fn:
        k = k.float().clamp(-448.0, 448.0)
    return k.to(dtype)


def sparq_step_bytes(
    n: int, head_dim: int, r: int, k: int, dtype_bytes: int = 2, side_bytes: int | None = None
) -> dict[str, int]:
    """Bytes one SparQ decode step moves for one (sequence, KV head), by stage, as the
    runtime's Triton pipeline runs it (``kernels.sparq``; the benchmark prints these next
    to its own count of each launch):

    - score: two passes over r rows of the side buffer (softmax normalisers, then the
      selection keys), n int32 keys written;
    - select: the keys read by three radix levels and the compaction;
    - attend: k full K and V rows and the fp32 sum of V (the k int32 row indices, under 1%
      of the rows, are left out).

    ``side_bytes``: bytes per side-buffer component (default ``SPARQ_SIDE_BYTES``)."""
    side = SPARQ_SIDE_BYTES if side_bytes is None else side_bytes
    return {
        "score": 2 * n * r * side + n * SPARQ_KEY_BYTES,
        "select": SPARQ_KEY_PASSES * n * SPARQ_KEY_BYTES,
        "attend": 2 * k * head_dim * dtype_bytes + head_dim * V_SUM_BYTES,
    }


@functools.lru_cache(maxsize=1024)
def sectors_touched(head_dim: int, r: int, dtype_bytes: int = 2) -> float:
    """Expected ``SECTOR_BYTES`` sectors a gather of ``r`` of a row's ``head_dim``
    components touches, the r distinct and uniformly random (SparQ's top-r of |q| changes
    with every query).

    Exact: a sector holding m of the components is missed with probability
    C(d - m, r) / C(d, r). Rows packed back to back start on a sector boundary only when
    head_dim * dtype_bytes is a multiple of it; otherwise this averages over the offsets
    at which rows start, which the rows take in turn."""
    step = math.gcd(head_dim * dtype_bytes, SECTOR_BYTES)
    starts = range(0, SECTOR_BYTES, step)
    total = math.comb(head_dim, r)
    touched = 0.0
    for start in starts:
        sizes = Counter((start + c * dtype_bytes) // SECTOR_BYTES for c in range(head_dim))
        touched += sum(1 - math.comb(head_dim - m, r) / total for m in sizes.values())
    return touched / len(starts)


def sparq_query_components(
    q: torch.Tensor, r: int, group_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparQ's first step, shared by the runtime, the profiler and the Triton kernel.

    ``q``: queries with components on the last axis and the query heads of one GQA group on
    ``group_dim``. Returns the indices of the top-r components of |q| summed over the group
    (``q``'s shape without ``group_dim``, last axis r; shared by the group), the gathered
    components ``q[..., idx]`` (``q``'s shape, last axis r) and each query's approximate-score
    scale sqrt(D * sum|q[idx]| / sum|q|) (``q``'s shape without the last axis, >= 1e-30):
    approximate scores are ``q[idx] . K[:, idx] / scale``.
    """
    qa = q.abs()
    idx = qa.sum(group_dim).topk(r, dim=-1).indices
    q_r = q.gather(-1, idx.unsqueeze(group_dim).expand(*q.shape[:-1], r))
    scale = torch.sqrt(q.shape[-1] * q_r.abs().sum(-1) / qa.sum(-1).clamp_min(1e-30))
    return idx, q_r, scale.clamp_min(1e-30)


def parse(spec: str | Pattern, head_dim: int | None = None) -> Pattern:
    """Turn ``"window:sink=4,span=256"`` into ``Window(sink=4, span=256)``, validated.

    Raises MoaSearchError with a one-line message on any malformed spec.
    """
    if isinstance(spec, Pattern):
        try:
            spec.check(head_dim)
        except ValueError as exc:
            raise MoaSearchError(f"pattern {spec.spec()!r}: {exc}") from None
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise MoaSearchError(f"pattern spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    name, _, arg_text = text.partition(":")
    name = name.strip().lower()
    if name not in PATTERNS:
        known = ", ".join(sorted(PATTERNS))
        raise MoaSearchError(f"unknown pattern {name!r} in {text!r} (known: {known})")
    cls = PATTERNS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in arg_text.split(","))):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq:
            raise MoaSearchError(f"pattern {text!r}: expected key=value, got {part!r}")
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise MoaSearchError(
                f"pattern {text!r}: unknown parameter {key!r} (allowed: {allowed})"
            )
        if key in kwargs:
            raise MoaSearchError(f"pattern {text!r}: parameter {key!r} given twice")
        kwargs[key] = _convert(text, key, raw.strip(), fields[key].type)
    pattern = cls(**kwargs)
    try:
        pattern.check(head_dim)
    except ValueError as exc:
        raise MoaSearchError(f"pattern {text!r}: {exc}") from None
    return pattern


def _convert(text: str, key: str, raw: str, annotation: object) -> int | float:
    wants_int = "int" in str(annotation)
    value = finite_float(raw, f"pattern {text!r}: {key}")
    if wants_int and "float" not in str(annotation):
        if not value.is_integer():
            raise MoaSearchError(f"pattern {text!r}: {key} must be an integer, got {raw!r}")
        return int(value)
    if wants_int and value.is_integer() and "." not in raw and "e" not in raw.lower():
        return int(value)
    return value


def dense_causal(
    q_pos: torch.Tensor, k_pos: torch.Tensor, reach: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Plain causal mask with the same broadcasting rules as ``Pattern.allowed``."""
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def seen_length(q_pos: torch.Tensor, reach: int | torch.Tensor | None = None) -> torch.Tensor:
    """The length each query's span is taken at: its own ``i + 1``, raised to ``reach``
    (the length its forward reaches; see the module docstring)."""
    own = q_pos + 1
    if reach is None:
        return own
    if isinstance(reach, torch.Tensor):
        return torch.maximum(own, reach.to(device=own.device, dtype=own.dtype))
    return own.clamp(min=int(reach))
