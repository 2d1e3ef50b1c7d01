"""What the report's figures share: the style, panel grids and facets, axes, palettes, legends,
titles, the accuracy-at-budget lines, and saving a figure as PNG and PDF."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from ..io import atomic_path
from . import FIGURE_FORMATS
from .analysis import algorithm_key
from .load import DatasetSettings

FIGURE_WIDTH_IN = 7.0
MAX_COLUMNS = 3  # panels per row before facets wrap
DPI = 200
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Per format: the metadata left out, so a figure's bytes depend on its data only.
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None}}


def style():
    # A local rc context: no global pyplot state or backend is touched (Figure renders with Agg).
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
          "legend.frameon": False, "axes.titlesize": 8.5, "axes.labelsize": 8,
          "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7.5}
    return matplotlib.rc_context(rc)


def save(fig: Figure, figures_dir: str, name: str) -> dict[str, Path]:
    """Write ``fig`` as ``{figures_dir}/{name}.{ext}`` for each of FIGURE_FORMATS, atomically;
    return ``{name}_{ext}`` -> path."""
    outputs = {}
    for ext in FIGURE_FORMATS:
        path = Path(figures_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:  # the temp name ends in .tmp: say the format
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=_METADATA[ext])
        outputs[f"{name}_{ext}"] = path
        # The constrained layout is solved by the first save; keep it for the second rather than
        # solving it again (a third of the report's time on a large grid).
        fig.set_layout_engine(None)
    return outputs


# ----------------------------------------------------------------------------- panels


def panel_grid(n_panels: int, ncols: int, panel_height: float) -> tuple[Figure, list]:
    """``n_panels`` axes, ``ncols`` to a row, wrapping onto as many rows as they need."""
    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(FIGURE_WIDTH_IN, panel_height * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def facets(settings: dict[str, DatasetSettings], table: pd.DataFrame, panel_height: float,
           by_algorithm: bool | None = None) -> tuple[Figure, list[tuple[Any, str, str | None, str | None]]]:
    """The panels of a per-K figure: [(axes, dataset, model or None, algorithm or None)].

    One panel per data set; with ``by_algorithm`` False and several algorithms (figures whose
    lines are not algorithms), one per (model, algorithm, data set); else with several
    algorithms one per (model, data set), models in rows, data sets in columns (wrapping
    after MAX_COLUMNS), so each panel compares the lines of one model.
    """
    datasets = list(settings)
    several = table["algorithm"].nunique() > 1
    if by_algorithm is None and not several:
        fig, axes = panel_grid(len(datasets), len(datasets), panel_height)
        return fig, [(ax, dataset, None, None) for ax, dataset in zip(axes, datasets)]
    models = sorted(table["model"].unique())
    algorithms = sorted(table["algorithm"].unique(), key=algorithm_key) if by_algorithm is False else [None]
    # a (model, algorithm) pair the grid does not have (an algorithm restricted to other models)
    # gets no panels; one that ran on some data sets shows "no runs" where it did not
    pairs = set(zip(table["model"], table["algorithm"]))
    keys = [(dataset, model, algorithm) for model in models for algorithm in algorithms for dataset in datasets
            if algorithm is None or (model, algorithm) in pairs]
    ncols = min(len(datasets), MAX_COLUMNS)
    if math.ceil(len(keys) / ncols) > 3:  # few data sets, many panels: wrap rather than a tall column
        ncols = MAX_COLUMNS
    fig, axes = panel_grid(len(keys), ncols, panel_height)
    return fig, [(ax, *key) for ax, key in zip(axes, keys)]


def in_panel(table: pd.DataFrame, dataset: str, model: str | None, algorithm: str | None) -> pd.DataFrame:
    keep = table["dataset"] == dataset
    if model is not None:
        keep &= table["model"] == model
    if algorithm is not None:
        keep &= table["algorithm"] == algorithm
    return table[keep]


def panel_title(dataset: str, limits: DatasetSettings, model: str | None, algorithm: str | None) -> str:
    """The data set and budget, and on a second line the model and algorithm the panel is of
    (long hub names would otherwise run into the next panel's title)."""
    below = " / ".join(x for x in (model, algorithm) if x)
    return f"{dataset} (budget {limits.budget})" + (f"\n{below}" if below else "")


def share_y_by_dataset(panels: list[tuple[Any, str]]) -> None:
    """Panels of one data set share their y axis (their accuracies are comparable)."""
    first: dict[str, Any] = {}
    for ax, dataset in panels:
        if dataset in first:
            ax.sharey(first[dataset])
        else:
            first[dataset] = ax


def log2_clients_axis(ax, clients: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(clients))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in clients])
    ax.set_xlim(min(clients) / 2 ** 0.4, max(clients) * 2 ** 0.4)
    ax.set_xlabel("clients K")


def no_runs(ax) -> None:
    ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.4")


# ----------------------------------------------------------------------------- palettes, legends, titles


def model_styles(models: list[str]) -> dict[str, dict]:
    colors = sns.color_palette("colorblind", len(models))
    return {m: {"color": colors[i], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(models)}


def clients_colors(all_clients: list[int]) -> dict[int, Any]:
    # A sequential palette without its near-white end, so K=1 stays visible on white.
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    return dict(zip(all_clients, cmap(np.linspace(0.25, 0.9, len(all_clients)))))


def dodge(keys: list[str], step: float = 0.06) -> dict[str, float]:
    """A small shift per line in log2 K, so error bars and seed points of lines at one K do not overlap."""
    return {key: 2 ** (step * (i - (len(keys) - 1) / 2)) for i, key in enumerate(keys)}


def legend(fig: Figure, handles: list) -> None:
    # Below the panels, outside them (never over data); as many columns as fit the figure width
    # (about 110 characters at this font size), so long names wrap into rows.
    if not handles:
        return
    longest = max(len(h.get_label()) for h in handles)
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), 110 // (longest + 6))))


def suptitle(fig: Figure, title: str, missing: int = 0, expected: int = 0) -> None:
    if missing:
        title += f"\n{missing} of {expected} cell seeds of the grid missing (tables/missing_cells.csv)"
    fig.suptitle(title, fontsize=9.5)


# ----------------------------------------------------------------------------- accuracy at the budget vs K


def accuracy_lines(ax, rows: pd.DataFrame, seeds: pd.DataFrame, style: dict, budget: int, shift: float,
                   linestyle: str = "-") -> tuple[bool, bool]:
    """One line of accuracy at the budget vs K: the seed-mean points, their 95% t-interval as error
    bars, the single seeds as faint points; a point from before the budget hollow. Returns
    (drew a partial point, drew a seed spread)."""
    rows = rows.dropna(subset=["accuracy"]).sort_values("clients")
    ax.plot(rows["clients"], rows["accuracy"], lw=1.4, ms=4.5, ls=linestyle, **style)
    # A point from before the budget (partial run) is drawn hollow, never passed off as final.
    partial = rows[rows["round_used"] < budget]
    if len(partial):
        ax.plot(partial["clients"], partial["accuracy"], ls="none", ms=4.5, mfc="white", **style)
    spread = False
    if len(rows) and rows["seeds"].max() > 1:
        spread = True
        ci = rows.dropna(subset=["ci95_low"])
        # Drawn within [0, 1] (an accuracy's range); a wide two-seed interval would otherwise set the scale.
        ax.vlines(ci["clients"] * shift, ci["ci95_low"].clip(0, 1), ci["ci95_high"].clip(0, 1), color=style["color"],
                  lw=1.1)
        ax.scatter(seeds["clients"] * shift, seeds["accuracy"], s=7, alpha=0.45, color=style["color"], lw=0)
    return bool(len(partial)), spread


def accuracy_handles(styles: dict[str, dict], any_partial: bool, any_spread: bool, linestyles=None) -> list:
    handles = [Line2D([], [], lw=1.4, ms=4.5, label=m, ls=(linestyles or {}).get(m, "-"), **s)
               for m, s in styles.items()]
    handles.append(Line2D([], [], ls="--", lw=1, color="0.35", label="chance"))
    if any_partial:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", color="0.3", label="run ended before budget"))
    if any_spread:
        handles.append(Line2D([], [], ls="-", marker="|", lw=1.1, color="0.3", label="95% t-interval over seeds"))
        handles.append(Line2D([], [], ls="none", marker="o", ms=3, alpha=0.45, color="0.3", label="single seeds"))
    return handles


def finish_accuracy_panel(ax, panel: pd.DataFrame, title: str, **title_style) -> None:
    """Chance line, log2 K axis, title and y label of an accuracy-at-budget panel (or "no runs")."""
    if panel.empty:
        no_runs(ax)
        return
    ax.axhline(panel["chance_accuracy"].mean(), ls="--", lw=1, color="0.35")
    log2_clients_axis(ax, sorted(panel["clients"].unique()))
    ax.set_title(title, **title_style)
    ax.set_ylabel("test accuracy at budget" if ax.get_subplotspec().is_first_col() else "")
