"""The report's figures, each a function of a :class:`~fedsweep.report.sweep.Sweep` returning the
matplotlib Figure written as ``{figures_dir}/{name}.png`` and ``.pdf`` (registered in
``fedsweep.report.FIGURE_REGISTRY``, captioned by ``workflow/report/figure_{name}.rst``).
Shared helpers: :mod:`fedsweep.report.plotting`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullFormatter

from .analysis import MEAN_SEED, Run, algorithm_key, communicated_bytes
from .plotting import (MAX_COLUMNS, accuracy_handles, accuracy_lines, clients_colors, dodge, facets,
                       finish_accuracy_panel, in_panel, legend, log2_clients_axis, model_styles, no_runs, panel_grid,
                       panel_title, share_y_by_dataset, suptitle)
from .clients import client_accuracy_figure
from .layer_drift import layer_drift_figure, load_layers
from .sweep import Sweep

DRIFT_PANELS = (("pseudo_gradient_norm", "pseudo-gradient norm"), ("client_drift_rms", "client spread (rms)"))


def _reference_styles(sweep: Sweep) -> dict[str, dict]:
    """The lines of Figs. 1-2: the algorithms of the reference partition where it has several, else the models."""
    ref_algorithms = sorted(sweep.ref_accuracy["algorithm"].unique(), key=algorithm_key)
    return model_styles(ref_algorithms if len(ref_algorithms) > 1 else sweep.models)


def plot_accuracy_vs_clients(sweep: Sweep) -> Figure:
    """Accuracy at the budget vs K on the reference partition, a line per model (or algorithm)."""
    accuracy, settings, styles = sweep.ref_accuracy, sweep.settings, _reference_styles(sweep)
    fig, panels = facets(settings, accuracy, 2.4)
    series = "algorithm" if accuracy["algorithm"].nunique() > 1 else "model"
    means = accuracy[accuracy["seed"] == MEAN_SEED]
    seeds = accuracy[accuracy["seed"] != MEAN_SEED]
    shift = dodge(list(styles))
    any_partial = any_spread = False
    for ax, dataset, panel_model, _ in panels:
        limits = settings[dataset]
        panel = in_panel(means, dataset, panel_model, None)
        panel_seeds = in_panel(seeds, dataset, panel_model, None)
        for key, rows in panel.groupby(series, sort=True):
            partial, spread = accuracy_lines(ax, rows, panel_seeds[panel_seeds[series] == key], styles[key],
                                             limits.budget, shift[key])
            any_partial |= partial
            any_spread |= spread
        finish_accuracy_panel(ax, panel, panel_title(dataset, limits, panel_model, None))
    legend(fig, accuracy_handles(styles, any_partial, any_spread))
    suptitle(fig, "Test accuracy at the round budget vs number of clients" + sweep.note, *sweep.gaps)
    return fig


def plot_accuracy_by_partition(sweep: Sweep) -> Figure:
    """Accuracy at the budget vs K, one line per partition; a panel per (data set, model[, algorithm])."""
    accuracy, settings, partitions = sweep.accuracy, sweep.settings, sweep.partitions
    fig, panels = facets(settings, accuracy, 2.2, by_algorithm=False)
    kinds = dict(zip(accuracy["partition"], accuracy["kind"]))
    labels = {p: f"{p} (per client)" if kinds.get(p) == "per_client" else p for p in partitions}
    styles = dict(zip(partitions, model_styles(partitions).values()))
    # Weak scaling (per_client: the data grows with K) dashed, so it is never read as the paper's setting.
    linestyles = {p: "--" if kinds.get(p) == "per_client" else "-" for p in partitions}
    means = accuracy[accuracy["seed"] == MEAN_SEED]
    seeds = accuracy[accuracy["seed"] != MEAN_SEED]
    shift = dodge(partitions)
    several_algorithms = accuracy["algorithm"].nunique() > 1
    any_partial = any_spread = False
    for ax, dataset, panel_model, panel_algorithm in panels:
        limits = settings[dataset]
        panel = in_panel(means, dataset, panel_model, panel_algorithm)
        panel_seeds = in_panel(seeds, dataset, panel_model, panel_algorithm)
        for partition, rows in panel.groupby("partition", sort=False):
            partial, spread = accuracy_lines(ax, rows, panel_seeds[panel_seeds["partition"] == partition],
                                             styles[partition], limits.budget, shift[partition],
                                             linestyles[partition])
            any_partial |= partial
            any_spread |= spread
        finish_accuracy_panel(ax, panel, panel_title(dataset, limits, panel_model,
                                                     panel_algorithm if several_algorithms else None), fontsize=7)
    handles = accuracy_handles({labels[p]: styles[p] for p in partitions}, any_partial, any_spread,
                               {labels[p]: linestyles[p] for p in partitions})
    legend(fig, handles)
    suptitle(fig, "Test accuracy at the round budget vs number of clients, by partition", *sweep.gaps)
    return fig


def plot_rounds_to_target(sweep: Sweep) -> Figure:
    """Rounds to the target vs K on the reference partition, a line per model (or algorithm); a
    failure drawn as a cross at the last round searched."""
    rounds, settings, styles = sweep.ref_rounds, sweep.settings, _reference_styles(sweep)
    fig, panels = facets(settings, rounds, 2.4)
    series = "algorithm" if rounds["algorithm"].nunique() > 1 else "model"
    means = rounds[rounds["seed"] == MEAN_SEED]
    seeds = rounds[(rounds["seed"] != MEAN_SEED) & rounds["reached"]]
    # Failures of several lines at one K would overlap at the top: shift each a little in log2 K.
    step = min(0.25, 0.8 / len(styles))
    shift = {m: 2 ** (step * (i - (len(styles) - 1) / 2)) for i, m in enumerate(styles)}
    any_failure = any_spread = False
    for ax, dataset, panel_model, _ in panels:
        limits = settings[dataset]
        panel = in_panel(means, dataset, panel_model, None)
        if panel.empty:
            no_runs(ax)
            continue
        panel_seeds = in_panel(seeds, dataset, panel_model, None)
        no_baseline = sorted(panel.loc[panel["target_accuracy"].isna(), series].unique())
        for model, rows in panel.dropna(subset=["target_accuracy"]).groupby(series, sort=True):
            failure, spread = _rounds_line(ax, rows, panel_seeds[panel_seeds[series] == model], styles[model],
                                           shift[model])
            any_failure |= failure
            any_spread |= spread
        ax.axhline(limits.second_threshold, ls=":", lw=1, color="0.35")
        ax.set_ylim(0, max(limits.second_threshold, panel["searched_until"].max()) * 1.1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        log2_clients_axis(ax, sorted(panel["clients"].unique()))
        ax.set_title(panel_title(dataset, limits, panel_model, None))
        ax.set_ylabel(f"rounds to {sweep.target_fraction:.0%} of K=1" if ax.get_subplotspec().is_first_col() else "")
        if no_baseline:
            ax.text(0.03, 0.03, "no K=1 baseline: " + ", ".join(no_baseline), transform=ax.transAxes,
                    fontsize=6.5, color="0.3", va="bottom")
    handles = [Line2D([], [], lw=1.4, ms=4.5, label=m, **s) for m, s in styles.items()]
    handles.append(Line2D([], [], ls=":", lw=1, color="0.35", label="search limit (second threshold)"))
    if any_spread:
        handles.append(Line2D([], [], ls="-", marker="|", lw=1.1, color="0.3", label="range over seeds that reached"))
        handles.append(Line2D([], [], ls="none", marker="o", ms=3, alpha=0.45, color="0.3", label="single seeds"))
    if any_failure:
        handles.append(Line2D([], [], ls="none", marker="x", ms=6, mew=1.8, color="0.2",
                              label="mean curve: not reached (at last round searched)"))
    legend(fig, handles)
    suptitle(fig, f"Rounds to reach {sweep.target_fraction:.0%} of the K=1 accuracy at the budget" + sweep.note,
             *sweep.gaps)
    return fig


def _rounds_line(ax, rows: pd.DataFrame, seeds: pd.DataFrame, style: dict, shift: float) -> tuple[bool, bool]:
    """One line of rounds to target vs K (the seed means), the range over the seeds that reached the
    target and each of them, and a cross where the mean curve failed. Returns (drew a failure,
    drew a seed spread)."""
    rows = rows.sort_values("clients")
    ax.plot(rows["clients"], rows["rounds"].astype("float64"), lw=1.4, ms=4.5, **style)
    drew_spread = False
    several = rows[rows["seeds"] > 1]
    if len(several):
        spread = several.dropna(subset=["rounds_min"])
        if len(spread):
            drew_spread = True
            ax.vlines(spread["clients"] * shift, spread["rounds_min"].astype("float64"),
                      spread["rounds_max"].astype("float64"), color=style["color"], lw=1.1)
            ax.scatter(seeds["clients"] * shift, seeds["rounds"].astype("float64"), s=7, alpha=0.45,
                       color=style["color"], lw=0)
    failed = rows[~rows["reached"]]
    if len(failed):
        ax.plot(failed["clients"] * shift, failed["searched_until"], ls="none", marker="x",
                ms=6, mew=1.8, color=style["color"])
    return bool(len(failed)), drew_spread


def _line_label(run: Run, several_algorithms: bool) -> str:
    return f"{run.model} / {run.algorithm}" if several_algorithms else run.model


def plot_accuracy_per_round(sweep: Sweep) -> Figure:
    """A panel per (data set, model), or per (data set, model / algorithm) with several algorithms,
    wrapping after 4 columns; a line per K (the seed mean) with a band from the lowest to the
    highest seed. The reference partition."""
    settings, models = sweep.settings, sweep.models
    means = [r for r in sweep.ref_runs if r.seed == MEAN_SEED]
    several = len({r.algorithm for r in sweep.ref_runs}) > 1
    if several:
        labels = {(r.model, algorithm_key(r.algorithm)): _line_label(r, True) for r in means}
        models = [labels[key] for key in sorted(labels)]
    all_clients = sorted({r.clients for r in means})
    colors = clients_colors(all_clients)
    # Up to 4 panels a row, one row per data set; more wrap onto 3 a row, each data set starting
    # a new row (its last row padded with empty slots).
    ncols = len(models) if len(models) <= 4 else MAX_COLUMNS
    per_dataset = math.ceil(len(models) / ncols) * ncols
    slots = [(dataset, models[i] if i < len(models) else None) for dataset in settings for i in range(per_dataset)]
    fig, slot_axes = panel_grid(len(slots), ncols, 1.9)
    for ax, (_, model) in zip(slot_axes, slots):
        ax.set_visible(model is not None)
    keys = [(dataset, model) for dataset, model in slots if model is not None]
    axes = [ax for ax, (_, model) in zip(slot_axes, slots) if model is not None]
    share_y_by_dataset([(ax, dataset) for ax, (dataset, _) in zip(axes, keys)])
    last_row = {dataset: max(i for i, (d, m) in enumerate(slots) if d == dataset and m is not None) // ncols
                for dataset in settings}
    any_band = False
    for ax, (dataset, model) in zip(axes, keys):
        row, column = divmod(slots.index((dataset, model)), ncols)
        cell_runs = sorted((r for r in means if r.dataset == dataset and _line_label(r, several) == model),
                           key=lambda r: r.clients)
        any_band |= _per_round_panel(ax, cell_runs, colors, settings[dataset].budget)
        ax.set_title(f"{dataset}\n{model}", fontsize=7)
        ax.set_xlabel("round" if row == last_row[dataset] else "")
        ax.set_ylabel("test accuracy" if column == 0 else "")
    handles = [Line2D([], [], lw=1.5, color=colors[k], label=f"K={k}") for k in all_clients]
    if any_band:
        handles.append(Patch(color="0.5", alpha=0.3, lw=0, label="lowest to highest seed"))
    handles += [Line2D([], [], ls="--", lw=1, color="0.35", label="chance"),
                Line2D([], [], ls=":", lw=1, color="0.5", label="budget")]
    legend(fig, handles)
    suptitle(fig, "Test accuracy per round (mean over seeds)" + sweep.note, *sweep.gaps)
    return fig


def _per_round_panel(ax, cell_runs: list[Run], colors: dict, budget: int) -> bool:
    """A line per K of one panel of accuracy per round, with its seed band, the chance line and the
    budget; returns whether a band was drawn."""
    any_band = False
    for run in cell_runs:
        ax.plot(run.curve.index, run.curve.to_numpy(), lw=1.1, color=colors[run.clients])
        if run.seeds > 1 and run.low is not None:
            any_band = True
            ax.fill_between(run.curve.index, run.low.to_numpy(), run.high.to_numpy(), color=colors[run.clients],
                            alpha=0.18, lw=0)
    if cell_runs:
        ax.axhline(np.mean([r.chance_accuracy for r in cell_runs]), ls="--", lw=1, color="0.35")
    else:
        no_runs(ax)
    ax.axvline(budget, ls=":", lw=1, color="0.5")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    return any_band


def plot_drift(sweep: Sweep) -> Figure:
    """A row per (data set, model), a column per measure (the pseudo-gradient norm, the clients'
    rms distance from their average) against the round, a line per K (mean over seeds); the reference algorithm and
    partition."""
    frame, settings = sweep.drift_frame, sweep.settings
    columns = [c for c, _ in DRIFT_PANELS]
    per_round = (frame[frame["round"] >= 1]
                 .groupby(["dataset", "model", "clients", "round"], sort=True)[columns].mean().reset_index())
    models = sorted(frame["model"].unique())
    pairs = [(dataset, model) for dataset in settings for model in models]
    all_clients = sorted(frame["clients"].unique())
    colors = clients_colors(all_clients)
    fig, axes = panel_grid(len(pairs) * len(DRIFT_PANELS), len(DRIFT_PANELS), 1.45)
    for i, (dataset, model) in enumerate(pairs):
        rows = per_round[(per_round["dataset"] == dataset) & (per_round["model"] == model)]
        for j, (column, label) in enumerate(DRIFT_PANELS):
            ax = axes[i * len(DRIFT_PANELS) + j]
            ax.set_title(f"{dataset} / {model}", fontsize=7)
            ax.set_ylabel(label, fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.set_xlabel("round" if i == len(pairs) - 1 else "")
            values = rows.dropna(subset=[column])
            if values.empty:
                ax.text(0.5, 0.5, "no runs" if rows.empty else "not recorded", transform=ax.transAxes,
                        ha="center", va="center", color="0.4")
                continue
            for clients, line in values.groupby("clients", sort=True):
                ax.plot(line["round"], line[column], lw=1.0, color=colors[clients])
            if (values[column] > 0).all():  # norms span orders of magnitude across K
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.axvline(settings[dataset].budget, ls=":", lw=1, color="0.5")
    handles = [Line2D([], [], lw=1.5, color=colors[k], label=f"K={k}") for k in all_clients]
    handles.append(Line2D([], [], ls=":", lw=1, color="0.5", label="budget"))
    legend(fig, handles)
    suptitle(fig, "Pseudo-gradient norm and client drift per round (mean over seeds)" + sweep.drift_note)
    return fig


def plot_accuracy_vs_bytes(sweep: Sweep) -> Figure:
    """A panel per data set: test accuracy against the bytes communicated so far (uploads and
    downloads of every client, log scale), a line per (model, K), the mean over seeds; the
    reference algorithm and partition. LoRA cells send a fraction of a full model's bytes."""
    frame, settings = sweep.drift_frame, sweep.settings
    curves = communicated_bytes(frame)
    models = sorted(frame["model"].unique())
    styles = model_styles(models)
    all_clients = sorted(frame["clients"].unique())
    widths = {k: 0.8 + 1.2 * i / max(len(all_clients) - 1, 1) for i, k in enumerate(all_clients)}
    datasets = list(settings)
    fig, axes = panel_grid(len(datasets), min(len(datasets), MAX_COLUMNS), 2.4)
    for ax, dataset in zip(axes, datasets):
        rows = curves[(curves["dataset"] == dataset) & (curves["bytes"] > 0)]
        ax.set_title(dataset, fontsize=8)
        ax.set_xlabel("bytes communicated (up + down, all clients)")
        ax.set_ylabel("test accuracy")
        if rows.empty:
            ax.text(0.5, 0.5, "no byte counts", transform=ax.transAxes, ha="center", va="center", color="0.4")
            continue
        for (model, clients), line in rows.groupby(["model", "clients"], sort=True):
            style = styles[model]
            ax.plot(line["bytes"], line["test_accuracy"], color=style["color"], lw=widths[clients],
                    marker=style.get("marker"), markersize=2.5, alpha=0.9)
        ax.set_xscale("log")
    handles = [Line2D([], [], color=styles[m]["color"], marker=styles[m].get("marker"), label=m) for m in models]
    handles += [Line2D([], [], color="0.3", lw=widths[k], label=f"K={k}") for k in all_clients]
    legend(fig, handles)
    suptitle(fig, "Test accuracy against communicated bytes (mean over seeds)" + sweep.drift_note)
    return fig


def plot_client_accuracy(sweep: Sweep) -> Figure:
    """Mean and worst-client accuracy at the budget vs K, a colour per partition (:mod:`.clients`)."""
    return client_accuracy_figure(sweep)


def plot_layer_drift(sweep: Sweep) -> Figure:
    """Relative client drift by layer group over rounds, smallest beside largest K, for the reference
    partition and algorithm (:mod:`.layer_drift`)."""
    return layer_drift_figure(load_layers(list(sweep.drift_frame["source"].unique())), sweep.drift_note)
