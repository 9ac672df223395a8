"""Next-token NLL on held-out text: one token stream and one chunked loss for every stage.

Why one home: the baseline card, eval's perplexity, the search's measured objective and the
gradient profiler all report "the model's NLL on text"; each used to build its own stream
(documents joined by blank lines in one, by EOS in the others) and its own loss, so their
numbers drifted apart. Documents are joined by EOS (what a model sees between documents).
The LM head runs ``LOGIT_CHUNK`` tokens at a time, so a long window never materialises a
full (tokens x vocab) fp32 logit matrix (128k vocab x 32k tokens would be 16 GB).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moa_search.errors import MoaSearchError
from moa_search.families import lm_head

LOGIT_CHUNK = 1024  # tokens per lm_head + cross-entropy chunk


@lru_cache(maxsize=8)
def token_stream(tokenizer: Any, split: str, corpus: str | None = None) -> np.ndarray:
    """Every document of ``split`` (of ``corpus``, or of all corpora) tokenized without
    special tokens, each followed by EOS when the tokenizer has one. int64 array."""
    from moa_search.data.texts import load_texts  # noqa: PLC0415

    docs = load_texts(split, corpus)
    if not docs:
        raise MoaSearchError(f"no {corpus or 'built-in'!r} documents in the {split} split")
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for doc in docs:
        ids.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return np.asarray(ids, dtype=np.int64)


def _chunk(hidden: torch.Tensor, head: Any, targets: torch.Tensor, weight: torch.Tensor | None):
    nll = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return (nll if weight is None else nll * weight).sum()


def chunked_nll(
    hidden: torch.Tensor,
    head: Any,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    checkpointed: bool = False,
) -> torch.Tensor:
    """Summed NLL (float32 scalar) of ``targets`` (N,) under ``head(hidden)`` (N, H), each
    token times ``weight`` (N,) when given. ``checkpointed``: each chunk's logits are
    recomputed in backward instead of kept (for a loss that is differentiated)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], LOGIT_CHUNK):
        sl = slice(s, s + LOGIT_CHUNK)
        args = (hidden[sl], head, targets[sl], None if weight is None else weight[sl])
        part = checkpoint(_chunk, *args, use_reentrant=False) if checkpointed else _chunk(*args)
        total = total + part.to(total.device)
    return total


@torch.no_grad()
def window_nll(model: Any, ids: list[int] | tuple[int, ...]) -> tuple[float, int]:
    """Mean next-token NLL over one window (labels = inputs shifted, no BOS added) and the
    number of predicted tokens. Runs the decoder once and the LM head in chunks."""
    x = torch.tensor([list(ids)], device=model.device)
    count = x.shape[1] - 1
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        return float(F.cross_entropy(logits, x[0, 1:])), count
    hidden = decoder(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
    return float(chunked_nll(hidden, lm_head(model, head), x[0, 1:])) / count, count
