"""Tables and figures of a sweep, from the ``metrics.parquet`` of whatever cells have finished.

The analysis of Hilmkil et al. (2021), per (model, data set, K clients):

- *accuracy at the budget*: test accuracy at round == the data set's ``budget``, compared with the
  K=1 cell (same model, data set and seed) as ``ratio``. A run that stopped before the budget
  (a partial or demo sweep) uses its last evaluated round <= budget, recorded in ``round_used``.
- *rounds to target*: the first evaluated round >= 1 whose accuracy reaches ``target_fraction``
  (default 0.9) x the K=1 accuracy at the budget, searched up to the data set's
  ``second_threshold`` (or the last round run, if earlier). Failures are rows, not gaps.

Seeds: every table has one row per seed plus, for every cell, a row with ``seed == "mean"``: the
same analysis applied to the seed-averaged learning curve (defined on the rounds that *every*
seed of the cell evaluated), compared with the K=1 seed-averaged curve. ``seeds`` says how many
seeds a row stands for. The mean rows also give the spread over seeds of the per-seed accuracies
at the budget: their standard deviation and a 95% t-interval for their mean (``ci95_low``,
``ci95_high``; with one seed no interval, and the ``ci95`` note says "1 seed"). ``binomial_se``
is the test-set sampling error of an accuracy p measured on n test rows, sqrt(p (1 - p) / n) (n:
the ``test_rows`` of metrics.parquet or run.json); on a mean row it is that of the mean accuracy
on the same test set (every seed is evaluated on the same rows, so averaging seeds does not
shrink it). ``tables/seeds.csv`` has one row per cell of the grid: the seeds found and expected,
its status, and the mean, standard deviation and interval of the accuracy, the ratio and the
rounds to target; ``tables/missing_cells.csv`` one row per (cell, seed) of the grid the metrics
lack. The grid is the report config's ``datasets``, ``models``, ``clients``, ``seeds`` and the
optional ``algorithms`` and ``partitions`` (each a list, or a mapping whose keys count); a key
that is absent stands for the values found in the metrics.

When the metrics mix protocols for one model, its rows are labelled ``"<model> [<protocol>]"``,
so a baseline is never taken from another protocol.

Algorithms: every cell has an ``algorithm`` (the column of metrics.parquet; ``fedavg`` for files
written before fedsweep had algorithms). The analysis is per (model, algorithm, data set, K), and
a cell's baseline is the K=1 cell of the same model and algorithm (the same client optimiser and
server step with one client), else, where that algorithm has no K=1 cell, ``fedavg``'s
(``baseline_algorithm`` says which). With several algorithms the figures compare them: hue =
algorithm, one panel per (model, data set); with one, hue = model, one panel per data set.

Partitions: every cell also has a ``partition`` (a slug: the column of metrics.parquet, ``iid``
for earlier files) and a ``kind``, from the run.json beside the metrics: ``fixed_total`` (the
whole training set split K ways: the paper's setting) or ``per_client`` (N rows per client, so the
data grows with K). The baseline is the K=1 cell of the same partition, else (same kind only)
``iid``'s (``baseline_partition``). Figures 1-3 show one partition, the reference (``iid`` if
present, else the first); ``accuracy_vs_clients_by_partition`` compares them all, and ``drift``
shows the pseudo-gradient norm and the clients' rms distance from their average per round for the
reference partition and algorithm; ``layer_drift`` shows where in the model the clients diverge (the
``layers.parquet`` beside each metrics file: :mod:`.layer_drift`).

Layout: :mod:`.load` reads the metrics files and the report config, :mod:`.analysis` computes
the statistics, :mod:`.sweep` holds one loaded sweep and the views the figures share,
:mod:`.tables` and :mod:`.figures` (with the shared helpers of :mod:`.plotting`) make one table
or figure per function of a :class:`~fedsweep.report.sweep.Sweep`.

This module imports nothing heavy (no pandas, matplotlib, numpy, scipy or torch): the Snakemake
head node imports it for the output names (``TABLES``, ``FIGURES``, ``DATASETS_JSON``,
``output_paths``). Adding a table or figure: one function in ``tables.py`` / ``figures.py``, one
line in ``TABLE_REGISTRY`` / ``FIGURE_REGISTRY`` below, and one caption file
``workflow/report/table_{name}.rst`` / ``workflow/report/figure_{name}.rst``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

# Output name -> the function of a Sweep that makes it, by name in fedsweep.report.tables
# (returns a DataFrame, written as {tables_dir}/{name}.csv) or fedsweep.report.figures (returns a
# matplotlib Figure, written as {figures_dir}/{name}.png and .pdf). The order is the order written.
TABLE_REGISTRY: dict[str, str] = {
    "accuracy_at_budget": "accuracy_at_budget",
    "rounds_to_target": "rounds_to_target",
    "seeds": "seeds",
    "missing_cells": "missing_cells",
    "client_accuracy": "client_accuracy",
}
FIGURE_REGISTRY: dict[str, str] = {
    "accuracy_vs_clients": "plot_accuracy_vs_clients",
    "rounds_to_target": "plot_rounds_to_target",
    "accuracy_per_round": "plot_accuracy_per_round",
    "drift": "plot_drift",
    "accuracy_vs_clients_by_partition": "plot_accuracy_by_partition",
    "accuracy_vs_bytes": "plot_accuracy_vs_bytes",
    "layer_drift": "plot_layer_drift",
    "client_accuracy": "plot_client_accuracy",
}
TABLES: tuple[str, ...] = tuple(TABLE_REGISTRY)
FIGURES: tuple[str, ...] = tuple(FIGURE_REGISTRY)
FIGURE_FORMATS = ("png", "pdf")
DATASETS_JSON = "datasets.json"  # the tables' sidecar: what each data set's class ids mean


def table_function(name: str) -> Callable:
    """The function making table ``name`` (imports pandas)."""
    return getattr(importlib.import_module(".tables", __name__), TABLE_REGISTRY[name])


def figure_function(name: str) -> Callable:
    """The function making figure ``name`` (imports matplotlib)."""
    return getattr(importlib.import_module(".figures", __name__), FIGURE_REGISTRY[name])


def output_paths(tables_dir: str | Path, figures_dir: str | Path) -> dict[str, Path]:
    """Output name -> path of every file :func:`make_report` writes, in the order it writes them:
    ``datasets`` (``DATASETS_JSON``), each table, then ``{figure}_{png,pdf}`` for each figure."""
    paths = {"datasets": Path(tables_dir) / DATASETS_JSON}
    paths.update((name, Path(tables_dir) / f"{name}.csv") for name in TABLES)
    paths.update((f"{name}_{ext}", Path(figures_dir) / f"{name}.{ext}") for name in FIGURES for ext in FIGURE_FORMATS)
    return paths


def cached_metrics(results_dir: str | Path) -> list[str]:
    """The metrics files of every finished cell under ``results_dir/runs`` now (``snakemake figures``)."""
    from ..grid import CELL_PATH

    folders = CELL_PATH.format(**dict.fromkeys(("dataset", "model", "algorithm", "partition", "clients", "seed"),
                                               "*"))
    return sorted(str(p) for p in Path(results_dir, "runs").glob(f"{folders}/metrics.parquet"))


def metrics_stamp(paths: list[str]) -> str:
    """A hash of the paths, sizes and mtimes of metrics files: changes when any is added or rewritten."""
    import hashlib
    import json
    import os

    stamp = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in paths]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()


def make_report(metrics: list[str], config: str, tables_dir: str, figures_dir: str) -> dict[str, Path]:
    """Write the tables (``TABLES``, CSV) to ``tables_dir`` with ``datasets.json``, and the figures
    (``FIGURES``, PNG and PDF) to ``figures_dir``; return output name -> path. Every file is
    written atomically."""
    from ..io import atomic_path, write_json
    from .load import dataset_labels
    from .plotting import save, style
    from .sweep import Sweep

    sweep = Sweep.load(metrics, config)
    paths = output_paths(tables_dir, figures_dir)
    outputs: dict[str, Path] = {"datasets": paths["datasets"]}
    write_json(outputs["datasets"], dataset_labels(sweep.frame))
    for name in TABLES:
        table = table_function(name)(sweep)
        with atomic_path(paths[name]) as tmp:
            table.to_csv(tmp, index=False)
        outputs[name] = paths[name]
    with style():
        for name in FIGURES:
            outputs.update(save(figure_function(name)(sweep), figures_dir, name))
    return outputs


__all__ = ["DATASETS_JSON", "FIGURES", "FIGURE_FORMATS", "FIGURE_REGISTRY", "TABLES", "TABLE_REGISTRY",
           "cached_metrics", "figure_function", "make_report", "metrics_stamp", "output_paths", "table_function"]
