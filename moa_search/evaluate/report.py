"""Write what evaluate measured: CSV (every trial and every summary row), Markdown, PNG plots.

Why three forms: the CSVs are for pandas and reruns of the statistics, results.md is what
goes into a PR or README (each number with its interval and sample count, so two numbers
whose intervals overlap are not read as a win), and the plots are the quick look.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from moa_search.evaluate.aggregate import pooled
from moa_search.evaluate.tasks import RETRIEVAL_TASKS

TITLES = {
    "ppl": "perplexity (lower is better)",
    "passkey": "passkey accuracy",
    "kv-retrieval": "kv-retrieval accuracy",
    "retrieval": "retrieval accuracy (passkey + kv pooled)",
}


def write_all(
    out: Path,
    trials: pd.DataFrame,
    summary: pd.DataFrame,
    derived: pd.DataFrame,
    meta: dict,
    plots: bool = True,
) -> list[Path]:
    """Write every output file into ``out`` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "trials.csv", out / "results.csv", out / "derived.csv", out / "run.json"]
    trials.to_csv(files[0], index=False)
    summary.to_csv(files[1], index=False)
    derived.to_csv(files[2], index=False)
    files[3].write_text(json.dumps(meta, indent=1, default=str) + "\n")
    figures = []
    if plots:
        figures = [
            p
            for p in (
                plot_vs_length(summary, out / "accuracy_vs_length.png"),
                plot_heatmap(summary, out / "needle_heatmap.png"),
                plot_budget(summary, out / "budget_curves.png", meta.get("sweep_length")),
            )
            if p is not None
        ]
    md = out / "results.md"
    md.write_text(markdown(trials, summary, derived, meta, [f.name for f in figures]))
    return [*files, md, *figures]


# --- Markdown -----------------------------------------------------------------------------
def _cell(row: pd.Series) -> str:
    if row.metric == "perplexity":
        v = f"{row.value:.3f}"
        ci = "" if math.isnan(row.ci_low) else f" [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        return f"{v}{ci} n={row.n}"
    return f"{row.value:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}] n={row.n}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(
    trials: pd.DataFrame,
    summary: pd.DataFrame,
    derived: pd.DataFrame,
    meta: dict,
    figures: list[str],
) -> str:
    """results.md: setup, methods at each length, one table per task, derived, sweep, cost."""
    conf = int(round(100 * meta.get("confidence", 0.95)))
    parts = [
        f"# moa-search eval: {meta['model']} with plan {meta['plan']}",
        f"Device {meta['device']}, {meta['dtype']}, backend {meta['backend']}, seed "
        f"{meta['seed']}, {meta['samples_per_cell']} samples per cell, wall time "
        f"{meta['seconds']:.0f} s. Cells read `value [{conf}% CI] n=samples`: Wilson intervals "
        f"for accuracies; perplexity = exp(token-weighted mean NLL) over n windows of held-out "
        f"test text ({meta['ppl_corpus']}), bootstrap interval over windows. Lengths marked * "
        f"are longer than any length the plan was made for "
        f"({meta['plan_profiled_lengths'] or 'unknown'}).",
    ]
    main = pooled(summary[summary.section == "main"])
    methods = main.drop_duplicates(["method", "length"])
    parts += [
        "## Methods (rebuilt at each length to match the plan's budget there)",
        _table(
            ["length", "method", "KV memory", "bytes read / step", "what it is"],
            [
                [
                    str(r.length),
                    r.method,
                    _pct(r.memory_density),
                    _pct(r.read_density),
                    r.description,
                ]
                for r in methods.itertuples()
            ],
        ),
    ]
    profiled = max(meta["plan_profiled_lengths"] or [0])
    lengths = sorted(main.length.unique())
    heads = [f"{n}{'*' if profiled and n > profiled else ''}" for n in lengths]
    for task in [t for t in TITLES if t in set(main.task)]:
        g = main[main.task == task]
        rows = []
        for method, gm in g.groupby("method", sort=False):
            by_n = {r.length: _cell(r) for _, r in gm.iterrows()}
            rows.append([method, *(by_n.get(n, "-") for n in lengths)])
        parts += [f"## {TITLES[task]}", _table(["method", *heads], rows)]
    if not derived.empty:
        parts += [
            "## Derived (vs dense)",
            _table(
                ["method", "metric", "task", "value", "note"],
                [
                    [
                        r.method,
                        r.metric,
                        r.task,
                        f"{r.value:.1%}" if r.metric == "max_relative_drop" else str(int(r.value)),
                        r.note,
                    ]
                    for r in derived.itertuples()
                ],
            ),
            "Effective context: longest length up to which retrieval stays >= 90% of dense. "
            "Max relative drop: worst (task, length) cell, accuracy drop or perplexity rise.",
        ]
    parts += _sweep_md(summary, meta)
    parts += _cost_md(trials)
    if meta.get("notes"):
        parts += ["## Notes", "\n".join(f"- {n}" for n in meta["notes"])]
    if figures:
        parts += ["## Figures", "\n".join(f"![{f}]({f})" for f in figures)]
    return "\n\n".join(parts) + "\n"


def _sweep_md(summary: pd.DataFrame, meta: dict) -> list[str]:
    sweep = pooled(summary[summary.section == "sweep"])
    if sweep.empty:
        return []
    tasks = [t for t in TITLES if t in set(sweep.task)]
    rows = []
    for (point, method), g in sweep.groupby(["point", "method"], sort=False):
        by_t = {r.task: _cell(r) for _, r in g.iterrows()}
        first = g.iloc[0]
        rows.append(
            [
                point,
                method,
                _pct(first.memory_density),
                _pct(first.read_density),
                *(by_t.get(t, "-") for t in tasks),
            ]
        )
    return [
        f"## KV budget sweep at n = {meta['sweep_length']}",
        _table(["point", "method", "KV memory", "read", *tasks], rows),
    ]


def _cost_md(trials: pd.DataFrame) -> list[str]:
    g = trials.groupby(["method", "task", "length"], sort=False).seconds
    cost = pd.DataFrame({"trials": g.size(), "mean": g.mean(), "total": g.sum()}).reset_index()
    rows = [
        [r.method, r.task, str(r.length), str(r.trials), f"{r.mean:.2f}", f"{r.total:.0f}"]
        for r in cost.itertuples()
    ]
    return [
        "## Cost (all sections)",
        _table(["method", "task", "length", "trials", "s / trial", "total s"], rows),
    ]


# --- plots --------------------------------------------------------------------------------
def _pyplot():
    import matplotlib  # noqa: PLC0415 - import only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _err(g: pd.DataFrame) -> np.ndarray:
    lo = (g.value - g.ci_low).fillna(0).clip(lower=0)
    hi = (g.ci_high - g.value).fillna(0).clip(lower=0)
    return np.vstack([lo.to_numpy(), hi.to_numpy()])


def plot_vs_length(summary: pd.DataFrame, path: Path) -> Path | None:
    """One panel per task: metric vs eval length, one line per method, CI error bars."""
    main = pooled(summary[summary.section == "main"])
    tasks = [t for t in ("passkey", "kv-retrieval", "retrieval", "ppl") if t in set(main.task)]
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        g = main[main.task == task]
        groups = list(g.groupby("method", sort=False))
        for i, (method, gm) in enumerate(groups):
            gm = gm.sort_values("length")
            x = gm.length * 2 ** (0.03 * (i - (len(groups) - 1) / 2))  # dodge: overlaps visible
            ax.errorbar(x, gm.value, yerr=_err(gm), marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(g.length.unique()), [str(n) for n in sorted(g.length.unique())])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(TITLES[task], fontsize=10)
        if task != "ppl":
            ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(summary: pd.DataFrame, path: Path) -> Path | None:
    """Passkey accuracy, needle depth x length, one panel per method."""
    g = summary[(summary.section == "main") & (summary.task == "passkey") & summary.depth.notna()]
    if g.empty:
        return None
    plt = _pyplot()
    methods = list(dict.fromkeys(g.method))
    lengths, depths = sorted(g.length.unique()), sorted(g.depth.unique())
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(1.2 + 0.9 * len(lengths) * len(methods), 0.5 * len(depths) + 1.6),
        squeeze=False,
    )
    for ax, method in zip(axes[0], methods, strict=True):
        grid = (
            g[g.method == method]
            .pivot_table(index="depth", columns="length", values="value")
            .reindex(index=depths, columns=lengths)
        )
        ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_budget(summary: pd.DataFrame, path: Path, length: int | None) -> Path | None:
    """Quality vs KV budget at the sweep length: plan points vs uniform baselines.

    x is the KV memory fraction, except SparQ (which keeps the full cache and saves reads),
    plotted at its bytes-read fraction. The main-section points at the same length are
    included; dense is the dashed line.
    """
    if length is None:
        return None
    rows = pooled(summary[summary.length == length])
    sweep = rows[rows.section == "sweep"]
    if sweep.empty:
        return None
    tasks = [t for t in ("passkey", "kv-retrieval", "retrieval", "ppl") if t in set(rows.task)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        g = rows[rows.task == task]
        dense = g[g.method == "dense"]
        if not dense.empty:
            ax.axhline(dense.value.iloc[0], ls="--", color="gray", label="dense")
        for method, gm in g[g.method != "dense"].groupby("method", sort=False):
            x = np.where(gm.method == "sparq", gm.read_density, gm.memory_density)
            order = np.argsort(x)
            ax.errorbar(
                x[order],
                gm.value.to_numpy()[order],
                yerr=_err(gm)[:, order],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xlabel("KV budget (memory; SparQ: bytes read), fraction of dense")
        ax.set_title(f"{TITLES[task]} @ {length}", fontsize=10)
        if task in RETRIEVAL_TASKS or task == "retrieval":
            ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
