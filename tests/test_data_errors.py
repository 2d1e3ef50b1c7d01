"""Broken data files and specs stop `fedsweep prepare` with one line naming the file, the value and
the row or line (exit 2, nothing written); what used to train silently on wrong data included.

Then the data facts `prepare` records (test texts duplicated in train, local provenance under a
preset's name, integer labels in numeric order, hub revisions) and the DAG-time helpers
`count_local_rows` and `local_files`.
"""

from __future__ import annotations

import io
import json
import time

import pandas as pd
import pytest

from fedsweep import FedsweepError
from fedsweep.cli import main
from fedsweep.data import load_frames, prepare
from fedsweep.dataspec import count_local_rows, local_files

from conftest import shared_data

D = "{d}"  # the case's input folder, filled in when the case runs


def _spec(**spec) -> list[str]:
    return ["--spec", json.dumps(spec)]


def _local(train: str = "train.csv", test: str = "test.csv", **extra) -> list[str]:
    """A local spec over files of the case's folder, given relative (--base-dir resolves them)."""
    return _spec(source="local", train=train, test=test, **extra)


def _parquet(**columns) -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame(columns).to_parquet(buffer)
    return buffer.getvalue()


TRAIN = "text,label\ngood film,pos\nbad film,neg\n"
TEST = "text,label\nfine film,pos\nawful film,neg\n"
INT_TEST = "text,label\nfine film,0\nawful film,1\n"
GOOD_PARQUET = _parquet(text=["a good film", "a bad film", "a fine film", "an awful film"], label=[1, 0, 1, 0])
# A gzip header, then a deflate block of the reserved type: zlib.error, whatever zlib wrote it.
BROKEN_GZIP = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 16


def _duplicated_parquet() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table([["a", "b"], [0, 1], [1, 0]], names=["text", "label", "label"]), buffer)
    return buffer.getvalue()


DUPLICATED_PARQUET = _duplicated_parquet()

# (id, files of the case's folder, arguments after `prepare --name mine --base-dir D --out-dir OUT`,
#  the exact error line after "fedsweep: error: ")
CASES = [
    # labels that trained wrong, silently
    ("empty-label", {"train.csv": "text,label\ngood film,pos\nbad film,\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: row 1 (line 3): label (column 'label') is empty"),
    ("ints-one-empty", {"train.csv": "text,label\na,0\nb,1\nc,1\n", "test.csv": "text,label\nd,0\ne,\nf,1\n"}, _local(),
     f"{D}/test.csv: row 1 (line 3): label (column 'label') is empty"),
    ("case-variants", {"train.csv": "text,label\na,World\nb,Sports\nc,world\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: row 2 (line 4): labels 'World' and 'world' differ only in case/whitespace"),
    ("whitespace-variants", {"train.csv": "text,label\na,World\nb,Sports\n", "test.csv": "text,label\nc,World \n"},
     _local(), f"{D}/test.csv: row 0 (line 2): labels 'World' and 'World ' differ only in case/whitespace"),
    ("mixed-int-and-text", {"train.csv": "text,label\na,0\nb,World\nc,1\n", "test.csv": INT_TEST}, _local(),
     f"{D}/train.csv: labels mix numbers and text: '0' at row 0 (line 2), 'World' at row 1 (line 3)"),
    ("int-train-text-test", {"train.csv": "text,label\na,0\nb,1\n", "test.csv": TEST}, _local(),
     f"{D}/test.csv: labels are text (e.g. 'pos') but {D}/train.csv has integers (e.g. 0)"),
    ("single-class", {"train.csv": "text,label\na,pos\nb,pos\n", "test.csv": "text,label\nc,pos\n"}, _local(),
     f"{D}/train.csv: only one class ('pos') in train and test; a classifier needs at least 2 classes"),
    ("label-offset-on-text", {"train.csv": TRAIN, "test.csv": TEST}, _local(label_offset=1),
     f"{D}/train.csv: label_offset=1 applies to integer labels, but column 'label' holds text (e.g. 'pos')"),
    ("none-among-text-labels", {"train.parquet": _parquet(text=["a", "b", "c"], label=["pos", "neg", None]),
                                "test.csv": TEST}, _local(train="train.parquet"),
     f"{D}/train.parquet: row 2: label (column 'label') is missing"),
    ("fractional-label", {"train.parquet": _parquet(text=["a", "b"], label=[0.0, 0.5]), "test.csv": INT_TEST},
     _local(train="train.parquet"), f"{D}/train.parquet: row 1: label 0.5 (column 'label') is not an integer"),
    # CSV numbers are read as Parquet's are: "0.5" stops as 0.5 does ("1.0" is 1: see the test below)
    ("fractional-csv-label", {"train.csv": "text,label\na,0.0\nb,0.5\n", "test.csv": INT_TEST}, _local(),
     f"{D}/train.csv: row 1 (line 3): label 0.5 (column 'label') is not an integer"),
    ("infinite-label", {"train.parquet": _parquet(text=["a", "b"], label=[0.0, float("inf")]), "test.csv": INT_TEST},
     _local(train="train.parquet"), f"{D}/train.parquet: row 1: label inf (column 'label') is not an integer"),
    ("huge-csv-label", {"train.csv": "text,label\na,0\nb,99999999999999999999\n", "test.csv": INT_TEST}, _local(),
     f"{D}/train.csv: row 1 (line 3): label 1e+20 (column 'label') is too large for a class id"),
    ("label-only-in-test", {"train.csv": TRAIN, "test.csv": "text,label\nc,pos\nd,meh\n"}, _local(),
     f"{D}/test.csv: row 1 (line 3): label 'meh' appears only in the test file, not in {D}/train.csv"),
    ("one-based-labels", {"train.csv": "text,label\na,1\nb,2\nc,3\n", "test.csv": "text,label\nd,2\n"}, _local(),
     f"{D}/train.csv: class 0 ('0') has no training example; labels run 1..3: if they count from 1, "
     "set label_offset: 1"),
    ("one-based-labels-named", {"train.csv": "text,label\na,1\nb,2\n", "test.csv": "text,label\nd,2\n"},
     _local(class_names=["neg", "pos"]),
     f"{D}/train.csv: row 1 (line 3): label 2 is outside 0..1 (2 class names); labels run 1..2: if they count "
     "from 1, set label_offset: 1"),
    ("class-named-but-absent", {"train.csv": TRAIN, "test.csv": TEST}, _local(class_names=["neg", "pos", "meh"]),
     f"{D}/train.csv: class 2 ('meh') has no training example"),
    # the seeded sample of 2 rows out of 8 is rows 5 and 7: the only 'b' (row 0) is left out
    ("class-lost-by-max-train", {"train.csv": "text,label\nt0,b\n" + "".join(f"t{i},a\n" for i in range(1, 8)),
                                 "test.csv": "text,label\nx,a\ny,b\n"}, _local(max_train=2),
     f"{D}/train.csv: class 1 ('b') has no training example among the max_train=2 sampled rows (raise max_train)"),
    ("duplicated-class-names", {"train.csv": TRAIN, "test.csv": TEST}, _local(class_names=["neg", "pos", "neg"]),
     "dataset 'mine': class_names has duplicates: 'neg'"),
    # texts
    ("int-text-column", {"train.parquet": _parquet(text=[5, 6], label=[0, 1]), "test.csv": INT_TEST},
     _local(train="train.parquet"), f"{D}/train.parquet: text column 'text' holds int64 values, not strings"),
    ("int-text-csv-column", {"train.csv": "text,label\n5,0\n6,1\n", "test.csv": INT_TEST}, _local(),
     f"{D}/train.csv: text column 'text' holds int64 values, not strings"),
    ("float-text-tsv-column", {"train.tsv": "text\tlabel\n5.5\t0\n\t1\n", "test.csv": INT_TEST},
     _local(train="train.tsv"),
     f"{D}/train.tsv: text column 'text' holds float64 values, not strings"),
    # a null part counts as an empty one: allowed while the joined text is not empty, in every format
    ("none-in-joined-text", {"train.parquet": _parquet(title=["A", None, ""], body=["x", "y", None], label=[0, 1, 0]),
                             "test.csv": "title,body,label\nD,w,0\nE,v,1\n"},
     _local(train="train.parquet", text=["title", "body"]), f"{D}/train.parquet: row 2: empty text (1 empty in all)"),
    ("empty-in-joined-csv-text", {"train.csv": "title,body,label\nA,,0\n,y,1\n,,0\n", "test.csv": INT_TEST},
     _local(text=["title", "body"]), f"{D}/train.csv: row 2 (line 4): empty text (1 empty in all)"),
    ("null-json-text", {"train.jsonl": '{"text": "a", "label": 0}\n{"text": null, "label": 1}\n', "test.csv": INT_TEST},
     _local(train="train.jsonl"), f"{D}/train.jsonl: row 1 (line 2): empty text (1 empty in all)"),
    ("number-in-json-text", {"train.jsonl": '{"text": "a", "label": 0}\n{"text": 5, "label": 1}\n',
                             "test.csv": INT_TEST}, _local(train="train.jsonl"),
     f"{D}/train.jsonl: row 1 (line 2): text column 'text' holds int 5, not a string"),
    ("empty-text", {"train.csv": 'text,label\na,0\n" ",1\n', "test.csv": INT_TEST}, _local(),
     f"{D}/train.csv: row 1 (line 3): empty text (1 empty in all)"),
    # spec keys
    ("unknown-local-key", {"train.csv": TRAIN, "test.csv": TEST}, _local(max_trian=50),
     "dataset 'mine': unknown local key(s) ['max_trian']"),
    ("unknown-hub-key", {}, _spec(source="hub", hub_id="someone/data", splits="train"),
     "dataset 'mine': unknown hub key(s) ['splits']"),
    ("unknown-preset-key", {}, [*_spec(max_trian=50), "--name", "imdb"],
     "dataset 'imdb': unknown hub key(s) ['max_trian']"),
    ("header-false-no-columns", {"train.csv": TRAIN, "test.csv": TEST}, _local(header=False),
     "dataset 'mine': header=false needs columns: [...]"),
    ("unknown-encoding", {"train.csv": TRAIN, "test.csv": TEST}, _local(encoding="utf-9"),
     "dataset 'mine': encoding='utf-9' is not a known text encoding (e.g. utf-8, latin-1)"),
    # files that are not what they claim
    ("missing-file", {"test.csv": TEST}, _local(train="nothere.csv"), f"{D}/nothere.csv: train file does not exist"),
    ("missing-column", {"train.csv": "text,y\na,pos\nb,neg\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: no column 'label' (columns: text, y)"),
    ("zero-byte-csv", {"train.csv": "", "test.csv": TEST}, _local(), f"{D}/train.csv: train file is empty (0 bytes)"),
    ("header-only-train", {"train.csv": "text,label\n", "test.csv": TEST}, _local(), f"{D}/train.csv: has no rows"),
    ("blank-lines-only", {"train.csv": "\n\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: has no header and no rows (only blank lines)"),
    ("invalid-utf8", {"train.csv": "text,label\ngood,pos\ncaf\xe9,neg\n".encode("latin-1"), "test.csv": TEST}, _local(),
     f"{D}/train.csv: line 3: not valid utf-8 (byte 0xe9 at column 4); set the spec's encoding "
     "(e.g. encoding: latin-1)"),
    ("ragged-csv", {"train.csv": "text,label\ngood,pos\nbad, really,neg\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: line 3 has 3 fields, expected 2 (quote fields that contain ',')"),
    # pandas fills a short row's missing fields with "" (it read as an empty label)
    ("short-csv-row", {"train.csv": "text,label,source\ngood,pos,web\nbad,neg\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: line 3 has 2 fields, the header has 3"),
    ("short-tsv-row", {"train.tsv": 'text\tlabel\n"two\nlines"\tpos\n\n  \nbad\n', "test.csv": TEST},
     _local(train="train.tsv"), f"{D}/train.tsv: line 6 has 1 field, the header has 2"),
    ("short-headerless-row", {"train.csv": "pos,good\nneg\n", "test.csv": TEST},
     _local(header=False, columns=["label", "text"]), f"{D}/train.csv: line 2 has 1 field, columns names 2"),
    # pandas makes a wider first row's extra leading field the index
    ("wide-first-csv-row", {"train.csv": "text,label\n1,good,pos\n2,bad,neg\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: line 2 has 3 fields, the header has 2"),
    # pandas renames the second (label.1) and reads the first alone
    ("duplicated-csv-column", {"train.csv": "text,label,label\na,pos,neg\nb,neg,pos\n", "test.csv": TEST}, _local(),
     f"{D}/train.csv: line 1: the header's column 'label' appears twice; give each column its own name"),
    ("duplicated-tsv-column", {"train.tsv": "\ntext\ttext\tlabel\na\tb\tpos\n", "test.csv": TEST},
     _local(train="train.tsv"), f"{D}/train.tsv: line 2: the header's column 'text' appears twice; give each column "
     "its own name"),
    ("duplicated-parquet-column", {"train.parquet": DUPLICATED_PARQUET, "test.csv": INT_TEST},
     _local(train="train.parquet"), f"{D}/train.parquet: column 'label' appears twice; give each column its own name"),
    ("duplicated-columns-key", {"train.csv": TRAIN, "test.csv": TEST}, _local(header=False, columns=["text", "text"]),
     "dataset 'mine': columns=['text', 'text'] must be a list of distinct column names"),
    # header: false over a file that has one: its names became a row and a class
    ("header-line-read-as-row", {"train.csv": "label,text\npos,good\nneg,bad\n", "test.csv": TEST},
     _local(header=False, columns=["label", "text"]),
     f"{D}/train.csv: row 0 (line 1): holds the column names (label, text): the file has a header line; use header: "
     "true (or remove header: false)"),
    ("header-line-read-as-row-tsv", {"train.tsv": "Class\tTitle\tDescription\npos\tgood\tfine\n", "test.csv": TEST},
     _local(train="train.tsv", header=False, columns=["class", "title", "body"], label="class", text="title"),
     f"{D}/train.tsv: row 0 (line 1): holds the column names (Class, Title, Description): the file has a header "
     "line; use header: true (or remove header: false)"),
    ("corrupt-gzip", {"train.csv.gz": BROKEN_GZIP, "test.csv": TEST}, _local(train="train.csv.gz"),
     f"{D}/train.csv.gz: cannot read train file (Error -3 while decompressing data: invalid block type)"),
    ("unclosed-quote", {"train.csv": 'text,label\n"good,pos\nbad,neg\n', "test.csv": TEST}, _local(),
     f"{D}/train.csv: not valid CSV (EOF inside string starting at row 1)"),
    ("headerless-wrong-columns", {"train.csv": "pos,good,extra\n", "test.csv": TEST},
     _local(header=False, columns=["label", "text"]), f"{D}/train.csv: rows have 3 fields but columns names 2"),
    ("garbage-parquet", {"train.parquet": b"PAR1 this is not parquet at all", "test.csv": TEST},
     _local(train="train.parquet"),
     f"{D}/train.parquet: not a readable Parquet file (no Parquet footer: truncated, or not Parquet at all)"),
    ("truncated-parquet", {"train.parquet": GOOD_PARQUET[: len(GOOD_PARQUET) // 2], "test.csv": TEST},
     _local(train="train.parquet"),
     f"{D}/train.parquet: not a readable Parquet file (no Parquet footer: truncated, or not Parquet at all)"),
    ("json-array-as-lines", {"train.json": '[{"text": "a", "label": 0},\n {"text": "b", "label": 1}]\n',
                             "test.csv": INT_TEST}, _local(train="train.json"),
     f"{D}/train.json: holds a JSON array, but .json files are read as JSON Lines (one object per line) unless "
     "lines: false"),
    ("invalid-json-line", {"train.jsonl": '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n', "test.csv": INT_TEST},
     _local(train="train.jsonl"),
     f"{D}/train.jsonl: line 2: invalid JSON (Expecting property name enclosed in double quotes, column 15)"),
    ("unknown-format", {"train.txt": "a\n", "test.csv": TEST}, _local(train="train.txt"),
     f"{D}/train.txt: unknown format '.txt' (expected .parquet, .csv, .tsv, .jsonl or .json; text files may end "
     "in .gz, .bz2 or .xz)"),
    # the spec itself
    ("missing-spec-file", {}, ["--spec-file", f"{D}/nothere.yaml"], f"{D}/nothere.yaml: spec file does not exist"),
    ("non-mapping-spec-file", {"spec.yaml": "- source: local\n- train: a.csv\n"}, ["--spec-file", f"{D}/spec.yaml"],
     f"{D}/spec.yaml: the spec must be a mapping (key: value), got list"),
    ("empty-spec-file", {"spec.yaml": "# nothing yet\n"}, ["--spec-file", f"{D}/spec.yaml"],
     f"{D}/spec.yaml: the spec must be a mapping (key: value), got nothing"),
    ("invalid-yaml-spec-file", {"spec.yaml": "source: local\ntrain: [a.csv\ntest: b.csv\n"},
     ["--spec-file", f"{D}/spec.yaml"],
     f"{D}/spec.yaml: invalid YAML at line 3, column 5: expected ',' or ']', but got ':'"),
    ("invalid-yaml-spec", {}, ["--spec", "{source: local, train: [a.csv}"],
     "--spec: invalid YAML at line 1, column 30: expected ',' or ']', but got '}'"),
    ("spec-and-spec-file", {"spec.yaml": "source: local\n"}, [*_spec(source="local"), "--spec-file", f"{D}/spec.yaml"],
     "give --spec or --spec-file, not both"),
]


def _write_files(folder, files: dict[str, str | bytes]) -> None:
    folder.mkdir()
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("files, args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_input_is_one_line_error(tmp_path, capsys, files, args, expected):
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_files(folder, files)
    args = [a.replace(D, str(folder)) for a in args]
    code = main(["prepare", "--name", "mine", "--base-dir", str(folder), "--out-dir", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == ["fedsweep: error: " + expected.replace(D, str(folder))]
    assert not out.exists() or not any(out.iterdir())  # no train.parquet, test.parquet or meta.json


def test_encoding_key_reads_latin1(tmp_path):
    (tmp_path / "train.csv").write_bytes("text,label\ngood,pos\ncaf\xe9,neg\n".encode("latin-1"))
    (tmp_path / "test.csv").write_text(TEST)
    spec = {"source": "local", "train": "train.csv", "test": "test.csv", "encoding": "latin-1"}
    train, _, names, _ = load_frames("cafe", spec, base_dir=tmp_path)
    assert train["text"].tolist() == ["good", "café"] and names == ["neg", "pos"]


# ----------------------------------------------------------------------------- accepted forms, alike in every format


@pytest.mark.parametrize("name, content", [
    ("ints.csv", "text,label\na,1\nb,0\nc,1\n"),
    ("floats.csv", "text,label\na,1.0\nb,0.0\nc, 1. \n"),
    ("ints.parquet", _parquet(text=["a", "b", "c"], label=[1, 0, 1])),
    ("floats.parquet", _parquet(text=["a", "b", "c"], label=[1.0, 0.0, 1.0])),
    ("strings.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip("abc", ["1.0", "0", "1"]))),
])
def test_whole_number_labels_are_integers_in_every_format(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    train, _, names, _ = load_frames("d", {"source": "local", "train": name, "test": name}, base_dir=tmp_path)
    assert train["label"].tolist() == [1, 0, 1] and names == ["0", "1"]


def test_null_and_empty_text_parts_are_alike(tmp_path):
    # Only some titles are numbers ("1984"): a text column, not a numeric one.
    (tmp_path / "t.csv").write_text("title,body,label\n1984,,0\nHeat,Film.,1\n,Noir.,0\n")
    (tmp_path / "t.parquet").write_bytes(
        _parquet(title=["1984", "Heat", None], body=[None, "Film.", "Noir."], label=[0, 1, 0]))
    texts = [load_frames("d", {"source": "local", "train": name, "test": name, "text": ["title", "body"]},
                         base_dir=tmp_path)[0]["text"].tolist() for name in ("t.csv", "t.parquet")]
    assert texts == [["1984 ", "Heat Film.", " Noir."]] * 2


# ----------------------------------------------------------------------------- what prepare records


def _texts(n: int, prefix: str) -> list[str]:
    return [f"{prefix} review number {i}" for i in range(n)]


@pytest.mark.parametrize("copies, warned", [(1, False), (5, True)])
def test_test_texts_in_train_are_counted_and_warned(tmp_path, capsys, copies, warned):
    train = _texts(200, "train")
    test = train[:copies] + _texts(100 - copies, "test")  # 1% is tolerated, 5% is not
    pd.DataFrame({"text": train, "label": [i % 2 for i in range(200)]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"text": test, "label": [i % 2 for i in range(100)]}).to_csv(tmp_path / "test.csv", index=False)
    spec = json.dumps({"source": "local", "train": "train.csv", "test": "test.csv"})
    out = tmp_path / "out"
    assert main(["prepare", "--name", "dup", "--spec", spec, "--base-dir", str(tmp_path), "--out-dir", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["test_in_train"] == {"rows": copies, "share": copies / 100}
    err = capsys.readouterr().err
    if warned:
        assert err.splitlines() == [
            "fedsweep: warning: dataset 'dup': 5 of 100 test texts (5.0%) also appear in the training set "
            "(exact duplicates): test accuracy overstates generalisation"]
    else:
        assert err == ""


def test_local_data_named_like_a_preset_records_only_what_was_read(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nmarkets rose,Business\ncup final,Sports\n")
    (tmp_path / "test.csv").write_text("text,label\nbank acts,Business\nteam wins,Sports\n")
    meta = prepare("ag_news", {"source": "local", "train": "train.csv", "test": "test.csv"}, tmp_path / "out",
                   base_dir=tmp_path)
    assert meta["class_names"] == ["Business", "Sports"]
    source = meta["source"]
    assert source["source"] == "local" and "hub_id" not in source and "train_split" not in source
    assert source["train"] == str(tmp_path / "train.csv")
    files = source["files"]
    assert files["test"]["path"] == str(tmp_path / "test.csv")
    assert files["train"]["bytes"] == (tmp_path / "train.csv").stat().st_size
    assert len(files["train"]["sha256"]) == 64 and files["train"]["sha256"] != files["test"]["sha256"]


@pytest.mark.parametrize("suffix, write", [
    (".csv", lambda rows, path: pd.DataFrame(rows).to_csv(path, index=False)),
    # JSON strings that look like integers: still integers, in numeric order
    (".jsonl", lambda rows, path: path.write_text("".join(
        json.dumps({"text": t, "label": str(y)}) + "\n" for t, y in zip(rows["text"], rows["label"])))),
])
def test_ten_or_more_integer_classes_keep_numeric_order(tmp_path, suffix, write):
    labels = [11, 2, 10, 0, 1, 3, 4, 5, 6, 7, 8, 9]
    rows = {"text": [f"text {y}" for y in labels], "label": labels}
    write(rows, tmp_path / f"train{suffix}")
    write(rows, tmp_path / f"test{suffix}")
    spec = {"source": "local", "train": f"train{suffix}", "test": f"test{suffix}"}
    train, _, names, _ = load_frames("many", spec, base_dir=tmp_path)
    assert train["label"].tolist() == labels
    assert names == [str(c) for c in range(12)]


def test_integer_labels_take_the_specs_class_names(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,2\nb,1\nc,3\n")
    spec = {"source": "local", "train": "d.csv", "test": "d.csv", "label_offset": 1, "class_names": ["x", "y", "z"]}
    meta = prepare("named", spec, tmp_path / "out", base_dir=tmp_path)
    assert meta["class_names"] == ["x", "y", "z"]
    assert pd.read_parquet(tmp_path / "out" / "train.parquet")["label"].tolist() == [1, 0, 2]


def test_hub_revision_is_passed_and_resolved_from_the_cache(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    calls = []

    def load_dataset(hub_id, config=None, split=None, revision=None):
        calls.append((hub_id, config, split, revision))
        return datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    commit = "1234567890abcdef1234567890abcdef12345678"
    ref = tmp_path / "hub" / "datasets--someone--data" / "refs" / "v1.0"
    ref.parent.mkdir(parents=True)
    ref.write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # offline: the cache answers
    spec = {"source": "hub", "hub_id": "someone/data", "revision": "v1.0"}
    meta = prepare("mine", spec, tmp_path / "out")
    assert calls == [("someone/data", None, "train", "v1.0"), ("someone/data", None, "test", "v1.0")]
    source = meta["source"]
    assert (source["revision"], source["resolved_revision"]) == ("v1.0", commit)
    assert (source["train_split"], source["test_split"], source["hub_config"]) == ("train", "test", None)


# ----------------------------------------------------------------------------- DAG-time helpers


def test_count_local_rows_of_real_parquet_is_fast(tmp_path):
    path = shared_data("imdb")
    spec = {"source": "local", "train": str(path / "train.parquet"), "test": str(path / "test.parquet")}
    start = time.perf_counter()
    counts = count_local_rows(spec, tmp_path)
    assert time.perf_counter() - start < 0.5  # footers only: milliseconds
    assert counts == {"train": 25_000, "test": 25_000}
    assert count_local_rows({**spec, "max_train": 500}, tmp_path) == {"train": 500, "test": 25_000}


def test_count_local_rows_of_text_files(tmp_path):
    (tmp_path / "tr.csv").write_text('text,label\n"two\nlines",0\n\nb,1\nc,0\n')
    (tmp_path / "te.jsonl").write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n')
    (tmp_path / "te.json").write_text('[{"text": "a", "label": 0}, {"text": "b", "label": 1}]')
    spec = {"source": "local", "train": "tr.csv", "test": "te.jsonl"}
    # A quoted newline counts as a row: an upper bound (3 real rows here).
    assert count_local_rows(spec, tmp_path) == {"train": 4, "test": 2}
    assert count_local_rows({**spec, "test": "te.json", "lines": False, "max_train": 2}, tmp_path) == \
        {"train": 2, "test": 2}
    assert load_frames("d", {**spec, "test": "tr.csv"}, tmp_path)[0]["text"].tolist() == ["two\nlines", "b", "c"]


@pytest.mark.parametrize("files, message", [
    ({}, "{d}/tr.csv: train file does not exist"),
    ({"tr.csv": "text,label\na,0\n", "te.parquet": b"not parquet"},
     "{d}/te.parquet: not a readable Parquet file (no Parquet footer: truncated, or not Parquet at all)"),
])
def test_count_local_rows_errors(tmp_path, files, message):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(FedsweepError) as info:
        count_local_rows({"source": "local", "train": "tr.csv", "test": "te.parquet"}, tmp_path)
    assert str(info.value) == message.replace("{d}", str(tmp_path))


def test_local_files_are_absolute(tmp_path, monkeypatch):
    spec = {"source": "local", "train": "data/tr.csv", "test": "/abs/te.csv"}
    assert local_files(spec, tmp_path) == [str(tmp_path / "data" / "tr.csv"), "/abs/te.csv"]
    monkeypatch.chdir(tmp_path)
    assert local_files({**spec, "train": "../x/tr.csv"}) == [str(tmp_path.parent / "x" / "tr.csv"), "/abs/te.csv"]
