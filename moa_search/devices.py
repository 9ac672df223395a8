"""One parser for the ``--device`` / ``--devices`` options of every command.

Why: torch accepts a device string long before it can use it, so ``cuda`` on a machine
without CUDA used to surface deep inside a command as ``AssertionError: Torch not compiled
with CUDA enabled`` and ``foo`` as a ``RuntimeError`` traceback. Every command checks its
devices here first and fails with one line naming the option and what is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from moa_search.errors import MoaSearchError

if TYPE_CHECKING:
    import torch

AUTO = "auto"  # profile only: shard one model over all visible GPUs (accelerate)


def _choices(allow_auto: bool) -> str:
    return "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")


def _available(kind: str) -> tuple[bool, int]:
    """(usable, number of devices) for a torch device type."""
    import torch  # noqa: PLC0415 - the CLI imports this module before it needs torch

    if kind == "cpu":
        return True, 1
    if kind == "cuda":
        ok = torch.cuda.is_available()
        return ok, torch.cuda.device_count() if ok else 0
    if kind == "mps":
        ok = torch.backends.mps.is_available()
        return ok, 1 if ok else 0
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        return False, 0
    ok = bool(is_available())
    count = getattr(backend, "device_count", None)
    return ok, int(count()) if ok and callable(count) else int(ok)


def parse_device(
    device: str | torch.device | None, *, allow_auto: bool = False, option: str = "--device"
) -> str | None:
    """Check one device and return it as a string (None stays None: the caller's default).

    Raises MoaSearchError (one line) for an unknown name, a device type this machine
    lacks (``cuda`` without CUDA) or an index past the visible devices.
    """
    if device is None:
        return None
    import torch  # noqa: PLC0415

    text = str(device).strip()
    if text.lower() == AUTO:
        if allow_auto:
            return AUTO
        raise MoaSearchError(f"{option}: 'auto' is not supported here (use {_choices(False)})")
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise MoaSearchError(
            f"{option}: unknown device {text!r} (use {_choices(allow_auto)})"
        ) from None
    usable, count = _available(dev.type)
    if not usable:
        why = (
            "this torch build has no CUDA"
            if dev.type == "cuda" and not torch.backends.cuda.is_built()
            else "none is visible"
        )
        available = "cpu" + (", cuda" if torch.cuda.is_available() else "")
        raise MoaSearchError(
            f"{option}: {text!r} requested but {dev.type} is not available here ({why}); "
            f"available: {available}"
        )
    if dev.index is not None and dev.index >= count:
        raise MoaSearchError(
            f"{option}: {text!r} requested but only {count} {dev.type} device(s) are visible "
            f"(indices 0..{count - 1})"
        )
    return text


def parse_devices(
    devices: str | Sequence[str] | None, *, option: str = "--devices"
) -> list[str] | None:
    """Check a comma-separated list (or sequence) of devices; None stays None."""
    if devices is None:
        return None
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    found = [str(d).strip() for d in items if str(d).strip()]
    if not found:
        raise MoaSearchError(f"{option}: expected comma-separated devices like cuda:0,cuda:1")
    return [parse_device(d, option=option) for d in found]


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPES.update(float16="float16", fp16="float16")


def dtype_name(dtype: torch.dtype | str, allow_auto: bool = False) -> str:
    """Canonical name (``float32``, ``bfloat16``, ``float16``; ``auto`` where allowed) of a
    dtype or its short name (``fp32``, ``bf16``, ``fp16``); one-line error otherwise."""
    import torch  # noqa: PLC0415

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if allow_auto and dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        known = "float32, bfloat16, float16" + (" or auto" if allow_auto else "")
        raise MoaSearchError(f"dtype: expected {known}, got {dtype!r}")
    return DTYPES[dtype]


def parse_dtype(dtype: torch.dtype | str, allow_auto: bool = False) -> torch.dtype | str:
    """The torch dtype of :func:`dtype_name` (``"auto"`` stays a string)."""
    import torch  # noqa: PLC0415

    name = dtype_name(dtype, allow_auto)
    return name if name == "auto" else getattr(torch, name)
