"""apply_plan on tiny random Llama models: exactness against dense and brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from moa_search import MoACache, MoaSearchError, apply_plan, remove_plan, uniform_plan
from moa_search.patterns import parse
from moa_search.takeover import attention_policy
from tests.conftest import tiny_llama

MIXED = [
    ["window:sink=2,span=5", "elastic:sink=1,alpha=2,beta=0.5"],
    ["dense", "window:sink=0,span=3"],
]


def _plan(model, rows):
    plan = uniform_plan(model, "dense")
    plan.heads = [[parse(s) for s in row] for row in rows]
    return plan


def _rule(spec: str, i: int, j: int, n: int | None = None, start: int = 0) -> bool:
    """The issue's rules written out longhand, independent of patterns.py. Query ``i`` is
    computed by a forward over positions start..n-1: its span is taken at ``n`` (MoA's
    input length; None: ``i + 1``, as in a decode step), and of the keys cached before it
    only the sink and the last span(start) positions are still held."""
    if j > i:
        return False
    name, _, args = spec.partition(":")
    kw = {k: float(v) for k, v in (a.split("=") for a in args.split(",") if a)}
    if name in ("dense", "sparq"):
        return True
    sink = kw.get("sink", 0)

    def span(m: int) -> float:
        if name == "window":
            return kw["span"]
        return max(1, min(m, math.floor(kw["alpha"] + kw["beta"] * m + 0.5)))

    if j < sink:
        return True
    if j < start and j < start - span(start):
        return False  # evicted before this forward
    return i - j < span(max(i + 1, n or 0))


def forward_ends(*ends: int):
    """(n, start) of query i in a sequence fed as forwards ending at ``ends``, then one
    token a step."""

    def reach(i: int) -> tuple[int, int]:
        bounds = [0, *sorted(ends)]
        for lo, hi in zip(bounds, bounds[1:]):
            if lo <= i < hi:
                return hi, lo
        return i + 1, i

    return reach


def _bruteforce_logits(model, ids, rows, reach=None):
    """Eager softmax attention with masks built element by element from ``_rule``;
    ``reach(i)``: the length the forward of query i reaches (None: the whole ``ids``)."""

    def attn(call, q, k, v):
        scaling = call.scale
        b, hq, lq, d = q.shape
        g = hq // k.shape[1]
        at = reach or (lambda i: (lq, 0))
        out = torch.empty_like(q)
        for h in range(hq):
            spec = rows[call.layer][h // g]
            m = torch.tensor([[_rule(spec, i, j, *at(i)) for j in range(lq)] for i in range(lq)])
            s = (q[:, h] @ k[:, h // g].transpose(-1, -2)) * scaling
            out[:, h] = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v[:, h // g]
        return out

    with attention_policy(model, "bruteforce_test", attn):
        return model(ids, use_cache=False).logits


@torch.no_grad()
def test_dense_plan_reproduces_logits_and_generate(model):
    ids = torch.randint(3, 128, (2, 33))
    ref = model(ids).logits
    ref_gen = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    with apply_plan(model, uniform_plan(model, "dense")):
        assert (model(ids).logits - ref).abs().max() <= 1e-5
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    assert torch.equal(gen, ref_gen)
    assert model.config._attn_implementation == "sdpa", "remove restores the model"


@torch.no_grad()
def test_mixed_plan_prefill_matches_bruteforce(model):
    ids = torch.randint(3, 128, (2, 24))
    expected = _bruteforce_logits(model, ids, MIXED)
    with apply_plan(model, _plan(model, MIXED)):
        got_nocache = model(ids, use_cache=False).logits
        got_cache = model(ids, use_cache=True).logits
    assert (got_nocache - expected).abs().max() <= 1e-5
    assert (got_cache - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("max_cache_len", [None, 40])
@torch.no_grad()
def test_step_by_step_decode_equals_full_recompute(model, max_cache_len):
    """A prefill, a chunk, then one token a step: each query takes its spans at the length
    its forward reaches (9, 13, then its own), as the brute-force rule says."""
    ids = torch.randint(3, 128, (2, 40))
    full = _bruteforce_logits(model, ids, MIXED, forward_ends(9, 13))
    with apply_plan(model, _plan(model, MIXED), max_cache_len=max_cache_len) as rt:
        cache = rt.new_cache()
        pieces = [model(ids[:, :9], past_key_values=cache).logits]
        pieces.append(model(ids[:, 9:13], past_key_values=cache).logits)  # chunked prefill
        for t in range(13, 40):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_attention_reads_the_cache_update_hands_back(model, monkeypatch):
    """The patterned cache reaches attention through ``update``'s return value alone: with
    the runtime's record of the active cache wiped before every call, a user-held cache
    still decodes exactly."""
    from moa_search.runtime.apply import PlanRuntime
    from moa_search.runtime.cache import CacheRead

    before = PlanRuntime._before_forward

    def forget(self, *args, **kwargs):
        out = before(self, *args, **kwargs)
        self.active_cache = None
        return out

    monkeypatch.setattr(PlanRuntime, "_before_forward", forget)
    ids = torch.randint(3, 128, (2, 24))
    full = _bruteforce_logits(model, ids, MIXED, forward_ends(10))
    with apply_plan(model, _plan(model, MIXED)) as rt:
        cache = rt.new_cache()
        pieces = [model(ids[:, :10], past_key_values=cache).logits]
        for t in range(10, 24):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
        layer = cache.layers[0]
        read, same = layer.update(ids[:, :1, None].float(), ids[:, :1, None].float())
    assert read is same and isinstance(read, CacheRead) and read.layer is layer
    assert int(layer.lengths[0]) == 24
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5


#: per pattern family, plans whose cache must allocate what ``Plan.kv_bytes`` predicts (SparQ
#: with its fp32 V sums); the edge cases: a span reaching past the sequence
#: (window:sink=4,span=40 at 40 tokens) and a sink longer than it (sink=64, sink=60)
BYTES_PLANS = {
    "dense": [["dense", "dense"], ["dense", "dense"]],
    "window": [
        ["window:sink=2,span=5", "window:sink=4,span=40"],
        ["window:sink=0,span=3", "window:sink=64,span=8"],
    ],
    "elastic": [
        ["elastic:sink=1,alpha=2,beta=0.5", "elastic:sink=4,alpha=40,beta=0.5"],
        ["elastic:sink=0,alpha=0,beta=1.0", "elastic:sink=60,alpha=2,beta=0.1"],
    ],
    "sparq": [
        ["sparq:r=4,k=8,local=2", "sparq:r=16,k_ratio=0.25,local=0"],
        ["sparq:r=2,k=3,local=1", "sparq:r=4,k=8,local=2"],
    ],
    "mixed": [
        ["window:sink=2,span=5", "sparq:r=4,k=8,local=2"],
        ["dense", "elastic:sink=1,alpha=2,beta=0.5"],
    ],
}


@pytest.mark.parametrize("family", list(BYTES_PLANS))
@torch.no_grad()
def test_cache_bytes_equal_plan_prediction(model, family):
    """After a prefill and decode steps, a batch's cache allocates exactly Plan.kv_bytes."""
    prompt, n, batch = 30, 40, 3
    ids = torch.randint(3, 128, (batch, n))
    plan = _plan(model, BYTES_PLANS[family])
    with apply_plan(model, plan, max_cache_len=n) as rt:
        cache = rt.new_cache()
        model(ids[:, :prompt], past_key_values=cache)
        for t in range(prompt, n):
            model(ids[:, t : t + 1], past_key_values=cache)
    assert cache.seq_lengths().tolist() == [n] * batch
    assert cache.nbytes() == plan.kv_bytes(n, batch=batch, dtype_bytes=4)
    dense = plan.dense_kv_bytes(n, batch=batch, dtype_bytes=4)
    if family == "sparq":  # the full cache, plus per head and sequence one fp32 V sum
        d = model.config.head_dim  # and the fp8 transposed copy of K (one byte an entry)
        assert cache.nbytes() == dense + 2 * 2 * batch * (d * 4 + n * d)
    elif family != "dense":
        assert cache.nbytes() < dense


@torch.no_grad()
def test_sparq_full_r_and_k_equals_dense(model):
    ids = torch.randint(3, 128, (2, 30))
    head_dim = model.config.head_dim
    sparq = uniform_plan(model, f"sparq:r={head_dim},k=4096,local=0")
    ref = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with apply_plan(model, sparq):
        got = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-4


@torch.no_grad()
def test_sparq_small_k_changes_output(model):
    ids = torch.randint(3, 128, (1, 60))
    with apply_plan(model, uniform_plan(model, "sparq:r=2,k=2,local=1")) as rt:
        cache = rt.new_cache()
        model(ids[:, :-1], past_key_values=cache)
        sparse = model(ids[:, -1:], past_key_values=cache).logits
    dense = model(ids).logits[:, -1:]
    assert (sparse - dense).abs().max() > 1e-3


@torch.no_grad()
def test_generate_left_padding_matches_unpadded_runs():
    model = tiny_llama(seed=3)
    plan = _plan(model, MIXED)
    a = torch.randint(3, 128, (1, 20))
    b = torch.randint(3, 128, (1, 13))
    batch = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 7:], mask[1, 7:] = b[0], 1
    with apply_plan(model, plan):
        both = model.generate(
            batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        alone = [
            model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
            )
            for x in (a, b)
        ]
        sampled = model.generate(
            batch, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0
        )
    assert torch.equal(both[0, 20:], alone[0][0, 20:])
    assert torch.equal(both[1, 20:], alone[1][0, 13:])
    assert sampled.shape == (2, 24)


def test_plan_for_other_model_refused(model):
    other = tiny_llama(layers=3)
    with pytest.raises(MoaSearchError, match="num_layers"):
        apply_plan(model, uniform_plan(other, "dense"))


def test_remove_plan_restores_model(model):
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        apply_plan(model, uniform_plan(model, "window:sink=0,span=2"))
        changed = model(ids).logits
        remove_plan(model)
        back = model(ids).logits
    assert (changed - ref).abs().max() > 1e-4
    assert torch.equal(back, ref)


@torch.no_grad()
def test_unsupported_cache_type_is_refused(model):
    from transformers import StaticCache

    ids = torch.randint(3, 128, (1, 8))
    cache = StaticCache(config=model.config, max_cache_len=32)
    plan = uniform_plan(model, "window:sink=1,span=4")
    with apply_plan(model, plan), pytest.raises(MoaSearchError, match="got StaticCache"):
        model(ids, past_key_values=cache)


@torch.no_grad()
def test_generate_uses_the_per_head_cache_and_remove_restores_it(model):
    ids = torch.randint(3, 128, (1, 12))
    kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with apply_plan(model, uniform_plan(model, "window:sink=1,span=4")):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert isinstance(out.past_key_values, MoACache)
    assert "generate" not in model.__dict__
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert not isinstance(out.past_key_values, MoACache)


@torch.no_grad()
def test_dense_cache_continuation_matches_full_recompute(model):
    """A user-supplied DynamicCache (full KV kept) still gives each head its pattern."""
    from transformers import DynamicCache

    ids = torch.randint(3, 128, (2, 30))
    full = _bruteforce_logits(model, ids, MIXED, forward_ends(20, 30))
    with apply_plan(model, _plan(model, MIXED)):
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :20], past_key_values=cache).logits
        rest = model(ids[:, 20:], past_key_values=cache).logits
    assert (torch.cat([first, rest], 1) - full).abs().max() <= 1e-5
    assert cache.get_seq_length() == 30, "the user's cache is the one that was filled"


def _tiny(arch: str):
    import transformers

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
        max_position_embeddings=512,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return model_cls(config).eval()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
@torch.no_grad()
def test_other_llama_family_models(arch):
    model = _tiny(arch)
    ids = torch.randint(3, 128, (2, 24))
    ref = model(ids).logits
    with apply_plan(model, uniform_plan(model, "dense")):
        assert (model(ids).logits - ref).abs().max() <= 1e-5
    rows = [["window:sink=2,span=5", "dense"], ["dense", "elastic:sink=1,alpha=2,beta=0.5"]]
    expected = _bruteforce_logits(model, ids, rows, forward_ends(10))
    with apply_plan(model, _plan(model, rows)) as runtime:
        cache = runtime.new_cache()
        steps = [model(ids[:, :10], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10, 24)]
    assert (torch.cat(steps, 1) - expected).abs().max() <= 1e-5
