"""Load a data set from the Hugging Face hub, local files or the synthetic generator into
normalised Parquet (``text`` str, ``label`` int64 0..C-1) plus a JSON of metadata.

A data set is described by a *spec* (a dict, usually from the workflow config). Each source
accepts the keys in :data:`SPEC_KEYS`; any other key is an error.

- ``source: hub``: ``hub_id``, optional ``hub_config``, ``revision`` (branch, tag or commit),
  ``train_split``, ``test_split``. A data set named like a preset (imdb, yelp_review_full,
  ag_news) whose spec says ``source: hub`` or no source starts from the preset; a local or
  synthetic spec of that name never does.
- ``source: local``: ``train`` and ``test`` files (relative paths resolve against the base
  folder, by default the working directory): .parquet, or text files .csv, .tsv, .jsonl, .json,
  optionally compressed (.gz, .bz2, .xz) and read with ``encoding`` (default utf-8). CSV/TSV files
  without a header need ``header: false`` and ``columns: [...]``. JSON files are read as JSON Lines
  (one object per line) unless ``lines: false`` (one array of objects).
- ``source: synthetic``: the arguments of :func:`fedsweep.synthetic.generate`.

Common keys: ``text`` (a column or a list of columns joined by ``text_separator``, default " "),
``label`` (column), ``label_offset`` (subtracted from integer labels, e.g. 1 for 1-based class
indices), ``class_names``, ``max_train`` / ``max_test`` (a seeded random subset, for quick runs)
and ``seed``.

Labels are integers (numbers, or strings that all look like integers: numeric order) or text
(ids in sorted order, or in the order of ``class_names``). Nothing ambiguous is guessed: a missing
or empty label or text, a text column of numbers, integers mixed with text, labels that differ only
in case or whitespace, a single class, a label only the test file has all stop with one line
naming the file (or hub split), the row (from 0 after the header, as pandas counts) and, in text
files, the line (from 1, as editors count).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import dataclasses
import gzip
import json
import lzma
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import FedsweepError, __version__
from .io import read_json, sha256_file, write_json, write_parquet

# Defaults for the paper's data sets as published on the hub. A user's hub spec overrides any key.
HUB_PRESETS: dict[str, dict[str, Any]] = {
    "imdb": {
        "source": "hub", "hub_id": "stanfordnlp/imdb", "train_split": "train", "test_split": "test",
        "text": "text", "label": "label",
    },
    "yelp_review_full": {
        "source": "hub", "hub_id": "Yelp/yelp_review_full", "train_split": "train",
        "test_split": "test", "text": "text", "label": "label",
    },
    # The hub copy has title and description already joined into ``text``. The paper's code used
    # the description alone, from the Kaggle CSV ("Class Index", "Title", "Description"): see the
    # ``ag_news_description`` example in config/config.yaml for a local copy of that file.
    "ag_news": {
        "source": "hub", "hub_id": "fancyzhx/ag_news", "train_split": "train", "test_split": "test",
        "text": "text", "label": "label",
    },
}

SOURCES = ("hub", "local", "synthetic")
SPLITS = ("train", "test")
SYNTHETIC_KEYS = (
    "num_classes", "train_size", "test_size", "difficulty", "label_noise", "min_words",
    "max_words", "topic_words", "seed",
)
# Keys every source accepts.
COMMON_KEYS = ("source", "class_names", "max_train", "max_test", "seed")
# Keys of the sources that read text and label columns (the generator makes its own).
COLUMN_KEYS = ("text", "text_separator", "label", "label_offset")
# Every key each source accepts (the workflow's config schema mirrors these).
SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "hub": COMMON_KEYS + COLUMN_KEYS + ("hub_id", "hub_config", "revision", "train_split", "test_split"),
    "local": COMMON_KEYS + COLUMN_KEYS + ("train", "test", "header", "columns", "lines", "encoding"),
    "synthetic": COMMON_KEYS + tuple(k for k in SYNTHETIC_KEYS if k not in COMMON_KEYS),
}

# Above this share of test texts also in the training set, `fedsweep prepare` warns.
DUPLICATE_WARNING_SHARE = 0.01

COMPRESSION_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
TEXT_FORMATS = (".csv", ".tsv", ".jsonl", ".json")
INTEGER_TEXT = r"\s*[+-]?\d+\s*"


# ----------------------------------------------------------------------------- specs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_encoding(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(codecs.lookup(value))
    except LookupError:
        return False


# What each key's value must be (None means "unset" and is dropped first); the synthetic
# generator checks its own arguments.
VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_train": (lambda v: _is_int(v) and v >= 1, "must be a positive integer"),
    "max_test": (lambda v: _is_int(v) and v >= 1, "must be a positive integer"),
    "seed": (_is_int, "must be an integer"),
    "label_offset": (_is_int, "must be an integer"),
    "class_names": (lambda v: _is_names(v) and len(v) > 0, "must be a list of names"),
    "text": (lambda v: isinstance(v, str) or (_is_names(v) and len(v) > 0), "must be a column or a list of columns"),
    "text_separator": (lambda v: isinstance(v, str), "must be a string"),
    "label": (lambda v: isinstance(v, str), "must be a column name"),
    "train": (lambda v: isinstance(v, str) and v != "", "must be a file path"),
    "test": (lambda v: isinstance(v, str) and v != "", "must be a file path"),
    "header": (lambda v: isinstance(v, bool), "must be true or false"),
    "lines": (lambda v: isinstance(v, bool), "must be true or false"),
    "columns": (lambda v: _is_names(v) and len(v) > 0, "must be a list of column names"),
    "encoding": (_is_encoding, "is not a known text encoding (e.g. utf-8, latin-1)"),
    "hub_id": (lambda v: isinstance(v, str), "must be a string"),
    "hub_config": (lambda v: isinstance(v, str), "must be a string"),
    "revision": (lambda v: isinstance(v, str), "must be a branch, tag or commit"),
    "train_split": (lambda v: isinstance(v, str), "must be a split name"),
    "test_split": (lambda v: isinstance(v, str), "must be a split name"),
}


def resolve_spec(name: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    """The spec (over the preset of the same name, for a hub spec), checked; reads no file."""
    if spec is not None and not isinstance(spec, dict):
        raise FedsweepError(f"dataset {name!r}: the spec must be a mapping, got {type(spec).__name__}")
    given = {k: v for k, v in (spec or {}).items() if v is not None}
    # A preset describes the hub copy: merged into a local or synthetic spec it would record a
    # hub_id and splits that were never read.
    preset = HUB_PRESETS.get(name, {}) if given.get("source", "hub") == "hub" else {}
    merged = {**preset, **given}
    source = merged.get("source")
    if source not in SOURCES:
        if not merged:
            raise FedsweepError(
                f"dataset {name!r}: unknown data set (no spec given and no preset; presets: "
                f"{', '.join(sorted(HUB_PRESETS))})"
            )
        raise FedsweepError(f"dataset {name!r}: source={source!r} is not one of {', '.join(SOURCES)}")
    unknown = sorted(map(str, set(merged) - set(SPEC_KEYS[source])))
    if unknown:
        raise FedsweepError(f"dataset {name!r}: unknown {source} key(s) {unknown}")
    _check_required_keys(name, merged)
    _check_values(name, merged)
    return merged


def _check_required_keys(name: str, spec: dict[str, Any]) -> None:
    if spec["source"] == "hub" and not spec.get("hub_id"):
        raise FedsweepError(f"dataset {name!r}: source=hub needs hub_id")
    if spec["source"] == "local":
        for split in SPLITS:
            if not spec.get(split):
                raise FedsweepError(f"dataset {name!r}: source=local needs a {split} file path")
        if spec.get("header") is False and not spec.get("columns"):
            raise FedsweepError(f"dataset {name!r}: header=false needs columns: [...]")


def _check_values(name: str, spec: dict[str, Any]) -> None:
    for key, value in spec.items():
        if key in VALUE_CHECKS:
            valid, requirement = VALUE_CHECKS[key]
            if not valid(value):
                raise FedsweepError(f"dataset {name!r}: {key}={value!r} {requirement}")
    names = spec.get("class_names", [])
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FedsweepError(f"dataset {name!r}: class_names has duplicates: {', '.join(map(repr, duplicates))}")


def _text_columns(spec: dict[str, Any]) -> list[str]:
    text = spec.get("text", "text")
    return [text] if isinstance(text, str) else list(text)


# ----------------------------------------------------------------------------- reading


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


def _local_path(path: str, base_dir: str | os.PathLike | None) -> Path:
    """Absolute, with ~ expanded and a relative path taken from base_dir (default: the working directory)."""
    return Path(os.path.abspath(Path(base_dir or os.getcwd()) / os.path.expanduser(path)))


def _file_format(path: Path) -> str:
    """The format suffix of a data file (.parquet, .csv, ...), looking through a compression suffix."""
    suffixes = path.suffixes
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSION_OPENERS
    fmt = (suffixes[:-1] if compressed else suffixes)[-1:] or [""]
    if fmt[0] in TEXT_FORMATS or (fmt[0] == ".parquet" and not compressed):
        return fmt[0]
    raise FedsweepError(
        f"{path}: unknown format {''.join(suffixes[-2:])!r} (expected .parquet, .csv, .tsv, .jsonl or .json; "
        "text files may end in .gz, .bz2 or .xz)"
    )


def _open_binary(path: Path):
    return COMPRESSION_OPENERS.get(path.suffix, open)(path, "rb")


def _open_text(path: Path, encoding: str):
    # newline="": the csv module needs it, and JSON ignores a line's trailing "\r".
    return COMPRESSION_OPENERS.get(path.suffix, open)(path, "rt", encoding=encoding, newline="")


def _check_file(path: Path, split: str) -> None:
    if not path.exists():
        raise FedsweepError(f"{path}: {split} file does not exist")
    if not path.is_file():
        raise FedsweepError(f"{path}: {split} file is not a file")
    if path.stat().st_size == 0:
        raise FedsweepError(f"{path}: {split} file is empty (0 bytes)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _parquet_error(path: Path, exc: BaseException) -> FedsweepError:
    reason = re.sub(r"^Could not open Parquet input source '.*?': ", "", _first_line(exc))
    if "magic bytes not found" in reason:
        reason = "no Parquet footer: truncated, or not Parquet at all"
    return FedsweepError(f"{path}: not a readable Parquet file ({reason})")


def _decode_error(path: Path, encoding: str) -> FedsweepError:
    """Which line does not decode: the file is read again, on this error path only."""
    advice = "set the spec's encoding (e.g. encoding: latin-1)"
    with _open_binary(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                return FedsweepError(
                    f"{path}: line {number}: not valid {encoding} (byte 0x{line[exc.start]:02x} at column "
                    f"{exc.start + 1}); {advice}"
                )
    return FedsweepError(f"{path}: not valid {encoding}; {advice}")


def _read_parquet(path: Path) -> Split:
    try:
        return Split(str(path), pd.read_parquet(path))
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, exc) from None


def _csv_problem(exc: pd.errors.ParserError, sep: str) -> str:
    message = _first_line(exc).removeprefix("Error tokenizing data. C error: ")
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
            with _open_text(path, encoding) as f:
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
    with _open_text(path, encoding) as f:
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


def _read_json_array(path: Path, encoding: str) -> Split:
    try:
        with _open_text(path, encoding) as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise FedsweepError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise FedsweepError(f"{path}: with lines: false the file must hold one JSON array of objects (one per row)")
    return Split(str(path), pd.DataFrame.from_records(records))


def _read_local_file(path: Path, split: str, spec: dict[str, Any]) -> Split:
    _check_file(path, split)
    fmt = _file_format(path)
    encoding = spec.get("encoding", "utf-8")
    try:
        if fmt == ".parquet":
            return _read_parquet(path)
        if fmt in (".csv", ".tsv"):
            return _read_csv(path, fmt, spec, encoding)
        if spec.get("lines", True):
            return _read_json_lines(path, fmt, encoding)
        return _read_json_array(path, encoding)
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None
    except (OSError, EOFError, lzma.LZMAError) as exc:  # unreadable, or a broken compressed stream
        raise FedsweepError(f"{path}: cannot read {split} file ({_first_line(exc)})") from None


def _load_local(spec: dict[str, Any], base_dir: str | os.PathLike | None) -> tuple[Split, Split, None, dict]:
    paths = {split: _local_path(spec[split], base_dir) for split in SPLITS}
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
            raise FedsweepError(f"{where}: cannot load ({type(exc).__name__}: {_first_line(exc)})") from None
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


# ----------------------------------------------------------------------------- texts


def _text_column(split: Split, column: str) -> pd.Series:
    """A text column, checked to hold a string in every row."""
    values = split.frame[column]
    if not (isinstance(values.dtype, pd.StringDtype) or values.dtype == object):
        raise split.error(f"text column {column!r} holds {values.dtype} values, not strings")
    missing = values.isna()
    if missing.any():
        raise split.error(f"text column {column!r} is missing", int(missing.idxmax()))
    if values.dtype == object:  # a JSON column may mix strings with numbers or lists
        not_text = ~values.map(lambda v: isinstance(v, str)).astype(bool)
        if not_text.any():
            row = int(not_text.idxmax())
            value = values[row]
            raise split.error(f"text column {column!r} holds {type(value).__name__} {value!r}, not a string", row)
    return values


def _normalise(split: Split, spec: dict[str, Any]) -> Split:
    """The split as two columns: ``text`` (joined, checked) and the file's ``label`` values."""
    frame = split.frame
    if len(frame) == 0:
        raise split.error("has no rows")
    text_columns = _text_columns(spec)
    label_column = spec.get("label", "label")
    for column in [*text_columns, label_column]:
        if column not in frame.columns:
            raise split.error(f"no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    parts = [_text_column(split, column) for column in text_columns]
    text = parts[0]
    for part in parts[1:]:
        text = text + spec.get("text_separator", " ") + part
    empty = text.str.strip().str.len() == 0
    if empty.any():
        raise split.error(f"empty text ({int(empty.sum())} empty in all)", int(empty.idxmax()))
    return dataclasses.replace(split, frame=pd.DataFrame({"text": text, "label": frame[label_column]}))


# ----------------------------------------------------------------------------- labels


def _shown(value: Any) -> str:
    """A label as a message shows it: text quoted, numbers plain (not np.int64(3))."""
    return repr(value) if isinstance(value, str) else str(int(value))


def _file_labels(split: Split, column: str) -> pd.Series:
    """The split's labels as int64 (numbers, or strings that all look like integers) or as str
    (text); a missing, empty, fractional or mixed label is an error naming its row."""
    values = split.frame["label"]
    missing = values.isna()
    if missing.any():
        raise split.error(f"label (column {column!r}) is missing", int(missing.idxmax()))
    if pd.api.types.is_bool_dtype(values):
        return values.astype("int64")
    if pd.api.types.is_numeric_dtype(values):
        fractional = values != np.floor(values)
        if fractional.any():
            row = int(fractional.idxmax())
            raise split.error(f"label {float(values[row])!r} (column {column!r}) is not an integer", row)
        return values.astype("int64")
    if values.dtype == object:  # a JSON column may mix strings with numbers or lists
        other = ~values.map(lambda v: isinstance(v, str) or _is_int(v)).astype(bool)
        if other.any():
            row = int(other.idxmax())
            raise split.error(f"label {values[row]!r} (column {column!r}) is neither an integer nor a string", row)
    text = values.astype(str)
    empty = text.str.strip() == ""
    if empty.any():
        raise split.error(f"label (column {column!r}) is empty", int(empty.idxmax()))
    integer = text.str.fullmatch(INTEGER_TEXT).astype(bool)
    if integer.all():
        return text.str.strip().astype("int64")
    if integer.any():
        first_integer, first_text = int(integer.idxmax()), int((~integer).idxmax())
        raise split.error(
            f"labels mix integers and text: {text[first_integer]!r} at {split.at(first_integer)}, "
            f"{text[first_text]!r} at {split.at(first_text)}"
        )
    return text


def _is_integer(labels: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(labels)


def _check_same_kind(train: Split, train_labels: pd.Series, test: Split, test_labels: pd.Series) -> None:
    if _is_integer(train_labels) != _is_integer(test_labels):
        def kind(labels: pd.Series) -> str:
            return f"{'integers' if _is_integer(labels) else 'text'} (e.g. {_shown(labels.iloc[0])})"

        raise test.error(f"labels are {kind(test_labels)} but {train.where} has {kind(train_labels)}")


def _one_based_hint(labels: pd.Series, offset: int) -> str:
    """The likely fix when integer labels run 1..C: class indices counted from 1."""
    if offset == 0 and labels.min() == 1 and labels.max() == labels.nunique():
        return f"; labels run 1..{labels.max()}: if they count from 1, set label_offset: 1"
    return ""


def _integer_classes(
    splits: list[Split], labels: list[pd.Series], spec: dict[str, Any], source_names: list[str] | None,
) -> tuple[list[pd.Series], int, list[str] | None, str]:
    """(ids per split, number of classes, class names if given, a hint for errors) of integer labels."""
    offset = spec.get("label_offset", 0)
    hint = _one_based_hint(pd.concat(labels), offset)
    ids = [split_labels - offset for split_labels in labels]
    names = spec.get("class_names") or source_names
    num_classes = len(names) if names else int(max(split_ids.max() for split_ids in ids)) + 1
    for split, split_labels, split_ids in zip(splits, labels, ids):
        outside = (split_ids < 0) | (split_ids >= num_classes)
        if outside.any():
            row = int(outside.idxmax())
            after = f" after label_offset={offset}" if offset else ""
            given = f" ({len(names)} class names)" if names else ""
            raise split.error(
                f"label {_shown(split_labels[row])}{after} is outside 0..{num_classes - 1}{given}{hint}", row
            )
    return ids, num_classes, list(names) if names else None, hint


def _check_label_variants(splits: list[Split], labels: list[pd.Series]) -> None:
    """Labels equal up to case and whitespace are one class typed two ways: stop rather than train both."""
    seen: dict[str, str] = {}
    for split, split_labels in zip(splits, labels):
        for label in split_labels.unique():
            first = seen.setdefault(" ".join(label.split()).casefold(), label)
            if first != label:
                row = int((split_labels == label).idxmax())
                raise split.error(f"labels {first!r} and {label!r} differ only in case/whitespace", row)


def _text_classes(
    splits: list[Split], labels: list[pd.Series], spec: dict[str, Any], column: str,
) -> tuple[list[pd.Series], list[str]]:
    """(ids per split, class names) of text labels: sorted, or in the order of class_names."""
    if "label_offset" in spec:
        raise splits[0].error(
            f"label_offset={spec['label_offset']} applies to integer labels, but column {column!r} holds text "
            f"(e.g. {labels[0].iloc[0]!r})"
        )
    _check_label_variants(splits, labels)
    names = list(spec.get("class_names") or sorted(set().union(*(set(split_labels) for split_labels in labels))))
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for split, split_labels in zip(splits, labels):
        split_ids = split_labels.map(index)
        unknown = split_ids.isna()
        if unknown.any():
            row = int(unknown.idxmax())
            raise split.error(f"label {split_labels[row]!r} is not in class_names {names}", row)
        ids.append(split_ids.astype("int64"))
    return ids, names


def _encode_labels(
    train: Split, test: Split, spec: dict[str, Any], source_names: list[str] | None,
) -> tuple[pd.Series, pd.Series, list[str]]:
    """Label ids 0..C-1 of both splits and the class names, after every check of the labels."""
    column = spec.get("label", "label")
    splits = [train, test]
    labels = [_file_labels(split, column) for split in splits]
    _check_same_kind(train, labels[0], test, labels[1])
    hint = ""
    if _is_integer(labels[0]):
        ids, num_classes, names, hint = _integer_classes(splits, labels, spec, source_names)
    else:
        ids, names = _text_classes(splits, labels, spec, column)
        num_classes = len(names)
    # Integer labels without names are named by their ids, listed only once the checks passed:
    # a column of large ids mistaken for labels would otherwise make a billion names first.
    def name_of(c: int) -> str:
        return names[c] if names else str(c)

    if num_classes < 2:
        raise train.error(f"only one class ({name_of(0)!r}) in train and test; a classifier needs at least 2 classes")
    only_in_test = ~ids[1].isin(ids[0].unique())
    if only_in_test.any():
        row = int(only_in_test.idxmax())
        raise test.error(f"label {_shown(labels[1][row])} appears only in the test file, not in {train.where}", row)
    _check_every_class_trains(train, ids[0], num_classes, name_of, hint)
    return ids[0], ids[1], [name_of(c) for c in range(num_classes)]


def _check_every_class_trains(
    train: Split, train_ids: pd.Series, num_classes: int, name_of: Callable[[int], str], why: str,
) -> None:
    present = set(train_ids.unique().tolist())
    # The first missing id is at most len(present): the scan never walks all num_classes ids.
    missing = next((c for c in range(num_classes) if c not in present), None)
    if missing is not None:
        raise train.error(f"class {missing} ({name_of(missing)!r}) has no training example{why}")


# ----------------------------------------------------------------------------- data sets


def _subsample(df: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if limit is None or limit >= len(df):
        return df
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(df), size=limit, replace=False))
    return df.iloc[keep]


def load_frames(
    name: str, spec: dict[str, Any] | None, base_dir: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str], dict]:
    """(train, test, class_names, source) for a data set, validated. ``source`` is the resolved
    spec plus what was read (local: absolute paths, sha256 and sizes; hub: the resolved commit).
    Relative local paths resolve against ``base_dir`` (default: the working directory)."""
    spec = resolve_spec(name, spec)
    train, test, source_names, source = LOADERS[spec["source"]](spec, base_dir)
    train, test = _normalise(train, spec), _normalise(test, spec)
    train_ids, test_ids, names = _encode_labels(train, test, spec, source_names)
    seed = spec.get("seed", 0)
    sampled_train = _subsample(train.frame.assign(label=train_ids), spec.get("max_train"), seed)
    sampled_test = _subsample(test.frame.assign(label=test_ids), spec.get("max_test"), seed + 1)
    if "max_train" in spec:
        why = f" among the max_train={spec['max_train']} sampled rows (raise max_train)"
        _check_every_class_trains(train, sampled_train["label"], len(names), lambda c: names[c], why)
    return sampled_train.reset_index(drop=True), sampled_test.reset_index(drop=True), names, source


def prepare(
    name: str, spec: dict[str, Any] | None, out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``train.parquet``, ``test.parquet`` and ``meta.json`` (last, so its presence means
    done); nothing is written unless every check passed."""
    train, test, names, source = load_frames(name, spec, base_dir)
    out = Path(out_dir)
    # Exact copies of test texts in the training set inflate test accuracy.
    duplicates = int(test["text"].isin(train["text"]).sum())
    meta: dict[str, Any] = {
        "name": name,
        "num_classes": len(names),
        "class_names": names,
        "rows": {"train": len(train), "test": len(test)},
        "label_counts": {
            split: np.bincount(df["label"].to_numpy(), minlength=len(names)).tolist()
            for split, df in (("train", train), ("test", test))
        },
        "test_in_train": {"rows": duplicates, "share": duplicates / len(test)},
        "source": source,
        "fedsweep_version": __version__,
        "sha256": {},
    }
    # The majority share is the accuracy of the best constant classifier: the "chance" level
    # drawn in the figures (1/C for balanced data).
    meta["chance_accuracy"] = max(meta["label_counts"]["test"]) / len(test)
    for split, df in (("train", train), ("test", test)):
        path = out / f"{split}.parquet"
        write_parquet(path, df.astype({"text": "string", "label": "int64"}))
        meta["sha256"][split] = sha256_file(path)
    write_json(out / "meta.json", meta)
    return meta


def duplicate_warning(meta: dict[str, Any]) -> str | None:
    """A warning when more than DUPLICATE_WARNING_SHARE of the test texts are also training texts."""
    share = meta["test_in_train"]["share"]
    if share <= DUPLICATE_WARNING_SHARE:
        return None
    return (f"dataset {meta['name']!r}: {meta['test_in_train']['rows']} of {meta['rows']['test']} test texts "
            f"({share:.1%}) also appear in the training set (exact duplicates): test accuracy overstates "
            "generalisation")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FedsweepError(f"data_dir {str(data_dir)!r} has no meta.json (run `fedsweep prepare` first)")
    return read_json(path)


# ----------------------------------------------------------------------------- DAG-time checks


def local_files(spec: dict[str, Any], base_dir: str | os.PathLike | None = None) -> list[str]:
    """Absolute paths of a local spec's train and test files, in that order (relative ones from
    ``base_dir``, default the working directory); reads nothing."""
    if spec.get("source") != "local":
        raise FedsweepError(f"source={spec.get('source')!r}: only a local spec has files")
    for split in SPLITS:
        if not isinstance(spec.get(split), str) or not spec[split]:
            raise FedsweepError(f"source=local needs a {split} file path")
    return [str(_local_path(spec[split], base_dir)) for split in SPLITS]


def _count_rows(path: Path, split: str, spec: dict[str, Any]) -> int:
    fmt = _file_format(path)
    if fmt == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_error(path, exc) from None
    if fmt in (".jsonl", ".json") and not spec.get("lines", True):
        return len(_read_local_file(path, split, spec).frame)
    try:
        with _open_binary(path) as f:
            lines = sum(1 for line in f if line.strip())
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise FedsweepError(f"{path}: cannot read ({_first_line(exc)})") from None
    has_header = fmt in (".csv", ".tsv") and spec.get("header", True)
    return max(lines - has_header, 0)


def count_local_rows(spec: dict[str, Any], base_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """{"train": rows, "test": rows} of a local spec, capped by max_train / max_test, without
    loading the data: Parquet from the file footer; CSV/TSV and JSON Lines by counting non-blank
    lines (less a CSV header), an upper bound when quoted fields span lines; a ``lines: false``
    JSON file is parsed. A missing or unreadable file is a one-line error."""
    counts = {}
    for split, path in zip(SPLITS, local_files(spec, base_dir)):
        _check_file(Path(path), split)
        rows = _count_rows(Path(path), split, spec)
        cap = spec.get(f"max_{split}")
        counts[split] = min(rows, cap) if cap else rows
    return counts
