"""Profile pictures: where the sensitive heads are, and which heads look far back.

* ``sensitivity_<family>.png``-style grid in one file: layer x query-head heatmap of the
  predicted |loss change|, averaged over the family's candidates, at the longest length.
* ``influence_distance.png``: per head, the share of total influence within distance d;
  local heads rise at once, retrieval heads keep climbing to the far end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moa_search.files import save_figure


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def sensitivity_heatmap(table: pd.DataFrame, path: Path) -> Path:
    """One panel per non-dense family: log10 mean |first-order change| (``delta_row_mean``,
    a magnitude, so heads whose signed effects cancel still show) per (layer, query head)."""
    plt = _pyplot()
    length = int(table["length"].max())
    rows = table[(table["head"] >= 0) & (table["length"] == length) & (table["family"] != "dense")]
    families = sorted(rows["family"].unique())
    fig, axes = plt.subplots(
        1, max(1, len(families)), figsize=(4.2 * max(1, len(families)), 5), squeeze=False
    )
    for ax, fam in zip(axes[0], families, strict=False):
        grid = (
            rows[rows["family"] == fam]
            .groupby(["layer", "head"])["delta_row_mean"]
            .mean()
            .unstack("head")
            .sort_index()
        )
        img = ax.imshow(
            np.log10(grid.to_numpy().clip(1e-9)), aspect="auto", origin="lower", cmap="viridis"
        )
        ax.set_title(
            f"{fam}: log10 sensitivity |dloss|\n(mean over candidates, N={length})", fontsize=9
        )
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(img, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def measured_heatmap(table: pd.DataFrame, path: Path) -> Path:
    """One panel per task family: log10 KL(dense || changed) per scored token when a KV head
    keeps only its smallest window candidate, per (layer, KV head): which heads each task
    needs far context from (retrieval heads stand out in their own panel)."""
    plt = _pyplot()
    length = int(table["length"].max())
    rows = table[(table["length"] == length) & (table["family"] == "window")]
    tasks = [c[3:] for c in table.columns if c.startswith("kl_")]
    if rows.empty or not tasks:
        rows = table[(table["length"] == length) & (table["family"] != "dense")]
    smallest = rows[rows["stored_bytes"] == rows["stored_bytes"].min()]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.2 * max(1, len(tasks)), 5),
                             squeeze=False)  # fmt: skip
    pattern = smallest["pattern"].iloc[0] if len(smallest) else "?"
    for ax, task in zip(axes[0], tasks, strict=False):
        grid = smallest.pivot_table(index="layer", columns="kv_head", values=f"kl_{task}")
        img = ax.imshow(
            np.log10(grid.to_numpy().clip(1e-7)), aspect="auto", origin="lower", cmap="magma"
        )
        ax.set_title(f"{task}", fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]))
        fig.colorbar(img, ax=ax, shrink=0.8, label="log10 KL per token")
    fig.suptitle(f"one head at {pattern}, all others dense (N={length})", fontsize=10)
    return save_figure(fig, path)


def influence_distance(distance: torch.Tensor, block_size: int, path: Path) -> Path:
    """distance: (L, H, nb) influence summed per block distance at one length."""
    plt = _pyplot()
    layers, heads, nb = distance.shape
    curves = distance.double().reshape(layers * heads, nb)
    share = curves.cumsum(-1) / curves.sum(-1, keepdim=True).clamp_min(1e-30)
    x = (np.arange(nb) + 1) * block_size
    near = share[:, : max(1, nb // 16)][:, -1].numpy()  # share within the nearest 1/16
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    cmap = plt.get_cmap("coolwarm_r")
    for i in np.argsort(near):
        ax.plot(x, share[i].numpy(), color=cmap(float(near[i])), lw=0.6, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("attention distance (tokens, block upper edge)")
    ax.set_ylabel("share of influence within distance")
    ax.set_title("per head: blue = local, red = retrieval")
    img = ax2.imshow(
        near.reshape(layers, heads),
        aspect="auto",
        origin="lower",
        cmap="coolwarm_r",
        vmin=0,
        vmax=1,
    )
    ax2.set_title(f"share of influence within {max(1, nb // 16) * block_size} tokens")
    ax2.set_xlabel("query head")
    ax2.set_ylabel("layer")
    fig.colorbar(img, ax=ax2, shrink=0.8)
    return save_figure(fig, path)
