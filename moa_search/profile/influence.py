"""Tile-wise first-order influence of attention entries on the loss (MoA's profile).

For one query row with softmax ``A`` and ``G = dL/dA`` (``G_j = dO . v_j``), dropping a
set S of keys and renormalising the rest changes the output by
``sum_{j in S} A_j (o - v_j) / (1 - A_S)``, hence the loss by about

    row(S)   = (D * A_S - sum_{j in S} A_j G_j) / (1 - A_S),     D = dO . o = sum_j A_j G_j

and, for S = {j}, MoA's entry effect ``e_j = A_j (D - G_j) / (1 - A_j)``.

What is stored, per (layer, query head) and candidate pattern:
  * ``moa``    sum over rows of sum_{j in S_i} |e_ij|   (MoA's estimate; also in blocks),
  * ``row``    sum over rows of |row_i(S_i)|            (joint drop per row, then |.|),
  * ``signed`` sum over rows of row_i(S_i)              (plain first-order Taylor term),
  * ``blocks`` sum of |e_ij| over block_size x block_size tiles (any mask, block-aligned).

Static patterns drop one contiguous key range per row, ``[sink, i - span(i+1)]``, so the
three sums come exactly, per element, from prefix sums along the key axis: no
block-diagonal approximation for the candidate grid. Memory is O(H * tile * N). On a GPU
the fused Triton kernel (``moa_search.kernels.influence``) computes the same sums without
any N x tile temporaries; the PyTorch loop here is its reference and the CPU path.

SparQ picks keys from the data, so it is priced by emulating its decode step
(``sparq_estimate``) at ``sparq_rows`` evenly spaced rows: ``sparq_row`` / ``sparq_signed``
are sums of |<dO, o_SparQ - o>| and <dO, o_SparQ - o> scaled to all rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moa_search.patterns import Pattern, SparQ, seen_length
from moa_search.profile.sparq_estimate import causal_softmax, running_v_mean, sparq_tile_deltas

_EPS = 1e-6
TILE_ELEMENTS = 1 << 26  # elements of one (H, tile, N) float32 temporary on GPU: 256 MiB
CPU_TILE_ELEMENTS = 1 << 21  # on CPU, tiles that stay in cache are ~2x faster
KERNEL_BLOCKS = (16, 32, 64, 128)  # block sizes the fused Triton kernel supports


@dataclass
class LayerInfluence:
    """Per-layer results for one sample; H = query heads, Cs/Cq static/SparQ candidates."""

    moa: torch.Tensor  # (H, Cs)
    row: torch.Tensor  # (H, Cs)
    signed: torch.Tensor  # (H, Cs)
    sparq_row: torch.Tensor  # (H, Cq)
    sparq_signed: torch.Tensor  # (H, Cq)
    blocks: torch.Tensor  # (H, N/B, N/B)


@dataclass
class LayerAttention:
    """One layer's attention for one sample as its backward sees it: ``q``, ``do`` (H, N, D)
    queries and dL/d(attention output) per query head; ``k``, ``v`` (Hkv, N, D) after RoPE;
    the softmax ``scale`` and the layer's own sliding ``window`` and logit ``softcap``
    (None: none; the model's attention probabilities are formed with them)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    scale: float
    window: int | None = None
    softcap: float | None = None

    @functools.cached_property
    def kv_float(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.float(), self.v.float()

    def tile(
        self, rows: slice | torch.Tensor, pos: torch.Tensor, nk: int
    ) -> tuple[torch.Tensor, ...]:
        """Query ``rows`` (at positions ``pos``, causal horizon ``nk`` keys) as float32
        (Hkv, G, t, D) queries and dO, their keys and values (Hkv, nk, D) and the dense
        probabilities (Hkv, G, t, nk)."""
        heads, _, dim = self.q.shape
        kv_heads = self.k.shape[0]
        group = heads // kv_heads
        kf, vf = self.kv_float
        qt = self.q[:, rows].float().view(kv_heads, group, -1, dim)
        dot = self.do[:, rows].float().view(kv_heads, group, -1, dim)
        kt, vt = kf[:, :nk], vf[:, :nk]
        a = causal_softmax(qt, kt, pos, self.scale, self.window, self.softcap)
        return qt, dot, kt, vt, a


def default_tile_rows(heads: int, length: int, block_size: int, on_cpu: bool = False) -> int:
    """Query rows per tile: a multiple of the block size keeping temporaries ~TILE_ELEMENTS."""
    rows = (CPU_TILE_ELEMENTS if on_cpu else TILE_ELEMENTS) // max(1, heads * length)
    rows = max(block_size, min(1024, rows) // block_size * block_size)
    return min(rows, length)


def dropped_range(
    patterns: Sequence[Pattern], pos: torch.Tensor, reach: int
) -> tuple[torch.Tensor, ...]:
    """Dropped keys of each row are ``[lo, hi]`` (empty when hi < lo).

    pos: (t,) query positions of a sample of ``reach`` tokens (every span is taken there).
    Returns lo: (C,) and hi: (C, t), int64.
    """
    lo = torch.tensor([p.sink for p in patterns], dtype=torch.int64, device=pos.device)
    seen = seen_length(pos, reach)
    span = torch.stack(
        [
            torch.as_tensor(p.span_at(seen), device=pos.device).to(torch.int64).expand_as(pos)
            for p in patterns
        ]
    )
    return lo, pos[None, :] - span


def range_sum(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sum of x over [lo, hi] per row from inclusive prefix sums along the last axis.

    prefix: (..., t, nk); lo: (C,); hi: (C, t). Returns (..., t, C).
    """
    nk = prefix.shape[-1]
    lead = prefix.shape[:-2]
    idx_hi = hi.clamp(0, nk - 1).T.expand(*lead, -1, -1)
    idx_lo = (lo - 1).clamp(0, nk - 1)[None, :].expand(hi.shape[1], -1).expand(*lead, -1, -1)
    total = prefix.gather(-1, idx_hi)
    before = prefix.gather(-1, idx_lo) * (lo > 0).to(prefix.dtype)
    empty = (hi < lo[:, None]).T  # (t, C)
    return (total - before).masked_fill(empty, 0.0)


def kept_sum(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sum of x over the kept keys ``[0, lo) + (hi, nk)`` per row and candidate.

    x: (..., t, nk), zero past each row's causal horizon; lo: (C,); hi: (C, t).
    Returns (..., t, C). Each part is summed on its own (prefix, suffix), no subtraction.
    """
    nk = x.shape[-1]
    lead = x.shape[:-2]
    prefix = x.cumsum(-1)
    idx_lo = (lo - 1).clamp(0, nk - 1)[None, :].expand(hi.shape[1], -1).expand(*lead, -1, -1)
    sink = prefix.gather(-1, idx_lo) * (lo > 0).to(x.dtype)
    del prefix
    suffix = x.flip(-1).cumsum(-1).flip(-1)
    idx_hi = (hi + 1).clamp(0, nk - 1).T.expand(*lead, -1, -1)
    return sink + suffix.gather(-1, idx_hi)


def layer_influence(
    att: LayerAttention,
    static: Sequence[Pattern],
    sparq: Sequence[SparQ] = (),
    block_size: int = 64,
    tile_rows: int | None = None,
    sparq_rows: int = 0,
    backend: str = "auto",
) -> LayerInfluence:
    """Influence of every static and SparQ candidate for one layer of one sample.

    ``att``: the layer's q, k, v, dO, scale, window and soft-cap (:class:`LayerAttention`).
    N must be a multiple of ``block_size``. Static candidates are priced at
    every row; SparQ candidates at ``sparq_rows`` evenly spaced rows (0: every row; the
    sums are scaled to all rows). ``backend``: "triton" (fused kernel, GPU), "torch"
    (float32 loop, any device) or "auto" (the kernel on CUDA when the block size allows it).
    The fused kernel knows no sliding window or soft-cap, so layers with either take the
    PyTorch loop.
    """
    q = att.q
    heads = q.shape[0]
    ranges = None
    native = att.window is not None or att.softcap is not None
    if native and backend == "triton":
        raise ValueError("the fused influence kernel has no sliding window or soft-cap")
    if native:
        backend = "torch"
    if backend in ("auto", "triton") and q.is_cuda and block_size in KERNEL_BLOCKS:
        ranges = _kernel_ranges(tuple(static), q.shape[1], block_size, str(q.device))
    if backend == "auto":  # the kernel needs ranges moving <= 1 key per row (all built-ins)
        backend = "triton" if ranges is not None else "torch"
    if backend == "triton":
        from moa_search.kernels.influence import static_influence  # noqa: PLC0415

        if ranges is None:  # CPU (interpreter) or a pattern the cache could not prepare
            lo, hi = dropped_range(static, torch.arange(q.shape[1], device=q.device), q.shape[1])
            ranges = (hi, lo, None)
        hi, lo, events = ranges
        found = static_influence(
            q, att.k, att.v, att.do, att.scale, hi, lo, block_size, events=events
        )
    elif backend == "torch":
        found = static_influence_torch(att, static, block_size, tile_rows)
    else:
        raise ValueError(f"backend: expected auto, triton or torch, got {backend!r}")
    stride = sparq_stride_for(q.shape[1], sparq_rows)
    sq_row, sq_signed = sparq_influence(att, sparq, stride, tile_rows)
    return LayerInfluence(
        moa=found["moa"].view(heads, len(static)),
        row=found["row"].view(heads, len(static)),
        signed=found["signed"].view(heads, len(static)),
        sparq_row=sq_row,
        sparq_signed=sq_signed,
        blocks=found["blocks"],
    )


@functools.lru_cache(maxsize=16)
def _kernel_ranges(
    static: tuple[Pattern, ...], length: int, block_size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, ...]]] | None:
    """Dropped ranges and kernel events of a candidate list, built once per length (not per
    layer: building them syncs with the host); None if a pattern's range moves too fast."""
    from moa_search.kernels.influence import launch_events  # noqa: PLC0415

    lo, hi = dropped_range(static, torch.arange(length, device=device), length)
    try:
        return hi, lo, launch_events(hi, lo, block_size, device)
    except ValueError:
        return None


def static_influence_torch(
    att: LayerAttention,
    static: Sequence[Pattern],
    block_size: int = 64,
    tile_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """The static sums of :func:`layer_influence` in plain PyTorch, one query tile at a time.

    Returns float32 ``moa``, ``row``, ``signed`` (H, C) and ``blocks`` (H, N/B, N/B).
    """
    heads, length, _ = att.q.shape
    kv_heads = att.k.shape[0]
    group = heads // kv_heads
    nb = length // block_size
    dev = att.q.device
    tile = tile_rows or default_tile_rows(heads, length, block_size, dev.type == "cpu")
    if tile % block_size:
        raise ValueError(f"tile_rows {tile} must be a multiple of block_size {block_size}")
    cs = len(static)
    moa = torch.zeros(kv_heads, group, cs, device=dev)
    row = torch.zeros_like(moa)
    signed = torch.zeros_like(moa)
    blocks = torch.zeros(kv_heads, group, nb, nb, device=dev)

    for q0 in range(0, length, tile):
        q1 = min(length, q0 + tile)
        t, nk = q1 - q0, q1
        pos = torch.arange(q0, q1, device=dev)
        _, dot, _, vt, a = att.tile(slice(q0, q1), pos, nk)
        ag = torch.einsum("hgtd,hnd->hgtn", dot, vt).mul_(a)  # A_j G_j
        # D_i = dO . o as the row sum of A G: for a one-hot row D - G_j is then exactly 0
        delta = ag.sum(-1, keepdim=True)  # (Hkv, G, t, 1)
        e = a * delta
        e.sub_(ag).div_((1.0 - a).clamp_min_(_EPS)).abs_()  # |e_ij|; 0 above the diagonal
        blocks[:, :, q0 // block_size : q1 // block_size, : nk // block_size] += e.view(
            kv_heads, group, t // block_size, block_size, nk // block_size, block_size
        ).sum((3, 5))
        if cs:
            lo, hi = dropped_range(static, pos, length)
            moa += range_sum(e.cumsum_(-1), lo, hi).sum(-2)
            del e
            # (D A_S - AG_S) / (1 - A_S) over the kept keys K = [0, lo) + (hi, i], summed
            # directly (prefix + suffix): 1 - A_S would cancel badly when A_S ~ 1
            kept_a = kept_sum(a, lo, hi)  # (Hkv, G, t, C)
            kept_ag = kept_sum(ag, lo, hi)
            mean_g = delta / a.sum(-1, keepdim=True)
            est = (kept_ag - mean_g * kept_a) / kept_a.clamp_min(_EPS)
            est.masked_fill_((hi < lo[:, None]).T, 0.0)
            row += est.abs().sum(-2)
            signed += est.sum(-2)
        del a, ag
    return {
        "moa": moa.view(heads, cs),
        "row": row.view(heads, cs),
        "signed": signed.view(heads, cs),
        "blocks": blocks.view(heads, nb, nb),
    }


def sparq_stride_for(length: int, rows: int) -> int:
    """Stride giving at least ``rows`` sampled rows of ``length`` (0 rows: every row)."""
    if rows < 0:
        raise ValueError(f"sparq_rows must be >= 0, got {rows}")
    return 1 if rows == 0 else max(1, length // rows)


def sampled_rows(length: int, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows priced for SparQ: every ``stride``-th, ending at the last row (the longest)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return torch.arange(length - 1, -1, -stride, device=device).flip(0)


def sparq_influence(
    att: LayerAttention, sparq: Sequence[SparQ], stride: int = 1, tile_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of |<dO, o_SparQ - o>| and of the signed value, per (head, candidate).

    Rows are sampled every ``stride`` (see :func:`sampled_rows`) and the sums scaled by
    N / sampled rows, so every stride estimates the same all-row total. Returns two
    float32 (H, Cq) tensors.
    """
    q, window = att.q, att.window
    heads, length, _ = q.shape
    kv_heads = att.k.shape[0]
    group = heads // kv_heads
    cq = len(sparq)
    row = torch.zeros(kv_heads, group, cq, device=q.device)
    signed = torch.zeros_like(row)
    if not cq:
        return row.view(heads, 0), signed.view(heads, 0)
    rows = sampled_rows(length, stride, q.device)
    tile = tile_rows or default_tile_rows(heads, length, 1, q.device.type == "cpu")
    vmean = running_v_mean(att.v, window)[:, rows]  # (Hkv, R, D)
    for r0 in range(0, rows.numel(), tile):
        pos = rows[r0 : r0 + tile]
        qt, dot, kt, vt, a = att.tile(pos, pos, int(pos[-1]) + 1)
        g = torch.einsum("hgtd,hnd->hgtn", dot, vt)
        dvm = (dot * vmean[:, None, r0 : r0 + tile]).sum(-1)
        for i, diff in sparq_tile_deltas(qt, kt, a, g, dvm, pos, sparq, window):
            row[..., i] += diff.abs().sum(-1)
            signed[..., i] += diff.sum(-1)
        del a, g
    factor = length / rows.numel()
    return (row * factor).view(heads, cq), (signed * factor).view(heads, cq)
