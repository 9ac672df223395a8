"""One device and dtype parser for every command: unknown or unavailable devices are one line,
before any model is loaded, and the same wording whichever command was given them."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from moa_search.devices import dtype_name, parse_device, parse_devices, parse_dtype
from moa_search.errors import MoaSearchError
from tests.conftest import tiny_llama

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return str(folder)


def _refused(args, *fragments):
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, MoaSearchError), repr(result.exception)
    msg = str(result.exception)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@no_cuda
def test_profile_on_cuda_without_cuda_is_one_line(tiny_dir, tmp_path):
    out = str(tmp_path / "p")
    _refused(["profile", tiny_dir, "--device", "cuda", "--out", out], "--device", "'cuda'")
    _refused(["profile", tiny_dir, "--device", "cuda:1", "--out", out], "cuda is not available")
    _refused(["profile", tiny_dir, "--devices", "cuda:0,cuda:1", "--out", out], "--devices")


def test_profile_with_unknown_device_is_one_line(tiny_dir, tmp_path):
    out = str(tmp_path / "p")
    _refused(["profile", tiny_dir, "--device", "foo", "--out", out], "unknown device 'foo'")
    _refused(["profile", tiny_dir, "--devices", "cpu,foo", "--out", out], "--devices", "'foo'")


@pytest.mark.parametrize(
    "command",
    [
        ["profile", "--device", "foo"],
        ["eval", "--plan", "p.yaml", "--device", "foo"],
        ["bench", "--synthetic", "density=0.25", "--device", "foo"],
        ["quickstart", "--device", "foo"],
    ],
)
def test_every_command_words_a_bad_device_the_same(tiny_dir, tmp_path, command):
    msg = _refused(
        [command[0], tiny_dir, *command[1:]], "--device: unknown device 'foo' (use cpu, cuda"
    )
    assert ("or auto" in msg) == (command[0] == "profile"), msg


def test_parse_device_accepts_what_is_there():
    assert parse_device("cpu") == "cpu"
    assert parse_device(" cpu ") == "cpu"
    assert parse_device(torch.device("cpu")) == "cpu"
    assert parse_device(None) is None
    assert parse_device("auto", allow_auto=True) == "auto"
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    assert parse_devices(None) is None


def test_parse_device_refuses_auto_where_not_supported_and_empty_lists():
    with pytest.raises(MoaSearchError, match="'auto' is not supported here"):
        parse_device("auto")
    with pytest.raises(MoaSearchError, match="--devices: expected comma-separated devices"):
        parse_devices(" , ")


def test_cuda_index_past_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == "cuda:1"
    with pytest.raises(MoaSearchError, match=r"'cuda:2' requested but only 2 cuda device\(s\)"):
        parse_device("cuda:2")


def test_library_profile_checks_its_device_too():
    from moa_search.profile import profile

    with pytest.raises(MoaSearchError, match="--device"):
        profile("smollm2-135m", device="nonsense", lengths=[64], samples=1)


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("fp32", "float32"),
        ("bf16", "bfloat16"),
        ("float16", "float16"),
        (torch.bfloat16, "bfloat16"),
    ],
)
def test_dtype_names_and_short_names(given, name) -> None:
    assert dtype_name(given) == name
    assert parse_dtype(given) is getattr(torch, name)


def test_dtype_auto_only_where_allowed() -> None:
    assert parse_dtype("auto", allow_auto=True) == "auto"
    with pytest.raises(MoaSearchError, match="dtype: expected float32, bfloat16, float16, got"):
        parse_dtype("auto")
    with pytest.raises(MoaSearchError, match="or auto, got 'int8'"):
        dtype_name("int8", allow_auto=True)
