"""How each client fares (:mod:`fedsweep.client_eval`): the table ``client_accuracy`` and the
figure ``client_accuracy`` (registered through their wrappers in :mod:`.tables` and :mod:`.figures`), both at the round each cell's accuracy at the budget is taken at
(``round_used`` of the accuracy table), so the global and the per-client numbers are comparable.

A seed row holds that seed's summary over clients at its round used; a mean row the average over
the cell's seeds of their summaries at the mean row's round used (a round every seed evaluated).
Metrics written before fedsweep recorded per-client accuracies leave the columns empty (NaN).
The ``client_holdout_*`` columns, each client's accuracy on a held-out slice of its own shard,
hold numbers only for cells trained with the setting ``client_holdout`` (NaN otherwise); the
figure draws their mean (dotted) where a panel has them.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..client_eval import CLIENT_COLUMNS, HOLDOUT_COLUMNS
from .analysis import MEAN_SEED
from .plotting import facets, in_panel, legend, log2_clients_axis, model_styles, no_runs, panel_title, suptitle
from .sweep import Sweep

CELL = ["dataset", "model", "algorithm", "partition", "clients"]
COLUMNS = (*CLIENT_COLUMNS, *HOLDOUT_COLUMNS)


def client_accuracy_table(sweep: Sweep) -> pd.DataFrame:
    """Per seed and seed mean, at the round used: the global accuracy and the per-client summary."""
    accuracy = sweep.accuracy[CELL + ["kind", "seed", "seeds", "round_used", "accuracy"]].reset_index(drop=True)
    frame = sweep.frame.loc[sweep.frame["round"].notna(), CELL + ["seed", "round", *COLUMNS]].copy()
    frame["seed"], frame["round"] = frame["seed"].astype(int), frame["round"].astype(int)
    is_mean = accuracy["seed"] == MEAN_SEED
    used = accuracy.assign(round=accuracy["round_used"].astype("float64"))  # NaN: no round <= budget
    seeds = used[~is_mean].assign(seed=lambda t: t["seed"].astype(int))
    per_seed = seeds.merge(frame.astype({"round": "float64"}), on=CELL + ["seed", "round"], how="left")
    # A mean row: the seeds' values at the mean's round used, averaged.
    of_mean = used[is_mean].merge(frame.drop(columns="seed").astype({"round": "float64"}),
                                  on=CELL + ["round"], how="left")
    means = of_mean.groupby(CELL, sort=False, dropna=False)[list(COLUMNS)].mean().reset_index()
    per_mean = used[is_mean].merge(means, on=CELL, how="left")
    table = pd.concat([per_seed.set_index(seeds.index), per_mean.set_index(used.index[is_mean])]).sort_index()
    table = table.drop(columns="round").rename(columns={"accuracy": "test_accuracy"})
    # How far the worst client falls below the global accuracy: the cost the global number hides.
    table["worst_client_gap"] = table["test_accuracy"] - table["client_accuracy_min"]
    return table.astype({"seed": object, "round_used": "Int64"})


def client_accuracy_figure(sweep: Sweep) -> Figure:
    """Mean (solid) and worst-client (dashed) accuracy at the round used vs K, a line colour per
    partition; a panel per (data set, model[, algorithm]). Cells with held-out slices: their mean
    held-out accuracy too (dotted)."""
    table = client_accuracy_table(sweep)
    means = table[table["seed"] == MEAN_SEED]
    settings, partitions = sweep.settings, sweep.partitions
    fig, panels = facets(settings, table, 2.2, by_algorithm=False)
    styles = dict(zip(partitions, model_styles(partitions).values()))
    several_algorithms = table["algorithm"].nunique() > 1
    any_held = False
    for ax, dataset, panel_model, panel_algorithm in panels:
        panel = in_panel(means, dataset, panel_model, panel_algorithm).dropna(subset=["client_accuracy_mean"])
        if panel.empty:
            no_runs(ax)
            continue
        for partition, rows in panel.groupby("partition", sort=False):
            rows = rows.sort_values("clients")
            style = styles[partition]
            ax.plot(rows["clients"], rows["client_accuracy_mean"], ls="-", lw=1.4, **style)
            ax.plot(rows["clients"], rows["client_accuracy_min"], ls="--", lw=1.1, mfc="white", **style)
            held = rows.dropna(subset=["client_holdout_accuracy_mean"])
            if not held.empty:
                ax.plot(held["clients"], held["client_holdout_accuracy_mean"], ls=":", lw=1.1, **style)
                any_held = True
        log2_clients_axis(ax, sorted(panel["clients"].unique()))
        ax.set_title(panel_title(dataset, settings[dataset], panel_model,
                                 panel_algorithm if several_algorithms else None), fontsize=7)
        ax.set_ylabel("client accuracy at budget" if ax.get_subplotspec().is_first_col() else "")
    handles = [Line2D([], [], ls="-", label=p, **styles[p]) for p in partitions]
    handles += [Line2D([], [], color="0.3", ls="-", label="mean over clients"),
                Line2D([], [], color="0.3", ls="--", label="worst client")]
    if any_held:
        handles.append(Line2D([], [], color="0.3", ls=":", label="mean over clients, own held-out rows"))
    legend(fig, handles)
    suptitle(fig, "Accuracy of the global model on each client's label distribution vs number of clients",
             *sweep.gaps)
    return fig
