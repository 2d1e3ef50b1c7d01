"""The ``layer_drift`` figure: where in the model the clients diverge (:mod:`fedsweep.layers`).

Its input is the ``layers.parquet`` beside each metrics file (long format: the cell's ids, round,
group, metric, value); cells without one (runs before fedsweep measured layer groups) are left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..layers import EMBEDDINGS, LAYERS_NAME, group_order
from .plotting import panel_grid, suptitle

SHOWN_METRIC = "relative_drift"  # the clients' rms spread per group over the group's weight norm
_CELL = ["dataset", "model", "clients", "seed"]


def load_layers(sources: list[str]) -> pd.DataFrame:
    """The layer tables beside the metrics files ``sources`` (those that have one), concatenated."""
    found = [Path(s).with_name(LAYERS_NAME) for s in dict.fromkeys(sources)]
    tables = [pd.read_parquet(path) for path in found if path.exists()]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[*_CELL, "round", "group",
                                                                                   "metric", "value"])


def _pairs(layers: pd.DataFrame) -> list[tuple[str, str, list[int]]]:
    """Per (data set, model): the smallest and the largest K with measures (one K: itself alone)."""
    out = []
    for (dataset, model), cells in layers.groupby(["dataset", "model"], sort=True):
        ks = sorted(int(k) for k in cells["clients"].unique())
        out.append((dataset, model, sorted({ks[0], ks[-1]})))
    return out


def layer_drift_figure(layers: pd.DataFrame, note: str = "") -> Figure:
    """A heatmap per (data set, model, K): layer groups (rows) by evaluated rounds (columns), coloured by
    the relative drift, the smallest K beside the largest on one colour scale; seed 0 (else the
    smallest seed)."""
    layers = layers[layers["metric"] == SHOWN_METRIC]
    if layers.empty:
        fig, (ax,) = panel_grid(1, 1, 2.5)  # the report's figures are at least 3 in tall
        ax.set_facecolor("0.5")  # an empty grid, visibly: no cell has layer measures
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no layer measures (layers.parquet) beside the metrics", ha="center", va="center",
                color="white", transform=ax.transAxes)
        return fig
    layers = layers[layers["seed"] == layers.groupby(["dataset", "model", "clients"])["seed"].transform("min")]
    pairs = _pairs(layers)
    fig, axes = panel_grid(2 * len(pairs), 2, 2.3)
    for i, (dataset, model, ks) in enumerate(pairs):
        cells = layers[(layers["dataset"] == dataset) & (layers["model"] == model)]
        grids = {k: cells[cells["clients"] == k].pivot_table(index="group", columns="round", values="value")
                 for k in ks}
        top = max(float(np.nanmax(g.to_numpy())) for g in grids.values()) or 1.0
        for j, k in enumerate(ks):
            _heatmap(fig, axes[2 * i + j], grids[k], top, f"{dataset} / {model}, K={k}")
        if len(ks) == 1:
            axes[2 * i + 1].set_visible(False)
    suptitle(fig, "Client drift by layer group: rms spread / weight norm, per evaluated round" + note)
    return fig


def _heatmap(fig: Figure, ax, grid: pd.DataFrame, top: float, title: str) -> None:
    """One cell's groups (model order, embeddings on top) by rounds, on the colour scale [0, top]."""
    grid = grid.reindex(group_order(grid.index))
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_yticks(range(len(grid.index)), [g if g == EMBEDDINGS or g == "head" else g.split()[1] for g in grid.index],
                  fontsize=6)
    rounds = list(grid.columns)
    ticks = sorted(set(np.linspace(0, len(rounds) - 1, min(6, len(rounds))).round().astype(int)))
    ax.set_xticks(ticks, [str(int(rounds[t])) for t in ticks], fontsize=6)
    ax.set_xlabel("round", fontsize=7)
    ax.set_ylabel("layer group", fontsize=7)
    ax.grid(False)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
