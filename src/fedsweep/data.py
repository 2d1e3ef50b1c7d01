"""Load a data set from the Hugging Face hub, local files or the synthetic generator into
normalised Parquet (``text`` str, ``label`` int64 0..C-1) plus a JSON of metadata.

A data set is described by a *spec* (a dict, usually from the workflow config). Each source
accepts the keys in :data:`fedsweep.dataspec.SPEC_KEYS`; any other key is an error.

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

Labels are integers (whole numbers, or strings that all look like numbers: "1.0" is 1; numeric
order) or text (ids in sorted order, or in the order of ``class_names``). Text columns may be
empty or null in a row as long as the joined text is not. Nothing ambiguous is guessed: a missing
or empty label, an empty joined text, a text column of numbers (CSV included), numbers mixed with
text, labels that differ only in case or whitespace, a single class, a label only the test file
has all stop with one line naming the file (or hub split), the row (from 0 after the header, as
pandas counts) and, in text files, the line (from 1, as editors count).

:mod:`fedsweep.sources` reads each source's splits, :mod:`fedsweep.labels` turns their labels into
class ids; here the text and label columns are checked, sampled and written out.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import FedsweepError, __version__
from .dataspec import resolve_spec, text_columns
from .io import read_json, sha256_file, write_json, write_parquet
from .labels import check_every_class_trains, encode_labels
from .sources import LOADERS, Split

# Above this share of test texts also in the training set, `fedsweep prepare` warns.
DUPLICATE_WARNING_SHARE = 0.01


# ----------------------------------------------------------------------------- texts


def _text_column(split: Split, column: str) -> pd.Series:
    """A text column, checked to hold a string (or nothing: a null counts as "") in every row."""
    values = split.frame[column]
    if not (isinstance(values.dtype, pd.StringDtype) or values.dtype == object):
        raise split.error(f"text column {column!r} holds {values.dtype} values, not strings")
    present = values.notna()
    if values.dtype == object:  # a JSON column may mix strings with numbers or lists
        not_text = present & ~values.map(lambda v: isinstance(v, str)).astype(bool)
        if not_text.any():
            row = int(not_text.idxmax())
            value = values[row]
            raise split.error(f"text column {column!r} holds {type(value).__name__} {value!r}, not a string", row)
    values = values.where(present, "")
    if not split.typed:
        _check_not_numbers(split, values, column)
    return values


def _check_not_numbers(split: Split, values: pd.Series, column: str) -> None:
    """A CSV column of numbers only is the column a typed format would have read as numbers: the
    wrong column (a label or an id), stopped as a Parquet int64 text column is."""
    given = values[values.str.strip() != ""]
    try:
        # Raises at the first value that is not a number: a real text column costs one value.
        numbers = pd.to_numeric(given)
    except (ValueError, TypeError):
        return
    if len(given):
        kind = numbers.dtype if numbers.dtype.kind in "iuf" else "numeric"  # object: beyond int64
        raise split.error(f"text column {column!r} holds {kind} values, not strings")


def _normalise(split: Split, spec: dict[str, Any]) -> Split:
    """The split as two columns: ``text`` (joined, checked) and the file's ``label`` values."""
    frame = split.frame
    if len(frame) == 0:
        raise split.error("has no rows")
    columns = text_columns(spec)
    label_column = spec.get("label", "label")
    for column in [*columns, label_column]:
        if column not in frame.columns:
            raise split.error(f"no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    parts = [_text_column(split, column) for column in columns]
    text = parts[0]
    for part in parts[1:]:
        text = text + spec.get("text_separator", " ") + part
    # A part may be empty or null (one title without a body); the joined text may not.
    empty = text.str.strip().str.len() == 0
    if empty.any():
        raise split.error(f"empty text ({int(empty.sum())} empty in all)", int(empty.idxmax()))
    return dataclasses.replace(split, frame=pd.DataFrame({"text": text, "label": frame[label_column]}))


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
    train_ids, test_ids, names = encode_labels(train, test, spec, source_names)
    seed = spec.get("seed", 0)
    sampled_train = _subsample(train.frame.assign(label=train_ids), spec.get("max_train"), seed)
    sampled_test = _subsample(test.frame.assign(label=test_ids), spec.get("max_test"), seed + 1)
    if "max_train" in spec:
        why = f" among the max_train={spec['max_train']} sampled rows (raise max_train)"
        check_every_class_trains(train, sampled_train["label"], len(names), lambda c: names[c], why)
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
