"""Data set specs without pandas: what a ``datasets:`` entry may say, checked, and how many rows
it will have, found cheaply before any job runs.

:mod:`fedsweep.data` reads the data sets these specs describe (see its docstring for the keys);
the workflow builds its DAG from the checks and counts here, which read no data: local files are
counted from Parquet footers or by their non-blank lines (cached by size and mtime), hub presets
know their rows, the synthetic generator's follow from its arguments. Every check raises
:class:`fedsweep.FedsweepError` with one line naming the field and value.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import json
import lzma
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from . import FedsweepError

# Defaults for the paper's data sets as published on the hub (a user's hub spec overrides any
# key), and their (train, test) rows, for estimates and shard checks before the download.
HUB_PRESETS: dict[str, dict[str, Any]] = {
    "imdb": {
        "source": "hub", "hub_id": "stanfordnlp/imdb", "train_split": "train", "test_split": "test",
        "text": "text", "label": "label", "rows": (25_000, 25_000),
    },
    "yelp_review_full": {
        "source": "hub", "hub_id": "Yelp/yelp_review_full", "train_split": "train",
        "test_split": "test", "text": "text", "label": "label", "rows": (650_000, 50_000),
    },
    # The hub copy has title and description already joined into ``text``. The paper's code used
    # the description alone, from the Kaggle CSV ("Class Index", "Title", "Description"): see the
    # ``ag_news_description`` example in config/config.yaml for a local copy of that file.
    "ag_news": {
        "source": "hub", "hub_id": "fancyzhx/ag_news", "train_split": "train", "test_split": "test",
        "text": "text", "label": "label", "rows": (120_000, 7_600),
    },
}
_PRESET_FACTS = ("rows",)  # what a preset knows besides its spec keys

SOURCES = ("hub", "local", "synthetic")
# fedsweep.synthetic.generate's defaults (it takes them from here: the rows are known without pandas).
SYNTHETIC_DEFAULTS: dict[str, Any] = {"num_classes": 4, "train_size": 2000, "test_size": 500, "difficulty": 0.5,
                                      "label_noise": 0.0, "min_words": 12, "max_words": 40, "topic_words": 24,
                                      "seed": 0}
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

COMPRESSION_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What reading a file may raise besides a decoding error: unreadable, or a broken compressed stream
# (gzip raises zlib.error for a damaged block, EOFError for a cut one).
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)
TEXT_FORMATS = (".csv", ".tsv", ".jsonl", ".json")


# ----------------------------------------------------------------------------- specs


def is_int(value: Any) -> bool:
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
    "max_train": (lambda v: is_int(v) and v >= 1, "must be a positive integer"),
    "max_test": (lambda v: is_int(v) and v >= 1, "must be a positive integer"),
    "seed": (is_int, "must be an integer"),
    "label_offset": (is_int, "must be an integer"),
    "class_names": (lambda v: _is_names(v) and len(v) > 0, "must be a list of names"),
    "text": (lambda v: isinstance(v, str) or (_is_names(v) and len(v) > 0), "must be a column or a list of columns"),
    "text_separator": (lambda v: isinstance(v, str), "must be a string"),
    "label": (lambda v: isinstance(v, str), "must be a column name"),
    "train": (lambda v: isinstance(v, str) and v != "", "must be a file path"),
    "test": (lambda v: isinstance(v, str) and v != "", "must be a file path"),
    "header": (lambda v: isinstance(v, bool), "must be true or false"),
    "lines": (lambda v: isinstance(v, bool), "must be true or false"),
    "columns": (lambda v: _is_names(v) and len(v) > 0 and len(set(v)) == len(v),
                "must be a list of distinct column names"),
    "encoding": (_is_encoding, "is not a known text encoding (e.g. utf-8, latin-1)"),
    "hub_id": (lambda v: isinstance(v, str), "must be a string"),
    "hub_config": (lambda v: isinstance(v, str), "must be a string"),
    "revision": (lambda v: isinstance(v, str), "must be a branch, tag or commit"),
    "train_split": (lambda v: isinstance(v, str), "must be a split name"),
    "test_split": (lambda v: isinstance(v, str), "must be a split name"),
}


def text_columns(spec: dict[str, Any]) -> list[str]:
    """The spec's text columns (one, or several joined by text_separator)."""
    text = spec.get("text", "text")
    return [text] if isinstance(text, str) else list(text)


def preset_spec(name: str) -> dict[str, Any]:
    """The spec keys of the hub preset called ``name`` ({} when there is none)."""
    return {k: v for k, v in HUB_PRESETS.get(name, {}).items() if k not in _PRESET_FACTS}


def resolve_spec(name: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    """The spec (over the preset of the same name, for a hub spec), checked; reads no file."""
    if spec is not None and not isinstance(spec, dict):
        raise FedsweepError(f"dataset {name!r}: the spec must be a mapping, got {type(spec).__name__}")
    given = {k: v for k, v in (spec or {}).items() if v is not None}
    # A preset describes the hub copy: merged into a local or synthetic spec it would record a
    # hub_id and splits that were never read.
    preset = preset_spec(name) if given.get("source", "hub") == "hub" else {}
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


# ----------------------------------------------------------------------------- local files


def local_path(path: str, base_dir: str | os.PathLike | None) -> Path:
    """Absolute, with ~ expanded and a relative path taken from base_dir (default: the working directory)."""
    return Path(os.path.abspath(Path(base_dir or os.getcwd()) / os.path.expanduser(path)))


def local_files(spec: dict[str, Any], base_dir: str | os.PathLike | None = None) -> list[str]:
    """Absolute paths of a local spec's train and test files, in that order (relative ones from
    ``base_dir``, default the working directory); reads nothing."""
    if spec.get("source") != "local":
        raise FedsweepError(f"source={spec.get('source')!r}: only a local spec has files")
    for split in SPLITS:
        if not isinstance(spec.get(split), str) or not spec[split]:
            raise FedsweepError(f"source=local needs a {split} file path")
    return [str(local_path(spec[split], base_dir)) for split in SPLITS]


def file_format(path: Path) -> str:
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


def open_binary(path: Path):
    return COMPRESSION_OPENERS.get(path.suffix, open)(path, "rb")


def open_text(path: Path, encoding: str):
    # newline="": the csv module needs it, and JSON ignores a line's trailing "\r".
    return COMPRESSION_OPENERS.get(path.suffix, open)(path, "rt", encoding=encoding, newline="")


def check_file(path: Path, split: str) -> None:
    if not path.exists():
        raise FedsweepError(f"{path}: {split} file does not exist")
    if not path.is_file():
        raise FedsweepError(f"{path}: {split} file is not a file")
    if path.stat().st_size == 0:
        raise FedsweepError(f"{path}: {split} file is empty (0 bytes)")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def parquet_error(path: Path, exc: BaseException) -> FedsweepError:
    reason = re.sub(r"^Could not open Parquet input source '.*?': ", "", first_line(exc))
    if "magic bytes not found" in reason:
        reason = "no Parquet footer: truncated, or not Parquet at all"
    return FedsweepError(f"{path}: not a readable Parquet file ({reason})")


def decode_error(path: Path, encoding: str) -> FedsweepError:
    """Which line does not decode: the file is read again, on this error path only."""
    advice = "set the spec's encoding (e.g. encoding: latin-1)"
    with open_binary(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                return FedsweepError(
                    f"{path}: line {number}: not valid {encoding} (byte 0x{line[exc.start]:02x} at column "
                    f"{exc.start + 1}); {advice}"
                )
    return FedsweepError(f"{path}: not valid {encoding}; {advice}")


def json_array(path: Path, encoding: str) -> list[dict[str, Any]]:
    """The rows of a ``lines: false`` JSON file: one array of objects."""
    try:
        with open_text(path, encoding) as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise FedsweepError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise FedsweepError(f"{path}: with lines: false the file must hold one JSON array of objects (one per row)")
    return records


@contextlib.contextmanager
def read_errors(path: Path, split: str, encoding: str) -> Iterator[None]:
    """A data file that does not decode or cannot be read, as one line."""
    try:
        yield
    except UnicodeDecodeError:
        raise decode_error(path, encoding) from None
    except READ_ERRORS as exc:
        raise FedsweepError(f"{path}: cannot read {split} file ({first_line(exc)})") from None


def _count_rows(path: Path, split: str, spec: dict[str, Any]) -> int:
    fmt = file_format(path)
    if fmt == ".parquet":
        import pyarrow as pa  # here: a footer is all this reads, and pyarrow is slow to import
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise parquet_error(path, exc) from None
    if fmt in (".jsonl", ".json") and not spec.get("lines", True):
        encoding = spec.get("encoding", "utf-8")
        with read_errors(path, split, encoding):
            return len(json_array(path, encoding))
    try:
        with open_binary(path) as f:
            lines = sum(1 for line in f if line.strip())
    except READ_ERRORS as exc:
        raise FedsweepError(f"{path}: cannot read ({first_line(exc)})") from None
    has_header = fmt in (".csv", ".tsv") and spec.get("header", True)
    return max(lines - has_header, 0)


def count_local_rows(spec: dict[str, Any], base_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """{"train": rows, "test": rows} of a local spec, capped by max_train / max_test, without
    loading the data: Parquet from the file footer; CSV/TSV and JSON Lines by counting non-blank
    lines (less a CSV header), an upper bound when quoted fields span lines; a ``lines: false``
    JSON file is parsed. A missing or unreadable file is a one-line error."""
    counts = {}
    for split, path in zip(SPLITS, local_files(spec, base_dir)):
        check_file(Path(path), split)
        rows = _count_rows(Path(path), split, spec)
        cap = spec.get(f"max_{split}")
        counts[split] = min(rows, cap) if cap else rows
    return counts


# ----------------------------------------------------------------------------- rows before any job


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int, int, int]:
    """What tells that a file changed: path, size, mtime, and ctime and inode too, because a file
    replaced by one with an older mtime (``cp -p``, ``tar -x``, ``rsync -t``) has a new ctime (the
    kernel sets it) or inode, where its mtime alone would say "unchanged"."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class RowCountCache:
    """Row counts and content digests of local input files, keyed by their :func:`file_stamp`: a
    large CSV is counted (and hashed) once, and again only after it changed."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, Any] = {}
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is only a cache: count again
        self.dirty = False

    @staticmethod
    def key(files: list[str], spec: dict[str, Any]) -> str:
        stamps = [file_stamp(f) for f in files]
        caps = {k: spec.get(k) for k in ("max_train", "max_test", "header", "lines", "encoding")}
        return json.dumps([stamps, caps], sort_keys=True)

    def get(self, key: str) -> tuple[int, int] | None:
        hit = self.entries.get(key)
        return tuple(hit) if hit else None

    def put(self, key: str, rows: tuple[int, int]) -> None:
        self.entries[key] = list(rows)
        self.dirty = True

    def digest(self, path: str | os.PathLike) -> str:
        """The sha256 of a file's content (cached by its stamp: a chmod rehashes, reruns nothing)."""
        key = json.dumps(["sha256", file_stamp(path)])
        if key not in self.entries:
            import hashlib

            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            self.entries[key] = sha.hexdigest()
            self.dirty = True
        return self.entries[key]

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        from .io import write_json

        try:
            write_json(self.path, self.entries)
        except OSError:
            pass  # a read-only work dir: counting again next time is fine


def _synthetic_rows(spec: dict[str, Any]) -> tuple[int, int]:
    return (int(spec.get("train_size", SYNTHETIC_DEFAULTS["train_size"])),
            int(spec.get("test_size", SYNTHETIC_DEFAULTS["test_size"])))


def _capped(rows: tuple[int, int], spec: dict[str, Any]) -> tuple[int, int]:
    train, test = rows
    if spec.get("max_train"):
        train = min(train, int(spec["max_train"]))
    if spec.get("max_test"):
        test = min(test, int(spec["max_test"]))
    return train, test


def dataset_rows(name: str, spec: dict[str, Any] | None, base_dir: str | os.PathLike,
                 cache: RowCountCache | None = None) -> tuple[int, int] | None:
    """(train, test) rows a data set will have after ``fedsweep prepare``, checked cheaply.

    Validates the spec as ``fedsweep prepare`` does (unknown keys, missing files), counts local
    files without loading them, and returns None only for a hub data set that is no preset.
    """
    resolved = resolve_spec(name, spec)
    source = resolved["source"]
    if source == "synthetic":
        return _capped(_synthetic_rows(resolved), resolved)
    if source == "hub":
        preset = HUB_PRESETS.get(name, {})
        rows = preset.get("rows") if preset and resolved.get("hub_id") == preset["hub_id"] else None
        return _capped(rows, resolved) if rows else None
    files = local_files(resolved, base_dir)
    for split, f in zip(SPLITS, files):
        if os.path.isfile(f) and not os.access(f, os.R_OK):
            raise FedsweepError(f"{f}: {split} file is not readable")
    # Only files that exist are cached; a missing one is reported by count_local_rows.
    key = RowCountCache.key(files, resolved) if cache and all(map(os.path.isfile, files)) else None
    if key and (hit := cache.get(key)):
        return hit
    counted = count_local_rows(resolved, base_dir)
    rows = (int(counted["train"]), int(counted["test"]))
    if key:
        cache.put(key, rows)
    return rows
