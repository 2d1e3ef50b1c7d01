"""Tables and figures of a sweep, from the ``metrics.parquet`` of whatever cells have finished.

The analysis of Hilmkil et al. (2021), per (model, data set, K clients):

- *accuracy at the budget*: test accuracy at round == the data set's ``budget``, compared with the
  K=1 cell (same model, data set and seed) as ``ratio``. A run that stopped before the budget
  (a partial or demo sweep) uses its last evaluated round <= budget, recorded in ``round_used``.
- *rounds to target*: the first evaluated round >= 1 whose accuracy reaches ``target_fraction``
  (default 0.9) x the K=1 accuracy at the budget, searched up to the data set's
  ``second_threshold`` (or the last round run, if earlier). Failures are rows, not gaps.

Seeds: every table has one row per seed plus, for every (model, data set, K), a row with
``seed == "mean"``: the same analysis applied to the seed-averaged learning curve (defined on the
rounds that *every* seed of the cell evaluated), compared with the K=1 seed-averaged curve.
``seeds`` says how many seeds a row stands for. The figures plot the "mean" rows.

When the metrics mix protocols for one model, its rows are labelled ``"<model> [<protocol>]"``,
so a baseline is never taken from another protocol.

Algorithms: every cell has an ``algorithm`` (the column of metrics.parquet; ``fedavg`` for files
written before fedsweep had algorithms). The analysis is per (model, algorithm, data set, K), and
a cell's baseline is the K=1 cell of the same model and algorithm (the same client optimiser and
server step with one client), else, where that algorithm has no K=1 cell, ``fedavg``'s
(``baseline_algorithm`` says which). With several algorithms the figures compare them: hue =
algorithm, one panel per (model, data set); with one, hue = model, one panel per data set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from . import FedsweepError
from .io import atomic_path, write_json

REQUIRED_COLUMNS = ("dataset", "model", "clients", "seed", "protocol", "round", "test_accuracy", "chance_accuracy")
CELL_KEYS = ["dataset", "model", "algorithm", "protocol", "clients", "seed"]
DEFAULT_ALGORITHM = "fedavg"  # metrics without an algorithm column: fedsweep before algorithms
MEAN_SEED = "mean"
DEFAULT_TARGET_FRACTION = 0.9
# Accuracies are ratios of counts; 0.9 x baseline may land a rounding error above an equal accuracy.
TARGET_TOLERANCE = 1e-9
FIGURE_WIDTH_IN = 7.0
DPI = 200
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@dataclass(frozen=True)
class DatasetSettings:
    budget: int
    second_threshold: int


@dataclass
class Run:
    """One learning curve: a single seed of a cell, or the seed average (seed == MEAN_SEED)."""

    model: str
    dataset: str
    clients: int
    seed: int | str
    seeds: int
    chance_accuracy: float
    last_round: int
    curve: pd.Series  # test accuracy indexed by evaluated round, ascending
    algorithm: str = DEFAULT_ALGORITHM


# ----------------------------------------------------------------------------- inputs


def find_metrics(entries: list[str] | str) -> list[Path]:
    """The metrics files named by ``entries`` (files, or folders searched recursively), each once."""
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    found: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            hits = sorted(path.rglob("metrics.parquet"))
            if not hits:
                raise FedsweepError(f"report: no metrics.parquet under --metrics {str(path)!r}")
            found += hits
        elif path.is_file():
            found.append(path)
        else:
            raise FedsweepError(f"report: --metrics {str(path)!r} does not exist")
    if not found:
        raise FedsweepError("report: --metrics names no files")
    # A file given directly and through its folder counts once.
    return list(dict.fromkeys(p.resolve() for p in found))


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    """All rows of the metrics files, checked: required columns, integer ids, accuracies in [0, 1]."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a truncated or foreign file
            raise FedsweepError(f"report: cannot read {str(path)!r} as Parquet ({str(exc).splitlines()[0]})") from exc
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise FedsweepError(f"report: {str(path)!r} lacks column {missing[0]!r} (has {list(frame.columns)})")
        if frame.empty:
            raise FedsweepError(f"report: {str(path)!r} has no rows")
        algorithm = frame["algorithm"].astype(str) if "algorithm" in frame.columns else DEFAULT_ALGORITHM
        frame = frame[list(REQUIRED_COLUMNS)].copy()
        frame["algorithm"] = algorithm
        for col in ("clients", "seed", "round"):
            values = pd.to_numeric(frame[col], errors="coerce")
            if values.isna().any() or (values != values.round()).any():
                raise FedsweepError(f"report: {str(path)!r} column {col!r} has non-integer values")
            frame[col] = values.astype("int64")
        if (frame["clients"] < 1).any() or (frame["round"] < 0).any():
            raise FedsweepError(f"report: {str(path)!r} has clients < 1 or round < 0")
        for col in ("test_accuracy", "chance_accuracy"):
            values = pd.to_numeric(frame[col], errors="coerce").astype("float64")
            if ((values < 0) | (values > 1)).any():
                raise FedsweepError(f"report: {str(path)!r} column {col!r} has values outside [0, 1]")
            frame[col] = values
        for col in ("dataset", "model", "protocol"):
            frame[col] = frame[col].astype(str)
        frame["source"] = str(path)
        frames.append(frame)
    metrics = pd.concat(frames, ignore_index=True)

    duplicated = metrics[metrics.duplicated(CELL_KEYS + ["round"], keep=False)]
    if not duplicated.empty:
        row = duplicated.iloc[0]
        sources = sorted(duplicated.loc[(duplicated[CELL_KEYS] == row[CELL_KEYS]).all(axis=1), "source"].unique())
        raise FedsweepError(
            f"report: cell dataset={row['dataset']!r} model={row['model']!r} algorithm={row['algorithm']!r} "
            f"K={row['clients']} seed={row['seed']} "
            f"has round {row['round']} more than once (in {sources})"
        )
    mixed = metrics.groupby("model")["protocol"].transform("nunique") > 1
    metrics.loc[mixed, "model"] = metrics.loc[mixed, "model"] + " [" + metrics.loc[mixed, "protocol"] + "]"
    return metrics


def read_report_config(path: str, datasets: list[str]) -> tuple[dict[str, DatasetSettings], float]:
    """Budget and second threshold of each data set in ``datasets`` (config order first), and the target fraction."""
    config_path = Path(path)
    if not config_path.is_file():
        raise FedsweepError(f"report: --config {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise FedsweepError(f"report: --config {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(config, dict):
        raise FedsweepError(f"report: --config {str(path)!r} is not a mapping")
    fraction = config.get("target_fraction", DEFAULT_TARGET_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise FedsweepError(f"report: config target_fraction={fraction!r} must be a number in (0, 1]")
    table = config.get("datasets")
    if not isinstance(table, dict):
        raise FedsweepError(f"report: --config {str(path)!r} has no 'datasets' mapping")
    settings: dict[str, DatasetSettings] = {}
    for name in [d for d in table if d in datasets] + sorted(d for d in datasets if d not in table):
        entry = table.get(name)
        if not isinstance(entry, dict):
            raise FedsweepError(f"report: config has no datasets.{name} (the metrics include data set {name!r})")
        for key in ("budget", "second_threshold"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FedsweepError(f"report: config datasets.{name}.{key}={value!r} must be a positive number of rounds")
        if entry["second_threshold"] < entry["budget"]:
            raise FedsweepError(
                f"report: config datasets.{name}.second_threshold={entry['second_threshold']} is below its "
                f"budget={entry['budget']}"
            )
        settings[name] = DatasetSettings(entry["budget"], entry["second_threshold"])
    return settings, float(fraction)


# ----------------------------------------------------------------------------- analysis


def learning_runs(metrics: pd.DataFrame) -> list[Run]:
    """Per cell: one Run per seed, then the seed-averaged Run."""
    runs: list[Run] = []
    for (model, algorithm, dataset, clients), cell in metrics.groupby(["model", "algorithm", "dataset", "clients"],
                                                                      sort=True):
        per_seed = []
        for seed, rows in cell.groupby("seed", sort=True):
            evaluated = rows.dropna(subset=["test_accuracy"]).sort_values("round")
            per_seed.append(Run(
                model, dataset, int(clients), int(seed), 1, float(rows["chance_accuracy"].mean()),
                int(rows["round"].max()), evaluated.set_index("round")["test_accuracy"], algorithm,
            ))
        # Average only rounds every seed evaluated, so no point of the mean curve mixes seed subsets.
        by_round = pd.concat({r.seed: r.curve for r in per_seed}, axis=1).dropna().sort_index()
        runs += per_seed + [Run(
            model, dataset, int(clients), MEAN_SEED, len(per_seed),
            float(np.mean([r.chance_accuracy for r in per_seed])),
            min(r.last_round for r in per_seed), by_round.mean(axis=1), algorithm,
        )]
    return runs


def _accuracy_at(run: Run, budget: int) -> tuple[int | None, float]:
    """(round used, accuracy): the last evaluated round <= budget."""
    points = run.curve[run.curve.index <= budget]
    return (int(points.index[-1]), float(points.iloc[-1])) if len(points) else (None, math.nan)


def _first_round_reaching(run: Run, target: float, until: int) -> int | None:
    points = run.curve[(run.curve.index >= 1) & (run.curve.index <= until)]
    hits = points[points >= target - TARGET_TOLERANCE]
    return int(hits.index[0]) if len(hits) else None


def analyse(runs: list[Run], settings: dict[str, DatasetSettings], target_fraction: float
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables (accuracy at the budget, rounds to target), sorted by data set (config order),
    model, K, seed (the mean row last)."""
    at_budget = {id(run): _accuracy_at(run, settings[run.dataset].budget) for run in runs}
    baselines = {(r.model, r.algorithm, r.dataset, r.seed): at_budget[id(r)][1] for r in runs if r.clients == 1}
    dataset_order = {name: i for i, name in enumerate(settings)}

    def sort_key(run: Run):
        return (dataset_order[run.dataset], run.model, _algorithm_key(run.algorithm), run.clients,
                run.seed == MEAN_SEED, run.seed if run.seed != MEAN_SEED else 0)

    def baseline_of(run: Run) -> tuple[str | None, float]:
        for algorithm in (run.algorithm, DEFAULT_ALGORITHM):
            key = (run.model, algorithm, run.dataset, run.seed)
            if key in baselines:
                return algorithm, baselines[key]
        return None, math.nan

    budget_rows, target_rows = [], []
    for run in sorted(runs, key=sort_key):
        limits = settings[run.dataset]
        round_used, accuracy = at_budget[id(run)]
        baseline_algorithm, baseline = baseline_of(run)
        ids = {"model": run.model, "algorithm": run.algorithm, "dataset": run.dataset, "clients": run.clients,
               "seed": run.seed}
        budget_rows.append({
            **ids, "budget": limits.budget, "round_used": round_used, "accuracy": accuracy,
            "baseline_accuracy": baseline, "ratio": accuracy / baseline if baseline > 0 else math.nan,
            "baseline_algorithm": baseline_algorithm, "chance_accuracy": run.chance_accuracy, "seeds": run.seeds,
        })

        searched_until = min(limits.second_threshold, run.last_round)
        target = target_fraction * baseline
        rounds = None if math.isnan(target) else _first_round_reaching(run, target, searched_until)
        if math.isnan(target):
            status = "no K=1 baseline"
        elif rounds is not None:
            status = f"reached at round {rounds}"
        else:
            status = f"not reached by round {searched_until}"
            if searched_until < limits.second_threshold:
                status += f" (run ended before round {limits.second_threshold})"
        target_rows.append({
            **ids, "target_accuracy": target, "rounds": rounds, "reached": rounds is not None,
            "searched_until": searched_until, "status": status, "seeds": run.seeds,
        })
    accuracy_table = pd.DataFrame(budget_rows).astype({"round_used": "Int64", "seed": object})
    rounds_table = pd.DataFrame(target_rows).astype({"rounds": "Int64", "reached": bool, "seed": object})
    return accuracy_table, rounds_table


# ----------------------------------------------------------------------------- figures


def _style():
    # A local rc context: no global pyplot state or backend is touched (Figure renders with Agg).
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
          "legend.frameon": False, "axes.titlesize": 8.5, "axes.labelsize": 8,
          "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7.5}
    return matplotlib.rc_context(rc)


def _dataset_grid(n_datasets: int, panel_height: float) -> tuple[Figure, list]:
    ncols = min(n_datasets, 3)
    nrows = math.ceil(n_datasets / ncols)
    fig = Figure(figsize=(FIGURE_WIDTH_IN, panel_height * nrows + 0.55), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_datasets:]:
        ax.set_visible(False)
    return fig, list(axes[:n_datasets])


def _log2_clients_axis(ax, clients: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(clients))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in clients])
    ax.set_xlim(min(clients) / 2 ** 0.4, max(clients) * 2 ** 0.4)
    ax.set_xlabel("clients K")


def _algorithm_key(name: str) -> tuple[bool, str]:
    """fedavg (the reference) first, then the others by name."""
    return (name != DEFAULT_ALGORITHM, name)


def _facets(settings: dict[str, DatasetSettings], table: pd.DataFrame, panel_height: float
            ) -> tuple[Figure, list[tuple[Any, str, str | None]], str]:
    """The panels of a per-K figure and the column its lines are coloured by.

    One algorithm: a panel per data set, a line per model. Several: a panel per (model, data
    set), models in rows, a line per algorithm, so each panel compares algorithms for one model.
    Returns (figure, [(axes, dataset, model or None)], series column).
    """
    if table["algorithm"].nunique() <= 1:
        fig, axes = _dataset_grid(len(settings), panel_height)
        return fig, [(ax, dataset, None) for ax, dataset in zip(axes, settings)], "model"
    models = sorted(table["model"].unique())
    fig = Figure(figsize=(FIGURE_WIDTH_IN, min(panel_height * len(models), 9.0) + 0.55), layout="constrained")
    axes = fig.subplots(len(models), len(settings), squeeze=False)
    return fig, [(axes[i, j], dataset, model) for i, model in enumerate(models)
                 for j, dataset in enumerate(settings)], "algorithm"


def _model_styles(models: list[str]) -> dict[str, dict]:
    colors = sns.color_palette("colorblind", len(models))
    return {m: {"color": colors[i], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(models)}


def _legend(fig: Figure, handles: list[Line2D]) -> None:
    # As many columns as fit the figure width (about 110 characters at this font size), so long
    # model names wrap into rows instead of running off the page.
    longest = max(len(h.get_label()) for h in handles)
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), 110 // (longest + 6))))


def _save(fig: Figure, figures_dir: str, name: str) -> dict[str, Path]:
    outputs = {}
    for ext, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
        path = Path(figures_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:  # the temp name ends in .tmp: say the format
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=metadata)
        outputs[f"{name}_{ext}"] = path
    return outputs


def plot_accuracy_vs_clients(accuracy: pd.DataFrame, settings: dict[str, DatasetSettings],
                             styles: dict[str, dict]) -> Figure:
    fig, panels, series = _facets(settings, accuracy, 2.5)
    means = accuracy[accuracy["seed"] == MEAN_SEED]
    seeds = accuracy[accuracy["seed"] != MEAN_SEED]
    any_partial = any_spread = False
    for ax, dataset, panel_model in panels:
        limits = settings[dataset]
        in_panel = (means["dataset"] == dataset) & ((means["model"] == panel_model) if panel_model else True)
        panel = means[in_panel]
        for key, rows in panel.groupby(series, sort=True):
            style = styles[key]
            rows = rows.dropna(subset=["accuracy"]).sort_values("clients")
            ax.plot(rows["clients"], rows["accuracy"], lw=1.4, ms=5, **style)
            # A point from before the budget (partial run) is drawn hollow, never passed off as final.
            partial = rows[rows["round_used"] < limits.budget]
            if len(partial):
                any_partial = True
                ax.plot(partial["clients"], partial["accuracy"], ls="none", ms=5, mfc="white", **style)
            spread = seeds[(seeds["dataset"] == dataset) & (seeds[series] == key)
                           & ((seeds["model"] == panel_model) if panel_model else True)]
            if rows["seeds"].max() > 1:
                any_spread = True
                ax.scatter(spread["clients"], spread["accuracy"], s=9, alpha=0.4, color=style["color"], lw=0)
        if panel.empty:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.4")
            continue
        ax.axhline(panel["chance_accuracy"].mean(), ls="--", lw=1, color="0.35")
        _log2_clients_axis(ax, sorted(panel["clients"].unique()))
        ax.set_title(f"{dataset} (budget {limits.budget} rounds)" + (f" / {panel_model}" if panel_model else ""))
        ax.set_ylabel("test accuracy at budget" if ax.get_subplotspec().is_first_col() else "")
    handles = [Line2D([], [], lw=1.4, ms=5, label=m, **s) for m, s in styles.items()]
    handles.append(Line2D([], [], ls="--", lw=1, color="0.35", label="chance"))
    if any_partial:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", color="0.3", label="run ended before budget"))
    if any_spread:
        handles.append(Line2D([], [], ls="none", marker="o", ms=3, alpha=0.4, color="0.3", label="single seeds"))
    _legend(fig, handles)
    fig.suptitle("Test accuracy at the round budget vs number of clients", fontsize=9.5)
    return fig


def plot_rounds_to_target(rounds: pd.DataFrame, settings: dict[str, DatasetSettings], target_fraction: float,
                          styles: dict[str, dict]) -> Figure:
    fig, panels, series = _facets(settings, rounds, 2.5)
    means = rounds[rounds["seed"] == MEAN_SEED]
    # Failures of several lines at one K would overlap at the top: shift each a little in log2 K.
    step = min(0.25, 0.8 / len(styles))
    dodge = {m: 2 ** (step * (i - (len(styles) - 1) / 2)) for i, m in enumerate(styles)}
    any_failure = False
    for ax, dataset, panel_model in panels:
        limits = settings[dataset]
        panel = means[(means["dataset"] == dataset) & ((means["model"] == panel_model) if panel_model else True)]
        if panel.empty:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.4")
            continue
        no_baseline = sorted(panel.loc[panel["target_accuracy"].isna(), series].unique())
        for model, rows in panel.dropna(subset=["target_accuracy"]).groupby(series, sort=True):
            style = styles[model]
            rows = rows.sort_values("clients")
            ax.plot(rows["clients"], rows["rounds"].astype("float64"), lw=1.4, ms=5, **style)
            failed = rows[~rows["reached"]]
            if len(failed):
                any_failure = True
                ax.plot(failed["clients"] * dodge[model], failed["searched_until"], ls="none", marker="x",
                        ms=7, mew=2, color=style["color"])
        ax.axhline(limits.second_threshold, ls=":", lw=1, color="0.35")
        ax.set_ylim(0, max(limits.second_threshold, panel["searched_until"].max()) * 1.1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _log2_clients_axis(ax, sorted(panel["clients"].unique()))
        ax.set_title(f"{dataset} (budget {limits.budget} rounds)" + (f" / {panel_model}" if panel_model else ""))
        ax.set_ylabel(f"rounds to {target_fraction:.0%} of K=1" if ax.get_subplotspec().is_first_col() else "")
        if no_baseline:
            ax.text(0.03, 0.03, "no K=1 baseline: " + ", ".join(no_baseline), transform=ax.transAxes,
                    fontsize=6.5, color="0.3", va="bottom")
    handles = [Line2D([], [], lw=1.4, ms=5, label=m, **s) for m, s in styles.items()]
    handles.append(Line2D([], [], ls=":", lw=1, color="0.35", label="search limit (second threshold)"))
    if any_failure:
        handles.append(Line2D([], [], ls="none", marker="x", ms=7, mew=2, color="0.2",
                              label="not reached (at last round searched)"))
    _legend(fig, handles)
    fig.suptitle(f"Rounds to reach {target_fraction:.0%} of the K=1 accuracy at the budget", fontsize=9.5)
    return fig


def _line_label(run: Run, several_algorithms: bool) -> str:
    return f"{run.model} / {run.algorithm}" if several_algorithms else run.model


def plot_accuracy_per_round(runs: list[Run], settings: dict[str, DatasetSettings], models: list[str]) -> Figure:
    """A panel per (data set, model), or per (data set, model / algorithm) with several algorithms."""
    means = [r for r in runs if r.seed == MEAN_SEED]
    several = len({r.algorithm for r in runs}) > 1
    if several:
        models = sorted({_line_label(r, True) for r in means})
    all_clients = sorted({r.clients for r in means})
    # A sequential palette without its near-white end, so K=1 stays visible on white.
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    colors = dict(zip(all_clients, cmap(np.linspace(0.25, 0.9, len(all_clients)))))
    nrows, ncols = len(settings), len(models)
    fig = Figure(figsize=(FIGURE_WIDTH_IN, min(2.0 * nrows, 8.5) + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex="row", sharey="row")
    for i, (dataset, limits) in enumerate(settings.items()):
        for j, model in enumerate(models):
            ax = axes[i, j]
            cell_runs = sorted((r for r in means if r.dataset == dataset and _line_label(r, several) == model),
                               key=lambda r: r.clients)
            for run in cell_runs:
                ax.plot(run.curve.index, run.curve.to_numpy(), lw=1.2, color=colors[run.clients])
            if cell_runs:
                ax.axhline(np.mean([r.chance_accuracy for r in cell_runs]), ls="--", lw=1, color="0.35")
            else:
                ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.axvline(limits.budget, ls=":", lw=1, color="0.5")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{dataset} / {model}", fontsize=7.5)
            ax.set_xlabel("round" if i == nrows - 1 else "")
            ax.set_ylabel("test accuracy" if j == 0 else "")
    handles = [Line2D([], [], lw=1.5, color=colors[k], label=f"K={k}") for k in all_clients]
    handles += [Line2D([], [], ls="--", lw=1, color="0.35", label="chance"),
                Line2D([], [], ls=":", lw=1, color="0.5", label="budget")]
    _legend(fig, handles)
    fig.suptitle("Test accuracy per round (mean over seeds)", fontsize=9.5)
    return fig


# ----------------------------------------------------------------------------- entry point


def dataset_labels(frame: pd.DataFrame) -> dict[str, dict]:
    """What each data set's class ids mean, from the run.json beside each metrics file: the
    tables' sidecar, so results can be read without the data folder."""
    labels: dict[str, dict] = {}
    for (dataset, source), _ in frame.groupby(["dataset", "source"], sort=True):
        summary = Path(source).with_name("run.json")
        if dataset in labels or not summary.exists():
            continue
        run = json.loads(summary.read_text())
        if "class_names" in run:
            labels[dataset] = {key: run.get(key) for key in ("class_names", "data_sha256") if key in run}
    return labels


def make_report(metrics: list[str], config: str, tables_dir: str, figures_dir: str) -> dict[str, Path]:
    """Write ``accuracy_at_budget.csv`` and ``rounds_to_target.csv`` to ``tables_dir`` and three figures
    (PNG and PDF) to ``figures_dir``; return output name -> path. Every file is written atomically."""
    frame = load_metrics(find_metrics(metrics))
    settings, target_fraction = read_report_config(config, sorted(frame["dataset"].unique()))
    runs = learning_runs(frame)
    accuracy, rounds = analyse(runs, settings, target_fraction)

    outputs: dict[str, Path] = {"datasets": Path(tables_dir) / "datasets.json"}
    write_json(outputs["datasets"], dataset_labels(frame))
    for name, table in (("accuracy_at_budget", accuracy), ("rounds_to_target", rounds)):
        path = Path(tables_dir) / f"{name}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        outputs[name] = path

    models = sorted(frame["model"].unique())
    algorithms = sorted(frame["algorithm"].unique(), key=_algorithm_key)
    styles = _model_styles(algorithms if len(algorithms) > 1 else models)
    with _style():
        for name, fig in (
            ("accuracy_vs_clients", plot_accuracy_vs_clients(accuracy, settings, styles)),
            ("rounds_to_target", plot_rounds_to_target(rounds, settings, target_fraction, styles)),
            ("accuracy_per_round", plot_accuracy_per_round(runs, settings, models)),
        ):
            outputs.update(_save(fig, figures_dir, name))
    return outputs
