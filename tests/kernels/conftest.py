"""Kernel tests: CPU runs use Triton's interpreter. The kernels are imported as the installed
``moa_search.kernels`` (``pip install -e .``), like every other entry point."""

from __future__ import annotations

import os
import sys

import pytest
import torch


def _use_interpreter() -> None:
    """CPU only: run Triton kernels in its interpreter.

    TRITON_INTERPRET must be set before triton is imported, but transformers (imported by
    tests/conftest.py and by moa_search) imports torch._dynamo, which imports triton. So
    when triton is already loaded in compiled mode, drop its Python modules (keeping the
    native ``triton._C`` extension) and let the kernels import it afresh in interpreter
    mode. Nothing on CPU uses the old modules afterwards.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    loaded = sys.modules.get("triton.language.standard")
    if loaded is None:
        return
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    if isinstance(loaded.sum, InterpretedFunction):
        return
    for name in list(sys.modules):
        if (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C"):
            del sys.modules[name]


if not torch.cuda.is_available():
    _use_interpreter()


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from moa_search.kernels.testing import fix_interpreter_loop_bounds

    fix_interpreter_loop_bounds()


@pytest.fixture(scope="session")
def sweep_size() -> int:
    """Random cases of the big sweep: $MOA_KERNEL_SWEEP, else 60 on GPU and 0 on CPU."""
    env = os.environ.get("MOA_KERNEL_SWEEP")
    if env:
        return int(env)
    return 60 if torch.cuda.is_available() else 0


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
