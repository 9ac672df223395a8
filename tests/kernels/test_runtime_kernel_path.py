"""The runtime's Triton decode path (kernel_dispatch) agrees with its PyTorch reference path:
same greedy tokens and close logits through model.generate, for a plan mixing every pattern.
On CPU the kernels run in Triton's interpreter (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

import moa_search as ms
from moa_search.families import layer_windows
from tests.conftest import tiny_llama
from tests.families import tiny_family_model

ROWS = [
    ["window:sink=2,span=5", "sparq:r=4,k=6,local=2"],
    ["dense", "elastic:sink=1,alpha=2,beta=0.5"],
]


def _generate(model, ids, force_kernels: bool, calls: list | None = None):
    plan = ms.uniform_plan(model, "dense")
    plan.heads = [[ms.parse(s) for s in row] for row in ROWS]
    with ms.apply_plan(model, plan, backend="reference") as runtime:
        if force_kernels:  # CPU tensors: route decode to the kernels explicitly
            from moa_search import kernels

            class Counting:  # proves the decode steps really went through the kernels
                def mixed_decode(self, *args, **kwargs):
                    calls.append("mixed")
                    return kernels.mixed_decode(*args, **kwargs)

                def sparq_decode(self, *args, **kwargs):
                    calls.append("sparq")
                    return kernels.sparq_decode(*args, **kwargs)

            runtime._kernels = Counting()
            runtime.use_kernels = lambda query, q_len, *args: q_len == 1
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_kernel_decode_matches_reference_in_generate(batch):
    model = tiny_llama(seed=5)
    ids = torch.randint(3, 128, (batch, 21))
    ref = _generate(model, ids, force_kernels=False)
    calls: list[str] = []
    got = _generate(model, ids, force_kernels=True, calls=calls)
    # 4 decode steps x 2 layers: one mixed launch per layer, one SparQ call in layer 0
    assert calls.count("mixed") == 8 and calls.count("sparq") == 4
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-3


STATIC_ROWS = [
    ["window:sink=2,span=5", "dense"],
    ["dense", "elastic:sink=1,alpha=2,beta=0.5"],
    ["window:sink=3,span=12", "dense"],
]


@pytest.mark.parametrize(
    ("model_type", "head_dim"), [("gemma2", 256), ("gemma3_text", 16), ("mistral", 16)]
)
@torch.no_grad()
def test_kernel_decode_honours_native_window_softcap_and_head_dim(model_type, head_dim):
    """Sliding layers, Gemma 2's logit cap and Gemma's head_dim 256 through the kernel."""
    model = tiny_family_model(model_type, seed=6, head_dim=head_dim)
    ids = torch.randint(3, 128, (2, 21))
    plan = ms.uniform_plan(model, "dense")
    plan.heads = [[ms.parse(s) for s in row] for row in STATIC_ROWS]
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    with ms.apply_plan(model, plan, backend="reference"):
        ref = model.generate(ids, **kw)
    calls: list[dict] = []
    with ms.apply_plan(model, plan, backend="reference") as runtime:
        from moa_search import kernels

        class Counting:
            def mixed_decode(self, *args, **kwargs):
                calls.append(kwargs)
                return kernels.mixed_decode(*args, **kwargs)

        runtime._kernels = Counting()
        runtime.use_kernels = lambda query, q_len, *args: q_len == 1
        got = model.generate(ids, **kw)
    assert len(calls) == 4 * 3  # decode steps x layers
    windows = {c["window"] for c in calls}
    assert windows == set(layer_windows(model.config))
    assert {c["softcap"] for c in calls} == {getattr(model.config, "attn_logit_softcapping", None)}
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits, strict=True):
        assert (a - b).abs().max() <= 1e-3
