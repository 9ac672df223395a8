"""Small helpers shared by the decode kernels: interpreter detection, launch geometry.

Nothing here touches device tensors' values, so every wrapper that uses these stays free
of host synchronisation (CUDA-graph capturable).
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``).

    The interpreter computes ``tl.dot`` on bf16 operands wrongly (Triton 3.6), so kernels
    take an ``UPCAST`` constexpr that moves dots to fp32 there.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 on CPU, so interpreter grids stay small)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def fit_tiles_to(
    budget: int, block_n: int, dim: int, elem_bytes: int, stages: int, tiles: int = 2
) -> tuple[int, int]:
    """(block_n, num_stages) whose pipelined tiles fit ``budget`` bytes of shared memory:
    pipelining keeps ``stages - 1`` copies of ``tiles`` (block_n, dim) tiles in flight;
    stages drop first, then the block halves (down to 16)."""

    def need(b: int, s: int) -> int:
        return max(1, s - 1) * tiles * b * dim * elem_bytes

    while stages > 1 and need(block_n, stages) > budget:
        stages -= 1
    while block_n > 16 and need(block_n, stages) > budget:
        block_n //= 2
    return block_n, stages


def fit_tiles(
    device: torch.device, block_n: int, dim: int, elem_bytes: int, stages: int, tiles: int = 2
) -> tuple[int, int]:
    """The tuned (block_n, num_stages), shrunk where the device's shared memory is short.

    Why: the tuning was chosen for bf16 at d <= 128; fp32 caches at d = 256 (Gemma in
    fp32) need 4x the bytes per tile, and Triton then refuses to launch (out of shared
    memory, seen on an H200). Unchanged on the CPU interpreter and wherever the tuned
    values fit (32 KiB are left for the query block and the partials)."""
    if device.type != "cuda" or interpreting():
        return block_n, stages
    index = device.index if device.index is not None else torch.cuda.current_device()
    return fit_tiles_to(_smem_limit(index) - 32 * 1024, block_n, dim, elem_bytes, stages, tiles)


@functools.lru_cache(maxsize=8)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later, not the interpreter): a kernel
    launched with it may start while the previous one drains, and waits in
    ``gdc_wait`` for that kernel's results, hiding a launch gap per kernel boundary."""
    if device.type != "cuda" or interpreting():
        return False
    return _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(x: int, multiple: int) -> int:
    return cdiv(x, multiple) * multiple


def pick_chunk(
    bound: int,
    programs_per_pos: int,
    device: torch.device,
    block: int,
    lo: int = 256,
    hi: int = 1024,
    per_sm: int = 16,
) -> int:
    """Positions handled by one split-K program.

    bound: upper bound of the valid length of any (sequence, head); programs_per_pos: how
    many (sequence, head) pairs share the launch. Aims at ~``per_sm`` programs per SM when every
    pair is full length, so that plans where only a few heads are long still give each SM
    several rounds of work (a program's duration is the scheduling quantum), clamped to
    [lo, hi] and rounded to the tile size ``block``.
    """
    want = cdiv(max(bound, 1) * max(programs_per_pos, 1), per_sm * sm_count(device))
    chunk = min(max(next_pow2(want), lo), hi)
    return round_up(max(chunk, block), block)


def check_common(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[int, int, int]:
    """Validate shapes shared by both entry points; return (B, Hq, D)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got shape {tuple(q.shape)}")
    batch, hq, dim = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != dim:
            raise ValueError(f"{name} must be (B={batch}, C_total, D={dim}), got {tuple(t.shape)}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in its last dim")
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {dim}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share a dtype")
    return batch, hq, dim
