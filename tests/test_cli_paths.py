"""The paths and numbers a `fedsweep` command is given: a folder where a file goes (or the other
way round) and a negative seed stop with one line naming the flag (exit 2, nothing written), a
file system refusal met later too; `~` is the home folder; JSON numbers in a mapping flag."""

from __future__ import annotations

import json
import pytest

from fedsweep.cli import main

SYNTHETIC = json.dumps({"source": "synthetic", "train_size": 64, "test_size": 32})


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file\n")
    assert main(["prepare", "--name", "d", "--spec", SYNTHETIC, "--out-dir", "data"]) == 0
    return tmp_path


@pytest.mark.parametrize("args, line", [
    (["prepare", "--name", "d", "--spec", SYNTHETIC, "--out-dir", "afile"],
     "--out-dir afile: afile is a file, not a folder"),
    (["prepare", "--name", "d", "--spec", SYNTHETIC, "--out-dir", "afile/sub"],
     "--out-dir afile/sub: afile is a file, not a folder"),
    (["tokenize", "--data-dir", "data", "--tokenizer", "minilm", "--out-dir", "afile"],
     "--out-dir afile: afile is a file, not a folder"),
    (["partition", "--data-dir", "data", "--clients", "2", "--seed", "-3", "--out", "s.parquet"],
     "partition: --seed -3 must be an integer >= 0"),
    (["partition", "--data-dir", "data", "--clients", "2", "--out", "data"], "--out data: is a folder, not a file"),
    (["partition", "--data-dir", "data", "--clients", "2", "--out", "afile/s.parquet"],
     "--out afile/s.parquet: afile is a file, not a folder"),
    (["report", "--metrics", "m", "--config", "c.yaml", "--tables-dir", "afile", "--figures-dir", "f"],
     "--tables-dir afile: afile is a file, not a folder"),
])
def test_a_bad_output_path_or_seed_is_one_line(work, capsys, args, line):
    before = sorted(work.rglob("*"))
    assert main(args) == 2
    assert capsys.readouterr().err == f"fedsweep: error: {line}\n"
    assert sorted(work.rglob("*")) == before


def test_a_file_system_refusal_later_is_one_line(work, capsys):
    """One the checks before the work cannot see (here a name longer than the file system takes)."""
    assert main(["partition", "--data-dir", "data", "--clients", "2", "--out", "x" * 300 + ".parquet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsweep: error: ") and err.count("\n") == 1 and "File name too long" in err


def test_tilde_in_an_output_path_is_the_home_folder(work, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(work / "home"))
    assert main(["partition", "--data-dir", "data", "--clients", "2", "--out", "~/s.parquet"]) == 0
    assert (work / "home" / "s.parquet").exists() and not (work / "~").exists()


def test_json_numbers_in_a_mapping_flag_are_numbers():
    """The workflow hands a job its settings as JSON: json.dumps(1e-6) is `1e-06`, which YAML 1.1
    would read as the text '1e-06' (and the job would refuse it)."""
    from fedsweep.cli import _spec_mapping

    assert _spec_mapping(json.dumps({"adam_eps": 1e-06, "lr": 2e-5}), "--settings") == {"adam_eps": 1e-06, "lr": 2e-5}
    assert _spec_mapping("{lr: 0.5, peft: {method: lora}}", "--settings") == {"lr": 0.5, "peft": {"method": "lora"}}
