"""`fedsweep status`: the state of every cell of a sweep, from run folders made by hand (one of each
state) and from a real short training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsweep import grid, status
from fedsweep.cli import main
from helpers import ROOT, small_config, write_config

NOW = 1_800_000_000.0  # the status's clock in these tests (ages are relative to it)
ERROR_LINE = "fedsweep: error: train: loss is not finite at round 2 (client 0); stopped"
SIGTERM_LINE = "[synthetic/tiny-bert/K4] SIGTERM: saved round 1 to checkpoint.pt; rerun to resume"
PROGRESS_LINE = "[synthetic/tiny-bert/K4] round 1/2 acc 0.3125 train_loss 1.3801 train 2.5s eval 0.1s 51 ex/s"


def sweep_config() -> dict:
    """tiny-bert on 2 seeds and tiny-albert on 1, K in {1, 2, 4}: 9 cells of 2 rounds, 6 min each."""
    config = small_config()
    config["clients"] = [1, 2, 4]
    config["models"]["tiny-bert"]["seeds"] = [0, 1]
    config["models"]["tiny-albert"] = {"tokenizer": "minilm"}
    config["resources"] = {"runtime": 6}
    return config


def _cell(work: Path, model: str, clients: int, seed: int) -> Path:
    run = work / "results" / "runs" / grid.cell_name(dict(dataset="synthetic", model=model, clients=clients, seed=seed))
    run.mkdir(parents=True)
    return run


def _write(path: Path, text: str, age: float) -> None:
    path.write_text(text)
    os.utime(path, (NOW - age, NOW - age))


def _progress(run: Path, round_: int, age: float, seconds: float) -> None:
    (run / "checkpoint.pt").write_bytes(b"weights")
    _write(run / "progress.json", json.dumps({"round": round_, "rounds": 2, "written": NOW - age, "seconds": seconds,
                                              "train_seconds": seconds / 2, "examples": 128 * round_,
                                              "examples_per_second": 256 * round_ / seconds}), age)


def _finished(run: Path, rate: float, seconds: float, diverged: dict | None = None) -> None:
    (run / "metrics.parquet").write_bytes(b"PAR1")
    _write(run / "run.json", json.dumps({"config": {"rounds": 2}, "train_examples_per_second": rate,
                                         "wall_seconds_this_run": 99.0, "diverged": diverged}), 3600)
    _progress(run, 2, 3600, seconds)


DIVERGED = {"round": 2, "train_loss": 1234.5, "initial_loss": 1.39, "factor": 100.0}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """One cell in each state; returns the folder the config lies in."""
    write_config(tmp_path / "config.yaml", sweep_config())
    _finished(_cell(tmp_path, "tiny-bert", 1, 0), rate=100.0, seconds=10.0)
    _finished(_cell(tmp_path, "tiny-bert", 1, 1), rate=300.0, seconds=30.0, diverged=DIVERGED)
    running = _cell(tmp_path, "tiny-bert", 2, 0)
    _progress(running, 1, 120, 6.0)
    _write(running / "train.log", "==== header ====\n" + PROGRESS_LINE + "\n", 120)
    failed = _cell(tmp_path, "tiny-bert", 2, 1)
    _progress(failed, 1, 600, 6.0)
    _write(failed / "train.log", f"{PROGRESS_LINE}\n{ERROR_LINE}\n\n", 60)
    stalled = _cell(tmp_path, "tiny-bert", 4, 0)  # killed without a word 2 h ago
    _progress(stalled, 1, 7200, 5.0)
    _write(stalled / "train.log", PROGRESS_LINE + "\n", 7200)
    stopped = _cell(tmp_path, "tiny-bert", 4, 1)
    _progress(stopped, 1, 900, 4.0)
    _write(stopped / "train.log", f"{PROGRESS_LINE}\n{SIGTERM_LINE}\n", 900)
    chain = _cell(tmp_path, "tiny-albert", 2, 0)  # between the two jobs of a chain: its first trained round 1
    _progress(chain, 1, 4000, 8.0)
    (chain / "segments").mkdir()
    _write(chain / "train.log", "trained tiny-albert K=2: round 1 test accuracy 0.3000 -> out\n", 4000)
    return tmp_path


def _status(work: Path, **kw):
    return status.status([str(work / "config.yaml")], str(work), now=NOW, **kw)


def test_json_counts_rounds_times_and_estimates(sweep):
    found = json.loads(_status(sweep, as_json_output=True))
    # tiny-bert's unfinished cells: 1 round of 2 left of 2 x (128 train + 64 test) examples, at the
    # median examples/s of its finished cells (100 and 300); tiny-albert has none: the cluster
    # estimate (runtime: 6 min), the share of the rounds left
    measured = 384 / 2 / 200
    assert found["groups"] == [
        {"dataset": "synthetic", "model": "tiny-bert", "algorithm": "fedavg", "partition": "iid", "cells": 6,
         "finished": 2, "running": 1, "failed": 3, "not_started": 0, "diverged": 1, "rounds_done": 8, "rounds": 12,
         "seconds_spent": 61.0, "seconds_remaining": round(4 * measured, 1),
         "remaining_from": {"measured": 4, "estimate": 0}},
        {"dataset": "synthetic", "model": "tiny-albert", "algorithm": "fedavg", "partition": "iid", "cells": 3,
         "finished": 0, "running": 1, "failed": 0, "not_started": 2, "diverged": 0, "rounds_done": 1, "rounds": 6,
         "seconds_spent": 8.0, "seconds_remaining": 180.0 + 2 * 360.0,
         "remaining_from": {"measured": 0, "estimate": 3}},
    ]
    assert found["total"] == {"cells": 9, "finished": 2, "running": 2, "failed": 3, "not_started": 2, "diverged": 1,
                              "rounds_done": 9, "rounds": 18, "seconds_spent": 69.0,
                              "seconds_remaining": round(4 * measured + 900.0, 1),
                              "remaining_from": {"measured": 4, "estimate": 3}}
    cells = {c["name"]: c for c in found["cells"]}
    assert [c["state"] for c in found["cells"]] == [
        "finished", "finished", "running", "failed", "failed", "failed", "not started", "running", "not started"]
    assert cells["synthetic/tiny-bert/fedavg/iid_K1_seed1"]["diverged"] == DIVERGED
    failed = cells["synthetic/tiny-bert/fedavg/iid_K2_seed1"]
    assert failed == {"name": "synthetic/tiny-bert/fedavg/iid_K2_seed1", "state": "failed", "round": 1, "rounds": 2,
                      "last_write": NOW - 60, "last_line": ERROR_LINE, "diverged": None, "note": None,
                      "seconds_spent": 6.0, "seconds_remaining": round(measured, 1), "remaining_from": "measured",
                      "dataset": "synthetic", "model": "tiny-bert", "algorithm": "fedavg", "partition": "iid",
                      "clients": 2, "seed": 1, "age_seconds": 60.0}
    stalled = cells["synthetic/tiny-bert/fedavg/iid_K4_seed0"]
    assert (stalled["age_seconds"], stalled["last_line"]) == (7200.0, PROGRESS_LINE)
    assert stalled["note"] == "no line says why: nothing written for more than 30 min (killed?)"
    assert cells["synthetic/tiny-bert/fedavg/iid_K4_seed1"]["last_line"] == SIGTERM_LINE
    assert cells["synthetic/tiny-bert/fedavg/iid_K2_seed0"]["age_seconds"] == 120.0
    assert cells["synthetic/tiny-albert/fedavg/iid_K2_seed0"]["note"] == "between two jobs of its chain"


def test_table_and_lists(sweep):
    lines = _status(sweep).splitlines()
    assert lines[0].startswith(f"{sweep / 'config.yaml'}: 9 cells under results/runs (as of ")
    assert lines[2:] == [
        "data set   model        cells  finished  running  failed  not started  rounds done  time spent  remaining"
        "  from",
        "synthetic  tiny-bert        6         2        1       3            0      8 of 12        61 s        4 s"
        "  measured",
        "synthetic  tiny-albert      3         0        1       0            2       1 of 6         8 s     15 min"
        "  estimate",
        "total                       9         2        2       3            2      9 of 18        69 s     15 min"
        "  measured + estimate",
        "",
        "running:",
        "  synthetic/tiny-bert/fedavg/iid_K2_seed0: round 1 of 2, last write 2 min ago",
        "  synthetic/tiny-albert/fedavg/iid_K2_seed0: round 1 of 2, last write 67 min ago: between two jobs of "
        "its chain",
        "",
        "failed:",
        f"  synthetic/tiny-bert/fedavg/iid_K2_seed1: round 1 of 2, last write 60 s ago: last line: {ERROR_LINE}",
        "  synthetic/tiny-bert/fedavg/iid_K4_seed0: round 1 of 2, last write 2.0 h ago: no line says why: nothing "
        f"written for more than 30 min (killed?); last line: {PROGRESS_LINE}",
        f"  synthetic/tiny-bert/fedavg/iid_K4_seed1: round 1 of 2, last write 15 min ago: last line: {SIGTERM_LINE}",
        "",
        "diverged:",
        "  synthetic/tiny-bert/fedavg/iid_K1_seed1: at round 2 (training loss 1.23e+03)",
    ]


def test_stall_limit_and_a_checkpoint_deleted_by_hand(sweep):
    # 3 hours of silence is within the limit asked for: the cell killed without a word counts as running
    found = json.loads(_status(sweep, as_json_output=True, stalled_after=3 * 3600))
    states = {c["name"]: c["state"] for c in found["cells"]}
    assert states["synthetic/tiny-bert/fedavg/iid_K4_seed0"] == "running"
    # without its checkpoint a cell starts over: progress.json's round no longer counts
    (sweep / "results/runs/synthetic/tiny-bert/fedavg/iid_K2_seed0/checkpoint.pt").unlink()
    found = json.loads(_status(sweep, as_json_output=True))
    rounds = {c["name"]: c["round"] for c in found["cells"]}
    assert rounds["synthetic/tiny-bert/fedavg/iid_K2_seed0"] == 0


def test_command_line_json_and_one_line_errors(sweep, capsys):
    assert main(["status", "--configfile", str(sweep / "config.yaml"), "--base-dir", str(sweep), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["total"]["finished"] == 2 and len(found["cells"]) == 9
    assert main(["status", "--configfile", str(sweep / "missing.yaml"), "--base-dir", str(sweep)]) == 2
    assert capsys.readouterr().err.startswith("fedsweep: error: ")
    assert main(["status", "--configfile", str(sweep / "config.yaml"), "--stalled-after", "0"]) == 2
    assert "--stalled-after 0 must be" in capsys.readouterr().err


def test_status_of_a_real_run_reads_its_progress_sidecar(micro, tmp_path, request):
    """A real `fedsweep train` (the micro BERT) of 2 rounds of the cell's 3 leaves progress.json
    (status: round 2 of 3); extended to 3 rounds, the cell is finished, its time from the sidecar."""
    import torch

    from fedsweep.train import TrainConfig, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a micro model: more threads only wait for each other on a busy machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    config = small_config()
    config["datasets"]["synthetic"]["second_threshold"] = 3
    config["clients"] = [1]
    write_config(tmp_path / "config.yaml", config)
    out = tmp_path / "results/runs/synthetic/tiny-bert/fedavg/iid_K1_seed0"
    cfg = dict(tokens_dir=str(micro.tokens), shards=micro.k1, model=micro.model, out_dir=str(out), epochs=1,
               batch_size=16, lr=0.05, progress="none", dataset="synthetic")

    def cell() -> dict:
        found = json.loads(status.status([str(tmp_path / "config.yaml")], str(tmp_path), as_json_output=True))
        (only,) = found["cells"]
        return only

    run(TrainConfig(rounds=2, **cfg))
    sidecar = json.loads((out / "progress.json").read_text())
    assert (sidecar["round"], sidecar["rounds"], sidecar["examples"]) == (2, 2, 2 * 96)
    assert sidecar["examples_per_second"] == pytest.approx(sidecar["examples"] / sidecar["train_seconds"])
    assert time.time() - 60 < sidecar["written"] <= time.time()
    found = cell()
    assert (found["state"], found["round"], found["rounds"], found["remaining_from"]) == ("running", 2, 3, "estimate")
    assert found["seconds_spent"] == round(sidecar["seconds"], 1) and sidecar["seconds"] > 0

    run(TrainConfig(rounds=3, **cfg))  # resumes from round 2
    summary = json.loads((out / "run.json").read_text())
    sidecar = json.loads((out / "progress.json").read_text())
    assert (sidecar["round"], sidecar["examples"]) == (3, 3 * 96)
    assert sidecar["examples_per_second"] == pytest.approx(summary["train_examples_per_second"])
    found = cell()
    assert (found["state"], found["round"], found["seconds_remaining"]) == ("finished", 3, 0.0)
    assert found["seconds_spent"] == round(sidecar["seconds"], 1)


def test_status_imports_no_torch_or_pandas(sweep):
    code = ("import sys; from fedsweep.cli import main; main(['status', '--configfile', 'config.yaml']); "
            "print(' '.join(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], cwd=sweep, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    assert "9 cells" in out.stdout
