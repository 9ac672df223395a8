"""MoALayerCache's fresh-prompt write (``append(..., fresh=True)``: one gather per tensor,
no host sync) leaves the cache exactly as the general scatter does, whatever the heads'
sinks and rings, the prompt length against them, the batch, the dtype and the model's own
window."""

from __future__ import annotations

import pytest
import torch

from moa_search.patterns import parse
from moa_search.runtime.cache import MoALayerCache

HEADS = [
    "dense",
    "window:sink=2,span=5",  # a ring of 5 that wraps many times
    "elastic:sink=1,alpha=2,beta=0.5",
    "window:sink=0,span=3",
    "window:sink=4,span=1",
    "sparq:r=4,k=6,local=2",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("length", [1, 3, 5, 8, 23, 40])
@pytest.mark.parametrize("batch", [1, 3])
def test_fresh_write_matches_general_write(
    dtype: torch.dtype, window: int | None, length: int, batch: int
) -> None:
    patterns = [parse(s) for s in HEADS]
    fresh, general = (MoALayerCache(patterns, 48, window) for _ in range(2))
    gen = torch.Generator().manual_seed(length * 10 + batch)
    k, v = (torch.randn(batch, len(HEADS), length, 8, generator=gen).to(dtype) for _ in range(2))
    pos = torch.arange(length)[None].expand(batch, -1)
    for cache in (fresh, general):
        cache.lazy_initialization(k, v)
    fresh.append(k, v, pos, fresh=True)
    general.append(k, v, pos)
    assert torch.equal(fresh.lengths, general.lengths)
    for h in range(len(HEADS)):
        kf, vf, pf = fresh.gather(h)
        kg, vg, pg = general.gather(h)
        assert torch.equal(pf, pg)
        held = (pg >= 0)[..., None]  # empty slots hold nothing either way
        assert torch.equal(kf * held, kg * held) and torch.equal(vf * held, vg * held)
        # every kept entry is the token at its position
        idx = pg.clamp(min=0)[..., None].expand(-1, -1, 8)
        assert torch.equal(kf * held, k[:, h].gather(1, idx) * held)
    assert torch.equal(fresh.v_sum, general.v_sum)


def test_fresh_flag_is_ignored_once_the_cache_holds_tokens() -> None:
    """A second chunk is never "fresh": the general path runs and keeps the old tokens."""
    patterns = [parse(s) for s in HEADS]
    a, b = (MoALayerCache(patterns, 48) for _ in range(2))
    k = torch.randn(1, len(HEADS), 10, 8)
    for cache in (a, b):
        cache.lazy_initialization(k, k)
        cache.append(k[:, :, :6], k[:, :, :6], torch.arange(6)[None])
    a.append(k[:, :, 6:], k[:, :, 6:], torch.arange(6, 10)[None], fresh=True)
    b.append(k[:, :, 6:], k[:, :, 6:], torch.arange(6, 10)[None])
    for h in range(len(HEADS)):
        assert all(torch.equal(x, y) for x, y in zip(a.gather(h), b.gather(h), strict=True))


def test_held_from_is_the_last_span_of_the_length_reached() -> None:
    """After n tokens a head holds its sink and the last span(n) positions, whatever its
    ring could still hold; inside ``MoACache.prompt(R)`` (a chunked prompt) it keeps
    span(R), and the prompt's length is forgotten afterwards, even on an error."""
    from moa_search.plan import Plan
    from moa_search.runtime.cache import MoACache

    patterns = [parse(s) for s in HEADS]
    layer = MoALayerCache(patterns, 48)
    k = torch.randn(2, len(HEADS), 20, 8)
    layer.lazy_initialization(k, k)
    layer.append(k, k, torch.arange(20)[None].expand(2, -1))
    elastic = patterns[2]  # span(20) = 12, span(30) = 17
    want = {0: 0, 1: 20 - 5, 2: 20 - int(elastic.span_at(20)), 3: 17, 4: 19, 5: 0}
    assert {h: layer.held_from(h).tolist() for h in want} == {h: [w, w] for h, w in want.items()}
    assert int(elastic.span_at(20)) == 12 and int(elastic.span_at(30)) == 17
    layer.reach = 30
    assert layer.held_from(2).tolist() == [3, 3]
    assert layer.held_from(1).tolist() == [15, 15], "a window's span does not grow"

    plan = Plan(model=None, heads=[patterns])
    cache = MoACache(plan, 48)
    with pytest.raises(RuntimeError), cache.prompt(40):
        assert cache.layers[0].reach == 40
        raise RuntimeError("a failing chunk")
    assert cache.layers[0].reach == 0
