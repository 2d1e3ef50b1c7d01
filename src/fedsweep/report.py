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
shows the pseudo-gradient norm and the clients' drift per round for the reference partition and
algorithm.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import seaborn as sns
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator
from scipy import stats

from . import FedsweepError
from .io import atomic_path, write_json

REQUIRED_COLUMNS = ("dataset", "model", "clients", "seed", "protocol", "round", "test_accuracy", "chance_accuracy")
# Per-round drift measures (train.METRIC_COLUMNS); NaN where a file predates them.
DRIFT_COLUMNS = ("pseudo_gradient_norm", "client_drift_max", "client_drift_rms", "update_cosine")
CELL_KEYS = ["dataset", "model", "algorithm", "partition", "protocol", "clients", "seed"]
DEFAULT_ALGORITHM = "fedavg"  # metrics without an algorithm column: fedsweep before algorithms
DEFAULT_PARTITION = "iid"  # metrics without a partition column: fedsweep before partition schemes
DEFAULT_KIND = "fixed_total"  # no run.json record of the kind: every split before per_client was one
MEAN_SEED = "mean"
DEFAULT_TARGET_FRACTION = 0.9
CONFIDENCE = 0.95
# Accuracies are ratios of counts; 0.9 x baseline may land a rounding error above an equal accuracy.
TARGET_TOLERANCE = 1e-9
FIGURE_WIDTH_IN = 7.0
MAX_COLUMNS = 3  # panels per row before facets wrap
DPI = 200
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class DatasetSettings:
    budget: int
    second_threshold: int


@dataclass(frozen=True)
class Grid:
    """The cells the report config asks for; None: whatever the metrics hold."""

    datasets: list[str]
    models: list[str] | None = None
    algorithms: list[str] | None = None
    partitions: list[str] | None = None
    clients: list[int] | None = None
    seeds: list[int] | None = None
    kinds: dict[str, str] = field(default_factory=dict)  # partition -> kind, where the config says
    # The grid's exact (dataset, model, algorithm, partition, clients, seed) list, where the config
    # gives one (a grid some of whose entries are restricted): it replaces the product of the lists.
    cells: list[tuple] | None = None


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
    partition: str = DEFAULT_PARTITION
    kind: str = DEFAULT_KIND
    test_rows: float = math.nan  # test-set size (NaN: not recorded)
    # The mean run: the lowest and highest seed at every round of ``curve`` (the band of Fig. 3).
    low: pd.Series | None = None
    high: pd.Series | None = None


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


def _run_record(metrics_path: Path) -> dict[str, Any]:
    """What the run.json beside a metrics file says about the partition's kind and the test-set size."""
    summary = metrics_path.with_name("run.json")
    try:
        run = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    record = {}
    partition = run.get("partition")
    if isinstance(partition, dict) and partition.get("kind"):
        record["kind"] = str(partition["kind"])
    if isinstance(run.get("test_rows"), int):
        record["test_rows"] = run["test_rows"]
    return record


# Every column the report reads, in one type per column whatever a file's version wrote (string
# or int32 ids, ...): the files' tables then concatenate without conversion, and numbers are
# checked once, on all rows (see load_metrics).
# Bytes the clients sent and received in a round (absent before fedsweep counted them: no curve).
BYTES_COLUMNS = ("upload_bytes", "download_bytes")
_COLUMN_TYPES = {
    **{c: pa.string() for c in ("dataset", "model", "protocol", "algorithm", "partition")},
    **{c: pa.float64() for c in ("clients", "seed", "round", "test_accuracy", "chance_accuracy", "test_rows",
                                 *DRIFT_COLUMNS, *BYTES_COLUMNS)},
}


def _read_one(path: Path) -> pa.Table:
    """One metrics file's columns that the report uses, with the defaults of earlier versions,
    plus ``kind`` (from run.json) and ``source``."""
    try:
        table = pq.ParquetFile(path).read()  # ParquetFile: far less overhead per file than read_table
    except Exception as exc:  # pyarrow raises several types for a truncated or foreign file
        raise FedsweepError(f"report: cannot read {str(path)!r} as Parquet ({str(exc).splitlines()[0]})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FedsweepError(f"report: {str(path)!r} lacks column {missing[0]!r} (has {table.column_names})")
    rows = table.num_rows
    if rows == 0:
        raise FedsweepError(f"report: {str(path)!r} has no rows")
    record = _run_record(path)
    defaults = {"algorithm": DEFAULT_ALGORITHM, "partition": DEFAULT_PARTITION,
                "test_rows": record.get("test_rows")}  # other absent columns (drift): null
    columns = {}
    for name, kind in _COLUMN_TYPES.items():
        if name in table.column_names:
            try:
                columns[name] = table.column(name).cast(kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                what = "non-integer values" if name in ("clients", "seed", "round") else "values that are not numbers"
                raise FedsweepError(f"report: {str(path)!r} column {name!r} has {what}") from None
        else:
            columns[name] = pa.array([defaults.get(name)] * rows, kind)
    columns["kind"] = pa.array([record.get("kind", DEFAULT_KIND)] * rows, pa.string())
    columns["source"] = pa.array([str(path)] * rows, pa.string())
    return pa.table(columns)


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    """All rows of the metrics files, checked: required columns, integer ids, accuracies in [0, 1]."""
    # Threads: pyarrow reads without the GIL, and a grid has thousands of small files.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        tables = list(pool.map(_read_one, paths))
    metrics = pa.concat_tables(tables).to_pandas()

    # Checked on all rows at once (fast for thousands of files); the message names the first bad file.
    def first_source(bad: pd.Series) -> str:
        return str(metrics.loc[bad.to_numpy().nonzero()[0][0], "source"])

    for col in ("clients", "seed", "round"):
        values = pd.to_numeric(metrics[col], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            raise FedsweepError(f"report: {first_source(bad)!r} column {col!r} has non-integer values")
        metrics[col] = values.astype("int64")
    bad = (metrics["clients"] < 1) | (metrics["round"] < 0)
    if bad.any():
        raise FedsweepError(f"report: {first_source(bad)!r} has clients < 1 or round < 0")
    for col in ("test_accuracy", "chance_accuracy"):
        values = pd.to_numeric(metrics[col], errors="coerce").astype("float64")
        bad = (values < 0) | (values > 1)
        if bad.any():
            raise FedsweepError(f"report: {first_source(bad)!r} column {col!r} has values outside [0, 1]")
        metrics[col] = values
    metrics["test_rows"] = pd.to_numeric(metrics["test_rows"], errors="coerce").astype("float64")
    for col in ("dataset", "model", "protocol", "algorithm", "partition", "kind"):
        metrics[col] = metrics[col].astype(str)

    duplicated = metrics[metrics.duplicated(CELL_KEYS + ["round"], keep=False)]
    if not duplicated.empty:
        row = duplicated.iloc[0]
        sources = sorted(duplicated.loc[(duplicated[CELL_KEYS] == row[CELL_KEYS]).all(axis=1), "source"].unique())
        raise FedsweepError(
            f"report: cell dataset={row['dataset']!r} model={row['model']!r} algorithm={row['algorithm']!r} "
            f"partition={row['partition']!r} K={row['clients']} seed={row['seed']} "
            f"has round {row['round']} more than once (in {sources})"
        )
    kinds = metrics.groupby("partition")["kind"].unique()
    mixed_kind = kinds[kinds.map(len) > 1]
    if len(mixed_kind):
        raise FedsweepError(f"report: partition {mixed_kind.index[0]!r} has cells of kinds "
                            f"{sorted(mixed_kind.iloc[0])}; give each split its own name")
    metrics["model_spec"] = metrics["model"]  # the name the config's grid uses
    mixed = metrics.groupby("model")["protocol"].transform("nunique") > 1
    metrics.loc[mixed, "model"] = metrics.loc[mixed, "model"] + " [" + metrics.loc[mixed, "protocol"] + "]"
    return metrics


def _name_list(config: dict, key: str, path: str) -> list | None:
    """A grid key of the report config: a list, or a mapping whose keys are the names."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, list):
        return value
    raise FedsweepError(f"report: config {key}={value!r} in {path!r} must be a list or a mapping")


def read_report_config(path: str, datasets: list[str]) -> tuple[dict[str, DatasetSettings], float]:
    """Budget and second threshold of each data set in ``datasets`` (config order first), and the target fraction."""
    settings, fraction, _ = read_report_grid(path, datasets)
    return settings, fraction


def read_report_grid(path: str, datasets: list[str]) -> tuple[dict[str, DatasetSettings], float, Grid]:
    """:func:`read_report_config` and the grid of cells the config asks for."""
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
    partitions = config.get("partitions")
    kinds = {}
    if isinstance(partitions, dict):  # the workflow's named partitions: their kind, or per_client makes it
        for name, entry in partitions.items():
            entry = entry if isinstance(entry, dict) else {}
            kinds[str(name)] = str(entry.get("kind") or ("per_client" if entry.get("per_client") else DEFAULT_KIND))
    cells = config.get("cells")
    if cells is not None:
        if not isinstance(cells, list) or not all(isinstance(c, list) and len(c) == 6 for c in cells):
            raise FedsweepError(f"report: config cells in {path!r} must be a list of [dataset, model, algorithm, "
                                f"partition, clients, seed]")
        cells = [(str(d), str(m), str(a), str(p), int(k), int(s)) for d, m, a, p, k, s in cells]
    grid = Grid(
        datasets=[str(d) for d in table],
        models=_strs(_name_list(config, "models", path)),
        algorithms=_strs(_name_list(config, "algorithms", path)),
        partitions=_strs(_name_list(config, "partitions", path)),
        clients=_ints(_name_list(config, "clients", path), "clients", path),
        seeds=_ints(_name_list(config, "seeds", path), "seeds", path),
        kinds=kinds,
        cells=cells,
    )
    return settings, float(fraction), grid


def _strs(values: list | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


def _ints(values: list | None, key: str, path: str) -> list[int] | None:
    if values is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise FedsweepError(f"report: config {key}={values!r} in {path!r} must be a list of integers")
    return list(values)


# ----------------------------------------------------------------------------- analysis


def seed_summary(values) -> dict[str, Any]:
    """Mean, standard deviation (n - 1) and 95% t-interval of the mean of per-seed values.

    One seed: no spread and no interval (NaN), and the ``ci95`` note says "1 seed", so a table
    never shows a made-up interval; none: "no seeds".
    """
    values = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype="float64")
    n = len(values)
    out = {"n": n, "mean": math.nan, "std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan,
           "ci95_half_width": math.nan, "ci95": ""}
    if n == 0:
        return {**out, "ci95": "no seeds"}
    out["mean"] = float(values.mean())
    if n == 1:
        return {**out, "ci95": "1 seed"}
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {**out, "std": std, "ci95_low": out["mean"] - half, "ci95_high": out["mean"] + half,
            "ci95_half_width": half}


def binomial_se(accuracy: float, test_rows: float) -> float:
    """The test-set sampling error of an accuracy measured on ``test_rows`` rows: sqrt(p (1 - p) / n)."""
    if not test_rows or pd.isna(test_rows) or pd.isna(accuracy):
        return math.nan
    return math.sqrt(accuracy * (1 - accuracy) / test_rows)


def learning_runs(metrics: pd.DataFrame) -> list[Run]:
    """Per cell: one Run per seed, then the seed-averaged Run."""
    cell_keys = ["model", "algorithm", "partition", "dataset", "clients"]
    per_seed_rows = metrics.groupby(cell_keys + ["seed"], sort=True)
    last_rounds, chances = per_seed_rows["round"].max(), per_seed_rows["chance_accuracy"].mean()
    cells = metrics.groupby(cell_keys, sort=True).agg(kind=("kind", "first"), test_rows=("test_rows", "max"))
    # One sort and numpy slices rather than a pandas group per seed: thousands of cells stay fast.
    evaluated = metrics.loc[metrics["test_accuracy"].notna(), cell_keys + ["seed", "round", "test_accuracy"]]
    evaluated = evaluated.sort_values(cell_keys + ["seed", "round"], kind="stable")
    positions = evaluated.groupby(cell_keys + ["seed"], sort=False).indices
    all_rounds, all_accuracy = evaluated["round"].to_numpy(), evaluated["test_accuracy"].to_numpy()
    no_points = np.empty(0, dtype=np.intp)

    runs: list[Run] = []
    for cell, seed_keys in itertools.groupby(last_rounds.index, key=lambda key: key[:-1]):
        model, algorithm, partition, dataset, clients = cell
        kind, test_rows = cells.loc[cell, "kind"], float(cells.loc[cell, "test_rows"])
        per_seed = []
        for key in seed_keys:
            at = positions.get(key, no_points)
            per_seed.append(Run(
                model, dataset, int(clients), int(key[-1]), 1, float(chances[key]), int(last_rounds[key]),
                pd.Series(all_accuracy[at], index=all_rounds[at]), algorithm, partition, kind, test_rows,
            ))
        # Average only rounds every seed evaluated, so no point of the mean curve mixes seed subsets.
        common = per_seed[0].curve.index.to_numpy()
        for run in per_seed[1:]:
            common = np.intersect1d(common, run.curve.index.to_numpy())
        by_seed = np.stack([run.curve.to_numpy()[np.searchsorted(run.curve.index.to_numpy(), common)]
                            for run in per_seed])
        runs += per_seed + [Run(
            model, dataset, int(clients), MEAN_SEED, len(per_seed),
            float(np.mean([r.chance_accuracy for r in per_seed])), min(r.last_round for r in per_seed),
            pd.Series(by_seed.mean(axis=0), index=common), algorithm, partition, kind, test_rows,
            low=pd.Series(by_seed.min(axis=0), index=common), high=pd.Series(by_seed.max(axis=0), index=common),
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


def _order(values, preferred: str | None = None, config: list[str] | None = None) -> list[str]:
    """Names in config order, else the preferred (reference) one first, then by name."""
    values = list(dict.fromkeys(values))
    rank = {name: i for i, name in enumerate(config or [])}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v != preferred, v))


def analyse(runs: list[Run], settings: dict[str, DatasetSettings], target_fraction: float
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables (accuracy at the budget, rounds to target), sorted by data set (config order),
    model, algorithm, partition, K, seed (the mean row last)."""
    at_budget = {id(run): _accuracy_at(run, settings[run.dataset].budget) for run in runs}
    baselines = {(r.model, r.algorithm, r.partition, r.dataset, r.seed): (at_budget[id(r)][1], r.kind)
                 for r in runs if r.clients == 1}
    dataset_order = {name: i for i, name in enumerate(settings)}
    partition_order = {name: i for i, name in enumerate(_order({r.partition for r in runs}, DEFAULT_PARTITION))}
    # The seeds' accuracies at the budget, for the spread on the mean rows.
    seed_accuracy: dict[tuple, list[float]] = {}
    seed_rounds: dict[tuple, list[int | None]] = {}
    for run in runs:
        if run.seed != MEAN_SEED:
            seed_accuracy.setdefault(_cell(run), []).append(at_budget[id(run)][1])

    def sort_key(run: Run):
        return (dataset_order[run.dataset], run.model, _algorithm_key(run.algorithm), partition_order[run.partition],
                run.clients, run.seed == MEAN_SEED, run.seed if run.seed != MEAN_SEED else 0)

    def baseline_of(run: Run) -> tuple[str | None, str | None, float]:
        # Same partition first; another's K=1 only where it is iid of the same kind.
        for algorithm in dict.fromkeys((run.algorithm, DEFAULT_ALGORITHM)):
            for partition in dict.fromkeys((run.partition, DEFAULT_PARTITION)):
                found = baselines.get((run.model, algorithm, partition, run.dataset, run.seed))
                if found is not None and found[1] == run.kind:
                    return algorithm, partition, found[0]
        return None, None, math.nan

    budget_rows, target_rows = [], []
    for run in sorted(runs, key=sort_key):
        limits = settings[run.dataset]
        round_used, accuracy = at_budget[id(run)]
        baseline_algorithm, baseline_partition, baseline = baseline_of(run)
        ids = {"model": run.model, "algorithm": run.algorithm, "partition": run.partition, "kind": run.kind,
               "dataset": run.dataset, "clients": run.clients, "seed": run.seed}
        spread = (seed_summary(seed_accuracy[_cell(run)]) if run.seed == MEAN_SEED
                  else {"std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "ci95": ""})
        budget_rows.append({
            **ids, "budget": limits.budget, "round_used": round_used, "accuracy": accuracy,
            "accuracy_std": spread["std"], "ci95_low": spread["ci95_low"], "ci95_high": spread["ci95_high"],
            "ci95": spread["ci95"], "binomial_se": binomial_se(accuracy, run.test_rows),
            "test_rows": run.test_rows,
            "baseline_accuracy": baseline, "ratio": accuracy / baseline if baseline > 0 else math.nan,
            "baseline_algorithm": baseline_algorithm, "baseline_partition": baseline_partition,
            "chance_accuracy": run.chance_accuracy, "seeds": run.seeds,
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
        if run.seed != MEAN_SEED:
            seed_rounds.setdefault(_cell(run), []).append(rounds)
            reached_rounds = [rounds] if rounds is not None else []
        else:  # seed rows come first in the sort: the cell's seeds are all in by now
            reached_rounds = [r for r in seed_rounds.get(_cell(run), []) if r is not None]
        target_rows.append({
            **ids, "target_accuracy": target, "rounds": rounds, "reached": rounds is not None,
            "searched_until": searched_until, "status": status, "seeds": run.seeds,
            "seeds_reached": len(reached_rounds),
            "rounds_min": min(reached_rounds) if reached_rounds else None,
            "rounds_max": max(reached_rounds) if reached_rounds else None,
        })
    accuracy_table = pd.DataFrame(budget_rows).astype({"round_used": "Int64", "seed": object})
    rounds_table = pd.DataFrame(target_rows).astype({"rounds": "Int64", "reached": bool, "seed": object,
                                                     "rounds_min": "Int64", "rounds_max": "Int64"})
    return accuracy_table, rounds_table


def _cell(run: Run) -> tuple:
    return (run.model, run.algorithm, run.partition, run.dataset, run.clients)


def grid_status(frame: pd.DataFrame, grid: Grid, accuracy: pd.DataFrame, rounds: pd.DataFrame
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(seeds table: one row per cell of the grid, then per cell the metrics hold beyond it, with its
    status and the statistics over its seeds; missing table: one row per (cell, seed) of the grid
    without metrics)."""
    found = frame.drop_duplicates(["dataset", "model_spec", "algorithm", "partition", "clients", "seed"])
    kinds = {**dict(zip(found["partition"], found["kind"])), **grid.kinds}
    label_of = dict(zip(found["model_spec"], found["model"]))  # config model name -> the tables' label
    datasets = grid.datasets + [d for d in _order(found["dataset"]) if d not in grid.datasets]
    models = [label_of.get(m, m) for m in grid.models] if grid.models else _order(found["model"])
    algorithms = grid.algorithms or _order(found["algorithm"], DEFAULT_ALGORITHM)
    partitions = grid.partitions or _order(found["partition"], DEFAULT_PARTITION)
    clients = grid.clients or sorted(found["clients"].unique().tolist())
    seeds = grid.seeds or sorted(found["seed"].unique().tolist())
    cell_keys = ["dataset", "model", "algorithm", "partition", "clients"]

    seed_rows = accuracy[accuracy["seed"] != MEAN_SEED]
    accuracy_of = dict(iter(seed_rows.groupby(cell_keys, sort=False)))
    rounds_of = dict(iter(rounds[rounds["seed"] != MEAN_SEED].groupby(cell_keys, sort=False)))
    if grid.cells is not None:  # the config's own list: its cells, each with its seeds
        seeds_of: dict[tuple, list[int]] = {}
        for d, m, a, p, k, seed in grid.cells:
            seeds_of.setdefault((d, label_of.get(m, m), a, p, k), []).append(seed)
        expected = list(seeds_of)
    else:
        expected = list(itertools.product(datasets, models, algorithms, partitions, clients))
        seeds_of = dict.fromkeys(expected, seeds)
    in_grid = set(expected)
    beyond = sorted((key for key in accuracy_of if key not in in_grid), key=str)

    cells, missing = [], []
    for key in expected + beyond:
        acc = accuracy_of.get(key)
        got = [] if acc is None else sorted(int(s) for s in acc["seed"])
        wanted = seeds_of[key] if key in in_grid else got
        absent = [s for s in wanted if s not in got]
        missing += [dict(zip(cell_keys, key), kind=kinds.get(key[3], ""), seed=s, status="missing") for s in absent]
        if not got:
            status = "missing"
        elif absent:
            status = f"partial: {len(got)} of {len(wanted)} seeds (missing seed {', '.join(map(str, absent))})"
        else:
            status = "complete"
        accuracy_stats = seed_summary([] if acc is None else acc["accuracy"])
        ratio_stats = seed_summary([] if acc is None else acc["ratio"])
        reached = [] if key not in rounds_of else [int(r) for r in rounds_of[key]["rounds"].dropna()]
        test_rows = math.nan if acc is None or acc["test_rows"].isna().all() else float(acc["test_rows"].max())
        cells.append({
            "dataset": key[0], "model": key[1], "algorithm": key[2], "partition": key[3], "kind": kinds.get(key[3], ""),
            "clients": key[4], "status": status, "seeds": len(got), "seeds_expected": len(wanted),
            "seed_list": " ".join(map(str, got)),
            "accuracy_mean": accuracy_stats["mean"], "accuracy_std": accuracy_stats["std"],
            "ci95_low": accuracy_stats["ci95_low"], "ci95_high": accuracy_stats["ci95_high"],
            "ci95_half_width": accuracy_stats["ci95_half_width"], "ci95": accuracy_stats["ci95"],
            "binomial_se": binomial_se(accuracy_stats["mean"], test_rows), "test_rows": test_rows,
            "ratio_mean": ratio_stats["mean"], "ratio_std": ratio_stats["std"],
            "seeds_reached": len(reached), "rounds_min": min(reached) if reached else None,
            "rounds_median": float(np.median(reached)) if reached else math.nan,
            "rounds_max": max(reached) if reached else None,
        })
    columns = ["dataset", "model", "algorithm", "partition", "kind", "clients", "seed", "status"]
    seeds_table = pd.DataFrame(cells).astype({"rounds_min": "Int64", "rounds_max": "Int64"})
    return seeds_table, pd.DataFrame(missing, columns=columns)


# ----------------------------------------------------------------------------- figures


def _style():
    # A local rc context: no global pyplot state or backend is touched (Figure renders with Agg).
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
          "legend.frameon": False, "axes.titlesize": 8.5, "axes.labelsize": 8,
          "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7.5}
    return matplotlib.rc_context(rc)


def _panel_grid(n_panels: int, ncols: int, panel_height: float) -> tuple[Figure, list]:
    """``n_panels`` axes, ``ncols`` to a row, wrapping onto as many rows as they need."""
    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(FIGURE_WIDTH_IN, panel_height * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


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


def reference_partition(partitions) -> str:
    """The partition Figs. 1-3 show: iid (the paper's) if present, else the first."""
    partitions = list(partitions)
    return DEFAULT_PARTITION if DEFAULT_PARTITION in partitions else partitions[0]


def _facets(settings: dict[str, DatasetSettings], table: pd.DataFrame, panel_height: float,
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
        fig, axes = _panel_grid(len(datasets), len(datasets), panel_height)
        return fig, [(ax, dataset, None, None) for ax, dataset in zip(axes, datasets)]
    models = sorted(table["model"].unique())
    algorithms = sorted(table["algorithm"].unique(), key=_algorithm_key) if by_algorithm is False else [None]
    keys = [(dataset, model, algorithm) for model in models for algorithm in algorithms for dataset in datasets]
    ncols = min(len(datasets), MAX_COLUMNS)
    if math.ceil(len(keys) / ncols) > 6:  # few data sets, many panels: wrap rather than a tall column
        ncols = MAX_COLUMNS
    fig, axes = _panel_grid(len(keys), ncols, panel_height)
    return fig, [(ax, *key) for ax, key in zip(axes, keys)]


def _in_panel(table: pd.DataFrame, dataset: str, model: str | None, algorithm: str | None) -> pd.DataFrame:
    keep = table["dataset"] == dataset
    if model is not None:
        keep &= table["model"] == model
    if algorithm is not None:
        keep &= table["algorithm"] == algorithm
    return table[keep]


def _panel_title(dataset: str, limits: DatasetSettings, model: str | None, algorithm: str | None) -> str:
    """The data set and budget, and on a second line the model and algorithm the panel is of
    (long hub names would otherwise run into the next panel's title)."""
    below = " / ".join(x for x in (model, algorithm) if x)
    return f"{dataset} (budget {limits.budget})" + (f"\n{below}" if below else "")


def _model_styles(models: list[str]) -> dict[str, dict]:
    colors = sns.color_palette("colorblind", len(models))
    return {m: {"color": colors[i], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(models)}


def _dodge(keys: list[str], step: float = 0.06) -> dict[str, float]:
    """A small shift per line in log2 K, so error bars and seed points of lines at one K do not overlap."""
    return {key: 2 ** (step * (i - (len(keys) - 1) / 2)) for i, key in enumerate(keys)}


def _legend(fig: Figure, handles: list) -> None:
    # Below the panels, outside them (never over data); as many columns as fit the figure width
    # (about 110 characters at this font size), so long names wrap into rows.
    if not handles:
        return
    longest = max(len(h.get_label()) for h in handles)
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), 110 // (longest + 6))))


def _suptitle(fig: Figure, title: str, missing: int = 0, expected: int = 0) -> None:
    if missing:
        title += f"\n{missing} of {expected} cell seeds of the grid missing (tables/missing_cells.csv)"
    fig.suptitle(title, fontsize=9.5)


def _no_runs(ax) -> None:
    ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.4")


def _save(fig: Figure, figures_dir: str, name: str) -> dict[str, Path]:
    outputs = {}
    for ext, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
        path = Path(figures_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:  # the temp name ends in .tmp: say the format
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=metadata)
        outputs[f"{name}_{ext}"] = path
        # The constrained layout is solved by the first save; keep it for the second rather than
        # solving it again (a third of the report's time on a large grid).
        fig.set_layout_engine(None)
    return outputs


def _accuracy_lines(ax, rows: pd.DataFrame, seeds: pd.DataFrame, style: dict, budget: int, shift: float,
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


def _accuracy_handles(styles: dict[str, dict], any_partial: bool, any_spread: bool, linestyles=None) -> list:
    handles = [Line2D([], [], lw=1.4, ms=4.5, label=m, ls=(linestyles or {}).get(m, "-"), **s)
               for m, s in styles.items()]
    handles.append(Line2D([], [], ls="--", lw=1, color="0.35", label="chance"))
    if any_partial:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", color="0.3", label="run ended before budget"))
    if any_spread:
        handles.append(Line2D([], [], ls="-", marker="|", lw=1.1, color="0.3", label="95% t-interval over seeds"))
        handles.append(Line2D([], [], ls="none", marker="o", ms=3, alpha=0.45, color="0.3", label="single seeds"))
    return handles


def _finish_accuracy_panel(ax, panel: pd.DataFrame, title: str, **title_style) -> None:
    """Chance line, log2 K axis, title and y label of an accuracy-at-budget panel (or "no runs")."""
    if panel.empty:
        _no_runs(ax)
        return
    ax.axhline(panel["chance_accuracy"].mean(), ls="--", lw=1, color="0.35")
    _log2_clients_axis(ax, sorted(panel["clients"].unique()))
    ax.set_title(title, **title_style)
    ax.set_ylabel("test accuracy at budget" if ax.get_subplotspec().is_first_col() else "")


def plot_accuracy_vs_clients(accuracy: pd.DataFrame, settings: dict[str, DatasetSettings],
                             styles: dict[str, dict], title_note: str = "", missing: tuple[int, int] = (0, 0)
                             ) -> Figure:
    fig, panels = _facets(settings, accuracy, 2.4)
    series = "algorithm" if accuracy["algorithm"].nunique() > 1 else "model"
    means = accuracy[accuracy["seed"] == MEAN_SEED]
    seeds = accuracy[accuracy["seed"] != MEAN_SEED]
    shift = _dodge(list(styles))
    any_partial = any_spread = False
    for ax, dataset, panel_model, _ in panels:
        limits = settings[dataset]
        panel = _in_panel(means, dataset, panel_model, None)
        panel_seeds = _in_panel(seeds, dataset, panel_model, None)
        for key, rows in panel.groupby(series, sort=True):
            partial, spread = _accuracy_lines(ax, rows, panel_seeds[panel_seeds[series] == key], styles[key],
                                              limits.budget, shift[key])
            any_partial |= partial
            any_spread |= spread
        _finish_accuracy_panel(ax, panel, _panel_title(dataset, limits, panel_model, None))
    _legend(fig, _accuracy_handles(styles, any_partial, any_spread))
    _suptitle(fig, "Test accuracy at the round budget vs number of clients" + title_note, *missing)
    return fig


def plot_accuracy_by_partition(accuracy: pd.DataFrame, settings: dict[str, DatasetSettings],
                               partitions: list[str], missing: tuple[int, int] = (0, 0)) -> Figure:
    """Accuracy at the budget vs K, one line per partition; a panel per (data set, model[, algorithm])."""
    fig, panels = _facets(settings, accuracy, 2.2, by_algorithm=False)
    kinds = dict(zip(accuracy["partition"], accuracy["kind"]))
    labels = {p: f"{p} (per client)" if kinds.get(p) == "per_client" else p for p in partitions}
    styles = dict(zip(partitions, _model_styles(partitions).values()))
    # Weak scaling (per_client: the data grows with K) dashed, so it is never read as the paper's setting.
    linestyles = {p: "--" if kinds.get(p) == "per_client" else "-" for p in partitions}
    means = accuracy[accuracy["seed"] == MEAN_SEED]
    seeds = accuracy[accuracy["seed"] != MEAN_SEED]
    shift = _dodge(partitions)
    several_algorithms = accuracy["algorithm"].nunique() > 1
    any_partial = any_spread = False
    for ax, dataset, panel_model, panel_algorithm in panels:
        limits = settings[dataset]
        panel = _in_panel(means, dataset, panel_model, panel_algorithm)
        panel_seeds = _in_panel(seeds, dataset, panel_model, panel_algorithm)
        for partition, rows in panel.groupby("partition", sort=False):
            partial, spread = _accuracy_lines(ax, rows, panel_seeds[panel_seeds["partition"] == partition],
                                              styles[partition], limits.budget, shift[partition],
                                              linestyles[partition])
            any_partial |= partial
            any_spread |= spread
        _finish_accuracy_panel(ax, panel, _panel_title(dataset, limits, panel_model,
                                                        panel_algorithm if several_algorithms else None), fontsize=7)
    handles = _accuracy_handles({labels[p]: styles[p] for p in partitions}, any_partial, any_spread,
                                {labels[p]: linestyles[p] for p in partitions})
    _legend(fig, handles)
    _suptitle(fig, "Test accuracy at the round budget vs number of clients, by partition", *missing)
    return fig


def plot_rounds_to_target(rounds: pd.DataFrame, settings: dict[str, DatasetSettings], target_fraction: float,
                          styles: dict[str, dict], title_note: str = "", missing: tuple[int, int] = (0, 0)
                          ) -> Figure:
    fig, panels = _facets(settings, rounds, 2.4)
    series = "algorithm" if rounds["algorithm"].nunique() > 1 else "model"
    means = rounds[rounds["seed"] == MEAN_SEED]
    seeds = rounds[(rounds["seed"] != MEAN_SEED) & rounds["reached"]]
    # Failures of several lines at one K would overlap at the top: shift each a little in log2 K.
    step = min(0.25, 0.8 / len(styles))
    dodge = {m: 2 ** (step * (i - (len(styles) - 1) / 2)) for i, m in enumerate(styles)}
    any_failure = any_spread = False
    for ax, dataset, panel_model, _ in panels:
        limits = settings[dataset]
        panel = _in_panel(means, dataset, panel_model, None)
        if panel.empty:
            _no_runs(ax)
            continue
        panel_seeds = _in_panel(seeds, dataset, panel_model, None)
        no_baseline = sorted(panel.loc[panel["target_accuracy"].isna(), series].unique())
        for model, rows in panel.dropna(subset=["target_accuracy"]).groupby(series, sort=True):
            style = styles[model]
            rows = rows.sort_values("clients")
            ax.plot(rows["clients"], rows["rounds"].astype("float64"), lw=1.4, ms=4.5, **style)
            # The spread over seeds: the range of the seeds that reached the target, and each seed.
            several = rows[rows["seeds"] > 1]
            if len(several):
                spread = several.dropna(subset=["rounds_min"])
                if len(spread):
                    any_spread = True
                    ax.vlines(spread["clients"] * dodge[model], spread["rounds_min"].astype("float64"),
                              spread["rounds_max"].astype("float64"), color=style["color"], lw=1.1)
                    mine = panel_seeds[panel_seeds[series] == model]
                    ax.scatter(mine["clients"] * dodge[model], mine["rounds"].astype("float64"), s=7, alpha=0.45,
                               color=style["color"], lw=0)
            failed = rows[~rows["reached"]]
            if len(failed):
                any_failure = True
                ax.plot(failed["clients"] * dodge[model], failed["searched_until"], ls="none", marker="x",
                        ms=6, mew=1.8, color=style["color"])
        ax.axhline(limits.second_threshold, ls=":", lw=1, color="0.35")
        ax.set_ylim(0, max(limits.second_threshold, panel["searched_until"].max()) * 1.1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _log2_clients_axis(ax, sorted(panel["clients"].unique()))
        ax.set_title(_panel_title(dataset, limits, panel_model, None))
        ax.set_ylabel(f"rounds to {target_fraction:.0%} of K=1" if ax.get_subplotspec().is_first_col() else "")
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
    _legend(fig, handles)
    _suptitle(fig, f"Rounds to reach {target_fraction:.0%} of the K=1 accuracy at the budget" + title_note, *missing)
    return fig


def _line_label(run: Run, several_algorithms: bool) -> str:
    return f"{run.model} / {run.algorithm}" if several_algorithms else run.model


def _clients_colors(all_clients: list[int]) -> dict[int, Any]:
    # A sequential palette without its near-white end, so K=1 stays visible on white.
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    return dict(zip(all_clients, cmap(np.linspace(0.25, 0.9, len(all_clients)))))


def _share_y_by_dataset(panels: list[tuple[Any, str]]) -> None:
    """Panels of one data set share their y axis (their accuracies are comparable)."""
    first: dict[str, Any] = {}
    for ax, dataset in panels:
        if dataset in first:
            ax.sharey(first[dataset])
        else:
            first[dataset] = ax


def plot_accuracy_per_round(runs: list[Run], settings: dict[str, DatasetSettings], models: list[str],
                            title_note: str = "", missing: tuple[int, int] = (0, 0)) -> Figure:
    """A panel per (data set, model), or per (data set, model / algorithm) with several algorithms,
    wrapping after 4 columns; a line per K (the seed mean) with a band from the lowest to the
    highest seed."""
    means = [r for r in runs if r.seed == MEAN_SEED]
    several = len({r.algorithm for r in runs}) > 1
    if several:
        labels = {(r.model, _algorithm_key(r.algorithm)): _line_label(r, True) for r in means}
        models = [labels[key] for key in sorted(labels)]
    all_clients = sorted({r.clients for r in means})
    colors = _clients_colors(all_clients)
    # Up to 4 panels a row, one row per data set; more wrap onto 3 a row, each data set starting
    # a new row (its last row padded with empty slots).
    ncols = len(models) if len(models) <= 4 else MAX_COLUMNS
    per_dataset = math.ceil(len(models) / ncols) * ncols
    slots = [(dataset, models[i] if i < len(models) else None) for dataset in settings for i in range(per_dataset)]
    fig, slot_axes = _panel_grid(len(slots), ncols, 1.9)
    for ax, (_, model) in zip(slot_axes, slots):
        ax.set_visible(model is not None)
    keys = [(dataset, model) for dataset, model in slots if model is not None]
    axes = [ax for ax, (_, model) in zip(slot_axes, slots) if model is not None]
    _share_y_by_dataset([(ax, dataset) for ax, (dataset, _) in zip(axes, keys)])
    last_row = {dataset: max(i for i, (d, m) in enumerate(slots) if d == dataset and m is not None) // ncols
                for dataset in settings}
    any_band = False
    for ax, (dataset, model) in zip(axes, keys):
        limits = settings[dataset]
        row, column = divmod(slots.index((dataset, model)), ncols)
        cell_runs = sorted((r for r in means if r.dataset == dataset and _line_label(r, several) == model),
                           key=lambda r: r.clients)
        for run in cell_runs:
            ax.plot(run.curve.index, run.curve.to_numpy(), lw=1.1, color=colors[run.clients])
            if run.seeds > 1 and run.low is not None:
                any_band = True
                ax.fill_between(run.curve.index, run.low.to_numpy(), run.high.to_numpy(), color=colors[run.clients],
                                alpha=0.18, lw=0)
        if cell_runs:
            ax.axhline(np.mean([r.chance_accuracy for r in cell_runs]), ls="--", lw=1, color="0.35")
        else:
            _no_runs(ax)
        ax.axvline(limits.budget, ls=":", lw=1, color="0.5")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.set_title(f"{dataset}\n{model}", fontsize=7)
        ax.set_xlabel("round" if row == last_row[dataset] else "")
        ax.set_ylabel("test accuracy" if column == 0 else "")
    handles = [Line2D([], [], lw=1.5, color=colors[k], label=f"K={k}") for k in all_clients]
    if any_band:
        handles.append(Patch(color="0.5", alpha=0.3, lw=0, label="lowest to highest seed"))
    handles += [Line2D([], [], ls="--", lw=1, color="0.35", label="chance"),
                Line2D([], [], ls=":", lw=1, color="0.5", label="budget")]
    _legend(fig, handles)
    _suptitle(fig, "Test accuracy per round (mean over seeds)" + title_note, *missing)
    return fig


DRIFT_PANELS = (("pseudo_gradient_norm", "pseudo-gradient norm"), ("client_drift_rms", "client drift (rms)"))


def plot_drift(frame: pd.DataFrame, settings: dict[str, DatasetSettings], title_note: str = "") -> Figure:
    """A row per (data set, model), a column per measure (the pseudo-gradient norm, the clients'
    rms drift) against the round, a line per K (mean over seeds); ``frame`` holds the rows of one
    algorithm and partition."""
    columns = [c for c, _ in DRIFT_PANELS]
    per_round = (frame[frame["round"] >= 1]
                 .groupby(["dataset", "model", "clients", "round"], sort=True)[columns].mean().reset_index())
    models = sorted(frame["model"].unique())
    pairs = [(dataset, model) for dataset in settings for model in models]
    all_clients = sorted(frame["clients"].unique())
    colors = _clients_colors(all_clients)
    fig, axes = _panel_grid(len(pairs) * len(DRIFT_PANELS), len(DRIFT_PANELS), 1.45)
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
    _legend(fig, handles)
    _suptitle(fig, "Pseudo-gradient norm and client drift per round (mean over seeds)" + title_note)
    return fig


def communicated_bytes(frame: pd.DataFrame) -> pd.DataFrame:
    """Per cell and evaluated round: the test accuracy and the bytes sent both ways up to that round.
    A round's bytes are the same every round (the sampled clients are a fixed number), so the
    total after round r is r times a trained round's; this holds with eval_every > 1 too."""
    rows = frame.dropna(subset=list(BYTES_COLUMNS))
    trained = rows[rows["round"] >= 1]
    if trained.empty:
        return pd.DataFrame(columns=["dataset", "model", "clients", "round", "test_accuracy", "bytes"])
    per_round = (trained["upload_bytes"] + trained["download_bytes"]).groupby(trained["source"]).first()
    out = frame[frame["source"].isin(per_round.index)][["dataset", "model", "clients", "seed", "round",
                                                         "test_accuracy", "source"]].copy()
    out["bytes"] = out["round"] * out["source"].map(per_round)
    return out.groupby(["dataset", "model", "clients", "round"], sort=True)[["test_accuracy", "bytes"]].mean() \
        .reset_index()


def plot_accuracy_vs_bytes(frame: pd.DataFrame, settings: dict[str, DatasetSettings], title_note: str = "") -> Figure:
    """A panel per data set: test accuracy against the bytes communicated so far (uploads and
    downloads of every client, log scale), a line per (model, K), the mean over seeds; ``frame``
    holds one algorithm and partition. LoRA cells send a fraction of a full model's bytes."""
    curves = communicated_bytes(frame)
    models = sorted(frame["model"].unique())
    styles = _model_styles(models)
    all_clients = sorted(frame["clients"].unique())
    widths = {k: 0.8 + 1.2 * i / max(len(all_clients) - 1, 1) for i, k in enumerate(all_clients)}
    datasets = list(settings)
    fig, axes = _panel_grid(len(datasets), min(len(datasets), MAX_COLUMNS), 2.4)
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
    _legend(fig, handles)
    _suptitle(fig, "Test accuracy against communicated bytes (mean over seeds)" + title_note)
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


TABLES = ("accuracy_at_budget", "rounds_to_target", "seeds", "missing_cells")
FIGURES = ("accuracy_vs_clients", "rounds_to_target", "accuracy_per_round", "drift",
           "accuracy_vs_clients_by_partition", "accuracy_vs_bytes")


def make_report(metrics: list[str], config: str, tables_dir: str, figures_dir: str) -> dict[str, Path]:
    """Write the tables (``TABLES``, CSV) to ``tables_dir`` with ``datasets.json``, and the figures
    (``FIGURES``, PNG and PDF) to ``figures_dir``; return output name -> path. Every file is
    written atomically."""
    frame = load_metrics(find_metrics(metrics))
    settings, target_fraction, grid = read_report_grid(config, sorted(frame["dataset"].unique()))
    runs = learning_runs(frame)
    accuracy, rounds = analyse(runs, settings, target_fraction)
    seeds, missing = grid_status(frame, grid, accuracy, rounds)

    outputs: dict[str, Path] = {"datasets": Path(tables_dir) / "datasets.json"}
    write_json(outputs["datasets"], dataset_labels(frame))
    for name, table in zip(TABLES, (accuracy, rounds, seeds, missing)):
        path = Path(tables_dir) / f"{name}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        outputs[name] = path

    partitions = _order(frame["partition"], DEFAULT_PARTITION, grid.partitions)
    shown = reference_partition(partitions)
    note = f" (partition {shown})" if len(partitions) > 1 else ""
    ref_accuracy = accuracy[accuracy["partition"] == shown]
    ref_rounds = rounds[rounds["partition"] == shown]
    ref_runs = [r for r in runs if r.partition == shown]
    algorithms = sorted(frame["algorithm"].unique(), key=_algorithm_key)
    shown_algorithms = sorted(frame.loc[frame["partition"] == shown, "algorithm"].unique(), key=_algorithm_key)
    drift_algorithm = shown_algorithms[0]  # fedavg where it ran, else the first by name
    drift_shows = ([f"algorithm {drift_algorithm}"] if len(algorithms) > 1 else []) + (
        [f"partition {shown}"] if len(partitions) > 1 else [])
    drift_note = f" ({', '.join(drift_shows)})" if drift_shows else ""
    models = sorted(frame["model"].unique())
    ref_algorithms = sorted(ref_accuracy["algorithm"].unique(), key=_algorithm_key)
    styles = _model_styles(ref_algorithms if len(ref_algorithms) > 1 else models)
    gaps = (len(missing), int(seeds["seeds_expected"].sum()))  # (missing, expected) seeds of grid cells
    with _style():
        for name, plot in (
            ("accuracy_vs_clients", lambda: plot_accuracy_vs_clients(ref_accuracy, settings, styles, note, gaps)),
            ("rounds_to_target",
             lambda: plot_rounds_to_target(ref_rounds, settings, target_fraction, styles, note, gaps)),
            ("accuracy_per_round", lambda: plot_accuracy_per_round(ref_runs, settings, models, note, gaps)),
            ("drift", lambda: plot_drift(frame[(frame["partition"] == shown) & (frame["algorithm"] == drift_algorithm)],
                                         settings, drift_note)),
            ("accuracy_vs_clients_by_partition",
             lambda: plot_accuracy_by_partition(accuracy, settings, partitions, gaps)),
            ("accuracy_vs_bytes",
             lambda: plot_accuracy_vs_bytes(frame[(frame["partition"] == shown)
                                                  & (frame["algorithm"] == drift_algorithm)], settings, drift_note)),
        ):
            outputs.update(_save(plot(), figures_dir, name))
    return outputs
