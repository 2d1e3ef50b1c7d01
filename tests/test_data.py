"""Loading data: local files (CSV with string labels and joined columns), the real samples in
../shared/data, the synthetic generator, tokenisation; and every bad input's one-line error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedsweep import FedsweepError
from fedsweep.data import load_frames, prepare, read_meta
from fedsweep.synthetic import generate
from fedsweep.tokens import load_split, tokenize

from conftest import shared_data


def _csv(tmp_path, name, rows):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_local_csv_string_labels_and_joined_text(tmp_path):
    rows = {"title": ["Stocks up", "Cup final", "New chip", "Rates cut"],
            "body": ["Markets rose.", "Team wins.", "Faster phones.", "Bank acts."],
            "topic": ["business", "sports", "tech", "business"]}
    spec = {"source": "local", "train": _csv(tmp_path, "train.csv", rows),
            "test": _csv(tmp_path, "test.csv", rows), "text": ["title", "body"], "label": "topic",
            "text_separator": ". "}
    meta = prepare("mini", spec, tmp_path / "out")
    assert meta["class_names"] == ["business", "sports", "tech"]  # sorted order = ids
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert train["label"].tolist() == [0, 1, 2, 0]
    assert train["text"].iloc[0] == "Stocks up. Markets rose."
    assert str(train["label"].dtype) == "int64"
    assert read_meta(tmp_path / "out")["sha256"]["train"] == meta["sha256"]["train"]


def test_headerless_csv_with_one_based_labels(tmp_path):
    # The Kaggle AG News layout the paper's code read: class index (1-based), title, description.
    path = tmp_path / "ag.csv"
    path.write_text('"3","Wall St. Bears","Short-sellers are seeing green."\n'
                    '"1","Talks end","Diplomats left."\n"2","Win","A win."\n"4","Chip","A chip."\n')
    spec = {"source": "local", "train": str(path), "test": str(path), "header": False,
            "columns": ["Class Index", "Title", "Description"], "text": "Description",
            "label": "Class Index", "label_offset": 1, "class_names": ["World", "Sports", "Business", "Sci/Tech"]}
    train, test, names, _ = load_frames("ag_news_description", spec)
    assert train["label"].tolist() == [2, 0, 1, 3]
    assert train["text"].iloc[0] == "Short-sellers are seeing green."


def test_real_ag_news_sample(tmp_path):
    path = shared_data("ag_news")
    spec = {"source": "local", "train": str(path / "train.parquet"), "test": str(path / "test.parquet"),
            "max_train": 400, "max_test": 200, "class_names": ["World", "Sports", "Business", "Sci/Tech"]}
    meta = prepare("ag_news", spec, tmp_path / "d")
    assert meta["rows"] == {"train": 400, "test": 200} and meta["num_classes"] == 4
    assert 0.25 <= meta["chance_accuracy"] < 0.4
    tmeta = tokenize(tmp_path / "d", "minilm", 128, tmp_path / "t")
    assert tmeta["vocab_size"] == 30522 and 20 < tmeta["mean_length"]["train"] < 128
    split = load_split(tmp_path / "t", "train")
    assert split.ids.shape[0] == 400 and int(split.lengths.max()) <= 128
    assert (split.ids[:, 0] == 101).all()  # [CLS] first: a real WordPiece tokenisation


def test_real_imdb_slice_truncates_at_max_length(tmp_path):
    path = shared_data("imdb")
    spec = {"source": "local", "train": str(path / "train.parquet"), "test": str(path / "test.parquet"),
            "max_train": 200, "max_test": 100}
    meta = prepare("imdb", spec, tmp_path / "d")
    assert meta["num_classes"] == 2 and min(meta["label_counts"]["train"]) > 50
    tmeta = tokenize(tmp_path / "d", "minilm", 128, tmp_path / "t")
    assert tmeta["truncated_share"]["train"] > 0.5  # reviews are long: most hit 128 tokens
    table = pq.read_table(tmp_path / "t" / "train.parquet")
    assert str(table.schema.field("input_ids").type) == "list<element: int32>"
    assert max(len(x) for x in table.column("input_ids").to_pylist()) == 128  # truncated, not padded


def test_synthetic_is_seeded_and_learnable_by_word_counts():
    a_train, a_test = generate(num_classes=3, train_size=600, test_size=300, difficulty=0.3, seed=2)
    b_train, _ = generate(num_classes=3, train_size=600, test_size=300, difficulty=0.3, seed=2)
    c_train, _ = generate(num_classes=3, train_size=600, test_size=300, difficulty=0.3, seed=3)
    assert a_train.equals(b_train) and not a_train.equals(c_train)
    assert sorted(a_train["label"].unique()) == [0, 1, 2]
    # A bag-of-words nearest-centroid classifier separates the classes: the signal is real.
    vocab = {w: i for i, w in enumerate(sorted({w for t in a_train["text"] for w in t.lower().strip(".").split()}))}
    def bow(texts):
        m = np.zeros((len(texts), len(vocab)))
        for r, t in enumerate(texts):
            for w in t.lower().strip(".").split():
                if w in vocab:
                    m[r, vocab[w]] += 1
        return m
    x, y = bow(a_train["text"]), a_train["label"].to_numpy()
    centroids = np.stack([x[y == c].mean(0) for c in range(3)])
    pred = (bow(a_test["text"]) @ centroids.T).argmax(1)
    assert (pred == a_test["label"].to_numpy()).mean() > 0.8


@pytest.mark.parametrize("spec, message", [
    (None, "unknown data set"),
    ({"source": "ftp"}, "source='ftp'"),
    ({"source": "local", "train": "/nope.csv", "test": "/nope.csv"}, "does not exist"),
    ({"source": "synthetic", "num_classes": 1}, "num_classes=1"),
    ({"source": "synthetic", "colour": 3}, "unknown synthetic key"),
    ({"source": "synthetic", "max_train": 0}, "max_train=0"),
])
def test_spec_errors(spec, message):
    with pytest.raises(FedsweepError, match=message):
        load_frames("mystery", spec)


def _local(tmp_path, train_rows, test_rows, **extra):
    return {"source": "local", "train": _csv(tmp_path, "tr.csv", train_rows),
            "test": _csv(tmp_path, "te.csv", test_rows), **extra}


def _raises_exactly(spec, message):
    with pytest.raises(FedsweepError) as info:
        load_frames("d", spec)
    assert str(info.value) == message


# Errors name the file (absolute), the row (from 0, after the header) and, in text files, its line.
def test_missing_column(tmp_path):
    spec = _local(tmp_path, {"text": ["a", "b"], "y": [0, 1]}, {"text": ["a"], "y": [0]})
    _raises_exactly(spec, f"{tmp_path}/tr.csv: no column 'label' (columns: text, y)")


def test_empty_text(tmp_path):
    spec = _local(tmp_path, {"text": ["fine", "  "], "label": [0, 1]}, {"text": ["a"], "label": [0]})
    _raises_exactly(spec, f"{tmp_path}/tr.csv: row 1 (line 3): empty text (1 empty in all)")


def test_label_out_of_range(tmp_path):
    spec = _local(tmp_path, {"text": ["a", "b"], "label": [0, 1]}, {"text": ["a"], "label": [5]},
                  class_names=["neg", "pos"])
    _raises_exactly(spec, f"{tmp_path}/te.csv: row 0 (line 2): label 5 is outside 0..1 (2 class names)")


def test_class_missing_from_train(tmp_path):
    # Class 1 is in neither file; class 2 only in the test file, which is what the message says.
    spec = _local(tmp_path, {"text": ["a", "b"], "label": [0, 0]}, {"text": ["a", "b"], "label": [0, 2]})
    _raises_exactly(spec, f"{tmp_path}/te.csv: row 1 (line 3): label 2 appears only in the test file, "
                          f"not in {tmp_path}/tr.csv")
    spec = _local(tmp_path, {"text": ["a", "b"], "label": [0, 2]}, {"text": ["a", "b"], "label": [0, 2]})
    _raises_exactly(spec, f"{tmp_path}/tr.csv: class 1 ('1') has no training example")


def test_prepare_cli_error_is_one_line(tmp_path, capsys):
    from fedsweep.cli import main

    assert main(["prepare", "--name", "x", "--spec", json.dumps({"source": "bogus"}), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedsweep: error:") and "source='bogus'" in err
    assert not any(tmp_path.iterdir())  # nothing written
