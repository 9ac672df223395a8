"""Write what evaluate measured: CSV (every trial and every summary row), Markdown, PNG plots.

Why three forms: the CSVs are for pandas and reruns of the statistics, results.md is what
goes into a PR or README (each number with its interval and sample count, so two numbers
whose intervals overlap are not read as a win), and the plots are the quick look.

results.md holds, per task and length, plan vs dense vs baselines with intervals (RULER
tasks as one table per length), the lm-eval tasks, the headline numbers (effective context,
max drop, mean ratio), the budget sweep and the cost. Cells where dense itself scores below
50% are marked "no signal" and are left out of the headline ratios.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from moa_search.data import ruler
from moa_search.evaluate.aggregate import HARNESS_PREFIX, SIGNAL_THRESHOLD, pooled
from moa_search.evaluate.tasks import DEPTH_TASKS, RULER_TASKS
from moa_search.files import save_figure, write_json

TITLES = {
    "ppl": "perplexity (lower is better)",
    "passkey": "passkey accuracy",
    "kv-retrieval": "kv-retrieval accuracy",
    "retrieval": "retrieval accuracy (passkey + kv pooled)",
    **{name: f"{name}: {t.summary}" for name, t in ruler.TASKS.items()},
    "ruler": "RULER average (mean of the task scores)",
}
_OWN = ("ppl", "passkey", "kv-retrieval", "retrieval")  # one table per task
_PLOT_ORDER = ("passkey", "kv-retrieval", "retrieval", *RULER_TASKS, "ruler", "ppl")
NO_SIGNAL = "no signal"


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
    write_json(files[3], meta)
    figures = []
    if plots and not summary.empty:
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
def _cell(row) -> str:
    if math.isnan(row.value):
        return "-"
    if row.metric == "perplexity":
        v = f"{row.value:.3f}"
        ci = "" if math.isnan(row.ci_low) else f" [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        return f"{v}{ci} n={row.n}"
    if math.isnan(row.ci_low):
        return f"{row.value:.2f} n={row.n}"
    return f"{row.value:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}] n={row.n}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _no_signal(g: pd.DataFrame) -> set[tuple[str, int]]:
    """(task, length) cells where the dense reference has no signal."""
    if "signal" not in g:
        return set()
    bad = g[g.signal.astype("boolean").fillna(True) == False]  # noqa: E712 - NA-safe
    return set(zip(bad.task, bad.length, strict=True))


def markdown(
    trials: pd.DataFrame,
    summary: pd.DataFrame,
    derived: pd.DataFrame,
    meta: dict,
    figures: list[str],
) -> str:
    """results.md: setup, methods, per-task and RULER tables, lm-eval, derived, sweep, cost."""
    conf = int(round(100 * meta.get("confidence", 0.95)))
    parts = [
        f"# moa-search eval: {meta['model']} with plan {meta['plan']}",
        f"Device {meta['device']}, {meta['dtype']}, backend {meta['backend']}, seed "
        f"{meta['seed']}, {meta['samples_per_cell']} samples per cell, wall time "
        f"{meta['seconds']:.0f} s. Cells read `value [{conf}% CI] n=samples`: Wilson intervals "
        f"for accuracies (0/1 per sample), a bootstrap over samples for partial-credit scores "
        f"(fraction of expected answers found), perplexity = exp(token-weighted mean NLL) over "
        f"n windows of held-out test text ({meta['ppl_corpus']}), bootstrap interval over "
        f"windows. Lengths marked * are longer than any length the plan was made for "
        f"({meta['plan_profiled_lengths'] or 'unknown'}). *{NO_SIGNAL}*: dense itself scores "
        f"below {SIGNAL_THRESHOLD:.0%} there, so the cell is shown but left out of the "
        f"headline ratios.",
    ]
    main = pooled(summary[summary.section == "main"]) if not summary.empty else summary
    if not main.empty:
        parts += _methods_md(main)
        parts += _own_tasks_md(main, meta)
        parts += _ruler_md(main, meta)
    parts += _harness_md(summary, meta)
    parts += _derived_md(derived)
    parts += _sweep_md(summary, meta)
    if not trials.empty:
        parts += _cost_md(trials)
    if meta.get("notes"):
        parts += ["## Notes", "\n".join(f"- {n}" for n in meta["notes"])]
    if figures:
        parts += ["## Figures", "\n".join(f"![{f}]({f})" for f in figures)]
    return "\n\n".join(parts) + "\n"


def _methods_md(main: pd.DataFrame) -> list[str]:
    methods = main.drop_duplicates(["method", "length"])
    return [
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


def _length_heads(lengths: list[int], meta: dict) -> list[str]:
    profiled = max(meta["plan_profiled_lengths"] or [0])
    return [f"{n}{'*' if profiled and n > profiled else ''}" for n in lengths]


def _own_tasks_md(main: pd.DataFrame, meta: dict) -> list[str]:
    parts: list[str] = []
    lengths = sorted(main.length.unique())
    heads = _length_heads(lengths, meta)
    quiet = _no_signal(main)
    for task in [t for t in _OWN if t in set(main.task)]:
        g = main[main.task == task]
        rows = []
        for method, gm in g.groupby("method", sort=False):
            by_n = {r.length: _cell(r) for r in gm.itertuples()}
            rows.append([method, *(by_n.get(n, "-") for n in lengths)])
        marked = [
            f"{h} ({NO_SIGNAL})" if (task, n) in quiet else h
            for h, n in zip(heads, lengths, strict=True)
        ]
        parts += [f"## {TITLES[task]}", _table(["method", *marked], rows)]
    return parts


def _ruler_md(main: pd.DataFrame, meta: dict) -> list[str]:
    """One table per length: RULER tasks down, methods across (plus the suite average)."""
    g = main[main.task.isin([*RULER_TASKS, "ruler"])]
    if g.empty:
        return []
    methods = list(dict.fromkeys(g.method))
    tasks = [t for t in (*RULER_TASKS, "ruler") if t in set(g.task)]
    quiet = _no_signal(g)
    parts = [
        "## RULER-style tasks",
        "Scores are the fraction of expected strings found in the greedy answer (RULER's "
        "match); one needle: 0/1 per sample, so the score is an accuracy. Single-needle tasks "
        "have `samples` prompts at every depth (heatmap), the others `samples` prompts.",
    ]
    profiled = max(meta["plan_profiled_lengths"] or [0])
    for n in sorted(g.length.unique()):
        gn = g[g.length == n]
        cells = {(r.task, r.method): _cell(r) for r in gn.itertuples()}
        rows = []
        for task in tasks:
            label = task + (f" ({NO_SIGNAL})" if (task, n) in quiet else "")
            rows.append([label, *(cells.get((task, m), "-") for m in methods)])
        star = "*" if profiled and n > profiled else ""
        parts += [f"### RULER at n = {n}{star}", _table(["task", *methods], rows)]
    return parts


def _harness_md(summary: pd.DataFrame, meta: dict) -> list[str]:
    if summary.empty:
        return []
    h = summary[summary.section == "lm-eval"]
    if h.empty:
        return []
    info = meta.get("lm_eval") or {}
    methods = list(dict.fromkeys(h.method))
    first = h.drop_duplicates("method").set_index("method")
    rows = []
    for (task, metric), g in h.groupby(["task", "metric"], sort=False):
        cells = {r.method: _cell(r) for r in g.itertuples()}
        rows.append([task[len(HARNESS_PREFIX) :], metric, *(cells.get(m, "-") for m in methods)])
    mem = ", ".join(f"{m} {_pct(first.memory_density[m])}" for m in methods)
    return [
        f"## lm-evaluation-harness tasks (lm-eval {info.get('version', '?')})",
        f"Baselines solved to the plan's KV memory at n = {info.get('length')} tokens "
        f"(KV memory there: {mem}); few-shot {info.get('num_fewshot')}, limit "
        f"{info.get('limit')}, chat template {info.get('chat_template')}. Intervals: Wilson / "
        f"bootstrap over documents for per-document means, else the harness's stderr.",
        _table(["task", "metric", *methods], rows),
    ]


def _derived_md(derived: pd.DataFrame) -> list[str]:
    if derived.empty:
        return []

    def fmt(r) -> str:
        if r.metric == "max_relative_drop":
            return f"{r.value:.1%}"
        if r.metric == "mean_ratio":
            return f"{r.value:.2f}"
        return str(int(r.value))

    parts = ["## Derived (vs dense)"]
    ecl = derived[derived.metric.isin(["effective_context_moa", "effective_context"])]
    if not ecl.empty:
        tasks = list(dict.fromkeys(ecl.task))
        rows = []
        for method, g in ecl.groupby("method", sort=False):
            by = {(r.metric, r.task): int(r.value) for r in g.itertuples()}
            row = [method]
            for t in tasks:
                moa, rel = by.get(("effective_context_moa", t)), by.get(("effective_context", t))
                row.append(
                    f"{moa if moa is not None else '-'}" + (f" ({rel})" if rel is not None else "")
                )
            rows.append(row)
        parts += [
            "### Effective context length",
            "MoA's definition (Fu et al. 2024, arXiv 2406.14909: the longest input length at "
            "which retrieval accuracy stays above 90%): the longest eval length L with score >= "
            "0.9 at L and at every shorter eval length (0: fails at the shortest). In "
            "parentheses, relative to dense: >= 90% of dense's score at every length up to L, "
            f"stopping where dense has {NO_SIGNAL}.",
            _table(["method", *tasks], rows),
        ]
    rest = derived[~derived.metric.isin(["effective_context_moa", "effective_context"])]
    if rest.empty:
        return parts
    parts += [
        "### Drops and ratios (derived.csv also says where each effective context stops)",
        _table(
            ["method", "metric", "task", "value", "note"],
            [[r.method, r.metric, r.task, fmt(r), r.note] for r in rest.itertuples()],
        ),
        "Max relative drop: worst (task, length) cell, accuracy drop or perplexity rise. Mean "
        f"ratio: method / dense averaged over accuracy cells; both leave {NO_SIGNAL} cells out.",
    ]
    return parts


def _sweep_md(summary: pd.DataFrame, meta: dict) -> list[str]:
    if summary.empty:
        return []
    sweep = pooled(summary[summary.section == "sweep"])
    if sweep.empty:
        return []
    tasks = [t for t in TITLES if t in set(sweep.task)]
    rows = []
    for (point, method), g in sweep.groupby(["point", "method"], sort=False):
        by_t = {r.task: _cell(r) for r in g.itertuples()}
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


def _panels(plt, n: int, width: float = 4.5, height: float = 3.6, cols: int = 4):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _short(task: str) -> str:
    return TITLES[task].split(":")[0] if task in ruler.TASKS else TITLES[task]


def plot_vs_length(summary: pd.DataFrame, path: Path) -> Path | None:
    """One panel per task: metric vs eval length, one line per method, CI error bars."""
    main = pooled(summary[summary.section == "main"])
    tasks = [t for t in _PLOT_ORDER if t in set(main.task)]
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(tasks))
    quiet = _no_signal(main)
    for ax, task in zip(axes, tasks, strict=True):
        g = main[main.task == task]
        groups = list(g.groupby("method", sort=False))
        for i, (method, gm) in enumerate(groups):
            gm = gm.sort_values("length")
            x = gm.length * 2 ** (0.03 * (i - (len(groups) - 1) / 2))  # dodge: overlaps visible
            ax.errorbar(x, gm.value, yerr=_err(gm), marker="o", capsize=3, label=method)
        lengths = sorted(g.length.unique())
        ax.set_xscale("log", base=2)
        ax.set_xlim(lengths[0] / 1.3, lengths[-1] * 1.3)  # one length: keep the dodge small
        ax.set_xticks(lengths, [f"{n}{'°' if (task, n) in quiet else ''}" for n in lengths])
        ax.set_xlabel("context length (tokens; ° = no signal)")
        ax.set_title(_short(task), fontsize=10)
        if task != "ppl":
            ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_heatmap(summary: pd.DataFrame, path: Path) -> Path | None:
    """Needle tasks' accuracy, needle depth x length: a row per task, a column per method."""
    g = summary[
        (summary.section == "main") & summary.task.isin(DEPTH_TASKS) & summary.depth.notna()
    ]
    if g.empty:
        return None
    plt = _pyplot()
    methods = list(dict.fromkeys(g.method))
    tasks = [t for t in DEPTH_TASKS if t in set(g.task)]
    lengths, depths = sorted(g.length.unique()), sorted(g.depth.unique())
    fig, axes = plt.subplots(
        len(tasks),
        len(methods),
        figsize=(1.2 + 0.9 * len(lengths) * len(methods), (0.5 * len(depths) + 1.4) * len(tasks)),
        squeeze=False,
    )
    for r, task in enumerate(tasks):
        for c, method in enumerate(methods):
            ax = axes[r][c]
            grid = (
                g[(g.method == method) & (g.task == task)]
                .pivot_table(index="depth", columns="length", values="value")
                .reindex(index=depths, columns=lengths)
            )
            ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for (i, j), v in np.ndenumerate(grid.to_numpy()):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(f"{method} · {task}", fontsize=9)
            if r == len(tasks) - 1:
                ax.set_xlabel("length")
            if c == 0:
                ax.set_ylabel("needle depth")
    return save_figure(fig, path)


def plot_budget(summary: pd.DataFrame, path: Path, length: int | None) -> Path | None:
    """Quality vs KV budget at the sweep length, a panel per task: plan points (scaled plan or
    the search's Pareto plans) vs uniform baselines at each point's budget.

    x is the KV memory fraction, except SparQ (which keeps the full cache and saves reads),
    plotted at its bytes-read fraction. The main-section points at the same length are
    included; dense is the dashed line.
    """
    if length is None:
        return None
    rows = pooled(summary[(summary.length == length) & summary.section.isin(["main", "sweep"])])
    sweep = rows[rows.section == "sweep"]
    if sweep.empty:
        return None
    tasks = [t for t in _PLOT_ORDER if t in set(rows.task)]
    plt = _pyplot()
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
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
        ax.set_title(f"{_short(task)} @ {length}", fontsize=10)
        if task != "ppl":
            ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)
