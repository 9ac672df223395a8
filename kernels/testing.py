"""Builders of packed per-head caches with random contents, for tests and benchmarks.

A head is described by its slot geometry (sink, ring) and a span rule n -> span; every slot
of the cache (stale ring entries included) holds random data, so a kernel that reads a
slot it should not read gives a different answer than the reference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._common import interpreting


@dataclass(frozen=True)
class HeadGeom:
    """One KV head: ``sink`` kept slots, ``ring`` ring slots, span(n) recent positions."""

    kind: str
    sink: int
    ring: int
    span_fn: Callable[[int], int] = field(compare=False)

    @property
    def cap(self) -> int:
        return self.sink + self.ring

    @staticmethod
    def dense(max_len: int) -> HeadGeom:
        return HeadGeom("dense", 0, max_len, lambda n: n)

    @staticmethod
    def window(sink: int, span: int, max_len: int, extra_ring: int = 0) -> HeadGeom:
        ring = max(1, min(span, max_len)) + extra_ring
        return HeadGeom("window", sink, ring, lambda n, s=span: min(n, s))

    @staticmethod
    def elastic(sink: int, alpha: float, beta: float, max_len: int) -> HeadGeom:
        def span(n: int) -> int:
            return max(1, min(n, math.floor(alpha + beta * n + 0.5)))

        ring = max(1, min(max_len, sink + span(max_len)) - sink)
        return HeadGeom("elastic", sink, ring, span)

    def read_rows(self, n: int) -> int:
        """Valid positions the newest query of a length-n sequence attends."""
        s0 = min(self.sink, n)
        return s0 + n - min(max(self.sink, n - self.span_fn(n)), n)


def build_layer(
    heads: list[HeadGeom],
    seq_lens: list[int],
    group: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random q (B, Hq, D), caches (B, C_total, D) and int32 metadata for ``heads``.

    Returns a dict with the keyword arguments of ``mixed_decode`` (minus scale) plus
    ``v_sum`` (B, Hkv, D) fp32: the sum of V over each dense-layout head's positions.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch, hkv = len(seq_lens), len(heads)
    offsets, total = [], 0
    for hd in heads:
        offsets.append(total)
        total += hd.cap

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    k_cache = rand(batch, total, dim)
    v_cache = rand(batch, total, dim)
    q = rand(batch, hkv * group, dim)
    span = torch.tensor([[hd.span_fn(n) for hd in heads] for n in seq_lens], dtype=torch.int32)
    v_sum = torch.zeros(batch, hkv, dim, dtype=torch.float32)
    for b, n in enumerate(seq_lens):
        for h, hd in enumerate(heads):
            if hd.sink == 0 and hd.ring >= n:
                v_sum[b, h] = v_cache[b, offsets[h] : offsets[h] + n].float().sum(0).cpu()
    i32 = {"dtype": torch.int32, "device": device}
    return {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "head_offset": torch.tensor(offsets, **i32),
        "head_sink": torch.tensor([hd.sink for hd in heads], **i32),
        "head_ring": torch.tensor([hd.ring for hd in heads], **i32),
        "span": span.to(device),
        "seq_len": torch.tensor(seq_lens, **i32),
        "v_sum": v_sum.to(device),
    }


def random_heads(rng: random.Random, hkv: int, max_len: int) -> list[HeadGeom]:
    """A random mix of dense / window (incl. sink > n, span >= n, slack ring) / elastic."""
    heads = []
    for _ in range(hkv):
        kind = rng.choice(["dense", "window", "window", "elastic"])
        sink = rng.choice([0, 0, 1, 4, rng.randint(0, max_len + 8)])
        if kind == "dense":
            heads.append(HeadGeom.dense(max_len))
        elif kind == "window":
            span = rng.choice([1, rng.randint(1, 64), rng.randint(1, max_len + 16)])
            heads.append(HeadGeom.window(sink, span, max_len, rng.choice([0, 0, 3])))
        else:
            heads.append(
                HeadGeom.elastic(sink, rng.uniform(0, 32), rng.uniform(0.05, 1.0), max_len)
            )
    return heads


def fix_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them
    for ``range(lo, hi)`` bounds, which NumPy >= 2.4 refuses; index through the element.
    For CPU runs (tests, ``benchmarks/sparq_decode.py --tiny``); a no-op on the GPU."""
    if not interpreting():
        return
    import numpy as np  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415
    from triton.runtime import interpreter  # noqa: PLC0415

    original = interpreter._patch_lang
    if getattr(original, "_moa_fixed", False):
        return

    def patch_lang(fn):  # noqa: ANN001, ANN202
        scope = original(fn)
        scope.set_attr(
            tl.core.tensor,
            "__index__",
            lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]),
        )
        return scope

    patch_lang._moa_fixed = True
    interpreter._patch_lang = patch_lang
