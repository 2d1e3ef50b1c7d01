"""The report's inputs: the metrics files (with the run.json beside each) and the report config."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .. import FedsweepError
from ..client_eval import CLIENT_COLUMNS, HOLDOUT_COLUMNS  # per-client accuracy summaries; null before them

REQUIRED_COLUMNS = ("dataset", "model", "clients", "seed", "protocol", "round", "test_accuracy", "chance_accuracy")
# Per-round drift measures (train.METRIC_COLUMNS); NaN where a file predates them.
DRIFT_COLUMNS = ("pseudo_gradient_norm", "client_drift_max", "client_drift_rms", "update_cosine")
# Bytes the clients sent and received in a round (absent before fedsweep counted them: no curve).
BYTES_COLUMNS = ("upload_bytes", "download_bytes")
CELL_KEYS = ["dataset", "model", "algorithm", "partition", "protocol", "clients", "seed"]
DEFAULT_ALGORITHM = "fedavg"  # metrics without an algorithm column: fedsweep before algorithms
DEFAULT_PARTITION = "iid"  # metrics without a partition column: fedsweep before partition schemes
DEFAULT_KIND = "fixed_total"  # no run.json record of the kind: every split before per_client was one
DEFAULT_TARGET_FRACTION = 0.9

# Every column the report reads, in one type per column whatever a file's version wrote (string
# or int32 ids, ...): the files' tables then concatenate without conversion, and numbers are
# checked once, on all rows (see load_metrics).
_COLUMN_TYPES = {
    **{c: pa.string() for c in ("dataset", "model", "protocol", "algorithm", "partition")},
    **{c: pa.float64() for c in ("clients", "seed", "round", "test_accuracy", "chance_accuracy", "test_rows",
                                 *DRIFT_COLUMNS, *BYTES_COLUMNS, *CLIENT_COLUMNS,
                                 *HOLDOUT_COLUMNS)},
    "diverged": pa.bool_(),  # from the round whose training loss exploded on (absent: never)
}


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


# ----------------------------------------------------------------------------- metrics


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
    _check_values(metrics)
    _check_cells(metrics)
    metrics["model_spec"] = metrics["model"]  # the name the config's grid uses
    mixed = metrics.groupby("model")["protocol"].transform("nunique") > 1
    metrics.loc[mixed, "model"] = metrics.loc[mixed, "model"] + " [" + metrics.loc[mixed, "protocol"] + "]"
    return metrics


def _check_values(metrics: pd.DataFrame) -> None:
    """Integer ids, accuracies in [0, 1], string names: checked and converted in place, on all rows
    at once (fast for thousands of files); a message names the first bad file."""

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


def _check_cells(metrics: pd.DataFrame) -> None:
    """No round of a cell twice; no partition of two kinds."""
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


# ----------------------------------------------------------------------------- report config


def read_report_config(path: str, datasets: list[str]) -> tuple[dict[str, DatasetSettings], float]:
    """Budget and second threshold of each data set in ``datasets`` (config order first), and the target fraction."""
    settings, fraction, _ = read_report_grid(path, datasets)
    return settings, fraction


def read_report_grid(path: str, datasets: list[str]) -> tuple[dict[str, DatasetSettings], float, Grid]:
    """:func:`read_report_config` and the grid of cells the config asks for."""
    config = _read_yaml(path)
    fraction = config.get("target_fraction", DEFAULT_TARGET_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise FedsweepError(f"report: config target_fraction={fraction!r} must be a number in (0, 1]")
    table = config.get("datasets")
    if not isinstance(table, dict):
        raise FedsweepError(f"report: --config {str(path)!r} has no 'datasets' mapping")
    settings = _dataset_settings(table, datasets)
    return settings, float(fraction), _grid(config, table, path)


def _read_yaml(path: str) -> dict:
    config_path = Path(path)
    if not config_path.is_file():
        raise FedsweepError(f"report: --config {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise FedsweepError(f"report: --config {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(config, dict):
        raise FedsweepError(f"report: --config {str(path)!r} is not a mapping")
    return config


def _dataset_settings(table: dict, datasets: list[str]) -> dict[str, DatasetSettings]:
    """The config's ``datasets`` entry of each data set of the metrics: config order, then the rest by name."""
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
    return settings


def _grid(config: dict, table: dict, path: str) -> Grid:
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
    return Grid(
        datasets=[str(d) for d in table],
        models=_strs(_name_list(config, "models", path)),
        algorithms=_strs(_name_list(config, "algorithms", path)),
        partitions=_strs(_name_list(config, "partitions", path)),
        clients=_ints(_name_list(config, "clients", path), "clients", path),
        seeds=_ints(_name_list(config, "seeds", path), "seeds", path),
        kinds=kinds,
        cells=cells,
    )


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


def _strs(values: list | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


def _ints(values: list | None, key: str, path: str) -> list[int] | None:
    if values is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise FedsweepError(f"report: config {key}={values!r} in {path!r} must be a list of integers")
    return list(values)
