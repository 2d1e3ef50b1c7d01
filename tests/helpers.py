"""What several test modules share: running the workflow in a temporary copy of its files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "envs")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # the `fedsweep` executable lives beside this interpreter
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}

def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: float = 900,
              env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env={**ENV, **(env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake run or dry run: rule -> number of jobs."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3:]:
                m = re.fullmatch(r"(\w+)\s+(\d+)", row.strip())
                if not m:
                    break
                counts[m.group(1)] = int(m.group(2))
            break
    counts.pop("total", None)
    return counts


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def small_config() -> dict:
    """A config of a few seconds: tiny-bert on a small synthetic data set, K in {1, 2}."""
    return {
        "clients": [1, 2],
        "models": {"tiny-bert": {"tokenizer": "minilm", "train": {"lr": 0.1}}},
        "datasets": {
            "synthetic": {
                "spec": {"source": "synthetic", "num_classes": 4, "train_size": 128, "test_size": 64},
                "budget": 1, "second_threshold": 2,
            }
        },
        "train": {"epochs": 1, "batch_size": 16, "max_length": 32},
    }


def local_csv(rows: int, name: str = "train.csv") -> dict:
    """A local data set over CSV files the case writes into its workdir (see write_inputs)."""
    return {"spec": {"source": "local", "train": f"data/{rows}_{name}", "test": "data/test.csv"},
            "budget": 1, "second_threshold": 1}


def write_inputs(work: Path) -> None:
    """Small valid data files and model folders that cases point at (relative to the workdir)."""
    data = work / "data"
    data.mkdir()
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    for rows in (40, 300):
        pd.DataFrame({"text": [f"{words[i % 4]} {i}" for i in range(rows)],
                      "label": [i % 4 for i in range(rows)]}).to_csv(data / f"{rows}_train.csv", index=False)
    pd.DataFrame({"text": [f"{w} test" for w in words], "label": range(4)}).to_csv(data / "test.csv", index=False)
    pd.DataFrame({"text": [f"{words[i % 4]} {i}" for i in range(50)],
                  "label": [i % 4 for i in range(50)]}).to_parquet(data / "50.parquet")
    (work / "afile").write_text("not a folder\n")
    (work / "afile0").write_text("")
    (data / "garbage.parquet").write_bytes(b"PAR1 this is not a parquet file")
    short = work / "models" / "short"  # a local model folder whose positions stop at 16
    short.mkdir(parents=True)
    (short / "config.json").write_text('{"model_type": "bert", "max_position_embeddings": 16}\n')
    (work / "models" / "empty").mkdir()


# several processes of one cell on this machine (gloo)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_side_by_side(single: list[str], multi: list[str], env: dict, logs: Path) -> None:
    """A one-process run and a 2-rank run (``TORCHRUN``) side by side, so that one's start-up
    overlaps the other's (they write separate folders: their numbers do not depend on it); both
    must succeed. Their output goes to files in ``logs`` (a pipe left unread while the other
    runs could fill up)."""
    procs = []
    for name, cmd in (("single", single), ("multi", multi)):
        log = logs / f"{name}.log"
        with open(log, "w") as out:
            procs.append((log, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)))
    try:
        for log, proc in procs:
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
