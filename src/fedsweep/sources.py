"""Read a data set's two splits from where its spec says they are: local files (Parquet, CSV/TSV,
JSON Lines or a JSON array, optionally compressed), the Hugging Face hub or the synthetic generator.

Each loader in :data:`LOADERS` returns the train and test :class:`Split` as read (no column is
checked yet: :mod:`fedsweep.data` does that), the class names the source knows (a hub
``ClassLabel``, the synthetic topics) or None, and the provenance recorded in ``meta.json``. Errors
name the file (or hub split) and, where it helps, the row and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from . import FedsweepError
from .dataspec import (SPLITS, SYNTHETIC_KEYS, check_file, file_format, first_line, json_array, local_path, open_text,
                       parquet_error, read_errors)
from .io import sha256_file


@dataclasses.dataclass
class Split:
    """One split as read, with what an error message needs to point into it."""

    where: str  # the absolute file path, or the hub split
    frame: pd.DataFrame
    # The 1-based line where a 0-based row starts, for text files; None where lines mean nothing.
    line_of: Callable[[int], int | None] = lambda row: None

    def __post_init__(self) -> None:
        # Rows are positions: a Parquet file may carry a pandas index of other values.
        self.frame = self.frame.reset_index(drop=True)

    def at(self, row: int) -> str:
        line = self.line_of(row)
        return f"row {row}" if line is None else f"row {row} (line {line})"

    def error(self, message: str, row: int | None = None) -> FedsweepError:
        return FedsweepError(f"{self.where}: {message}" if row is None else f"{self.where}: {self.at(row)}: {message}")


def _read_parquet(path: Path) -> Split:
    try:
        return Split(str(path), pd.read_parquet(path))
    except (pa.ArrowException, OSError) as exc:
        raise parquet_error(path, exc) from None


def _csv_problem(exc: pd.errors.ParserError, sep: str) -> str:
    message = first_line(exc).removeprefix("Error tokenizing data. C error: ")
    ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if ragged:
        expected, line, saw = ragged.groups()
        return f"line {line} has {saw} fields, expected {expected} (quote fields that contain {sep!r})"
    return f"not valid CSV ({message})"


def _csv_line_finder(path: Path, sep: str, header: bool, encoding: str) -> Callable[[int], int | None]:
    """row -> the line it starts on. The file is read again with the csv module, which counts
    lines through quoted newlines; only error messages ask, so loading pays nothing."""

    def line_of(row: int) -> int | None:
        try:
            with open_text(path, encoding) as f:
                reader = csv.reader(f, delimiter=sep)
                index, start = (-1 if header else 0), 1
                for record in reader:
                    if record:  # pandas skips blank lines
                        if index == row:
                            return start
                        index += 1
                    start = reader.line_num + 1
        except (csv.Error, OSError, UnicodeDecodeError):
            pass  # the row number alone still locates it
        return None

    return line_of


def _read_csv(path: Path, fmt: str, spec: dict[str, Any], encoding: str) -> Split:
    header = spec.get("header", True)
    sep = "\t" if fmt == ".tsv" else ","
    try:
        # Every cell as a string: the labels' type is decided from all of them together (below),
        # not by pandas per column, where one empty cell turned integer labels into strings.
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False,
                            encoding=encoding)
    except pd.errors.EmptyDataError:
        raise FedsweepError(f"{path}: has no header and no rows (only blank lines)") from None
    except pd.errors.ParserError as exc:
        raise FedsweepError(f"{path}: {_csv_problem(exc, sep)}") from None
    if not header:
        # Given as pandas ``names``, too few columns would silently become the index.
        columns = spec["columns"]
        if frame.shape[1] != len(columns):
            raise FedsweepError(f"{path}: rows have {frame.shape[1]} fields but columns names {len(columns)}")
        frame.columns = columns
    return Split(str(path), frame, _csv_line_finder(path, sep, header, encoding))


def _read_json_lines(path: Path, fmt: str, encoding: str) -> Split:
    records: list[dict] = []
    lines: list[int] = []
    with open_text(path, encoding) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not records and line.lstrip().startswith("["):
                raise FedsweepError(
                    f"{path}: holds a JSON array, but {fmt} files are read as JSON Lines (one object per line) "
                    "unless lines: false"
                )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedsweepError(f"{path}: line {number}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise FedsweepError(
                    f"{path}: line {number}: a JSON Lines row must be an object, got {type(record).__name__}"
                )
            records.append(record)
            lines.append(number)
    return Split(str(path), pd.DataFrame.from_records(records), lambda row: lines[row])


def _read_local_file(path: Path, split: str, spec: dict[str, Any]) -> Split:
    check_file(path, split)
    fmt = file_format(path)
    encoding = spec.get("encoding", "utf-8")
    with read_errors(path, split, encoding):
        if fmt == ".parquet":
            return _read_parquet(path)
        if fmt in (".csv", ".tsv"):
            return _read_csv(path, fmt, spec, encoding)
        if spec.get("lines", True):
            return _read_json_lines(path, fmt, encoding)
        return Split(str(path), pd.DataFrame.from_records(json_array(path, encoding)))


def _load_local(spec: dict[str, Any], base_dir: str | os.PathLike | None) -> tuple[Split, Split, None, dict]:
    paths = {split: local_path(spec[split], base_dir) for split in SPLITS}
    train, test = (_read_local_file(paths[split], split, spec) for split in SPLITS)
    provenance = {
        **spec, **{split: str(path) for split, path in paths.items()},
        "files": {split: {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
                  for split, path in paths.items()},
    }
    return train, test, None, provenance


def _hub_where(spec: dict[str, Any], split_name: str) -> str:
    config = f" config {spec['hub_config']!r}" if spec.get("hub_config") else ""
    return f"hub dataset {spec['hub_id']!r}{config} split {split_name!r}"


def _hub_commit(hub_id: str, revision: str | None) -> str | None:
    """The commit a hub revision resolves to: a commit itself, the hub's answer, or the local cache's
    ref; None when none of them knows (offline with nothing cached)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, constants

    try:
        return HfApi().dataset_info(hub_id, revision=revision).sha
    except Exception:  # offline, unreachable or private: the cache may still know
        ref = Path(constants.HF_HUB_CACHE) / f"datasets--{hub_id.replace('/', '--')}" / "refs" / (revision or "main")
        return ref.read_text().strip() if ref.is_file() else None


def _load_hub(spec: dict[str, Any], base_dir: str | os.PathLike | None) -> tuple[Split, Split, list[str] | None, dict]:
    import datasets  # imported here: slow to import and unused by every other path

    # Passed only when given: the library's default revision otherwise.
    revision = {"revision": spec["revision"]} if "revision" in spec else {}
    split_names = {split: spec.get(f"{split}_split", split) for split in SPLITS}
    splits, class_names = [], None
    for split_name in split_names.values():
        where = _hub_where(spec, split_name)
        try:
            ds = datasets.load_dataset(spec["hub_id"], spec.get("hub_config"), split=split_name, **revision)
        except Exception as exc:  # the hub library's many failures (not found, offline, bad config)
            raise FedsweepError(f"{where}: cannot load ({type(exc).__name__}: {first_line(exc)})") from None
        feature = ds.features.get(spec.get("label", "label"))
        if class_names is None and isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        splits.append(Split(where, ds.to_pandas()))
    provenance = {
        **spec, "hub_config": spec.get("hub_config"), "revision": spec.get("revision"),
        "resolved_revision": _hub_commit(spec["hub_id"], spec.get("revision")),
        **{f"{split}_split": name for split, name in split_names.items()},
    }
    return splits[0], splits[1], class_names, provenance


def _load_synthetic(spec: dict[str, Any], base_dir: str | os.PathLike | None) -> tuple[Split, Split, list[str], dict]:
    from .synthetic import generate

    kwargs = {k: spec[k] for k in SYNTHETIC_KEYS if k in spec}
    train, test = generate(**kwargs)
    class_names = [f"topic{c}" for c in range(kwargs.get("num_classes", 4))]
    return Split("synthetic train", train), Split("synthetic test", test), class_names, dict(spec)


LOADERS = {"hub": _load_hub, "local": _load_local, "synthetic": _load_synthetic}
