"""Fast prefill for a fresh cache: dense-like heads in one causal SDPA call, window / elastic
heads by query chunks over only the keys their pattern can reach.

The plain path (``reference.attend_head`` per KV head) builds an L x L boolean mask per head
and attends over every key: at 32k tokens that is a 1 GiB mask per head and the full
quadratic cost for a 4k window. Here, for a prompt that starts at position 0 with no
padding (the usual prefill), heads are grouped:

- full heads (dense, SparQ -- dense in prefill -- and static patterns that reach every key
  at this length): one ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``
  (FlashAttention on CUDA);
- every distinct window / elastic pattern of the layer: queries in chunks of ``chunk``
  positions; chunk [c0, c1) attends to the sink keys and the band [c1 - 1 - span_max + 1 ..
  c1) with a small (chunk x band) mask, so work is ~ L x (chunk + span) instead of L^2 / 2.

With ``window`` (the model layer's own sliding window) no query sees a key ``window`` or
more positions back, whatever its pattern: every head is then clamped to it (a dense head
becomes a band of ``window`` keys, a sink only counts while it is inside the window).

``softcap`` (Gemma 2's attention logit cap) is applied to every logit before the mask.

On CUDA, a layer with some banded heads, for a prompt of at least ``MIN_FLEX_LENGTH``
tokens, runs through FlexAttention (``runtime/flex_prefill.py``: one fused launch visiting
only each head's sink + band key blocks). ``MOA_PREFILL`` picks: ``auto`` (the default:
flex where torch has it), ``flex``, ``flex-split`` (full heads in the causal SDPA call, the
others in one flex launch) or ``banded``, the chunked path below, which also runs on CPU,
for shorter prompts, and once the flex path has raised (a warning says so). Why flex by
default: on an H200 (8B shape, 25% plan, bf16) it prefilled a 32k prompt 1.21x faster than
dense where the banded path took 1.76x dense's time, and 4k at 0.99x of dense speed
where banded ran at 0.50x (``benchmarks/prefill.py``). Padded prompts and
prompts after cached tokens never come here (attention.py's per-head path).

Exact: same keys and softmax as the reference, up to floating-point summation order.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from moa_search.patterns import Dense, Pattern
from moa_search.runtime.constants import device_tensor
from moa_search.runtime.scores import Logits, sdpa

DEFAULT_CHUNK = 2048
#: ``MOA_PREFILL`` values: the chunked banded path, FlexAttention for every head of a layer,
#: FlexAttention for the banded heads with SDPA for the full ones, or flex where it runs
METHODS = ("banded", "flex", "flex-split", "auto")
#: shortest prompt the flex methods take (see ``_flex_method``)
MIN_FLEX_LENGTH = 1024
#: layer prefills per path taken ("sdpa", "banded", "flex", "flex-split", "flex-failed"):
#: lets benchmarks and users check which path really ran
PATH_COUNTS: Counter[str] = Counter()
_FLEX_FAILED: list[str] = []  # the first error of the flex path; later calls skip it


@dataclass(frozen=True)
class _Band:
    """What every banded chunk shares: the layer's ``logits``, its own sliding ``window``
    (None: none) and the query ``chunk`` length."""

    logits: Logits
    window: int | None
    chunk: int


def covers_all(pattern: Pattern, length: int, window: int | None = None) -> bool:
    """True when every query of a prompt of ``length`` tokens sees all earlier keys.
    Memoised: asked for every head of every layer on each prefill."""
    return _covers_all(pattern, length, window)


@functools.lru_cache(maxsize=4096)
def _covers_all(pattern: Pattern, length: int, window: int | None) -> bool:
    if window is not None and window < length:
        return False
    if isinstance(pattern, Dense) or not pattern.static:
        return True
    n = torch.arange(1, length + 1, dtype=torch.long)
    return bool((pattern.sink + torch.as_tensor(pattern.span_at(n)) >= n).all())


def fresh_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: list[Pattern],
    logits: Logits,
    out: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    window: int | None = None,
    method: str | None = None,
) -> torch.Tensor:
    """Attention of a prompt at positions 0..L-1 (no padding, nothing cached before).

    query: (B, Hq, L, D); key / value: (B, Hkv, L, D); patterns: one per KV head;
    logits: the layer's scale and logit cap; window: its own sliding window, if any;
    method: one of ``METHODS`` (None: ``$MOA_PREFILL``, else "auto").
    Returns ``out`` (B, Hq, L, D), same dtype as query.
    """
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    if out is None:
        out = torch.empty_like(query)
    full: list[int] = []
    sparse: dict[Pattern, tuple[Pattern, list[int]]] = {}
    for h, p in enumerate(patterns):
        if covers_all(p, length, window):
            full.append(h)
        else:
            sparse.setdefault(p, (p, []))[1].append(h)  # frozen: equal patterns group

    flex = _flex_method(method, query) if sparse else None
    if flex is not None:
        from moa_search.runtime.flex_prefill import flex_prefill  # noqa: PLC0415

        try:
            split = flex == "flex-split" and full
            flex_prefill(query, key, value, patterns, logits, out, window,
                         full_heads=full if split else None)  # fmt: skip
            PATH_COUNTS[flex] += 1
            return out
        except torch.OutOfMemoryError:  # the prompt's own size: no reason to switch flex off
            raise
        except Exception as exc:  # compile / kernel trouble: the banded path still works
            PATH_COUNTS["flex-failed"] += 1
            _FLEX_FAILED.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(
                f"FlexAttention prefill failed, using the banded path from now on: "
                f"{_FLEX_FAILED[0][:300]}",
                RuntimeWarning,
                stacklevel=2,
            )
    PATH_COUNTS["banded" if sparse else "sdpa"] += 1

    if full:
        kv_idx, qi = head_index(full, group, query.device)
        everything = len(full) == kv_heads
        q = query if everything else query.index_select(1, qi)
        k = key if everything else key.index_select(1, kv_idx)
        v = value if everything else value.index_select(1, kv_idx)
        y = sdpa(
            q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=logits.scale,
            enable_gqa=group > 1, softcap=logits.softcap,
        )  # fmt: skip
        if everything:
            out.copy_(y)
        else:
            out.index_copy_(1, qi, y)

    for pattern, heads in sparse.values():
        _banded(query, key, value, pattern, heads, out, _Band(logits, window, chunk))
    return out


def _flex_method(method: str | None, query: torch.Tensor) -> str | None:
    """ "flex" / "flex-split" when that path should run for ``query``, else None. Prompts
    under ``MIN_FLEX_LENGTH`` stay banded: one chunk per pattern is cheap there, and short
    queries would take flex's separate decoding kernel (one more compile, less tested)."""
    name = method or os.environ.get("MOA_PREFILL", "").strip().lower() or "auto"
    if name not in METHODS:
        raise ValueError(f"MOA_PREFILL / method must be one of {', '.join(METHODS)}, got {name!r}")
    if name == "banded" or not query.is_cuda or _FLEX_FAILED:
        return None
    if query.shape[2] < MIN_FLEX_LENGTH:
        return None
    if name == "auto":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401, PLC0415
        except ImportError:
            return None
        return "flex"
    return name


def head_index(kv_heads: list[int], group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device index tensors of ``kv_heads`` and of their query heads (GQA: kv head h owns
    query heads h * group .. h * group + group - 1). Shared constants: indexing with a
    Python list copies it to the device, a host sync per call."""
    q_heads = [h * group + g for h in kv_heads for g in range(group)]
    return device_tensor(kv_heads, torch.long, device), device_tensor(q_heads, torch.long, device)


def _sdpa_masked(q, k, v, mask, scale, softcap=None):
    """Masked SDPA off the cuDNN backend: cuDNN builds a plan per new shape (milliseconds
    each), and the memory-efficient kernel handles masks well."""
    if q.is_cuda and softcap is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return sdpa(q, k, v, mask=mask, scale=scale)
    return sdpa(q, k, v, mask=mask, scale=scale, softcap=softcap)


def _banded(query, key, value, pattern, heads, out, shared: _Band) -> None:
    """Window / elastic heads sharing ``pattern``: query chunks over sink + band keys.

    Every chunk reads a band of the same width (positions before the sink or before 0 are
    masked), so all full chunks share one shape. With ``window`` every span is clamped to
    it and a sink key counts only for queries less than ``window`` positions after it
    (dense and SparQ heads, dense in prefill, are sink 0 / span n)."""
    batch, q_heads, length, dim = query.shape
    group = q_heads // key.shape[1]
    scale, softcap = shared.logits.scale, shared.logits.softcap
    window, chunk = shared.window, shared.chunk
    dev = query.device
    kv_idx, qi = head_index(heads, group, dev)
    n_h = len(heads)
    k_g = key.index_select(1, kv_idx).to(query.dtype)  # (B, n_h, L, D)
    v_g = value.index_select(1, kv_idx).to(query.dtype)
    q_g = query.index_select(1, qi)  # (B, n_h * G, L, D)
    sink = min(pattern.sink, length)
    pos = torch.arange(length, device=dev)
    spans = torch.as_tensor(pattern.span_at(pos + 1), device=dev)  # (L,) span of query i
    if window is not None:
        spans = spans.clamp(max=window)
    span_max = int(spans.max())
    chunk = max(16, min(chunk, length))
    width = min(length, -(-(chunk + span_max - 1) // 64) * 64)  # band keys per chunk
    sink_pos = pos[:sink]
    for c0 in range(0, length, chunk):
        c1 = min(length, c0 + chunk)
        band = c1 - width + torch.arange(width, device=dev)  # may start below 0
        idx = band.clamp_min(0)
        q_pos = pos[c0:c1, None]
        in_band = (
            (band[None] >= sink) & (band[None] <= q_pos) & (q_pos - band[None] < spans[c0:c1, None])
        )
        if sink:
            sees_sink = sink_pos[None] <= q_pos
            if window is not None:
                sees_sink = sees_sink & (q_pos - sink_pos[None] < window)
            mask = torch.cat([sees_sink, in_band], 1)
        else:
            mask = in_band
        k = torch.cat([k_g[:, :, :sink], k_g.index_select(2, idx)], 2)
        v = torch.cat([v_g[:, :, :sink], v_g.index_select(2, idx)], 2)
        m = k.shape[2]
        if group > 1:
            k = k[:, :, None].expand(batch, n_h, group, m, dim).reshape(batch, n_h * group, m, dim)
            v = v[:, :, None].expand(batch, n_h, group, m, dim).reshape(batch, n_h * group, m, dim)
        out[:, qi, c0:c1] = _sdpa_masked(q_g[:, :, c0:c1], k, v, mask[None, None], scale, softcap)
