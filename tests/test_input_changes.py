"""What a changed or bad input does to a finished or starting run, through a real `snakemake`:
editing a local data file (or a local model folder) reruns exactly what depends on it, also when
the new file has an older mtime; bad data content fails its prepare job with the cause on the
console (and again at the end of the failed run); data warnings reach the console."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import copy_workflow, job_counts, local_csv, small_config, snakemake, write_config, write_inputs


# ----------------------------------------------------------------------------- changed inputs rerun


def _rerun_config() -> dict:
    """Two data sets (a local CSV and a synthetic one) x two models (a built-in tiny one and a local
    save_pretrained folder), K=1, one round each: 4 small cells."""
    return {
        "clients": [1],
        "models": {"tiny-bert": {"tokenizer": "minilm"},
                   "mybert": {"spec": "./models/mybert", "tokenizer": "minilm"}},
        "datasets": {
            "mine": {"spec": {"source": "local", "train": "data/300_train.csv", "test": "data/test.csv"},
                     "budget": 1, "second_threshold": 1},
            "synthetic": {"spec": {"source": "synthetic", "num_classes": 4, "train_size": 96, "test_size": 32}, "budget": 1, "second_threshold": 1},
        },
        "train": {"epochs": 1, "batch_size": 16, "max_length": 16, "lr": 0.05},
        "threads": {"tokenize": 1, "train": 1},
        "resources": {"gpus": 0, "mem_mb": 2000, "runtime": 10},
    }


def _save_local_model(folder: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from fedsweep.models import tiny_config

    AutoModelForSequenceClassification.from_config(tiny_config("tiny-bert", 4)).save_pretrained(folder)


@pytest.mark.slow
def test_changed_local_data_or_model_reruns_exactly_what_depends_on_it(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    write_inputs(work)
    _save_local_model(work / "models" / "mybert")
    write_config(work / "config/rerun.yaml", _rerun_config())
    args = ("--configfile", "config/rerun.yaml")
    snakemake(work, "--cores", "2", *args, timeout=900)
    assert "Nothing to be done" in (p := snakemake(work, "-n", *args)).stdout + p.stderr

    # The local model's weights change: its fetch record and its 2 cells rerun, nothing else.
    weights = next((work / "models" / "mybert").glob("*.safetensors"))
    before = weights.stat()
    os.utime(weights)
    dry = snakemake(work, "-n", *args)
    assert job_counts(dry.stdout + dry.stderr) == {"fetch_model": 1, "train": 2, "report": 1, "all": 1}, dry.stdout
    outputs = [line for line in dry.stdout.splitlines() if line.strip().startswith("output:")]
    assert not any("/tiny-bert/" in line for line in outputs), outputs
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as it was: nothing to do again
    assert "Nothing to be done" in (p := snakemake(work, "-n", *args)).stdout + p.stderr

    # The user's data file changes (300 -> 200 rows): its data, tokens, shards and 2 cells rerun.
    csv = work / "data" / "300_train.csv"
    pd.read_csv(csv).head(200).to_csv(csv, index=False)
    dry = snakemake(work, "-n", *args)
    assert job_counts(dry.stdout + dry.stderr) == {
        "prepare_data": 1, "tokenize": 1, "partition": 1, "train": 2, "report": 1, "all": 1}, dry.stdout
    outputs = [line for line in dry.stdout.splitlines() if line.strip().startswith("output:")]
    assert not any("runs/synthetic" in line for line in outputs), outputs
    snakemake(work, "--cores", "2", "results/data/mine/meta.json", *args, timeout=900)  # its first job
    meta = yaml.safe_load((work / "results/data/mine/meta.json").read_text())
    assert meta["rows"]["train"] == 200


@pytest.mark.slow  # a real snakemake run: not in the quick loop
def test_bad_data_content_fails_its_prepare_job_with_the_cause_on_the_console(tmp_path):
    """What only reading the data can show (here an empty label cell) fails the data set's first job,
    and the console shows fedsweep's one-line cause, not only the log's path; nothing trains."""
    work = copy_workflow(tmp_path / "wf")
    write_inputs(work)
    csv = work / "data" / "300_train.csv"
    frame = pd.read_csv(csv).astype({"label": "object"})
    frame.loc[7, "label"] = ""
    frame.to_csv(csv, index=False)
    config = small_config()
    config["datasets"] = {"mine": local_csv(300)}
    write_config(work / "config/bad.yaml", config)
    proc = snakemake(work, "--cores", "1", "--configfile", "config/bad.yaml", check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    causes = [line for line in out.splitlines() if line.startswith("error (log: ")]
    assert causes == [f"error (log: results/logs/prepare_data/mine.log): fedsweep: error: {csv}: row 7 (line 9): "
                      "label (column 'label') is empty"], out
    # and again at the end (the Snakefile's onerror), as under the slurm executor, where only this one shows
    assert (f"cause (rule prepare_data, log results/logs/prepare_data/mine.log): fedsweep: error: {csv}: row 7 "
            "(line 9): label (column 'label') is empty") in out.splitlines(), out
    assert not (work / "results" / "runs").exists()
    assert not (work / "results" / "data" / "mine" / "meta.json").exists()


@pytest.mark.slow  # a real snakemake run: not in the quick loop
def test_data_warnings_reach_the_console(tmp_path):
    """A test set that is the training set: prepare_data succeeds, and its warning is on the
    console, not only in logs/prepare_data/."""
    work = copy_workflow(tmp_path / "wf")
    write_inputs(work)
    config = small_config()
    config["datasets"] = {"mine": {"spec": {"source": "local", "train": "data/300_train.csv",
                                            "test": "data/300_train.csv"}, "budget": 1, "second_threshold": 1}}
    write_config(work / "config/leak.yaml", config)
    proc = snakemake(work, "results/data/mine/meta.json", "--cores", "1", "--configfile", "config/leak.yaml",
                     timeout=300)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("fedsweep: warning:")]
    assert warnings == ["fedsweep: warning: dataset 'mine': 300 of 300 test texts (100.0%) also appear in the "
                        "training set (exact duplicates): test accuracy overstates generalisation"], proc.stderr


@pytest.mark.slow  # a real snakemake run: not in the quick loop
def test_a_data_file_replaced_with_an_older_mtime_reruns_its_data(tmp_path):
    """`cp -p`, `tar -x`, `rsync -t`: the new file's mtime is older than the outputs', so mtime
    alone says "up to date"; its content digest (a param of prepare_data) says otherwise."""
    work = copy_workflow(tmp_path / "wf")
    write_inputs(work)
    config = small_config()
    config["datasets"] = {"mine": local_csv(300)}
    write_config(work / "config/local.yaml", config)
    args = ("results/data/mine/meta.json", "--configfile", "config/local.yaml")
    snakemake(work, "--cores", "1", *args, timeout=300)
    assert "Nothing to be done" in (p := snakemake(work, "-n", *args)).stdout + p.stderr
    csv = work / "data" / "300_train.csv"
    old = csv.stat()
    frame = pd.read_csv(csv)
    frame.loc[0, "label"] = (frame.loc[0, "label"] + 1) % 4  # same size, other content
    frame.to_csv(csv, index=False)
    os.utime(csv, ns=(old.st_atime_ns, old.st_mtime_ns - 10**12))  # older than the outputs
    dry = snakemake(work, "-n", *args)
    assert job_counts(dry.stdout + dry.stderr) == {"prepare_data": 1}, dry.stdout
