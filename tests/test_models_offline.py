"""An unknown model name fails fast when the hub cannot be used, instead of spending ~30 s
in huggingface_hub's retries: offline flags and an unreachable endpoint are said in one
line, and names in the local hub cache still resolve without the network."""

from __future__ import annotations

import time

import pytest

from moa_search import models
from moa_search.errors import MoaSearchError

NAME = "no-such-org/no-such-model-moa-search-test"


@pytest.fixture
def online_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    return monkeypatch


def _fails_fast(call, *fragments):
    start = time.perf_counter()
    with pytest.raises(MoaSearchError) as err:
        call()
    seconds = time.perf_counter() - start
    msg = str(err.value)
    assert seconds < 5, f"took {seconds:.1f} s"
    assert "\n" not in msg and NAME in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_flag_fails_fast_and_says_so(online_env, var):
    online_env.setenv(var, "1")
    _fails_fast(lambda: models.load_model(NAME), "cannot load model", f"{var} is set")
    _fails_fast(lambda: models.load_tokenizer(NAME), f"{var} is set")


def test_unreachable_hub_fails_fast_and_says_so(online_env):
    online_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    _fails_fast(
        lambda: models.load_model(NAME),
        "not in the local Hugging Face cache",
        "127.0.0.1 cannot be reached",
        "HF_HUB_OFFLINE=1",
    )


def test_import_and_profile_configs_fail_fast_too(online_env, tmp_path):
    from moa_search.search.importers import model_identity

    online_env.setenv("HF_HUB_OFFLINE", "1")
    _fails_fast(lambda: model_identity(NAME), "HF_HUB_OFFLINE is set")


def test_cached_names_resolve_without_the_network(online_env, tmp_path):
    import huggingface_hub

    online_env.setenv("HF_HUB_OFFLINE", "1")
    online_env.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda *a, **k: str(tmp_path / "config.json")
    )
    assert models.resolve_model_path(NAME) == NAME


def test_proxy_skips_the_direct_probe(online_env):
    online_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    online_env.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert models._unreachable_hub() is None


def test_malformed_names_are_one_line(online_env):
    with pytest.raises(MoaSearchError, match="no such folder, and not a Hugging Face model"):
        models.resolve_model_path("./no/such/folder/here")
