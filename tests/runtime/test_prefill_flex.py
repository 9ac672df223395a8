"""The FlexAttention prefill (runtime/flex_prefill.py) against the plain per-head reference.

On CPU flex runs eagerly (it evaluates the mask_mod on every pair and ignores the block
mask), so the block tables are checked on their own, pair by pair, against the rule; on a
GPU the compiled kernel reads exactly those tables.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from moa_search import apply_plan
from moa_search.patterns import parse
from moa_search.runtime import flex_prefill as fp
from moa_search.runtime import prefill
from moa_search.runtime.attention import _clamp
from moa_search.runtime.reference import attend_head
from moa_search.runtime.scores import Logits
from tests.families import TINY, VOCAB, tiny_family_model
from tests.runtime.bruteforce import bruteforce_logits
from tests.runtime.test_runtime_families import MIXED as FAMILY_MIXED
from tests.runtime.test_runtime_families import WITH_SPARQ, _plan
from tests.runtime.test_runtime_families import N as FAMILY_N

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

MIXES = {
    "mixed": ["dense", "window:sink=4,span=100", "elastic:sink=2,alpha=3.0,beta=0.25",
              "sparq:r=4,k=8,local=4"],
    "all-banded": ["window:sink=0,span=7", "elastic:sink=0,alpha=0.0,beta=0.5",
                   "window:sink=130,span=1", "elastic:sink=64,alpha=100.0,beta=0.0625"],
    "edge": ["window:sink=1000,span=3", "window:sink=8,span=5000",
             "elastic:sink=0,alpha=0.0,beta=1.0",
             "elastic:sink=3,alpha=129.0,beta=0.0"],
}  # fmt: skip


def reference(q, k, v, patterns, logits, window):
    """What attention.py's plain path computes: per KV head, the pattern in the window."""
    batch, q_heads, length, _ = q.shape
    group = q_heads // k.shape[1]
    pos = torch.arange(length)[None].expand(batch, -1)
    want = torch.empty_like(q)
    for h, p in enumerate(patterns):
        sl = slice(h * group, (h + 1) * group)
        head, k_pos, _ = _clamp(p, window, pos, pos)
        want[:, sl] = attend_head(q[:, sl], k[:, h], v[:, h], pos, k_pos, head, logits)
    return want


def rule(patterns, length, window):
    """(Hkv, L, L) bool: key j seen by query i, from each pattern's own ``allowed``."""
    pos = torch.arange(length)
    masks = []
    for p in patterns:
        head, _, _ = _clamp(p, window, pos[None], pos[None])
        masks.append(head.allowed(pos, pos, length) if head.static else pos[None] <= pos[:, None])
    return torch.stack(masks)


def inputs(batch, kv, group, length, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv * group, length, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv, length, dim, generator=g).to(dtype)
    return q, k, v


def patterns_of(mix, kv):
    specs = MIXES[mix]
    return [parse(specs[h % len(specs)]) for h in range(kv)]


@pytest.mark.parametrize("length", [1, 5, 127, 128, 129, 300])
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("window", [None, 50])
def test_flex_prefill_matches_reference_fp32(length, mix, window):
    q, k, v = inputs(2, 4, 2, length, 16, torch.float32, seed=length)
    patterns = patterns_of(mix, 4)
    logits = Logits(16**-0.5)
    got = fp.flex_prefill(q, k, v, patterns, logits, torch.empty_like(q), window, compiled=False)
    torch.testing.assert_close(got, reference(q, k, v, patterns, logits, window),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("split", [False, True])
def test_flex_prefill_gqa_softcap_split(group, softcap, split):
    length, kv = 260, 4 if group < 8 else 2
    q, k, v = inputs(1, kv, group, length, 32, torch.float32, seed=group)
    q = q * 3  # large logits, so the cap matters
    patterns = patterns_of("mixed", kv)
    logits = Logits(32**-0.5, softcap)
    full = [h for h, p in enumerate(patterns) if prefill.covers_all(p, length)] if split else None
    got = fp.flex_prefill(
        q, k, v, patterns, logits, torch.empty_like(q), compiled=False, full_heads=full
    )
    torch.testing.assert_close(got, reference(q, k, v, patterns, logits, None),
                               rtol=2e-5, atol=2e-5)  # fmt: skip
    if softcap:  # the cap changed the result, so the test sees it
        uncapped = reference(q, k, v, patterns, Logits(32**-0.5), None)
        assert (got - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("window", [None, 70])
def test_flex_prefill_bf16(window):
    q, k, v = inputs(1, 4, 4, 333, 64, torch.bfloat16)
    patterns = patterns_of("all-banded", 4)
    logits = Logits(64**-0.5, 30.0)
    got = fp.flex_prefill(q, k, v, patterns, logits, torch.empty_like(q), window, compiled=False)
    want = reference(q.float(), k.float(), v.float(), patterns, logits, window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


CASES = [
    (mix, length, window, fp.BLOCK)
    for mix in sorted(MIXES)
    for length in (1, 100, 128, 200, 700)
    for window in (None, 1, 100, 300)
] + [("mixed", 700, w, b) for b in (64, 256) for w in (None, 100)]  # the --sweep blocks


@pytest.mark.parametrize(("mix", "length", "window", "block"), CASES)
def test_block_tables_cover_the_rule_exactly(mix, length, window, block):
    """Every seen pair lies in a visited block, a visited block holds a seen pair, and a
    full block (mask skipped on the GPU) is complete and holds only seen pairs."""
    patterns = patterns_of(mix, 4)
    bounds = fp.head_bounds(patterns, length, window, "cpu", block)
    visit, full = fp.block_tables(bounds, length, block)
    seen = rule(patterns, length, window)
    nb = -(-length // block)
    padded = torch.zeros(4, nb * block, nb * block, dtype=torch.bool)
    padded[:, :length, :length] = seen
    blocks = padded.view(4, nb, block, nb, block)
    any_seen = blocks.any(-1).any(2)
    all_seen = blocks.all(-1).all(2)
    assert torch.equal(visit, any_seen)
    assert not (full & ~all_seen).any()
    # full misses only blocks needing sink and band together (none without a sink)
    no_sink = torch.tensor([p.sink == 0 or not p.static for p in patterns])
    assert torch.equal(full[no_sink], all_seen[no_sink])


def test_block_mask_round_trip_and_gqa_rows():
    patterns = patterns_of("mixed", 4)
    length, group = 700, 2
    bounds = fp.head_bounds(patterns, length, 300, "cpu")
    visit, full = fp.block_tables(bounds, length)
    mask = fp.build_block_mask(bounds, length, group)
    assert mask.shape[-2:] == (length, length)
    dense = mask.to_dense()[0].bool()  # (Hq, QB, KB)
    assert torch.equal(dense, visit.repeat_interleave(group, 0))
    full_rows = torch.zeros_like(dense)
    num, idx = mask.full_kv_num_blocks[0], mask.full_kv_indices[0]
    for h in range(dense.shape[0]):
        for r in range(dense.shape[1]):
            full_rows[h, r, idx[h, r, : num[h, r]].long()] = True
    assert torch.equal(full_rows, full.repeat_interleave(group, 0))
    # query head h uses KV head h // group in the mask_mod too
    b = torch.zeros((), dtype=torch.long)
    for h in range(8):
        got = mask.mask_mod(b, torch.tensor(h), torch.tensor(650), torch.tensor(40))
        assert bool(got) == bool(rule(patterns, length, 300)[h // group, 650, 40])


def test_mask_cache_reuses_and_stays_bounded():
    cache = fp._MaskCache()
    patterns = patterns_of("mixed", 4)
    first = cache.get(patterns, 300, None, 2, "cpu")
    assert cache.get(patterns, 300, None, 2, "cpu") is first
    assert cache.get(patterns, 301, None, 2, "cpu") is not first
    cache.limit = fp._mask_bytes(first)
    cache.get(patterns, 302, None, 2, "cpu")
    assert cache.bytes <= cache.limit and len(cache.entries) == 1


def _eager_flex(monkeypatch, method: str) -> list:
    """Route fresh_prefill to the flex path on CPU (eager flex); returns the calls made."""
    calls, real = [], fp.flex_prefill

    def eager(*args, **kwargs):
        calls.append(kwargs["full_heads"])
        return real(*args, **kwargs, compiled=False)

    monkeypatch.setattr(fp, "flex_prefill", eager)
    monkeypatch.setattr(prefill, "_FLEX_FAILED", [])
    monkeypatch.setattr(prefill, "_flex_method", lambda m, query: method)
    return calls


@pytest.mark.parametrize("model_type", list(TINY))
@pytest.mark.parametrize("method", ["flex", "flex-split"])
@pytest.mark.parametrize("rows", [FAMILY_MIXED, WITH_SPARQ], ids=["mixed", "sparq"])
@torch.no_grad()
def test_model_prefill_through_flex_matches_bruteforce(model_type, method, rows, monkeypatch):
    """Each family's real attention call (its strides, scaling, softcap, native window)."""
    model = tiny_family_model(model_type, seed=1)
    ids = torch.randint(3, VOCAB, (2, FAMILY_N))
    expected = bruteforce_logits(model, ids, rows)
    calls = _eager_flex(monkeypatch, method)
    with apply_plan(model, _plan(model, rows)) as runtime:
        got = model(ids, use_cache=True).logits
    banded = [any(not prefill.covers_all(p, FAMILY_N, w) for p in heads)
              for heads, w in zip(runtime.plan.heads, runtime.windows)]  # fmt: skip
    assert len(calls) == sum(banded)  # flex ran where a head drops keys, SDPA elsewhere
    assert (got - expected).abs().max() <= 1e-4


def test_fresh_prefill_dispatches_to_flex_and_falls_back(monkeypatch):
    """The dispatch (CUDA only in real runs) with the eager flex: right heads, right output;
    a flex failure warns once and the banded path still returns the exact result."""
    q, k, v = inputs(1, 4, 2, 200, 16, torch.float32)
    patterns = patterns_of("mixed", 4)
    logits = Logits(0.25)
    want = reference(q, k, v, patterns, logits, None)
    calls = _eager_flex(monkeypatch, "flex")
    for method, full in (("flex", None), ("flex-split", [0, 3])):
        monkeypatch.setattr(prefill, "_flex_method", lambda m, query, name=method: name)
        got = prefill.fresh_prefill(q, k, v, patterns, logits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert calls[-1] == full

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(fp, "flex_prefill", broken)
    before = prefill.PATH_COUNTS["flex-failed"]
    with pytest.warns(RuntimeWarning, match="no kernel today"):
        got = prefill.fresh_prefill(q, k, v, patterns, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert prefill.PATH_COUNTS["flex-failed"] == before + 1

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("too long a prompt")

    monkeypatch.setattr(fp, "flex_prefill", out_of_memory)
    monkeypatch.setattr(prefill, "_FLEX_FAILED", [])
    with pytest.raises(torch.OutOfMemoryError):
        prefill.fresh_prefill(q, k, v, patterns, logits)
    assert prefill._FLEX_FAILED == []  # flex stays on for the next prompt


def test_prefill_method_setting(monkeypatch):
    q = torch.zeros(1, 2, 4, 8)
    monkeypatch.setattr(prefill, "_FLEX_FAILED", [])
    monkeypatch.setenv("MOA_PREFILL", "flex")
    assert prefill._flex_method(None, q) is None  # CPU: the banded path
    monkeypatch.setenv("MOA_PREFILL", "bogus")
    with pytest.raises(ValueError, match="MOA_PREFILL"):
        prefill._flex_method(None, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prefill._flex_method("banded", q) is None
    long, short = (SimpleNamespace(is_cuda=True, shape=(1, 2, n, 8)) for n in (4096, 100))
    monkeypatch.delenv("MOA_PREFILL")
    assert prefill._flex_method(None, long) == "flex"  # the default on CUDA: auto
    assert prefill._flex_method("auto", long) == "flex"
    assert prefill._flex_method("flex-split", long) == "flex-split"
    assert prefill._flex_method("flex", short) is None
    monkeypatch.setattr(prefill, "_FLEX_FAILED", ["broken"])
    assert prefill._flex_method("flex", long) is None


@pytest.mark.slow
@torch.no_grad()
def test_compiled_flex_on_cpu_skips_blocks_and_matches_reference():
    """The compiled kernel (Inductor's CPU template, which honours the block tables like the
    GPU one): lengths that change (the dynamic recompile), GQA, softcap, window, split."""
    for length, window, softcap, split in ((300, None, None, False), (700, 250, 3.0, True)):
        q, k, v = inputs(1, 4, 2, length, 32, torch.float32, seed=length)
        patterns = patterns_of("mixed", 4)
        logits = Logits(32**-0.5, softcap)
        full = [h for h, p in enumerate(patterns) if prefill.covers_all(p, length, window)]
        got = fp.flex_prefill(q, k, v, patterns, logits, torch.empty_like(q), window,
                              full_heads=full if split else None, compiled=True)  # fmt: skip
        want = reference(q, k, v, patterns, logits, window)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_flex_settings_check_names_and_blocks():
    with pytest.raises(ValueError, match="known are"):
        fp.FlexSettings(kernel_options=(("BLOCK_Q", 64),))
    with pytest.raises(ValueError, match="must divide"):
        fp.FlexSettings(block=64, kernel_options=(("BLOCK_M", 128),))
    with pytest.raises(ValueError, match="multiple of 16"):
        fp.FlexSettings(block=100)


def test_configure_swaps_settings_and_drops_cached_masks():
    patterns = patterns_of("mixed", 4)
    fp.MASKS.get(patterns, 300, None, 1, "cpu")
    assert fp.MASKS.entries
    old = fp.configure(fp.FlexSettings(block=64))
    try:
        assert not fp.MASKS.entries and fp.SETTINGS.block == 64
        q, k, v = (torch.randn(1, 4, 300, 16) for _ in range(3))
        out = torch.empty_like(q)
        fp.flex_prefill(q, k, v, patterns, Logits(0.25), out, compiled=False)
        mask = next(iter(fp.MASKS.entries.values()))[0]
        assert mask.BLOCK_SIZE == (64, 64)
        torch.testing.assert_close(out, reference(q, k, v, patterns, Logits(0.25), None))
    finally:
        fp.configure(old)
    assert old == fp.SETTINGS


def test_flex_runs_with_room_for_recompiles(monkeypatch):
    """Flex calls see a recompile limit of at least RECOMPILE_LIMIT (the default 8 sent a
    long-context run's later chunks to the banded path), and the user's setting is back
    afterwards."""
    import torch._dynamo.config as dynamo_config  # noqa: PLC0415

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo_config, name)
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append(getattr(dynamo_config, name))
        return q

    monkeypatch.setattr(fp, "compiled_flex", lambda dynamic=None: spy)
    q = torch.randn(1, 2, 4, 8)
    fp._flex(q, q, q, None, Logits(0.5), compiled=True)
    assert seen == [max(before, fp.RECOMPILE_LIMIT)]
    assert getattr(dynamo_config, name) == before
