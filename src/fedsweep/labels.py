"""Turn a data set's label column into class ids 0..C-1 and class names, or stop with one line.

Labels are integers (whole numbers, or strings that all look like numbers, so "1.0" is 1: numeric
order, shifted by ``label_offset``) or text (ids in sorted order, or in the order of
``class_names``). A missing, empty, fractional or infinite label, numbers mixed with text (in a
split or between train and test), text labels that differ only in case or whitespace, a label
outside the classes, a single class, a label only the test split has and a class with no
training example are errors naming the split and the row.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from .dataspec import is_int
from .sources import Split

# A decimal number, as a label string: all-number labels are integers however written ("1", "1.0").
NUMBER_TEXT = r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*"


def _shown(value: Any) -> str:
    """A label as a message shows it: text quoted, numbers plain (not np.int64(3))."""
    return repr(value) if isinstance(value, str) else str(int(value))


def _whole_numbers(split: Split, values: pd.Series, column: str) -> pd.Series:
    """Numeric labels as int64: whole numbers however stored (0, 0.0, "1.0"); the first fractional,
    infinite or out-of-range one is an error naming its row."""
    if pd.api.types.is_signed_integer_dtype(values):
        return values.astype("int64")
    numbers = values.astype("float64")
    whole = np.isfinite(numbers) & (numbers == np.floor(numbers))
    bad = ~whole | (numbers.abs() >= 2.0**63)
    if bad.any():
        row = int(bad.idxmax())
        why = "is too large for a class id" if whole[row] else "is not an integer"
        raise split.error(f"label {float(numbers[row])!r} (column {column!r}) {why}", row)
    return numbers.astype("int64")


def _file_labels(split: Split, column: str) -> pd.Series:
    """The split's labels as int64 (numbers, or strings that all look like numbers) or as str
    (text); a missing, empty, fractional or mixed label is an error naming its row."""
    values = split.frame["label"]
    missing = values.isna()
    if missing.any():
        raise split.error(f"label (column {column!r}) is missing", int(missing.idxmax()))
    if pd.api.types.is_bool_dtype(values):
        return values.astype("int64")
    if pd.api.types.is_numeric_dtype(values):
        return _whole_numbers(split, values, column)
    if values.dtype == object:  # a JSON column may mix strings with numbers or lists
        other = ~values.map(lambda v: isinstance(v, str) or is_int(v)).astype(bool)
        if other.any():
            row = int(other.idxmax())
            raise split.error(f"label {values[row]!r} (column {column!r}) is neither an integer nor a string", row)
    text = values.astype(str)
    empty = text.str.strip() == ""
    if empty.any():
        raise split.error(f"label (column {column!r}) is empty", int(empty.idxmax()))
    number = text.str.fullmatch(NUMBER_TEXT).astype(bool)
    if number.all():
        # Parsed as numbers do: CSV "1.0" is the label Parquet's 1.0 is.
        return _whole_numbers(split, pd.to_numeric(text.str.strip()), column)
    if number.any():
        first_number, first_text = int(number.idxmax()), int((~number).idxmax())
        raise split.error(
            f"labels mix numbers and text: {text[first_number]!r} at {split.at(first_number)}, "
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


def encode_labels(
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
    check_every_class_trains(train, ids[0], num_classes, name_of, hint)
    return ids[0], ids[1], [name_of(c) for c in range(num_classes)]


def check_every_class_trains(
    train: Split, train_ids: pd.Series, num_classes: int, name_of: Callable[[int], str], why: str,
) -> None:
    """Stop when a class id in 0..num_classes-1 has no training row; ``why`` ends the message."""
    present = set(train_ids.unique().tolist())
    # The first missing id is at most len(present): the scan never walks all num_classes ids.
    missing = next((c for c in range(num_classes) if c not in present), None)
    if missing is not None:
        raise train.error(f"class {missing} ({name_of(missing)!r}) has no training example{why}")

