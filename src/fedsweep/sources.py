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
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import FedsweepError
from .dataspec import (READ_ERRORS, SPLITS, SYNTHETIC_KEYS, check_file, file_format, first_line, json_array, local_path,
                       open_text, parquet_error, read_errors, text_columns)
from .io import sha256_file


@dataclasses.dataclass
class Split:
    """One split as read, with what an error message needs to point into it."""

    where: str  # the absolute file path, or the hub split
    frame: pd.DataFrame
    # The 1-based line where a 0-based row starts, for text files; None where lines mean nothing.
    line_of: Callable[[int], int | None] = lambda row: None
    # False where every cell was read as a string (CSV, TSV): a column's type shows only in its values.
    typed: bool = True

    def __post_init__(self) -> None:
        # Rows are positions: a Parquet file may carry a pandas index of other values.
        self.frame = self.frame.reset_index(drop=True)

    def at(self, row: int) -> str:
        line = self.line_of(row)
        return f"row {row}" if line is None else f"row {row} (line {line})"

    def error(self, message: str, row: int | None = None) -> FedsweepError:
        return FedsweepError(f"{self.where}: {message}" if row is None else f"{self.where}: {self.at(row)}: {message}")


def _check_unique_columns(path: Path, names: list[str], where: str = "") -> None:
    """A column named twice: pandas would rename or refuse the second, and read the first alone."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FedsweepError(f"{path}: {where}column {name!r} appears twice; give each column its own name")
        seen.add(name)


def _read_parquet(path: Path) -> Split:
    try:
        _check_unique_columns(path, pq.read_schema(path).names)
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


def _csv_records(path: Path, sep: str, encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(line it starts on, fields) of each record pandas reads, header included. The csv module
    counts lines through quoted newlines; blank and whitespace-only lines are skipped, as pandas
    skips them (a quoted empty field, csv's [''], is a row to both)."""
    with open_text(path, encoding) as f:
        reader = csv.reader(f, delimiter=sep)
        start = 1
        for record in reader:
            if record and not (len(record) == 1 and record[0] != "" and not record[0].strip()):
                yield start, record
            start = reader.line_num + 1


def _first_record(
    path: Path, sep: str, encoding: str, wanted: Callable[[list[str]], bool],
) -> tuple[int, list[str]] | None:
    """The first record ``wanted`` accepts, or None (also where the csv module cannot read the file:
    these scans only sharpen a message, or look for a fault pandas let through)."""
    try:
        return next(((line, record) for line, record in _csv_records(path, sep, encoding) if wanted(record)), None)
    except (csv.Error, UnicodeDecodeError, *READ_ERRORS):
        return None


def _csv_line_finder(path: Path, sep: str, header: bool, encoding: str) -> Callable[[int], int | None]:
    """row -> the line it starts on. Only error messages ask, so loading pays nothing."""

    def line_of(row: int) -> int | None:
        rows = itertools.count(-1 if header else 0)  # the header is row -1
        found = _first_record(path, sep, encoding, lambda record: next(rows) == row)
        return found[0] if found else None

    return line_of


def _check_csv_shape(path: Path, frame: pd.DataFrame, sep: str, encoding: str, header: bool) -> None:
    """Rows wider or narrower than the header, which pandas reads without a word: a wider first row
    makes its extra leading fields the index (which Split drops), a narrower row gets empty fields."""
    width = frame.shape[1]
    against = f"the header has {width}" if header else f"columns names {width}"
    if not isinstance(frame.index, pd.RangeIndex):
        wide = _first_record(path, sep, encoding, lambda record: len(record) > width)
        where, fields = (f"line {wide[0]}", len(wide[1])) if wide else ("the first row", width + frame.index.nlevels)
        raise FedsweepError(f"{path}: {where} has {fields} fields, {against}")
    # A short row leaves at least its last field empty: only then is the file scanned.
    if width > 1 and (frame.iloc[:, -1] == "").any():
        short = _first_record(path, sep, encoding, lambda record: len(record) < width)
        if short:
            fields = len(short[1])
            raise FedsweepError(f"{path}: line {short[0]} has {fields} field{'s' * (fields != 1)}, {against}")


def _check_no_header_line(split: Split, spec: dict[str, Any]) -> None:
    """With header: false, a first row that names the columns is a header read as data (and a class)."""
    first = split.frame.iloc[0].map(lambda v: str(v).strip().casefold())
    named = [*text_columns(spec), spec.get("label", "label")]
    if list(first) == [c.casefold() for c in spec["columns"]] or all(
            column in first.index and first[column] == column.casefold() for column in named):
        raise split.error(f"holds the column names ({', '.join(split.frame.iloc[0])}): the file has a header line; "
                          "use header: true (or remove header: false)", 0)


def _read_csv(path: Path, fmt: str, spec: dict[str, Any], encoding: str) -> Split:
    header = spec.get("header", True)
    sep = "\t" if fmt == ".tsv" else ","
    try:
        # Every cell as a string: the labels' type is decided from all of them together (in
        # fedsweep.labels), not by pandas per column, where one empty cell turned integer labels into strings.
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False,
                            encoding=encoding)
    except pd.errors.EmptyDataError:
        raise FedsweepError(f"{path}: has no header and no rows (only blank lines)") from None
    except pd.errors.ParserError as exc:
        raise FedsweepError(f"{path}: {_csv_problem(exc, sep)}") from None
    if header:
        names = _first_record(path, sep, encoding, lambda record: True)
        if names:  # pandas renamed a repeated name (label, label.1)
            _check_unique_columns(path, names[1], f"line {names[0]}: the header's ")
    elif frame.shape[1] != len(spec["columns"]):
        # Given as pandas ``names``, too few columns would silently become the index.
        raise FedsweepError(f"{path}: rows have {frame.shape[1]} fields but columns names {len(spec['columns'])}")
    _check_csv_shape(path, frame, sep, encoding, header)
    split = Split(str(path), frame, _csv_line_finder(path, sep, header, encoding), typed=False)
    if not header:
        split.frame.columns = spec["columns"]
        if len(split.frame):
            _check_no_header_line(split, spec)
    return split


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
