"""The two small runtime changes the bench relies on: vectorised decode spans and the fast
fresh-prompt prefill hooked into the "moa" attention function."""

from __future__ import annotations

import torch

from moa_search.bench.models import build_model
from moa_search.bench.synthetic import synthetic_plan
from moa_search.patterns import parse
from moa_search.runtime import apply_plan
from moa_search.runtime.cache import MoALayerCache

SPECS = [
    "dense",
    "window:sink=4,span=37",
    "elastic:sink=3,alpha=5.0,beta=0.3",
    "sparq:r=4,k=8,local=4",
    "elastic:sink=0,alpha=0.0,beta=0.0625",
    "elastic:sink=2,alpha=0.0,beta=0.125,floor=40",
]


def test_affine_spans_equal_span_at():
    patterns = [parse(s) for s in SPECS]
    layer = MoALayerCache(patterns, max_cache_len=4096)
    k = torch.zeros(3, len(patterns), 1, 16)
    layer.update(k, k)
    layer.append(k, k, torch.zeros(3, 1, dtype=torch.long))
    for n in [1, 2, 5, 63, 64, 65, 1000, 4095]:
        layer.lengths.copy_(torch.tensor([n, max(1, n - 1), n // 2 + 1]))
        got = layer.decode_metadata()["span"]
        want = torch.stack([torch.as_tensor(p.span_at(layer.lengths)) for p in patterns], 1)
        assert torch.equal(got, want.to(torch.int32)), n


def test_fast_prefill_logits_match_reference():
    model = build_model("tiny-llama", dtype=torch.float32, device="cpu")
    plan = synthetic_plan(model, density=0.4, length=96, sink=4, tolerance=0.1)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(3)
    )
    outs = {}
    for backend in ("reference", "auto"):
        with apply_plan(model, plan, backend=backend), torch.no_grad():
            out = model(ids, use_cache=True)
            step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
            outs[backend] = (out.logits, step.logits)
    torch.testing.assert_close(outs["auto"][0], outs["reference"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["auto"][1], outs["reference"][1], rtol=1e-4, atol=1e-4)
