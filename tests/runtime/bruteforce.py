"""Brute-force references shared by the runtime tests: eager softmax with masks built
element by element from the pattern rules (``test_apply._rule``), and a prefill +
chunk + token-by-token decode through a plan's cache."""

from __future__ import annotations

import torch

from moa_search.takeover import attention_policy
from tests.runtime.test_apply import _rule, forward_ends


def bruteforce_logits(model, ids, rows, window: int | None = None, reach=None):
    """Logits with every head under ``rows[layer][kv_head]``: rule AND i - j < window.

    ``window``: the bound to apply; None takes the one the model hands its attention
    function (its own sliding window, if any). ``reach(i)``: (n, start) of the forward
    computing query i (``test_apply.forward_ends``; None: one forward over ``ids``). The
    model's scaling and soft-cap apply."""

    def attn(call, q, k, v):
        lq, g = q.shape[2], q.shape[1] // k.shape[1]
        bound = window if window is not None else (call.window or 10**9)
        at = reach or (lambda i: (lq, 0))
        out = torch.empty_like(q)
        for h in range(q.shape[1]):
            spec = rows[call.layer][h // g]
            m = torch.tensor(
                [
                    [_rule(spec, i, j, *at(i)) and i - j < bound for j in range(lq)]
                    for i in range(lq)
                ]
            )
            s = (q[:, h] @ k[:, h // g].transpose(-1, -2)) * call.scale
            if call.softcap is not None:
                s = torch.tanh(s / call.softcap) * call.softcap
            out[:, h] = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v[:, h // g]
        return out

    with attention_policy(model, "bruteforce_test", attn):
        return model(ids, use_cache=False).logits


#: (n, start) of each query under ``stepwise``'s forwards: 9 tokens, 4, then one a step
STEPWISE = forward_ends(9, 13)


def stepwise(model, runtime, ids, first: int = 9):
    """(logits, cache): a ``first``-token prefill, a 4-token chunk, then one token a step."""
    cache = runtime.new_cache()
    pieces = [model(ids[:, :first], past_key_values=cache).logits]
    pieces.append(model(ids[:, first : first + 4], past_key_values=cache).logits)
    for t in range(first + 4, ids.shape[1]):
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    return torch.cat(pieces, 1), cache
