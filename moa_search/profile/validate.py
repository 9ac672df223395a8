"""Fidelity: measured loss increase of single-head ablations vs the profile's prediction.

Why: a first-order estimate is only useful if it ranks (head, pattern) choices like the
real loss does. For M sampled (layer, kv_head, pattern) triples we rerun the model with
that one KV head changed and everything else dense, and report the Spearman rank
correlation between predicted and measured loss increase.

Static patterns run through ``apply_plan`` (no cache: each head is masked by its
pattern). SparQ is a decode method (dense in prefill), so for it every position of the
one head is computed as a SparQ decode step would (``sparq_prefill``, checked against
``runtime.reference.sparq_decode`` in the tests) -- teacher-forced decoding, in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from moa_search.patterns import Pattern, SparQ, parse
from moa_search.plan import dense_plan
from moa_search.profile.calib import Sample
from moa_search.profile.capture import _dense, sample_loss
from moa_search.profile.sparq_estimate import sparq_prefill
from moa_search.runtime import apply_plan
from moa_search.takeover import Call, attention_policy

SPARQ_ATTN = "moa_profile_sparq"


def _sparq_attention(
    call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """The model's own attention, except one KV group decoded with SparQ at every position.

    ``call.state``: (layer, kv_head, pattern) of that group, or None (dense everywhere)."""
    scale, window, softcap = call.scale, call.window, call.softcap
    out = _dense(query, key, value, scale, window, softcap)
    if call.state is not None and call.state[0] == call.layer:
        _, kv, pattern = call.state
        group = query.shape[1] // key.shape[1]
        sl = slice(kv * group, (kv + 1) * group)
        out = out.clone()
        for b in range(query.shape[0]):
            y = sparq_prefill(
                query[b, sl], key[b, kv], value[b, kv], pattern, scale,
                window=window, softcap=softcap,
            )  # fmt: skip
            out[b, sl] = y.to(out.dtype)
    return out


@torch.no_grad()
def _losses(model: torch.nn.Module, samples: Sequence[Sample]) -> np.ndarray:
    return np.array(
        [float(sample_loss(model, s.input_ids, s.loss_mask, need_grad=False)) for s in samples]
    )


@torch.no_grad()
def static_losses(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    layer: int | None,
    kv_head: int,
    pattern: Pattern | None,
) -> np.ndarray:
    """Per-sample loss with a plan dense everywhere except (layer, kv_head) -> pattern."""
    plan = dense_plan(model)
    if layer is not None and pattern is not None:
        plan.heads = [list(row) for row in plan.heads]
        plan.heads[layer][kv_head] = pattern
    with apply_plan(model, plan, backend="reference"):
        return _losses(model, samples)


@torch.no_grad()
def sparq_losses(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    layer: int | None,
    kv_head: int,
    pattern: SparQ | None,
) -> np.ndarray:
    """Per-sample loss with one KV head decoded by SparQ at every position (None: dense)."""
    target = (layer, kv_head, pattern) if layer is not None and pattern is not None else None
    with attention_policy(model, SPARQ_ATTN, _sparq_attention, state=target):
        return _losses(model, samples)


def pick_pairs(table: pd.DataFrame, length: int, m: int, seed: int) -> pd.DataFrame:
    """M distinct KV-head rows (not dense) at ``length``, drawn with a fixed seed."""
    rows = table[(table["head"] == -1) & (table["length"] == length) & (table["family"] != "dense")]
    m = min(m, len(rows))
    return rows.sample(n=m, random_state=seed).sort_values(["layer", "kv_head", "pattern"])


def validate_profile(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    table: pd.DataFrame,
    length: int,
    m: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure M single-head ablations; Spearman of each estimator vs measured.

    ``table`` must hold the per-sample means over exactly ``samples`` at ``length``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    was_training = model.training
    model.eval()
    head_dim = int(
        getattr(model.config, "head_dim", 0)
        or model.config.hidden_size // model.config.num_attention_heads
    )
    pairs = pick_pairs(table, length, m, seed)
    base_static = static_losses(model, samples, None, 0, None)
    base_sparq = sparq_losses(model, samples, None, 0, None)
    records = []
    for _, row in tqdm(list(pairs.iterrows()), desc=f"validate @{length}", disable=not progress):
        pattern = parse(row["pattern"], head_dim)
        layer, kv = int(row["layer"]), int(row["kv_head"])
        if isinstance(pattern, SparQ):
            measured = sparq_losses(model, samples, layer, kv, pattern) - base_sparq
        else:
            measured = static_losses(model, samples, layer, kv, pattern) - base_static
        records.append(
            {
                "layer": layer,
                "kv_head": kv,
                "pattern": row["pattern"],
                "family": row["family"],
                "measured": float(measured.mean()),
                "measured_std": float(measured.std()),
                **{
                    c: float(row[c])
                    for c in (
                        "delta_loss_mean",
                        "delta_moa_mean",
                        "delta_row_mean",
                        "delta_signed_mean",
                    )
                },
            }
        )
    model.train(was_training)
    frame = pd.DataFrame(records)
    result: dict[str, Any] = {"length": length, "pairs": len(frame), "n_samples": len(samples)}
    for col, key in (
        ("delta_loss_mean", "spearman"),
        ("delta_row_mean", "spearman_row"),
        ("delta_moa_mean", "spearman_moa"),
        ("delta_signed_mean", "spearman_signed"),
    ):
        if not len(frame):
            result[key] = None
            continue
        ok = frame[col].notna()
        result[key] = _spearman(frame.loc[ok, col], frame.loc[ok, "measured"])
    for fam in sorted(frame["family"].unique()) if len(frame) else []:
        sub = frame[frame["family"] == fam]
        result[f"spearman_{fam}"] = _spearman(sub["delta_loss_mean"], sub["measured"])
    result["records"] = records
    return result


def _spearman(a: pd.Series, b: pd.Series) -> float | None:
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return None
    return float(spearmanr(a.to_numpy(), b.to_numpy()).statistic)
