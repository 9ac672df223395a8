"""Synthetic profiles with the profiler's schema, for tests and the speed benchmark.

Why: the search must be testable and timed without a model or a profiler run. The numbers
follow a simple, plausible attention model: each KV head has a sensitivity and a locality
scale; a window keeps ``1 - exp(-span/tau)`` of the non-sink attention mass, so loss falls
as the span grows; a few "retrieval" heads attend flatly over the whole context and are
very sensitive (only dense or SparQ serve them well).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from moa_search.files import atomic_folder, write_json
from moa_search.patterns import Dense, Elastic, Pattern, SparQ, Window
from moa_search.plan import ModelIdentity
from moa_search.profile.candidates import param_columns
from moa_search.profile.candidates import params as candidate_params
from moa_search.profile.table import KEY_COLUMNS
from moa_search.search.costs import DTYPE_BYTES


def default_candidates() -> list[Pattern]:
    """40 candidates: dense, 12 windows, 18 elastic spans, 9 SparQ settings."""
    cands: list[Pattern] = [Dense()]
    cands += [Window(sink=s, span=w) for s in (4, 64) for w in (128, 256, 512, 1024, 2048, 4096)]
    cands += [
        Elastic(sink=s, alpha=a, beta=b)
        for s in (4, 64)
        for a in (0.0, 256.0, 1024.0)
        for b in (0.125, 0.25, 0.5)
    ]
    cands += [SparQ(r=r, k_ratio=k, local=16) for r in (8, 16, 32) for k in (0.0625, 0.125, 0.25)]
    return cands


def synthetic_identity(
    num_layers: int = 4,
    num_kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 64,
    name: str = "synthetic",
) -> ModelIdentity:
    """A made-up model identity (fingerprint derived from the shape)."""
    return ModelIdentity(
        name_or_path=name,
        architecture="LlamaForCausalLM",
        num_layers=num_layers,
        num_attention_heads=num_kv_heads * group,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        fingerprint=f"synthetic-{num_layers}x{num_kv_heads}x{group}x{head_dim}",
    )


def _kept_mass(p: Pattern, n: int, tau: float, retrieval: bool) -> float:
    """Fraction of a head's attention mass the pattern keeps at length ``n``."""
    if isinstance(p, Dense):
        return 1.0
    if isinstance(p, SparQ):
        quality = 1.0 - 0.5 * np.exp(-p.r / 8.0)
        return quality * (1.0 - np.exp(-p.k_at(n) / n * 40.0))
    sink_mass = (0.02 if retrieval else 0.3) * (1.0 - np.exp(-p.sink / 4.0))
    span = float(p.span_at(n))
    local = span / n if retrieval else 1.0 - np.exp(-span / tau)
    return sink_mass + (1.0 - sink_mass) * local


def synthetic_rows(
    identity: ModelIdentity,
    lengths: list[int],
    candidates: list[Pattern],
    seed: int = 0,
    retrieval_fraction: float = 0.08,
    per_query_rows: bool = True,
) -> pd.DataFrame:
    """The profile table as a DataFrame (aggregate rows head=-1, plus per-query-head rows)."""
    rng = np.random.default_rng(seed)
    num_kv = identity.num_layers * identity.num_key_value_heads
    group = identity.group_size
    sens = rng.lognormal(np.log(0.01), 1.0, num_kv)
    tau = np.exp(rng.uniform(np.log(32), np.log(2048), num_kv))
    retrieval = rng.random(num_kv) < retrieval_fraction
    sens[retrieval] *= 30.0
    share = rng.dirichlet(np.ones(group), num_kv)
    d = identity.head_dim
    records = []
    for ci, p in enumerate(candidates):
        params = candidate_params(p)
        for n in lengths:
            stored = p.bytes_stored(n, d, DTYPE_BYTES)
            read = p.bytes_read(n, d, DTYPE_BYTES)
            density = stored / (2 * n * d * DTYPE_BYTES)
            growth = (n / min(lengths)) ** 0.2
            for g in range(num_kv):
                kept = _kept_mass(p, n, tau[g], bool(retrieval[g]))
                mean = 0.0 if ci == 0 and isinstance(p, Dense) else sens[g] * (1 - kept) * growth
                noise = 1.0 + 0.05 * rng.standard_normal()
                mean = max(0.0, mean * noise)
                layer, kv = divmod(g, identity.num_key_value_heads)
                heads = [-1] + (list(range(kv * group, (kv + 1) * group)) if per_query_rows else [])
                for h in heads:
                    frac = 1.0 if h < 0 else share[g, h - kv * group]
                    records.append(
                        (
                            layer,
                            kv,
                            h,
                            p.name,
                            p.spec(),
                            *params.values(),
                            n,
                            mean * frac,
                            0.3 * mean * frac + 1e-6,
                            8,
                            stored,
                            read,
                            density,
                        )
                    )
    param_cols = param_columns()
    columns = [
        *KEY_COLUMNS,
        *param_cols,
        "length",
        "delta_loss_mean",
        "delta_loss_std",
        "n_samples",
        "stored_bytes",
        "read_bytes",
        "density",
    ]
    frame = pd.DataFrame.from_records(records, columns=columns)
    for col in param_cols:
        frame[col] = pd.array(frame[col].to_numpy(dtype=float), dtype="Float64")
    for col in ("layer", "kv_head", "head", "length", "n_samples", "stored_bytes", "read_bytes"):
        frame[col] = frame[col].astype("int64")
    return frame


def make_synthetic_profile(
    out_dir: str | os.PathLike[str],
    identity: ModelIdentity | None = None,
    lengths: list[int] | tuple[int, ...] = (1024, 2048, 4096),
    candidates: list[Pattern] | None = None,
    seed: int = 0,
    retrieval_fraction: float = 0.08,
    per_query_rows: bool = True,
) -> Path:
    """Write ``profile.parquet`` + ``meta.json`` to ``out_dir`` atomically; returns the folder."""
    identity = identity or synthetic_identity()
    candidates = candidates or default_candidates()
    lengths = sorted(int(n) for n in lengths)
    frame = synthetic_rows(identity, lengths, candidates, seed, retrieval_fraction, per_query_rows)
    meta = {
        "model": identity.to_dict(),
        "lengths": lengths,
        "block_size": 64,
        "candidates": [p.spec() for p in candidates],
        "calibration_hash": f"synthetic-seed{seed}",
        "method_version": "synthetic-1",
        "spearman": None,
    }

    def fill(tmp: Path) -> None:
        frame.to_parquet(tmp / "profile.parquet", index=False)
        write_json(tmp / "meta.json", meta)

    return atomic_folder(out_dir, fill)
