"""``bench --calibrate-costs``: a measured table of decode-attention time per KV head.

Why: byte costs say how much a plan reads, not how long the step takes on the user's GPU
(launch overhead, SparQ's extra passes, small-batch occupancy). This times one decode
step of one attention layer through the runtime's own decode path -- ``decode_layer``
with the Triton kernels on CUDA (the mixed kernel for dense / window / elastic heads, the
SparQ pipeline for SparQ heads), the runtime's per-head PyTorch reference elsewhere (CPU
numbers only serve tests) -- for every cell of batch x context x pattern, and writes one
tidy CSV row per cell (:data:`COLUMNS`) plus ``<stem>.meta.json`` (device, torch version,
date). :mod:`moa_search.search.latency` reads it back.

What a cell times: a layer of ``kv_heads`` KV heads, all with the same pattern, holding
``n`` tokens per sequence (random K/V: decode time depends on lengths, not values); the
step's attention only (the cache write of the new token is not timed, so replays do not
move the length). ``us_per_head`` = the layer's time / ``kv_heads``: the layer's launch
overhead is shared by its heads, as a real layer shares it. Static patterns are timed as
dense at each context and as window+sink heads keeping each of ``stored`` entries (their
time depends on the entries read, which is how elastic heads are priced too); SparQ at
each of its settings.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from moa_search.errors import MoaSearchError
from moa_search.files import atomic_write, write_json
from moa_search.patterns import MEASURED_SINK, Dense, Pattern, SparQ, Window, parse
from moa_search.plan import ModelIdentity

COLUMNS = (
    "device", "dtype", "group", "head_dim", "kv_heads", "family", "pattern", "batch", "n",
    "stored", "read", "us", "us_per_head",
)  # fmt: skip
#: window+sink heads of the static rows keep this many entries by default
DEFAULT_STORED = (256, 1024, 4096)
CPU_REPS = 5  # median of this many timed calls per cell on the CPU reference path


@dataclass(frozen=True)
class CalibrateConfig:
    """The grid: ``batches`` x ``contexts`` x patterns (dense, a window keeping each of
    ``stored`` entries below the context, each of ``sparq`` specs; default: the
    profiler's measured and gradient SparQ grids at the model's head_dim)."""

    batches: Sequence[int] = (1, 8, 32)
    contexts: Sequence[int] = (4096, 16384, 32768)
    stored: Sequence[int] = DEFAULT_STORED
    sparq: Sequence[str] | None = None
    device: str = "cuda"
    dtype: str = "bfloat16"


def meta_path(csv_path: str | Path) -> Path:
    """``costs.csv`` -> ``costs.meta.json``: where the table's meta lives."""
    return Path(csv_path).with_suffix(".meta.json")


def sparq_settings(head_dim: int, specs: Sequence[str] | None = None) -> list[SparQ]:
    """The SparQ settings to time: ``specs``, or every default candidate of both grids."""
    if specs is None:
        found = SparQ.candidates([4096], head_dim) + SparQ.candidates([4096], head_dim, "gradient")
        return list(dict.fromkeys(found))
    out = []
    for spec in specs:
        p = parse(spec if spec.startswith("sparq") else f"sparq:{spec}", head_dim)
        if not isinstance(p, SparQ):
            raise MoaSearchError(f"--sparq: {spec!r} is not a SparQ setting")
        out.append(p)
    return out


def grid(identity: ModelIdentity, config: CalibrateConfig) -> list[tuple[int, int, Pattern]]:
    """Every (batch, context, pattern) cell, in the order they are timed."""
    for what, values in (("batch", config.batches), ("context", config.contexts)):
        if not values or any(int(v) != v or v <= 0 for v in values):
            raise MoaSearchError(f"calibrate-costs: {what} sizes must be positive integers")
    if any(s <= 1 for s in config.stored):
        raise MoaSearchError("calibrate-costs: stored lengths must be > 1")
    sparq = sparq_settings(identity.head_dim, config.sparq)
    cells = []
    for b in sorted(set(config.batches)):
        for n in sorted(set(config.contexts)):
            patterns: list[Pattern] = [Dense()]
            for s in sorted(set(config.stored)):
                if s < n:
                    sink = min(MEASURED_SINK, s // 2)
                    patterns.append(Window(sink=sink, span=s - sink))
            cells += [(b, n, p) for p in [*patterns, *sparq]]
    return cells


def calibrate_costs(
    identity: ModelIdentity,
    out: str | Path,
    config: CalibrateConfig | None = None,
    progress: bool = True,
) -> Path:
    """Time every cell of the grid and write the table to ``out`` (CSV) and its meta."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from moa_search.devices import parse_dtype  # noqa: PLC0415

    config = config or CalibrateConfig()
    device = torch.device(config.device)
    dtype = parse_dtype(config.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoaSearchError(f"calibrate-costs: device {config.device!r}: CUDA is not available")
    cells = grid(identity, config)
    group = identity.num_attention_heads // identity.num_key_value_heads
    kv = identity.num_key_value_heads
    name = device_name(device)
    rows = []
    for batch, n, pattern in tqdm(cells, desc="calibrate costs", disable=not progress):
        us = time_cell(pattern, batch, n, kv, group, identity.head_dim, device, dtype)
        rows.append(
            {
                "device": name,
                "dtype": str(dtype).removeprefix("torch."),
                "group": group,
                "head_dim": identity.head_dim,
                "kv_heads": kv,
                "family": pattern.name,
                "pattern": pattern.spec(),
                "batch": batch,
                "n": n,
                "stored": pattern.stored_entries(n),
                "read": pattern.read_entries(n, identity.head_dim, dtype.itemsize),
                "us": us,
                "us_per_head": us / kv,
            }
        )
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    out = Path(out)
    write_json(
        meta_path(out),
        {
            "device": name,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": identity.name_or_path,
            "path": "triton kernels" if device.type == "cuda" else "pytorch reference",
            "table": out.name,
        },
    )
    return atomic_write(out, lambda tmp: frame.to_csv(tmp, index=False))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _layer(pattern: Pattern, kv: int, batch: int, n: int, dim: int, device, dtype):
    """A patterned layer cache holding ``n`` random tokens per sequence."""
    from moa_search.runtime.cache import MoALayerCache  # noqa: PLC0415

    layer = MoALayerCache([pattern] * kv, max_cache_len=n)
    like = torch.empty(batch, kv, 1, dim, dtype=dtype, device=device)
    layer.lazy_initialization(like, like)
    layer._ensure_capacity(n, like)
    layer.keys.normal_()
    layer.values.normal_()
    if layer.v_sum is not None:
        layer.v_sum.normal_()
        layer.sync_side()  # SparQ scores the side buffer: it must hold these keys too
    layer.lengths.fill_(n)
    layer.processed = n
    return layer


def time_cell(
    pattern: Pattern,
    batch: int,
    n: int,
    kv: int,
    group: int,
    dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Microseconds of one decode step of a ``kv``-head layer of ``pattern`` at length n."""
    from moa_search.runtime.scores import Logits  # noqa: PLC0415

    with torch.inference_mode():
        layer = _layer(pattern, kv, batch, n, dim, device, dtype)
        query = torch.randn(batch, kv * group, 1, dim, dtype=dtype, device=device)
        out = torch.empty_like(query)
        logits = Logits(dim**-0.5)
        step = _cuda_step if device.type == "cuda" else _reference_step
        try:
            return step(layer, query, out, logits)
        finally:
            del layer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _cuda_step(layer, query, out, logits) -> float:
    """Median of CUDA-graph replays of ``decode_layer`` (do_bench if capture fails)."""
    import triton.testing as tt  # noqa: PLC0415

    from moa_search import kernels  # noqa: PLC0415
    from moa_search.runtime.kernel_dispatch import decode_layer  # noqa: PLC0415

    def fn() -> None:
        decode_layer(kernels, layer, query, out, logits)

    fn()
    torch.cuda.synchronize()
    try:
        ms = tt.do_bench_cudagraph(fn, rep=40, return_mode="median")
    except Exception:  # noqa: BLE001 - graph capture is an optimisation of the timing only
        torch.cuda.synchronize()
        ms = tt.do_bench(fn, warmup=10, rep=40, return_mode="median")
    return float(ms) * 1e3


def _reference_step(layer, query, out, logits) -> float:
    """Median wall time of the runtime's per-head reference decode (CPU)."""
    from moa_search.runtime.reference import attend_head  # noqa: PLC0415

    group = query.shape[1] // layer.num_heads
    q_pos = layer.lengths[:, None]

    def fn() -> None:
        for h, pattern in enumerate(layer.patterns):
            k, v, pos = layer.gather(h)
            v_mean = None
            if h in layer.sparq_heads:
                v_mean = layer.v_sum[:, layer.sparq_heads.index(h)] / layer.lengths[:, None]
            sl = slice(h * group, (h + 1) * group)
            out[:, sl] = attend_head(query[:, sl], k, v, q_pos, pos, pattern, logits, v_mean)

    fn()
    times = []
    for _ in range(CPU_REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6
