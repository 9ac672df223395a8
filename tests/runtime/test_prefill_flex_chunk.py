"""FlexAttention for a prompt chunk after cached tokens (``cached_prefill``'s flex path,
``flex_prefill.flex_cached_prefill``).

On CPU flex runs eagerly (every pair goes through the mask_mod; the block tables are not
read), so the outputs are compared with the banded chunk path and with the one-shot prefill
of the whole prompt, the mask_mod pair by pair with the exact rule in key-index space (key
positions read from the cache's own slots, not from ``ChunkKeys``), and the block tables
against that rule as test_prefill_flex does for fresh prompts. The slow test runs
Inductor's compiled CPU kernel, which reads the tables.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from transformers import LlamaConfig

from moa_search.patterns import parse
from moa_search.plan import uniform_plan
from moa_search.runtime import flex_prefill as fp
from moa_search.runtime import prefill
from moa_search.runtime.attention import _clamp
from moa_search.runtime.cache import HeadLayout, MoACache
from moa_search.runtime.scores import Logits
from tests.conftest import tiny_llama
from tests.families import tiny_family_model
from tests.runtime.test_chunked_prefill import _plan as model_plan
from tests.runtime.test_chunked_prefill import (
    _run,
    check_chunked_equals_one_shot,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

L = 300  # prompt length of the function-level tests
MIXES = {
    # a dense (full) head, a window whose ring a small chunk does not fill, an elastic head
    # and a floored elastic one (its floor, 24, is above beta * L = 19)
    "mixed": ["dense", "window:sink=4,span=40", "elastic:sink=2,alpha=8.0,beta=0.125",
              "elastic:sink=3,alpha=0.0,beta=0.0625,floor=24"],
    # no full head; a sink (70) that later chunks start inside; spans past every chunk
    "banded": ["window:sink=0,span=7", "elastic:sink=0,alpha=0.0,beta=0.5",
               "window:sink=70,span=3", "elastic:sink=16,alpha=20.0,beta=0.0,floor=50"],
    # SparQ (dense in prefill; banded only inside a layer window) next to narrow heads
    "sparq": ["sparq:r=4,k=8,local=4", "window:sink=1,span=90", "dense",
              "elastic:sink=5,alpha=30.0,beta=0.25"],
    # sinks of whole blocks (16) that stay in place inside a layer window of 100
    "sinks": ["window:sink=32,span=40", "elastic:sink=48,alpha=10.0,beta=0.0", "dense",
              "window:sink=20,span=100"],
}  # fmt: skip


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """The flex paths on CPU (eager flex) for chunks of any length, no earlier failures."""
    monkeypatch.setattr(prefill, "FLEX_ON_CPU", True)
    monkeypatch.setattr(prefill, "MIN_FLEX_LENGTH", 1)
    monkeypatch.setattr(prefill, "_FLEX_FAILED", [])
    monkeypatch.setattr(prefill, "_CHUNK_FLEX_FAILED", [])
    monkeypatch.delenv("MOA_PREFILL", raising=False)


def patterns_of(mix: str):
    return [parse(s) for s in MIXES[mix]]


def inputs(batch, kv, group, length, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv * group, length, dim, generator=g)
    k = torch.randn(batch, kv, length, dim, generator=g)
    v = torch.randn(batch, kv, length, dim, generator=g)
    return q, k, v


def one_layer_cache(patterns, window, max_len: int) -> MoACache:
    config = LlamaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=len(patterns), num_key_value_heads=len(patterns),
                         head_dim=16)  # fmt: skip
    plan = uniform_plan(config, "dense")
    plan.heads = [list(patterns)]
    return MoACache(plan, max_len, [window])


def in_chunks(q, k, v, patterns, logits, window, chunk, method, reach=True):
    """(output, counts of the paths taken) of the prompt fed ``chunk`` tokens at a time as
    attention.py feeds it: the first chunk through ``fresh_prefill``, the later ones through
    ``cached_prefill``; with ``reach`` inside ``MoACache.prompt`` (spans at the prompt's
    length, as in one forward)."""
    batch, _, length, _ = q.shape
    cache = one_layer_cache(patterns, window, length + 5)
    layer = cache.layers[0]
    before = dict(prefill.PATH_COUNTS)
    outs = []
    with cache.prompt(length) if reach else contextlib.nullcontext():
        for c0 in range(0, length, chunk):
            c1 = min(length, c0 + chunk)
            qc, kc, vc = q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1]
            layer.update(kc, vc)
            if c0:
                out = torch.full_like(qc, float("nan"))  # every entry must be written
                outs.append(prefill.cached_prefill(
                    qc, kc, vc, patterns, layer, logits, out, window, method=method
                ))  # fmt: skip
                continue
            reach_at = max(c1, layer.reach)
            outs.append(prefill.fresh_prefill(qc, kc, vc, patterns, logits, window=window,
                                              reach=reach_at, method="banded"))  # fmt: skip
            layer.append(kc, vc, torch.arange(c1)[None].expand(batch, -1), fresh=True)
    counts = {key: n - before.get(key, 0) for key, n in prefill.PATH_COUNTS.items()
              if key.startswith("chunk")}  # fmt: skip
    return torch.cat(outs, 2), {key: n for key, n in counts.items() if n}


VARIANTS = {"b1-g1": (1, 1, None), "b2-g4-softcap": (2, 4, 5.0)}  # (batch, group, softcap)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("chunk", [32, 77, 128, 200])
@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_flex_chunks_equal_banded_chunks_and_one_shot(mix, window, chunk, variant, flex_on_cpu):
    """Chunks smaller than a ring (32 < 40), larger than every ring, not a multiple of the
    flex block (77, 200) and one (128); GQA, batch and softcap together in one variant."""
    batch, group, softcap = VARIANTS[variant]
    q, k, v = inputs(batch, 4, group, L, 16, seed=chunk)
    q = q * 3 if softcap else q  # large logits, so the cap matters
    patterns = patterns_of(mix)
    logits = Logits(0.25, softcap)
    later = -(-L // chunk) - 1
    flex, counts = in_chunks(q, k, v, patterns, logits, window, chunk, "flex")
    assert counts == {"chunk-flex": later}
    banded, counts = in_chunks(q, k, v, patterns, logits, window, chunk, "banded")
    assert counts == {"chunk": later}
    one_shot = prefill.fresh_prefill(q, k, v, patterns, logits, window=window, method="banded")
    torch.testing.assert_close(flex, banded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex, one_shot, rtol=1e-5, atol=1e-5)
    if softcap:  # the cap changed the result, so the comparison sees it
        uncapped = prefill.fresh_prefill(q, k, v, patterns, Logits(0.25), window=window)
        assert (flex - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("chunk", [40, 128])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_flex_chunks_without_prompt_reach_equal_banded(mix, chunk, flex_on_cpu):
    """Without ``MoACache.prompt`` every chunk takes its spans at its own end and the cache
    drops what the length so far no longer needs: flex and banded agree on that too."""
    q, k, v = inputs(2, 4, 2, L, 16, seed=7)
    patterns = patterns_of(mix)
    flex, _ = in_chunks(q, k, v, patterns, Logits(0.25), 60, chunk, "flex", reach=False)
    banded, _ = in_chunks(q, k, v, patterns, Logits(0.25), 60, chunk, "banded", reach=False)
    torch.testing.assert_close(flex, banded, rtol=1e-5, atol=1e-5)


def cached_layer(patterns, window, start: int, length: int, reach: bool = True):
    """A layer holding positions 0 .. start - 1 (random keys, value = key + 1) laid out for
    a prompt of start + length tokens (with ``reach``, spans taken there), and the next
    chunk's keys and values."""
    cache = one_layer_cache(patterns, window, start + length + 3)
    layer = cache.layers[0]
    _, k, _ = inputs(1, len(patterns), 1, start + length, 16, seed=start)
    v = k + 1
    if reach:
        for one in cache.layers:
            one.reach = start + length  # what MoACache.prompt sets
    layer.update(k, v)
    layer.append(k[:, :, :start], v[:, :, :start], torch.arange(start)[None], fresh=True)
    return layer, k[:, :, start:], v[:, :, start:]


def key_positions(layer, heads, start: int, length: int, size: int) -> torch.Tensor:
    """(n_heads, size) position of each key in ascending order, -1 for padding, from the
    cache's own slot positions (what each slot holds) and the chunk."""
    rows = []
    for h in heads:
        held = layer.slot_positions(h)[0]
        held = held[held >= 0].sort().values
        row = torch.cat([held, torch.arange(start, start + length)])
        rows.append(torch.cat([row, torch.full((size - row.numel(),), -1)]))
    return torch.stack(rows)


def exact_rule(layer, heads, positions, start: int, length: int, window) -> torch.Tensor:
    """(n_heads, C, M) bool: key j seen by query t of the chunk, from each pattern's own
    ``allowed`` (spans at the prompt's reach), the keys the cache still holds and the
    layer's window."""
    q_pos = torch.arange(start, start + length)
    reach = max(start + length, layer.reach)
    masks = []
    for i, h in enumerate(heads):
        pattern, k_pos = layer.patterns[h], positions[i]
        head, _, _ = _clamp(pattern, window, q_pos[None], k_pos[None])
        rule = head.allowed(q_pos, k_pos.clamp_min(0), reach)
        held = (k_pos < pattern.sink) | (k_pos >= pattern.held_from(start, layer.reach))
        masks.append(rule & (held & (k_pos >= 0))[None, :])
    return torch.stack(masks)


def banded_heads(layer, length: int, window) -> list[int]:
    """The heads ``cached_prefill`` does not take as full for this chunk."""
    _, sparse = prefill.chunk_heads(layer.patterns, layer, length, window)
    return sorted(h for heads in sparse.values() for h in heads)


RULE_CASES = [
    (mix, start, length, window, block)
    for mix in sorted(MIXES)
    for start, length in ((1, 40), (30, 32), (45, 200), (130, 77), (260, 40))
    for window in (None, 1, 50)
    for block in (16, 64)
]
RULE_CASES += [("mixed", 128, 256, w, fp.BLOCK) for w in (None, 100)]  # the default block
RULE_CASES += [
    ("sinks", start, 64, 100, 16) for start in (85, 98)
]  # sink blocks at the window edge


@pytest.mark.parametrize("reach", [True, False], ids=["prompt-reach", "own-reach"])
@pytest.mark.parametrize(("mix", "start", "length", "window", "block"), RULE_CASES)
def test_chunk_keys_mask_and_block_tables_follow_the_rule(mix, start, length, window, block, reach):
    """The keys are the cache's held entries then the chunk's, in position order; the
    mask_mod is the exact rule on every pair; every seen pair lies in a visited block, a
    visited block holds one and a full block (mask skipped on the GPU) holds only seen
    pairs."""
    patterns = patterns_of(mix)
    layer, k_new, v_new = cached_layer(patterns, window, start, length, reach)
    heads = banded_heads(layer, length, window)
    keys, k, v = prefill.chunk_keys(layer, k_new, v_new, heads, start, torch.float32)
    size = max(layer.layout.capacity(h) for h in heads) + length
    assert keys.size == size == k.shape[2]  # the same for every chunk of this length
    positions = key_positions(layer, heads, start, length, size)
    _, k_all, _ = inputs(1, len(patterns), 1, start + length, 16, seed=start)
    for i, h in enumerate(heads):
        real = positions[i] >= 0
        want = k_all[0, h, positions[i][real]]
        torch.testing.assert_close(k[0, i, real], want, rtol=0, atol=0)
        torch.testing.assert_close(v[0, i, real], want + 1, rtol=0, atol=0)
        assert (positions[i][real].diff() > 0).all()

    seen = exact_rule(layer, heads, positions, start, length, window)
    bounds = fp.key_bounds([patterns[h] for h in heads], keys, window, "cpu", block, layer.reach)
    mod = fp.mask_mod_for(bounds, 1)
    t, j = torch.arange(length)[:, None], torch.arange(size)[None, :]
    got = torch.stack([mod(0, torch.tensor(i), t, j) for i in range(len(heads))])
    assert torch.equal(got, seen)

    visit, full = fp.block_tables(bounds, length, block)
    qb, kb = -(-length // block), -(-size // block)
    padded = torch.zeros(len(heads), qb * block, kb * block, dtype=torch.bool)
    padded[:, :length, :size] = seen
    blocks = padded.view(len(heads), qb, block, kb, block)
    assert torch.equal(visit, blocks.any(-1).any(2))
    assert not (full & ~blocks.all(-1).all(2)).any()


def test_chunk_block_mask_shapes_gqa_rows_and_cache():
    """The BlockMask covers (C, M) with one row per query head and is cached per chunk."""
    patterns = patterns_of("mixed")
    layer, k_new, v_new = cached_layer(patterns, 50, 130, 77)
    heads = banded_heads(layer, 77, 50)
    keys, _, _ = prefill.chunk_keys(layer, k_new, v_new, heads, 130, torch.float32)
    picked = [patterns[h] for h in heads]
    mask = fp.chunk_mask(picked, keys, 50, 2, "cpu", layer.reach)
    assert mask.shape[-2:] == (77, keys.size)
    bounds = fp.key_bounds(picked, keys, 50, "cpu", fp.SETTINGS.block, layer.reach)
    visit, _ = fp.block_tables(bounds, 77, fp.SETTINGS.block)
    assert torch.equal(mask.to_dense()[0].bool(), visit.repeat_interleave(2, 0))
    assert fp.chunk_mask(picked, keys, 50, 2, "cpu", layer.reach) is mask
    assert fp.chunk_mask(picked, keys, 50, 1, "cpu", layer.reach) is not mask


def test_every_full_chunk_has_the_same_flex_shapes(flex_on_cpu, monkeypatch):
    """Queries, keys and BlockMask of every full chunk have one shape (M = the largest
    capacity + C), so compiled flex meets one shape per chunk size on the GPU."""
    shapes, real = [], fp._flex

    def recorded(q, k, v, block_mask, logits, compiled):
        shapes.append((q.shape, k.shape, block_mask.kv_indices.shape))
        return real(q, k, v, block_mask, logits, compiled)

    monkeypatch.setattr(fp, "_flex", recorded)
    q, k, v = inputs(1, 4, 2, L, 16)
    patterns = patterns_of("mixed")
    in_chunks(q, k, v, patterns, Logits(0.25), None, 64, "flex")
    assert len(shapes) == 4 and len(set(shapes[:-1])) == 1  # 64 .. 255; the last is 44 long
    layout = HeadLayout.build(patterns, L + 5)  # in_chunks' cache; head 0 (dense) is full
    assert shapes[0][1][2] == max(layout.capacity(h) for h in (1, 2, 3)) + 64


@pytest.mark.parametrize("mix", ["mixed", "banded"])
def test_flex_chunk_failure_falls_back_to_banded_once(mix, flex_on_cpu, monkeypatch):
    """A flex error warns once, counts, and the banded path gives the exact result for this
    chunk and the later ones; out of memory is raised (flex stays on); the fresh prompt's
    flex path is not switched off by the chunk's."""
    q, k, v = inputs(2, 4, 2, L, 16)
    patterns = patterns_of(mix)
    want, _ = in_chunks(q, k, v, patterns, Logits(0.25), None, 100, "banded")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no chunk kernel today")

    monkeypatch.setattr(fp, "flex_cached_prefill", broken)
    with pytest.warns(RuntimeWarning, match="no chunk kernel today") as caught:
        got, counts = in_chunks(q, k, v, patterns, Logits(0.25), None, 100, "flex")
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert calls == [1] and counts == {"chunk-flex-failed": 1, "chunk": 2}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert prefill._CHUNK_FLEX_FAILED and not prefill._FLEX_FAILED

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("too long a chunk")

    monkeypatch.setattr(fp, "flex_cached_prefill", out_of_memory)
    monkeypatch.setattr(prefill, "_CHUNK_FLEX_FAILED", [])
    with pytest.raises(torch.OutOfMemoryError):
        in_chunks(q, k, v, patterns, Logits(0.25), None, 100, "flex")
    assert prefill._CHUNK_FLEX_FAILED == []


def test_chunk_flex_is_chosen_like_the_fresh_one(monkeypatch):
    """CPU: banded unless the switch is on; short chunks and MOA_PREFILL=banded: banded."""
    q, k, v = inputs(1, 4, 1, L, 16)
    patterns = patterns_of("banded")
    monkeypatch.setattr(prefill, "_CHUNK_FLEX_FAILED", [])
    monkeypatch.delenv("MOA_PREFILL", raising=False)
    assert in_chunks(q, k, v, patterns, Logits(0.25), None, 100, None)[1] == {"chunk": 2}
    monkeypatch.setattr(prefill, "FLEX_ON_CPU", True)
    monkeypatch.setattr(prefill, "MIN_FLEX_LENGTH", 101)  # the later chunk, of 100, is short
    assert in_chunks(q, k, v, patterns, Logits(0.25), None, 200, None)[1] == {"chunk": 1}
    monkeypatch.setattr(prefill, "MIN_FLEX_LENGTH", 100)
    assert in_chunks(q, k, v, patterns, Logits(0.25), None, 100, None)[1] == {"chunk-flex": 2}
    monkeypatch.setenv("MOA_PREFILL", "banded")
    assert in_chunks(q, k, v, patterns, Logits(0.25), None, 100, None)[1] == {"chunk": 2}


@pytest.fixture(scope="module")
def llama():
    """test_chunked_prefill's model: its ROWS are for this shape."""
    return tiny_llama(heads=8, kv_heads=4, head_dim=16, vocab=96)


@pytest.mark.parametrize("chunk", [7, 16, 43])
def test_model_chunked_prefill_through_flex_equals_one_shot(llama, chunk, flex_on_cpu):
    """A model's own attention calls (``DecodeLoop.prefill(chunk=)``, whose chunks run
    inside ``MoACache.prompt``): logits, next tokens and every head's cache as one-shot."""
    check_chunked_equals_one_shot(llama, chunk, "chunk-flex")


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_model_chunks_through_flex_inside_the_model_window(family, flex_on_cpu):
    """Layers with their own sliding window and Gemma 2's softcap, through the flex path."""
    model = tiny_family_model(family)
    rows = [["dense", "window:sink=2,span=5"]] * model.config.num_hidden_layers
    plan = model_plan(model, rows)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    want = _run(model, plan, ids, None, steps=3)
    before = prefill.PATH_COUNTS["chunk-flex"]
    got = _run(model, plan, ids, 6, steps=3)
    assert prefill.PATH_COUNTS["chunk-flex"] > before
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], want[1])


@pytest.mark.slow
@torch.no_grad()
def test_compiled_flex_chunks_on_cpu_match_banded(flex_on_cpu, monkeypatch):
    """Inductor's compiled CPU kernel, which skips blocks by the tables: GQA, softcap,
    window, two chunk shapes (a full chunk and the shorter last one). From a clean dynamo
    state: after the fresh path's dynamic compile (test_prefill_flex) the recompile for
    chunks hits an Inductor CPU template bug in torch 2.13 (C++ that does not build)."""
    torch._dynamo.reset()
    compiled = functools.partial(fp.flex_cached_prefill, compiled=True)
    for window, softcap in ((None, None), (60, 3.0)):
        q, k, v = inputs(1, 4, 2, 600, 32, seed=5)
        patterns = patterns_of("mixed")
        logits = Logits(32**-0.5, softcap)
        want, _ = in_chunks(q, k, v, patterns, logits, window, 256, "banded")
        with monkeypatch.context() as patch:
            patch.setattr(fp, "flex_cached_prefill", compiled)
            got, counts = in_chunks(q, k, v, patterns, logits, window, 256, "flex")
        assert counts == {"chunk-flex": 2}
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
