"""Bench outputs: bench.csv (every row), bench.md (tables with the device named), and plots
(tokens/s vs batch per context; peak memory and KV bytes vs context)."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moa_search.files import atomic_write

GIB = 2**30


def versions() -> dict[str, Any]:
    """torch / triton / transformers versions, the command line and the card: what every
    benchmark's run.json records so a result names what it ran on."""
    meta: dict[str, Any] = {"torch": torch.__version__, "argv": sys.argv}
    for name in ("triton", "transformers"):
        try:
            meta[name] = __import__(name).__version__
        except Exception:
            meta[name] = None
    meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return meta


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> Path:
    """``rows`` as CSV (atomic write): the given ``columns`` (other keys dropped), else the
    union of the rows' keys in first-seen order."""
    keys: list[str] = list(columns) if columns is not None else []
    if columns is None:
        for r in rows:
            keys += [k for k in r if k not in keys]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            w = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def _md_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(
    rows: list[dict[str, Any]], columns: list[str], cell: Callable[[Any], str] = str
) -> list[str]:
    """Header, separator and one line per row of ``columns`` (a missing cell is blank)."""
    lines = [_md_row(columns), "|" + "---|" * len(columns)]
    return lines + [_md_row([cell(r.get(c, "")) for c in columns]) for r in rows]


#: transformers' own decoding configs: those of bench.run.CONFIG_SPECS with a transformers cache
HF_CONFIGS = ("dense-sdpa", "hf-static-compiled", "hf-dynamic")


def _ratio(row: dict, ref: dict | None) -> float | None:
    ok = ref and ref.get("tok_s") and row.get("tok_s")
    return row["tok_s"] / ref["tok_s"] if ok else None


def _dense_moa_for(config: str) -> str:
    """The like-for-like dense row: compiled configs against the compiled dense runtime."""
    return "dense-moa-compiled" if config.endswith("-compiled") else "dense-moa"


def _speedups(row: dict, ref_of) -> dict[str, Any]:
    """tok/s of ``row`` over dense-moa's (``ref_of(config)`` gives a config's row at the
    same point, or None; compiled configs over dense-moa-compiled) and over the fastest
    transformers config measured there."""
    refs = [r for r in (ref_of(c) for c in HF_CONFIGS) if r and r.get("tok_s")]
    best = max(refs, key=lambda r: r["tok_s"]) if refs else None
    return {
        "dense-moa": _ratio(row, ref_of(_dense_moa_for(row.get("config", "")))),
        "best-hf": _ratio(row, best),
        "best-hf-config": best["config"] if best else None,
    }


def _best_hf_cell(sp: dict[str, Any]) -> str:
    if sp["best-hf"] is None:
        return "-"
    return f"{sp['best-hf']:.2f} ({sp['best-hf-config']})"


def _ok(rows, mode):
    return [r for r in rows if r.get("mode") == mode and r.get("status") == "ok"]


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown tables: decode sweep with speedups, equal memory, prefill, overhead."""
    lines = [f"# moa-search bench: {meta.get('model')} on {meta.get('device')}", ""]
    lines.append(
        f"torch {meta.get('torch')}; new tokens {meta.get('new_tokens')}; "
        f"plan {meta.get('plan') or 'synthetic ' + str(meta.get('synthetic'))}"
    )
    lines.append("")
    sweep = [r for r in rows if r.get("mode") == "sweep"]
    base = {(r["config"], r["context"], r["batch"]): r for r in _ok(rows, "sweep")}
    lines += [
        "## Decode (synthetic cache at `context` tokens)",
        "",
        "`graph`: each step one replay of our CUDA graph (hf-static-compiled makes its own "
        "through torch.compile; hf-dynamic has none). `x dense-moa`: over dense-moa, or "
        "over dense-moa-compiled for the compiled configs.",
        "",
        "| context | batch | config | graph | KV density | tok/s | ms/token | x dense-moa "
        "| x best transformers | peak GiB | KV GiB | KV vs predicted | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        key = (r["context"], r["batch"])
        sp = _speedups(r, lambda d, key=key: base.get((d, *key)))
        kv_gib = r["kv_bytes"] / GIB if r.get("kv_bytes") else None
        cells = [r["context"], r["batch"], r["config"], r.get("graph", "-"),
                 _fmt(r.get("kv_density"), 3),
                 _fmt(r.get("tok_s"), 1), _fmt(r.get("step_ms"), 3), _fmt(sp["dense-moa"]),
                 _best_hf_cell(sp), _fmt(r.get("peak_gib")), _fmt(kv_gib),
                 f"{_fmt(r.get('kv_err_pct'), 3)}%", r.get("status")]  # fmt: skip
        lines.append(_md_row(cells))
    notes = {r["config"]: r["note"] for r in sweep if r.get("note")}
    if notes:  # peers' library, version, backend and planning choice, once per config
        lines += ["", *(f"- `{c}`: {n}" for c, n in notes.items())]
    eq = [r for r in rows if r.get("mode") == "equal-memory"]
    if eq:
        lines += [
            "",
            f"## Equal memory (budget {eq[0].get('budget_gib')} GiB)",
            "",
            "| context | config | max batch | predicted | tok/s | x dense-moa "
            "| x best transformers | peak GiB | tries (batch, fits) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        by = {(r["config"], r["context"]): r for r in eq}
        for r in eq:
            sp = _speedups(r, lambda d, ctx=r["context"]: by.get((d, ctx)))
            cells = [r["context"], r["config"], r.get("batch"), r.get("predicted_batch"),
                     _fmt(r.get("tok_s"), 1), _fmt(sp["dense-moa"]), _best_hf_cell(sp),
                     _fmt(r.get("peak_gib")), r.get("tries")]  # fmt: skip
            lines.append(_md_row(cells))
    pre = [r for r in rows if r.get("mode") == "prefill"]
    if pre:
        lines += [
            "",
            "## Prefill (real prompt into a fresh cache)",
            "",
            "| context | batch | config | seconds | tok/s | x transformers time | peak GiB "
            "| status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        pb = {(r["config"], r["context"]): r for r in pre if r.get("status") == "ok"}
        for r in pre:
            ref = next((pb[k] for c in HF_CONFIGS if (k := (c, r["context"])) in pb), None)
            rel = r["prefill_s"] / ref["prefill_s"] if ref and r.get("prefill_s") else None
            lines.append(
                f"| {r['context']} | {r['batch']} | {r['config']} | {_fmt(r.get('prefill_s'), 3)} "
                f"| {_fmt(r.get('prefill_tok_s'), 0)} | {_fmt(rel)} | {_fmt(r.get('peak_gib'))} "
                f"| {r.get('status')} |"
            )
    ov = [r for r in rows if "eager_step_ms" in r]
    if ov:
        lines += [
            "",
            "## Per-step overhead and kernel time (profiler, steps without our CUDA graph)",
            "",
            "`timed ms`: the decode table's step (our CUDA-graph replay where `graph` is "
            "True); `no-graph ms`: the same step launched from Python. Kernel times are "
            "device time per step by kind; `copy`: PyTorch's copy kernels (casts, "
            "`torch.cat`, `repeat_kv`'s expand, memcpy), `other`: every other kernel "
            "(norms, rotary, activations, the cache append). The profiled steps launch "
            "the decode kernels without programmatic dependent launch (with it a kernel's "
            "wait for the one before counts as its own time).",
            "",
            "| context | batch | config | graph | timed ms | no-graph ms | kernel sum ms "
            "| overhead % | attention ms | gemm ms | other ms | copy ms | kernels/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ov:
            lines.append(
                f"| {r['context']} | {r['batch']} | {r['config']} | {r.get('graph', '-')} "
                f"| {_fmt(r.get('step_ms'), 3)} "
                f"| {_fmt(r.get('eager_step_ms'), 3)} | {_fmt(r.get('kernel_ms'), 3)} "
                f"| {_fmt(r.get('overhead_pct'), 1)} | {_fmt(r.get('kernel_attention_ms'), 3)} "
                f"| {_fmt(r.get('kernel_gemm_ms'), 3)} | {_fmt(r.get('kernel_other_ms'), 3)} "
                f"| {_fmt(r.get('kernel_copy_ms'), 3)} | {r.get('kernels_per_step', '-')} |"
            )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict[str, Any]], out: Path, device: str) -> list[Path]:
    """tokens_per_s.png (tok/s vs batch, one panel per context) and memory.png (peak and
    KV GiB vs context at each batch). Skipped without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    sweep = _ok(rows, "sweep")
    eq = _ok(rows, "equal-memory")
    paths = []
    contexts = sorted({r["context"] for r in sweep})
    configs = list(dict.fromkeys(r["config"] for r in sweep))
    if contexts:
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts, strict=True):
            for cfg in configs:
                pts = sorted(
                    (r["batch"], r["tok_s"])
                    for r in sweep
                    if r["config"] == cfg and r["context"] == ctx
                )
                if pts:
                    line = ax.plot(*zip(*pts, strict=True), marker="o", label=cfg)[0]
                for r in eq:
                    if r["config"] == cfg and r["context"] == ctx:
                        ax.scatter(
                            [r["batch"]],
                            [r["tok_s"]],
                            marker="*",
                            s=150,
                            color=line.get_color() if pts else None,
                        )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch (star: max batch at the memory budget)")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"context {ctx}")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"decode throughput, {device}")
        fig.tight_layout()
        paths.append(out / "tokens_per_s.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        for cfg in configs:
            for bs in sorted({r["batch"] for r in sweep}):
                pts = sorted(
                    (r["context"], r["peak_gib"], r["kv_bytes"] / GIB)
                    for r in sweep
                    if r["config"] == cfg and r["batch"] == bs and "peak_gib" in r
                )
                if len(pts) >= 1:
                    xs, peak, kv = zip(*pts, strict=True)
                    line = ax.plot(xs, peak, marker="o", label=f"{cfg} B={bs} peak")[0]
                    ax.plot(xs, kv, ls="--", color=line.get_color(), label=f"{cfg} B={bs} KV")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("GiB")
        ax.set_title(f"memory vs context, {device}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a CPU run has no peak-memory points
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / "memory.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "bench.csv")
    (out / "bench.md").write_text(markdown(rows, meta))
    plots(rows, out, str(meta.get("device")))


def load_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read bench.csv back (numbers as numbers) to re-render tables or plots."""
    rows = []
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v == "":
                    continue
                try:
                    row[k] = int(v)
                except ValueError:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return rows
