"""Generic tests over every registered pattern, plus the exact rules each one promises."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar  # at module level: dataclasses must see it for the toy pattern

import numpy as np
import pytest
import torch

from moa_search import MoaSearchError
from moa_search.patterns import PATTERNS, Dense, Elastic, SparQ, Window, parse, sectors_touched

EXAMPLES = {
    "dense": ["dense"],
    "window": ["window:sink=4,span=16", "window:sink=0,span=1", "window:sink=32,span=8"],
    "elastic": [
        "elastic:sink=4,alpha=8,beta=0.25",
        "elastic:sink=0,alpha=0,beta=1.0",
        "elastic:sink=2,alpha=3.5,beta=0.0",
        "elastic:sink=4,alpha=0,beta=0.25,floor=12",
    ],
    "sparq": ["sparq:r=4,k=8,local=2", "sparq:r=16,k_ratio=0.25,local=0"],
}


def test_every_registered_pattern_has_examples():
    assert set(EXAMPLES) == set(PATTERNS), "add examples for a new pattern here"


ALL_SPECS = [s for specs in EXAMPLES.values() for s in specs]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_spec_round_trip(spec):
    p = parse(spec)
    assert parse(p.spec()) == p
    assert str(p) == p.spec()


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_mask_is_causal_and_keeps_self(spec):
    p = parse(spec)
    pos = torch.arange(70)
    mask = p.allowed(pos, pos)
    assert not mask.triu(1).any(), "a pattern may never look at future keys"
    if p.static:
        assert mask.diagonal().all(), "every query sees its own key"


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_storage_covers_every_future_query(spec):
    """Keys a later query needs were never evicted: stored set at n is a superset."""
    p = parse(spec)
    if not p.static:
        return
    pos = torch.arange(90)
    mask = p.allowed(pos, pos)
    for n in range(1, 90):
        needed_later = mask[n - 1 :, :n].any(0).sum().item()
        # keys still needed at or after step n are within what the head stores at n
        assert needed_later <= p.stored_entries(n)
        assert p.stored_entries(n) <= n


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_costs_are_consistent(spec):
    p = parse(spec)
    for n in (1, 7, 64, 1000):
        stored = p.bytes_stored(n, 64, 2)
        side = p.side_bytes(n, 64)
        assert side == (64 * 4 + n * 64 if isinstance(p, SparQ) else 0)  # V sum, fp8 K copy
        assert stored == 2 * p.stored_entries(n) * 64 * 2 + side
        assert p.bytes_read(n, 64, 2) > 0
        assert p.capacity(n) == p.stored_entries(n)  # a cache sized for n allocates that
        if p.static:
            assert p.bytes_read(n, 64, 2) == stored


def test_window_rule_exact():
    p = Window(sink=2, span=3)
    pos = torch.arange(8)
    mask = p.allowed(pos, pos)
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (j <= i and (j < 2 or i - j < 3))


def test_capacity_never_exceeds_the_sequence():
    """A span reaching past the sequence, or a sink longer than it, allocates no spare slot."""
    assert Window(sink=4, span=48).capacity(50) == 50
    assert (Window(sink=60, span=8).sink_slots(50), Window(sink=60, span=8).ring_size(50)) == (
        49,
        1,
    )
    assert Elastic(sink=60, alpha=2, beta=0.5).capacity(50) == 50
    assert Window(sink=4, span=16).capacity(50) == 20


def test_elastic_span_rule_and_growth():
    p = Elastic(sink=1, alpha=2, beta=0.5)
    assert [p.span_at(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 3, 4, 7]
    spans = [p.span_at(n) for n in range(1, 200)]
    assert all(b - a in (0, 1) for a, b in zip(spans, spans[1:]))
    assert p.span_at(torch.tensor([1, 10])).tolist() == [1, 7]


def test_spans_are_taken_at_the_length_the_forward_reaches():
    """MoA's rule: every query of an N-token prompt sees span(N) recent keys (a decode step
    reaches its own i + 1); windows and dense do not depend on it."""
    p = Elastic(sink=2, alpha=0, beta=0.5)
    pos = torch.arange(64)
    prompt = p.allowed(pos, pos, 64)
    own = p.allowed(pos, pos)
    assert int(p.span_at(64)) == 32 and int(p.span_at(41)) == 21
    seen_40 = prompt[40].nonzero()[:, 0].tolist()
    assert seen_40 == [0, 1, *range(40 - 31, 41)], "sink + span(64) at query 40"
    assert own[40].nonzero()[:, 0].tolist() == [0, 1, *range(40 - 20, 41)]
    assert torch.equal(prompt[-1], own[-1]), "the last query reaches 64 either way"
    assert prompt[:33].equal(torch.ones(33, 64, dtype=torch.bool).tril()[:33])
    reach = torch.tensor([[64], [10]])  # per row, broadcast over the queries
    rows = p.allowed(pos[None].expand(2, -1), pos[None].expand(2, -1), reach)
    assert torch.equal(rows[0], prompt) and torch.equal(rows[1], p.allowed(pos, pos, 10))
    for q in (Window(sink=4, span=8), Dense()):
        assert torch.equal(q.allowed(pos, pos, 64), q.allowed(pos, pos))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_held_from_is_what_a_head_keeps_past_its_sink(spec):
    """After n tokens a head keeps its sink and its last span_at(n) positions (span_at of a
    chunked prompt's whole length while it is fed); ints and tensors agree."""
    p = parse(spec)
    ns = torch.arange(0, 300)
    for reach in (0, 150, 400):
        got = p.held_from(ns, reach)
        assert got.tolist() == [p.held_from(int(n), reach) for n in ns]
        if not p.static:
            assert not got.any()
            continue
        want = [max(0, n - int(p.span_at(max(n, reach, 1)))) for n in range(300)]
        assert got.tolist() == want
        kept = [min(n, p.sink) + n - max(h, min(n, p.sink)) for n, h in zip(range(300), want)]
        assert kept[-1] <= p.capacity(max(300, reach)), "the cache can hold what it keeps"


def test_elastic_floor_is_the_window_until_the_span_outgrows_it():
    """A floored twin is window(span=floor) up to floor / beta tokens, then beta * n; its
    span never grows by more than one per token (no evicted key is needed again)."""
    twin = Elastic(sink=4, alpha=0, beta=0.125, floor=64)
    window = Window(sink=4, span=64)
    for n in (1, 10, 64, 300, 512):
        assert twin.span_at(n) == window.span_at(n)
        assert twin.stored_entries(n) == window.stored_entries(n)
    assert twin.span_at(1024) == 128 and twin.stored_entries(1024) == 4 + 128
    ns = torch.arange(1, 2000)
    spans = twin.span_at(ns)
    assert spans.tolist() == [twin.span_at(int(n)) for n in ns]
    assert set(spans.diff().tolist()) <= {0, 1}
    assert twin.span_affine() == (0.0, 0.125) and twin.span_least() == 64
    assert twin.scaled(0.5, 1024) == Elastic(sink=4, alpha=0, beta=0.0625, floor=32)


def test_measured_twins_are_floored_at_their_window():
    """Over several lengths, every twin (0, s / shortest) has floor s: it costs its window at
    the shortest length and keeps the window's span at every earlier position."""
    twins = [p for p in Elastic.candidates([2048, 4096], 64) if p.floor is not None]
    assert twins, "several lengths give twins"
    for p in twins:
        assert p.alpha == 0 and p.span_at(2048) == p.floor == round(p.beta * 2048)
        assert p.span_at(4096) == 2 * p.floor
    assert not [p for p in Elastic.candidates([2048], 64) if p.floor is not None]


def test_sparq_counts_bandwidth_not_memory():
    p = SparQ(r=16, k=128, local=16)
    assert p.stored_entries(4096) == 4096, "SparQ keeps the full cache"
    side = 128 * 4 + 4096 * 128  # V sum, the fp8 transposed copy of K
    assert p.bytes_stored(4096, 128) == Dense().bytes_stored(4096, 128) + side
    assert p.bytes_stored(0, 128) == 0  # nothing allocated yet
    assert p.bytes_read(4096, 128) < Dense().bytes_read(4096, 128) / 2


def _mean_sectors(head_dim, r, dtype_bytes, subsets):
    """Mean distinct 32-byte sectors over ``subsets`` (rows of r component indices), row i
    of a packed row-major buffer starting at byte i * head_dim * dtype_bytes."""
    start = np.arange(len(subsets))[:, None] * head_dim * dtype_bytes
    sectors = np.sort((start + np.asarray(subsets) * dtype_bytes) // 32, axis=1)
    distinct = (np.diff(sectors, axis=1) != 0).sum(1) + 1
    return distinct.mean(), distinct.std()


@pytest.mark.parametrize(
    "head_dim, r, dtype_bytes",
    [(64, 8, 2), (128, 16, 2), (128, 8, 1), (64, 3, 4), (72, 5, 2), (256, 32, 2)],
)
def test_sparq_step1_sectors_equal_a_random_count(head_dim, r, dtype_bytes):
    """The formula against random r-subsets (72 x bf16: rows not sector-aligned). The
    tolerance is 5 standard errors, well under the 0.06 sector by which drawing with
    replacement would miss at (64, 8, 2)."""
    samples = 20_000
    rng = np.random.default_rng(0)
    subsets = rng.random((samples, head_dim)).argsort(1)[:, :r]
    mean, std = _mean_sectors(head_dim, r, dtype_bytes, subsets)
    assert sectors_touched(head_dim, r, dtype_bytes) == pytest.approx(
        mean, abs=5 * std / math.sqrt(samples) + 1e-9
    )


@pytest.mark.parametrize("head_dim, r, dtype_bytes", [(16, 3, 4), (12, 2, 4), (32, 5, 2)])
def test_sparq_step1_sectors_equal_every_subset_counted(head_dim, r, dtype_bytes):
    """Exact for small rows: every r-subset at every row start (12 x fp32: two starts)."""
    combos = list(itertools.combinations(range(head_dim), r))
    rows = 32 // math.gcd(head_dim * dtype_bytes, 32)  # rows until starts repeat
    subsets = [c for c in combos for _ in range(rows)]  # row i takes start i % rows
    mean, _ = _mean_sectors(head_dim, r, dtype_bytes, subsets)
    assert sectors_touched(head_dim, r, dtype_bytes) == pytest.approx(mean, rel=1e-12)


def test_sparq_reads_the_side_buffer_and_k_rows():
    """Step 1 reads r fp8 components of every key twice (side buffer), the selection keys
    are written once and read four times, step 2 reads k full rows, then the V sum."""
    n, d = 4096, 64
    p = SparQ(r=8, k=100, local=16)
    want = 2 * n * 8 + n * 4 + 4 * n * 4 + 2 * 100 * d * 2 + d * 4
    assert p.bytes_read(n, d) == want
    assert p.bytes_read(n, d, 4) == want + 2 * 100 * d * 2
    assert p.bytes_read(n, d, window=1000) == SparQ(r=8, k=100, local=16).bytes_read(1000, d)
    # the side buffer makes step 1 cost r bytes a key, not r scattered sectors of K
    assert SparQ(r=8, k_ratio=1 / 16).bytes_read(n, d) < Dense().bytes_read(n, d) / 2
    assert sectors_touched(64, 64, 2) == 4 and sectors_touched(64, 1, 2) == 1


@pytest.mark.parametrize("dtype_bytes", [1, 2, 4])
def test_static_patterns_read_whole_rows(dtype_bytes):
    """Dense, window and elastic read every row they keep, whole: 2 * entries * d * bytes."""
    n, d = 1000, 64
    for p, entries in ((Dense(), 1000), (Window(sink=4, span=60), 64),
                       (Elastic(sink=4, alpha=8, beta=0.1), 4 + 108)):  # fmt: skip
        assert p.read_entries(n, d, dtype_bytes) == entries
        assert p.bytes_read(n, d, dtype_bytes) == 2 * entries * d * dtype_bytes
        assert p.bytes_read(n, d, dtype_bytes, window=50) == 2 * min(entries, 50) * d * dtype_bytes


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nope", "unknown pattern"),
        ("window:span=0", "span must be > 0"),
        ("window:sink=-1,span=4", "sink must be >= 0"),
        ("window:spam=4", "unknown parameter"),
        ("window:span", "expected key=value"),
        ("window:span=abc", "must be a number"),
        ("window:span=2.5", "must be an integer"),
        ("elastic:beta=1.5", "beta must be in [0, 1]"),
        ("elastic:beta=0.5,floor=-2", "floor must be >= 0"),
        ("elastic:beta=0.5,floor=2.5", "must be an integer"),
        ("sparq:r=16", "exactly one of k or k_ratio"),
        ("sparq:r=0,k=4", "r must be > 0"),
        ("sparq:r=4,k_ratio=2", "k_ratio must be in (0, 1]"),
        ("", "non-empty"),
    ],
)
def test_bad_specs_give_one_line_errors(spec, fragment):
    with pytest.raises(MoaSearchError) as err:
        parse(spec)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_r_larger_than_head_dim_rejected():
    with pytest.raises(MoaSearchError, match="r must be <= head_dim"):
        parse("sparq:r=128,k=4", head_dim=64)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_span_affine_matches_span_at(spec):
    p = parse(spec)
    affine = p.span_affine()
    if affine is None:
        return
    a, b = affine
    least = p.span_least()
    for n in range(1, 300):
        assert min(n, max(least, math.floor(a + b * n + 0.5))) == int(p.span_at(n))


@pytest.mark.parametrize("spec", EXAMPLES["sparq"])
def test_sparq_k_at_tensor_equals_scalar(spec):
    p = parse(spec)
    n = torch.arange(0, 400)
    assert p.k_at(n).tolist() == [1] + [p.k_at(int(m)) for m in n[1:]]


def test_sparq_query_components_share_indices_over_the_group() -> None:
    from moa_search.patterns import sparq_query_components

    q = torch.randn(3, 4, 2, 16, generator=torch.Generator().manual_seed(0))  # (B, t, G, D)
    idx, q_r, scale = sparq_query_components(q, 5, group_dim=2)
    assert idx.shape == (3, 4, 5) and q_r.shape == (3, 4, 2, 5) and scale.shape == (3, 4, 2)
    b, t = 1, 2
    want = q[b, t].abs().sum(0).topk(5).indices
    assert set(idx[b, t].tolist()) == set(want.tolist())
    sel = q[b, t][:, idx[b, t]]
    assert torch.equal(q_r[b, t], sel)
    expect = torch.sqrt(16 * sel.abs().sum(-1) / q[b, t].abs().sum(-1))
    assert torch.allclose(scale[b, t], expect)


def test_a_new_pattern_is_one_class_through_profile_plan_and_show(tmp_path) -> None:
    """Register a toy pattern here and nowhere else: the measured profile prices its grid,
    the search plans with it (plots included) and ``show`` prints the plan."""
    from moa_search.patterns import PATTERNS, Pattern, PlotStyle, register
    from moa_search.plan import load_plan
    from moa_search.profile import profile
    from moa_search.profile.measured import MeasureConfig
    from moa_search.search import plan_search
    from moa_search.show import describe_plan
    from tests.profile.conftest import tiny_model
    from tests.profile.test_measured import _samples

    @register
    @dataclass(frozen=True)
    class Recent(Pattern):
        """Toy: the newest ``span`` keys, no sink."""

        name: ClassVar[str] = "toyrecent"
        style: ClassVar[PlotStyle] = PlotStyle("P", "R")
        span: int = 8

        @classmethod
        def candidates(cls, lengths, head_dim, grid="measured", block_size=64):
            return [cls(span=max(lengths) // 8), cls(span=max(lengths) // 4)]

        def span_at(self, n):
            return (
                torch.clamp(n, max=self.span) if isinstance(n, torch.Tensor) else min(n, self.span)
            )

        def ring_size(self, max_len: int) -> int:
            return max(1, min(self.span, max_len))

        def span_affine(self):
            return (float(self.span), 0.0)

    try:
        model = tiny_model()
        prof = profile(
            model, calib=_samples(), lengths=[64], samples=4, out=tmp_path / "p", plots=False,
            progress=False, measure=MeasureConfig(max_scored=0, row_batch=8),
        )  # fmt: skip
        assert {"toyrecent:span=8", "toyrecent:span=16"} <= set(prof.table["pattern"])
        result = plan_search(
            tmp_path / "p", budgets=["memory=0.5"], trials=4, patterns=["dense", "toyrecent"],
            progress=False,
        )  # fmt: skip
        plan = load_plan(result.best)
        families = {p.name for row in plan.heads for p in row}
        assert "toyrecent" in families and families <= {"dense", "toyrecent"}
        text = describe_plan(plan, [64])
        assert "toyrecent:span=" in text and "heads by family:" in text
    finally:
        PATTERNS.pop("toyrecent", None)
