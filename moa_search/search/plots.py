"""pareto.png (loss vs KV memory and vs KV bytes read) and plan_map.png (layer x KV head).

Why these two: the front shows what each byte buys against the uniform baselines at the
same budgets; the map shows where the plan spends its bytes (which layers/heads stay dense).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moa_search.files import save_figure  # noqa: E402
from moa_search.patterns import PATTERNS  # noqa: E402
from moa_search.plan import Plan  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    """Write the PNG atomically (temp file + rename)."""
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_pareto(
    trials: pd.DataFrame,
    baselines: list[dict],
    budgets: dict[str, float],
    loss_label: str,
    path: Path,
    length: int | None = None,
) -> Path:
    """Two panels sharing the loss axis; budgets as dashed lines (fractions of dense), the
    cost axes at ``length`` tokens (where the budget binds)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    done = trials[trials["state"] == "COMPLETE"]
    front = done[done["pareto"]]
    best = done[done["best"]]
    for ax, col, label, kind in (
        (axes[0], "memory_density", "KV memory (fraction of dense)", "memory"),
        (axes[1], "read_density", "KV bytes read per decode step (fraction of dense)", "bandwidth"),
    ):
        if length is not None:
            label = f"{label} at {length} tokens"
        ax.scatter(done[col], done["loss"], s=10, c="0.75", label="trials")
        f = front.sort_values(col)
        ax.scatter(f[col], f["loss"], s=22, c="tab:blue", label="Pareto-optimal")
        ax.scatter(
            best[col], best["loss"], s=140, marker="*", c="tab:red", label="best.yaml", zorder=5
        )
        for b in baselines:
            ax.scatter(
                b[col],
                b["loss"],
                s=60,
                marker=PATTERNS[b["family"]].style.marker,
                facecolors="none",
                edgecolors="k",
                label=f"uniform {b['family']}",
            )
            ax.annotate(
                b["pattern"],
                (b[col], b["loss"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if kind in budgets:
            ax.axvline(budgets[kind], ls="--", c="tab:green", lw=1, label=f"{kind} budget")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(loss_label)
    handles, labels = axes[0].get_legend_handles_labels()
    extra_h, extra_l = axes[1].get_legend_handles_labels()
    seen = dict(zip(labels + extra_l, handles + extra_h, strict=True))
    fig.legend(
        seen.values(),
        seen.keys(),
        loc="upper center",
        ncol=4,
        fontsize=8,
        bbox_to_anchor=(0.5, 1.08),
    )
    _save(fig, path)
    return path


def plot_plan_map(plan: Plan, length: int, path: Path, title: str = "") -> Path:
    """Heatmap of each KV head's memory density at ``length``, family letter in each cell."""
    d = plan.model.head_dim
    dense = 2 * length * d * 2
    dens = np.array([[p.bytes_stored(length, d) / dense for p in row] for row in plan.heads])
    layers, heads = dens.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * heads + 2), max(3, 0.25 * layers + 1)))
    im = ax.imshow(dens, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    if layers * heads <= 512:
        for i, row in enumerate(plan.heads):
            for j, p in enumerate(row):
                ax.text(
                    j,
                    i,
                    p.style.letter,
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if dens[i, j] < 0.6 else "k",
                )
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"memory density at {length} tokens (D/W/E/S = family)", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of dense KV")
    _save(fig, path)
    return path


def plot_checked(report, path: Path) -> Path:
    """pareto_measured.png: measured quality of the checked plans vs KV memory.

    One panel per task family the check measured: perplexity ratio to dense for text-like
    tasks, the share of answers still reproduced for retrieval; x is KV memory at the
    shortest planned length, where a fractional budget binds (dashed line)."""
    tasks = [
        t for t in ("text", "code", "retrieval", "self") if t in report.final["measured_by_task"]
    ]
    length = min(report.final["memory_density"], key=int)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        key, label = (
            ("match", "answers reproduced (held-out)")
            if task == "retrieval"
            else ("ppl_ratio", "perplexity / dense (held-out)")
        )

        def y(entry: dict, task: str = task, key: str = key) -> float:
            return entry["measured_by_task"].get(task, {}).get(key, np.nan)

        ax.scatter([p["memory_density"][length] for p in report.front],
                   [y(p) for p in report.front], c="tab:blue", s=24,
                   label="Pareto plans (measured)")  # fmt: skip
        ax.scatter([report.final["memory_density"][length]], [y(report.final)], marker="*",
                   s=160, c="tab:red", zorder=5, label="best.yaml (checked)")  # fmt: skip
        for b in report.baselines:
            ax.scatter([b["memory_density"][length]], [y(b)], marker="s", s=40, c="tab:orange",
                       label=f"uniform window ({b['pattern']})")  # fmt: skip
            ax.axvline(b["budget"], ls="--", c="0.6", lw=1)
        ax.set_xlabel(f"KV memory at {length} tokens (fraction of dense)")
        ax.set_ylabel(label)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("checked plans vs the uniform window at equal memory")
    _save(fig, path)
    return path
