"""Load a data set from the Hugging Face hub, local files or the synthetic generator into
normalised Parquet (``text`` str, ``label`` int64 0..C-1) plus a JSON of metadata.

A data set is described by a *spec* (a dict, usually from the workflow config):

- ``source: hub``: ``hub_id``, optional ``hub_config``, ``train_split``, ``test_split``.
- ``source: local``: ``train`` and ``test`` file paths (.parquet, .csv, .tsv, .jsonl/.json);
  for CSV files without a header, ``header: false`` and ``columns: [...]``.
- ``source: synthetic``: the arguments of :func:`fedsweep.synthetic.generate`.

Common keys: ``text`` (a column or a list of columns joined by ``text_separator``, default " "),
``label`` (column; strings are mapped to ids in sorted order), ``label_offset`` (subtracted from
integer labels, e.g. 1 for 1-based CSV class indices), ``class_names``, ``max_train`` /
``max_test`` (a seeded random subset, for quick runs) and ``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import FedsweepError, __version__
from .io import read_json, sha256_file, write_json, write_parquet

# Defaults for the paper's data sets as published on the hub. A user's spec overrides any key.
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
SYNTHETIC_KEYS = (
    "num_classes", "train_size", "test_size", "difficulty", "label_noise", "min_words",
    "max_words", "topic_words", "seed",
)


def resolve_spec(name: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    """Merge a user's spec over the hub preset of the same name (if any) and check it."""
    merged = dict(HUB_PRESETS.get(name, {}))
    merged.update(spec or {})
    source = merged.get("source")
    if source not in SOURCES:
        if not merged:
            raise FedsweepError(
                f"dataset {name!r}: unknown data set (no spec given and no preset; presets: "
                f"{', '.join(sorted(HUB_PRESETS))})"
            )
        raise FedsweepError(f"dataset {name!r}: source={source!r} is not one of {', '.join(SOURCES)}")
    if source == "hub" and not merged.get("hub_id"):
        raise FedsweepError(f"dataset {name!r}: source=hub needs hub_id")
    if source == "local":
        for split in ("train", "test"):
            if not merged.get(split):
                raise FedsweepError(f"dataset {name!r}: source=local needs a {split} file path")
    for key in ("max_train", "max_test"):
        value = merged.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise FedsweepError(f"dataset {name!r}: {key}={value!r} must be a positive integer")
    if source == "synthetic":
        unknown = set(merged) - set(SYNTHETIC_KEYS) - {"source", "class_names", "max_train", "max_test"}
        if unknown:
            raise FedsweepError(f"dataset {name!r}: unknown synthetic key(s) {sorted(unknown)}")
    return merged


def _text_columns(spec: dict[str, Any]) -> list[str]:
    text = spec.get("text", "text")
    return [text] if isinstance(text, str) else list(text)


def _read_local(path: str, spec: dict[str, Any], name: str, split: str) -> pd.DataFrame:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise FedsweepError(f"dataset {name!r}: {split} file {str(p)!r} does not exist")
    suffix = "".join(p.suffixes[-2:]) if p.suffix in (".gz", ".bz2", ".zst") else p.suffix
    if suffix.startswith(".parquet"):
        return pd.read_parquet(p)
    if suffix.startswith((".csv", ".tsv")):
        header = spec.get("header", True)
        columns = spec.get("columns")
        if not header and not columns:
            raise FedsweepError(f"dataset {name!r}: header=false needs columns: [...]")
        return pd.read_csv(
            p, sep="\t" if suffix.startswith(".tsv") else ",", header=0 if header else None,
            names=columns, keep_default_na=False,
        )
    if suffix.startswith((".jsonl", ".json")):
        return pd.read_json(p, lines=suffix.startswith(".jsonl") or spec.get("lines", True))
    raise FedsweepError(f"dataset {name!r}: {split} file {str(p)!r} has unknown format {suffix!r}")


def _read_hub(spec: dict[str, Any], split: str) -> tuple[pd.DataFrame, list[str] | None]:
    import datasets  # imported here: slow to import and unused by every other path

    ds = datasets.load_dataset(spec["hub_id"], spec.get("hub_config"), split=spec[f"{split}_split"])
    names = None
    feature = ds.features.get(spec.get("label", "label"))
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    return ds.to_pandas(), names


def _normalise(
    df: pd.DataFrame, spec: dict[str, Any], name: str, split: str
) -> pd.DataFrame:
    text_cols = _text_columns(spec)
    label_col = spec.get("label", "label")
    for col in [*text_cols, label_col]:
        if col not in df.columns:
            raise FedsweepError(
                f"dataset {name!r}: {split} has no column {col!r} (columns: {', '.join(map(str, df.columns))})"
            )
    sep = spec.get("text_separator", " ")
    text = df[text_cols[0]].astype(str)
    for col in text_cols[1:]:
        text = text + sep + df[col].astype(str)
    out = pd.DataFrame({"text": text.to_numpy(dtype=object), "label": df[label_col].to_numpy()})
    empty = np.flatnonzero(out["text"].str.strip().str.len().to_numpy() == 0)
    if len(empty):
        raise FedsweepError(
            f"dataset {name!r}: {split} row {int(empty[0])} has an empty text ({len(empty)} empty in all)"
        )
    return out


def _subsample(df: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if limit is None or limit >= len(df):
        return df
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(df), size=limit, replace=False))
    return df.iloc[keep].reset_index(drop=True)


def _encode_labels(
    train: pd.DataFrame, test: pd.DataFrame, spec: dict[str, Any], name: str,
    hub_names: list[str] | None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    labels = pd.concat([train["label"], test["label"]], ignore_index=True)
    if pd.api.types.is_bool_dtype(labels) or pd.api.types.is_numeric_dtype(labels):
        numeric = labels.to_numpy()
        if not np.all(np.isfinite(numeric.astype(float))) or np.any(numeric != np.round(numeric)):
            raise FedsweepError(f"dataset {name!r}: label column has non-integer values")
        offset = int(spec.get("label_offset", 0))
        train = train.assign(label=train["label"].astype("int64") - offset)
        test = test.assign(label=test["label"].astype("int64") - offset)
        names = spec.get("class_names") or hub_names
        num_classes = len(names) if names else int(max(train["label"].max(), test["label"].max())) + 1
        names = list(names) if names else [str(i) for i in range(num_classes)]
    else:
        names = sorted(labels.astype(str).unique())
        if spec.get("class_names"):
            # Users may fix the order (and with it the ids) of string labels.
            names = list(spec["class_names"])
        index = {n: i for i, n in enumerate(names)}
        def to_ids(s: pd.Series) -> pd.Series:
            ids = s.astype(str).map(index)
            if ids.isna().any():
                bad = s[ids.isna()].iloc[0]
                raise FedsweepError(f"dataset {name!r}: label {bad!r} is not in class_names {names}")
            return ids.astype("int64")
        train, test = train.assign(label=to_ids(train["label"])), test.assign(label=to_ids(test["label"]))
    num_classes = len(names)
    for split, df in (("train", train), ("test", test)):
        bad = df["label"][(df["label"] < 0) | (df["label"] >= num_classes)]
        if len(bad):
            raise FedsweepError(
                f"dataset {name!r}: {split} label {int(bad.iloc[0])} is outside 0..{num_classes - 1}"
            )
    missing = sorted(set(range(num_classes)) - set(train["label"].unique().tolist()))
    if missing:
        raise FedsweepError(
            f"dataset {name!r}: class {missing[0]} ({names[missing[0]]!r}) has no training example"
        )
    return train, test, names


def load_frames(name: str, spec: dict[str, Any] | None) -> tuple[pd.DataFrame, pd.DataFrame, list[str], dict]:
    """Return (train, test, class_names, resolved_spec) for a data set, validated."""
    spec = resolve_spec(name, spec)
    seed = int(spec.get("seed", 0))
    hub_names = None
    if spec["source"] == "synthetic":
        from .synthetic import generate

        kwargs = {k: spec[k] for k in SYNTHETIC_KEYS if k in spec}
        train, test = generate(**kwargs)
        spec.setdefault("class_names", [f"topic{c}" for c in range(kwargs.get("num_classes", 4))])
    elif spec["source"] == "local":
        train = _normalise(_read_local(spec["train"], spec, name, "train"), spec, name, "train")
        test = _normalise(_read_local(spec["test"], spec, name, "test"), spec, name, "test")
    else:
        raw_train, hub_names = _read_hub(spec, "train")
        raw_test, _ = _read_hub(spec, "test")
        train = _normalise(raw_train, spec, name, "train")
        test = _normalise(raw_test, spec, name, "test")
    # Subsampling happens before label checks so that a slice missing a class is reported.
    train = _subsample(train, spec.get("max_train"), seed)
    test = _subsample(test, spec.get("max_test"), seed + 1)
    train, test, names = _encode_labels(train, test, spec, name, hub_names)
    return train.reset_index(drop=True), test.reset_index(drop=True), names, spec


def prepare(name: str, spec: dict[str, Any] | None, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``train.parquet``, ``test.parquet`` and ``meta.json`` (last, so its presence means done)."""
    train, test, names, resolved = load_frames(name, spec)
    out = Path(out_dir)
    meta: dict[str, Any] = {
        "name": name,
        "num_classes": len(names),
        "class_names": names,
        "rows": {"train": len(train), "test": len(test)},
        "label_counts": {
            split: np.bincount(df["label"].to_numpy(), minlength=len(names)).tolist()
            for split, df in (("train", train), ("test", test))
        },
        "source": resolved,
        "fedsweep_version": __version__,
        "sha256": {},
    }
    # The majority share is the accuracy of the best constant classifier: the "chance" level
    # drawn in the figures (1/C for balanced data).
    meta["chance_accuracy"] = max(meta["label_counts"]["test"]) / max(len(test), 1)
    for split, df in (("train", train), ("test", test)):
        path = out / f"{split}.parquet"
        write_parquet(path, df.astype({"text": "string", "label": "int64"}))
        meta["sha256"][split] = sha256_file(path)
    write_json(out / "meta.json", meta)
    return meta


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FedsweepError(f"data_dir {str(data_dir)!r} has no meta.json (run `fedsweep prepare` first)")
    return read_json(path)
