"""Costs the search can trust: per pattern, what the runtime cache really allocates and what
its decode kernels really read equal what ``moa_search.patterns`` declares (within 2%).

Stored bytes are the cache's own tensors (``MoACache.nbytes``). Read bytes are counted
from the cache's decode metadata (the rows each static head's span and sinks reach) and,
for SparQ, from the kernels' per-launch count on the cache's side buffer dtype; the plan
prices the same heads with ``Pattern.bytes_read``."""

from __future__ import annotations

import pytest
import torch

from moa_search import apply_plan, uniform_plan
from moa_search.kernels import sparq_kernel_bytes
from moa_search.patterns import SparQ, parse
from tests.conftest import tiny_llama

ROWS = {
    "dense": [["dense", "dense"], ["dense", "dense"]],
    "window": [["window:sink=2,span=5", "window:sink=4,span=40"], ["window:sink=0,span=3"] * 2],
    "elastic": [["elastic:sink=1,alpha=2,beta=0.5"] * 2, ["elastic:sink=4,alpha=0,beta=0.25"] * 2],
    "sparq": [["sparq:r=4,k=8,local=2", "sparq:r=8,k_ratio=0.25,local=0"], ["sparq:r=2,k=3"] * 2],
    "mixed": [["window:sink=2,span=5", "sparq:r=4,k=8,local=2"], ["dense", "elastic"]],
}


def _measured_read(cache, n: int) -> int:
    """Bytes one decode step at length n reads from this cache, head by head."""
    total = 0
    for layer in cache.layers:
        meta = layer.decode_metadata()
        row = 2 * layer.keys.shape[-1] * layer.keys.element_size()
        for h, p in enumerate(layer.patterns):
            for b in range(layer.lengths.shape[0]):
                if isinstance(p, SparQ):
                    side = layer.sparq_kt.element_size()
                    d = layer.keys.shape[-1]
                    parts = sparq_kernel_bytes(n, d, min(p.r, d), p.k_at(n), row // (2 * d), side)
                    total += sum(parts.values())
                    continue
                sink = min(int(meta["head_sink"][h]), n)
                span = min(int(meta["span"][b, h]), n - sink)
                total += (sink + span) * row
    return total


@pytest.mark.parametrize("family", list(ROWS))
@torch.no_grad()
def test_runtime_bytes_equal_declared(family: str) -> None:
    model = tiny_llama(seed=2)
    plan = uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in ROWS[family]]
    prompt, n, batch = 30, 40, 2
    ids = torch.randint(3, 128, (batch, n))
    with apply_plan(model, plan, max_cache_len=n) as runtime:
        cache = runtime.new_cache()
        model(ids[:, :prompt], past_key_values=cache)
        for t in range(prompt, n):
            model(ids[:, t : t + 1], past_key_values=cache)
    itemsize = cache.layers[0].keys.element_size()
    assert cache.nbytes() == pytest.approx(plan.kv_bytes(n, batch, itemsize), rel=0.02)
    read = _measured_read(cache, n)
    assert read == pytest.approx(plan.read_bytes(n, batch, itemsize), rel=0.02)
