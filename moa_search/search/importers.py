"""Turn peers' plan files into our plan YAML, so their choices run on our runtime and plots.

- MoA (thu-nics/MoA): ``{"alphas": [[per head] per layer], "betas": [[...]]}``, every head
  a 64-token sink plus a window of span ``alpha + beta * N`` (alpha in tokens, beta a
  fraction). MoA plans per query head (it expands GQA models to MHA); our patterns live per
  KV head, so each KV group takes the largest alpha and the largest beta of its query heads,
  which keeps every key any of them kept. MoA allows negative alphas; ours must be >= 0, so
  those are raised to 0 (keeps more keys, never fewer).
- DuoAttention (mit-han-lab/duo-attention): ``full_attention_heads.tsv``, layers x KV heads
  of gate values; a head with gate >= threshold stays dense, the others become
  sink + recent windows. Sink/recent come from the ``config.json`` beside the TSV
  (``deploy_*`` first, as Duo's loader does) or Duo's training defaults, 64 and 256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moa_search.errors import MoaSearchError
from moa_search.patterns import MAX_PARAM, Dense, Elastic, Pattern, Window
from moa_search.plan import ModelIdentity, Plan, plan_from_dict, save_plan

MOA_SINK = 64
DUO_SINK = 64
DUO_RECENT = 256
DUO_THRESHOLD = 0.5
FORMATS = ("moa", "duo")


def model_identity(model: Any) -> ModelIdentity:
    """A ModelIdentity from an identity, a transformers config or model, or a name/path."""
    if isinstance(model, ModelIdentity):
        return model
    if isinstance(model, (str, os.PathLike)):
        from moa_search.models import load_config  # noqa: PLC0415

        config = load_config(str(model))
        return ModelIdentity.from_config(config, str(model))
    return ModelIdentity.from_config(model)


def import_moa(path: str | os.PathLike[str], model: Any, sink: int = MOA_SINK) -> Plan:
    """MoA alphas/betas JSON -> Plan (elastic heads, max over each KV group)."""
    path = Path(path)
    sink = _count(sink, "sink", minimum=0)
    ident = model_identity(model)
    data = _read_json(path)
    alphas = _matrix(data, "alphas", path, ident)
    betas = _matrix(data, "betas", path, ident)
    if alphas.shape != betas.shape:
        raise MoaSearchError(f"{path}: alphas {alphas.shape} and betas {betas.shape} differ")
    if (betas < 0).any() or (betas > 1).any():
        raise MoaSearchError(f"{path}: betas: expected fractions in [0, 1]")
    per_query = alphas.shape[1] == ident.num_attention_heads and ident.group_size > 1
    if per_query:
        shape = (ident.num_layers, ident.num_key_value_heads, ident.group_size)
        alphas, betas = alphas.reshape(shape).max(axis=2), betas.reshape(shape).max(axis=2)
    clamped = int((alphas < 0).sum())
    heads = [
        [
            Elastic(sink=sink, alpha=float(max(a, 0.0)), beta=float(b))
            for a, b in zip(arow, brow, strict=True)
        ]
        for arow, brow in zip(alphas, betas, strict=True)
    ]
    notes = [f"imported from MoA plan {path.name}; sink={sink}"]
    if per_query:
        notes.append(
            f"MoA plans per query head: each KV group of {ident.group_size} heads takes "
            "the max alpha and max beta of its heads (a superset of their keys)"
        )
    if clamped:
        notes.append(f"{clamped} negative alpha value(s) raised to 0 (keeps more keys)")
    return Plan(
        ident, heads, notes="; ".join(notes), metrics={"source": "moa", "source_file": path.name}
    )


def import_duo(
    path: str | os.PathLike[str],
    model: Any,
    threshold: float = DUO_THRESHOLD,
    sink: int | None = None,
    recent: int | None = None,
) -> Plan:
    """DuoAttention full_attention_heads.tsv -> Plan (dense or window(sink, recent))."""
    path = Path(path)
    ident = model_identity(model)
    if not 0 <= threshold <= 1:
        raise MoaSearchError(f"threshold must be in [0, 1], got {threshold}")
    try:
        gates = np.loadtxt(path, dtype=float, delimiter="\t", ndmin=2)
    except FileNotFoundError:
        raise MoaSearchError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise MoaSearchError(
            f"{path}: not a tab-separated table of numbers ({str(exc).splitlines()[0]})"
        ) from None
    if not np.isfinite(gates).all():
        raise MoaSearchError(f"{path}: gate values must be finite numbers")
    want = (ident.num_layers, ident.num_key_value_heads)
    if gates.shape != want:
        raise MoaSearchError(
            f"{path}: expected {want[0]} rows (layers) x {want[1]} columns "
            f"(KV heads) for {ident.name_or_path}, got {gates.shape[0]} x "
            f"{gates.shape[1]}"
        )
    cfg_sink, cfg_recent, origin = _duo_config(path.parent / "config.json")
    sink = _count(sink, "sink", minimum=0) if sink is not None else cfg_sink
    recent = _count(recent, "recent", minimum=1) if recent is not None else cfg_recent
    window: Pattern = Window(sink=sink, span=recent)
    full = np.clip(gates, 0, 1) >= threshold
    heads = [[Dense() if f else window for f in row] for row in full]
    notes = (
        f"imported from DuoAttention {path.name}: gate >= {threshold} -> dense "
        f"({int(full.sum())} of {full.size} KV heads), others window sink={sink} "
        f"recent={recent} ({origin})"
    )
    return Plan(ident, heads, notes=notes, metrics={"source": "duo", "source_file": path.name})


def import_plan(
    fmt: str, path: str | os.PathLike[str], model: Any, out: str | os.PathLike[str], **options: Any
) -> Path:
    """CLI entry: import a ``moa`` or ``duo`` file and save the plan YAML atomically."""
    if fmt not in FORMATS:
        raise MoaSearchError(f"unknown plan format {fmt!r} (choose from {', '.join(FORMATS)})")
    options = {k: v for k, v in options.items() if v is not None}
    plan = (
        import_moa(path, model, **options) if fmt == "moa" else import_duo(path, model, **options)
    )
    # Check the plan exactly as load_plan will read it back, before anything is written.
    plan_from_dict(plan.to_dict(), source=f"{fmt} import of {path}")
    return save_plan(plan, out)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MoaSearchError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MoaSearchError(f"{path}: not valid JSON ({type(exc).__name__})") from None


def _matrix(data: Any, key: str, path: Path, ident: ModelIdentity) -> np.ndarray:
    if not isinstance(data, dict) or key not in data:
        raise MoaSearchError(f"{path}: {key}: missing (expected a MoA plan with alphas and betas)")
    try:
        arr = np.array(data[key], dtype=float)
    except (TypeError, ValueError):
        raise MoaSearchError(f"{path}: {key}: expected a list per layer of numbers") from None
    if arr.ndim != 2 or arr.shape[0] != ident.num_layers:
        raise MoaSearchError(
            f"{path}: {key}: expected {ident.num_layers} layers of equal-length "
            f"lists, got shape {arr.shape}"
        )
    if arr.shape[1] not in (ident.num_attention_heads, ident.num_key_value_heads):
        raise MoaSearchError(
            f"{path}: {key}: expected {ident.num_attention_heads} (query) or "
            f"{ident.num_key_value_heads} (KV) heads per layer, "
            f"got {arr.shape[1]}"
        )
    if not np.isfinite(arr).all():
        raise MoaSearchError(f"{path}: {key}: values must be finite")
    return arr


def _duo_config(path: Path) -> tuple[int, int, str]:
    """Sink/recent from Duo's config.json (deploy_* overrides), else Duo's defaults."""
    if not path.is_file():
        return DUO_SINK, DUO_RECENT, "DuoAttention defaults"
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise MoaSearchError(f"{path}: expected a JSON object")

    def pick(keys: tuple[str, str], default: int, minimum: int) -> int:
        for key in keys:  # the first one present and not null
            if cfg.get(key) is not None:
                return _count(cfg[key], key, minimum, source=path)
        return default

    sink = pick(("deploy_sink_size", "sink_size"), DUO_SINK, 0)
    recent = pick(("deploy_recent_size", "recent_size"), DUO_RECENT, 1)
    return sink, recent, f"from {path.name}"


def _count(value: Any, name: str, minimum: int, source: Path | None = None) -> int:
    """An integer in [minimum, MAX_PARAM] (integral floats such as 64.0 accepted)."""
    where = f"{source}: " if source is not None else ""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or not minimum <= value <= MAX_PARAM:
        raise MoaSearchError(
            f"{where}{name}: expected an integer in [{minimum}, {MAX_PARAM}], got {value!r}"
        )
    return value
