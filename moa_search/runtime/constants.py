"""Small constant index tensors on the device, made once and shared.

Why: ``torch.tensor(python_list, device="cuda")`` copies from pageable host memory, which
synchronises the host with the GPU. The runtime needs such tensors (cache geometry, head
index lists) for every layer of every prompt; made per call, they stalled each prefill
11 times a layer (an H200 idled ~25 ms of a 4k-token prefill of the 8B shape). Made once
per (values, dtype, device), they cost nothing after the first prompt.

The tensors are shared: never modify one in place.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def device_tensor(
    values: Sequence[int] | Sequence[float] | Sequence[Sequence[float]],
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, cached (read-only)."""
    frozen = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values)
    return _cached(frozen, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=4096)
def _cached(values: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)
