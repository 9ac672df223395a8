"""Run one sample forward + backward and price every candidate inside each layer's backward.

Why inside the backward: the influence needs Q, K, V and dL/dO of a layer at the same
time. A custom attention policy (installed with :mod:`moa_search.takeover`) wraps SDPA in
an autograd Function whose backward recomputes attention, hands
(q, k, v, dO) to :func:`layer_influence` and frees them; with gradient checkpointing
only one layer's tensors are alive at once, so memory stays O(N * tile) above training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from moa_search import families
from moa_search.errors import MoaSearchError
from moa_search.nll import chunked_nll
from moa_search.patterns import Pattern, SparQ
from moa_search.profile.influence import LayerAttention, LayerInfluence, layer_influence
from moa_search.profile.sparq_estimate import visible
from moa_search.runtime.scores import sdpa
from moa_search.takeover import Call, attention_policy

ATTN_NAME = "moa_profile"

#: hook(layer, LayerAttention of the sample: q, k, v, dO without the batch axis)
LayerHook = Callable[[int, LayerAttention], None]


def _dense(q, k, v, scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """The model's own causal attention: its sliding window and logit soft-cap, if any."""
    if window is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    band = visible(torch.arange(q.shape[-2], device=q.device), k.shape[-2], window)
    return sdpa(q, k, v, scale=scale, mask=band, softcap=softcap, enable_gqa=True)


class _ProfiledAttention(torch.autograd.Function):
    """The model's causal attention whose backward also calls the layer hook."""

    @staticmethod
    def forward(ctx, q, k, v, call: Call):  # type: ignore[override]
        """``call``: the model's attention call (scale, layer, window, soft-cap; ``state``
        is the layer hook)."""
        ctx.save_for_backward(q, k, v)
        ctx.call = call
        return _dense(q, k, v, call.scale, call.window, call.softcap)

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        call: Call = ctx.call
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _dense(*leaves, call.scale, call.window, call.softcap)
            grads = torch.autograd.grad(out, leaves, d_out)
        with torch.no_grad():
            one = (t.detach()[0] for t in (q, k, v, d_out))
            call.state(call.layer, LayerAttention(*one, call.scale, call.window, call.softcap))
        return (*grads, None)


def _profile_attention(
    call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """query: (1, Hq, N, D); key/value: (1, Hkv, N, D). Returns (1, Hq, N, D)."""
    return _ProfiledAttention.apply(query, key, value, call)


@contextmanager
def profiling(
    model: torch.nn.Module, hook: LayerHook, gradient_checkpointing: bool = True
) -> Iterator[None]:
    """Switch ``model`` to the profiling attention (and checkpointing); restore on exit."""
    saved_train = model.training
    saved_grad = [p.requires_grad for p in model.parameters()]
    saved_ckpt = bool(getattr(model, "is_gradient_checkpointing", False))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.train()  # transformers only checkpoints in train mode
            _check_no_dropout(model)
        with attention_policy(model, ATTN_NAME, _profile_attention, state=hook):
            yield
    finally:
        for p, g in zip(model.parameters(), saved_grad, strict=True):
            p.requires_grad_(g)
        if gradient_checkpointing and not saved_ckpt:
            model.gradient_checkpointing_disable()
        model.train(saved_train)


def _check_no_dropout(model: torch.nn.Module) -> None:
    """Checkpointing needs train mode, where dropout would be live: refuse it (all
    supported checkpoints ship with zero dropout)."""
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        if getattr(model.config, key, 0.0):
            raise MoaSearchError(
                f"config.{key}={getattr(model.config, key)}: the gradient profiler runs in "
                "train mode and needs zero dropout; set it to 0"
            )


def _base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    return families.decoder(model), model.get_output_embeddings()


def sample_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor, need_grad: bool
) -> torch.Tensor:
    """Mean next-token loss over marked tokens. input_ids, loss_mask: (N,).

    The lm_head + cross-entropy runs in checkpointed chunks so vocab x N logits never
    exist at once (128k vocab x 32k tokens would be 16 GB). Gradients flow from the
    input embeddings, so no parameter gradients are kept.
    """
    base, head = _base_and_head(model)
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)[None]
    embeds = model.get_input_embeddings()(ids)
    if need_grad:
        embeds = embeds.detach().requires_grad_(True)
    hidden = base(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
    targets = ids[0, 1:]
    weight = loss_mask.to(device)[1:].float()
    count = weight.sum().clamp_min(1.0)
    hidden = hidden[:-1].to(head.weight.device)
    dev = head.weight.device
    total = chunked_nll(
        hidden,
        families.lm_head(model, head),
        targets.to(dev),
        weight.to(dev),
        checkpointed=need_grad,
    )
    return total / count.to(total.device)


class InfluenceRecorder:
    """Collects :class:`LayerInfluence` per layer during one backward pass (on CPU)."""

    def __init__(
        self,
        static: Sequence[Pattern],
        sparq: Sequence[SparQ],
        block_size: int,
        tile_rows: int | None = None,
        sparq_rows: int = 0,
        backend: str = "auto",
    ):
        self.static, self.sparq = list(static), list(sparq)
        self.block_size, self.tile_rows = block_size, tile_rows
        self.sparq_rows, self.backend = sparq_rows, backend
        self.layers: dict[int, LayerInfluence] = {}

    def __call__(self, layer: int, att: LayerAttention) -> None:
        res = layer_influence(
            att, self.static, self.sparq, self.block_size, self.tile_rows, self.sparq_rows,
            self.backend,
        )  # fmt: skip
        self.layers[layer] = LayerInfluence(
            **{
                f: getattr(res, f).cpu()
                for f in ("moa", "row", "signed", "sparq_row", "sparq_signed", "blocks")
            }
        )


def profile_sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    recorder: InfluenceRecorder,
    gradient_checkpointing: bool = True,
) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward + backward; returns (dense loss, stacked results over layers).

    Results: moa/row/signed (L, H, Cs), sparq_row/sparq_signed (L, H, Cq), blocks
    (L, H, N/B, N/B).
    """
    recorder.layers.clear()
    with profiling(model, recorder, gradient_checkpointing):
        loss = sample_loss(model, input_ids, loss_mask, need_grad=True)
        loss.backward()
    n_layers = len(families.attention_modules(model))
    missing = [i for i in range(n_layers) if i not in recorder.layers]
    if missing:
        raise RuntimeError(f"no gradient reached attention layers {missing}")
    out = {
        f: torch.stack([getattr(recorder.layers[i], f) for i in range(n_layers)])
        for f in ("moa", "row", "signed", "sparq_row", "sparq_signed", "blocks")
    }
    return float(loss.detach()), out
