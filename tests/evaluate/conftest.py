"""Fixtures for evaluate tests: a tiny random Llama and a character-level tokenizer stand-in.

Why a stand-in: the retrieval prompt builders need ``__call__``, ``decode`` and a chat
template; a real tokenizer would mean a download. One character = one token keeps prompts
exact and the tiny model's vocabulary (128) sufficient.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama

_FIRST = 3  # ids 0, 1, 2 are pad, eos, bos in tiny_llama's config
_NEWLINE = _FIRST + 95
_UNK = _NEWLINE + 1


class CharTokenizer:
    """Printable ASCII and newline map to one id each; anything else to an unknown id."""

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    chat_template = "user: {content}\nassistant:"

    def _id(self, ch: str) -> int:
        if ch == "\n":
            return _NEWLINE
        code = ord(ch)
        return _FIRST + code - 32 if 32 <= code < 127 else _UNK

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self._id(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in (int(x) for x in ids):
            if i < _FIRST:
                if not skip_special_tokens:
                    out.append(f"<{i}>")
            elif i == _NEWLINE:
                out.append("\n")
            elif i < _NEWLINE:
                out.append(chr(i - _FIRST + 32))
            else:
                out.append("?")
        return "".join(out)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


@pytest.fixture(scope="session")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def model():
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread on a shared, busy CPU (no spin contention)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
