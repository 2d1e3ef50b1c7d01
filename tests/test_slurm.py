"""The workflow on a real (single-node) SLURM cluster, through profiles/slurm + profiles/slurm-ci.

The cluster is started by the test (tests/slurm_cluster.py) and needs root and Debian's SLURM
packages (``bash .ci/install-slurm.sh``); without them these tests skip, unless
``FEDSWEEP_REQUIRE_SLURM=1`` (CI) turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import slurm_cluster, unavailable_reason

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "profiles" / "slurm", REPO / "profiles" / "slurm-ci"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Columns of metrics.parquet that are measured times, not results.
TIMINGS = ["train_seconds", "aggregate_seconds", "eval_seconds"]


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        if os.environ.get("FEDSWEEP_REQUIRE_SLURM") == "1":
            pytest.fail(f"FEDSWEEP_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    with slurm_cluster() as c:
        c.env.update(OFFLINE)
        yield c


def _wait_for_text(path: Path, pattern: str, timeout: float, job_state=None) -> re.Match:
    """Poll ``path`` until ``pattern`` matches its text; bounded by ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            m = re.search(pattern, path.read_text(errors="replace"))
            if m:
                return m
        if job_state is not None and job_state() not in (None, "PENDING", "CONFIGURING", "RUNNING"):
            break
        time.sleep(0.3)
    text = path.read_text(errors="replace") if path.exists() else "(no file)"
    raise AssertionError(f"{pattern!r} not seen in {path} within {timeout:.0f}s:\n{text[-3000:]}")


def test_sbatch_runs_a_job(cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = cluster.sbatch("-p", cluster.partition, "-o", str(out), "--wrap", "echo hello from job $SLURM_JOB_ID")
    assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.diagnostics()
    assert out.read_text().strip() == f"hello from job {job}"


def _fedsweep(*args: str, env: dict) -> None:
    res = subprocess.run(["fedsweep", *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"fedsweep {' '.join(args)} failed:\n{res.stdout}{res.stderr}"


def test_cancelled_training_job_resumes_to_identical_metrics(cluster, tmp_path):
    """scancel a `fedsweep train` job mid-run; the resubmitted job resumes from its checkpoint
    and ends with the metrics of an uninterrupted run (bitwise, on a CPU)."""
    env = cluster.env
    _fedsweep("prepare", "--name", "synth", "--out-dir", str(tmp_path / "data"), "--spec",
              "{source: synthetic, num_classes: 4, train_size: 256, test_size: 64, difficulty: 0.3, seed: 1}",
              env=env)
    _fedsweep("tokenize", "--data-dir", str(tmp_path / "data"), "--tokenizer", "tiny-bert", "--max-length", "32",
              "--out-dir", str(tmp_path / "tokens"), env=env)
    _fedsweep("partition", "--data-dir", str(tmp_path / "data"), "--clients", "2", "--seed", "0",
              "--out", str(tmp_path / "shards.parquet"), env=env)
    rounds = 20

    def train(out_dir: Path, log: Path) -> str:
        cmd = (f"exec fedsweep train --tokens-dir {tmp_path / 'tokens'} --shards {tmp_path / 'shards.parquet'}"
               f" --model tiny-bert --rounds {rounds} --epochs 1 --batch-size 16 --lr 0.05 --device cpu"
               f" --progress lines --out-dir {out_dir}")
        return cluster.sbatch("-p", cluster.partition, "-c", "1", "-t", "10", "-o", str(log), "--wrap", cmd)

    baseline = train(tmp_path / "baseline", tmp_path / "baseline.log")
    run_dir = tmp_path / "run"
    first = train(run_dir, tmp_path / "first.log")
    # Cancel once round 3 is done: well inside the 20 rounds.
    _wait_for_text(tmp_path / "first.log", r"round 3/20", timeout=240, job_state=lambda: cluster.job_state(first))
    cluster.run(["scancel", first])
    assert cluster.wait_job(first, timeout=90) == "CANCELLED"
    log = (tmp_path / "first.log").read_text()
    saved = re.search(r"SIGTERM: saved round (\d+)", log)
    assert saved, f"the cancelled job did not checkpoint on SIGTERM:\n{log[-2000:]}"
    saved_round = int(saved.group(1))
    assert 3 <= saved_round < rounds
    assert (run_dir / "checkpoint.pt").exists()
    assert not (run_dir / "metrics.parquet").exists()

    second = train(run_dir, tmp_path / "second.log")
    assert cluster.wait_job(second, timeout=300) == "COMPLETED", (tmp_path / "second.log").read_text()[-3000:]
    assert cluster.wait_job(baseline, timeout=300) == "COMPLETED", (tmp_path / "baseline.log").read_text()[-3000:]

    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["resumed_from_round"] == saved_round
    assert summary["slurm_job_id"] == second
    assert json.loads((tmp_path / "baseline" / "run.json").read_text())["resumed_from_round"] == 0

    import pandas as pd

    resumed = pd.read_parquet(run_dir / "metrics.parquet").drop(columns=TIMINGS)
    uninterrupted = pd.read_parquet(tmp_path / "baseline" / "metrics.parquet").drop(columns=TIMINGS)
    assert list(resumed["round"]) == list(range(rounds + 1))
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)


def _demo_config(path: Path, second_threshold: int) -> None:
    """config/demo.yaml cut to one model and K in {1, 2}, for a few minutes on 2 CPU cores."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results_dir"] = "results"
    cfg["models"] = {"tiny-bert": cfg["models"]["tiny-bert"]}
    cfg["clients"] = [1, 2]
    cfg["seeds"] = [0]
    (name,) = list(cfg["datasets"])[:1]
    cfg["datasets"] = {name: cfg["datasets"][name]}
    cfg["datasets"][name]["second_threshold"] = second_threshold
    cfg["datasets"][name]["budget"] = min(cfg["datasets"][name]["budget"], second_threshold)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_demo_workflow_through_slurm_survives_a_cancelled_training_job(cluster, tmp_path):
    """The demo grid (cut down) through `--profile profiles/slurm --profile profiles/slurm-ci`:
    every job but the local ones goes through sbatch, one training job is scancel'ed mid-run,
    Snakemake resubmits it (retries) and the new job resumes from the checkpoint."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    for needed in (REPO / "Snakefile", REPO / "config" / "demo.yaml"):
        if not needed.exists():
            pytest.skip(f"{needed} not present")
    work = tmp_path / "work"
    work.mkdir()
    rounds = 12
    _demo_config(work / "config.yaml", second_threshold=rounds)
    dataset = next(iter(yaml.safe_load((work / "config.yaml").read_text())["datasets"]))
    victim_log = work / "results" / "logs" / "train" / dataset / "tiny-bert" / "K2_seed0.log"
    victim_run = work / "results" / "runs" / dataset / "tiny-bert" / "K2_seed0"

    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--configfile",
           str(work / "config.yaml")]
    for profile in PROFILES:
        cmd += ["--profile", str(profile)]
    smk_log = work / "snakemake.log"
    killed = None
    timeout = 900
    with open(smk_log, "w") as out:
        # cwd = the work folder: .snakemake/ (and its slurm_logs) go there, not into the repo.
        proc = subprocess.Popen(cmd, cwd=work, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                done = [int(r) for r in re.findall(r"round (\d+)/", victim_log.read_text())] if victim_log.exists() else []
                if killed is None and done and 2 <= max(done) < rounds:
                    listing = cluster.run(["squeue", "-h", "-o", "%i|%k"]).stdout.split()
                    ids = [line.split("|")[0] for line in listing
                           if line.split("|", 1)[1].startswith("rule_train") and line.endswith("_2_0")]
                    if ids:
                        killed = ids[0]
                        cluster.run(["scancel", killed])
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
    log = smk_log.read_text(errors="replace")
    assert proc.returncode == 0, f"snakemake exited with {proc.returncode} (timeout {timeout}s):\n{log[-6000:]}"

    # The figures and tables of the report came out.
    results = work / "results"
    for figure in ("accuracy_vs_clients", "rounds_to_target", "accuracy_per_round"):
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{figure}.{ext}").stat().st_size > 0
    for table in ("accuracy_at_budget", "rounds_to_target"):
        assert (results / "tables" / f"{table}.csv").stat().st_size > 0

    # The jobs went through SLURM: sbatch ids in Snakemake's log, SLURM_JOB_ID in each run.json.
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    rules = set(re.findall(r"slurm_logs/rule_(\w+?)/", log))
    assert {"tokenize", "partition", "train", "report"} <= rules, log[-4000:]
    assert len(submitted) >= 6
    for k in (1, 2):
        summary = json.loads((results / "runs" / dataset / "tiny-bert" / f"K{k}_seed0" / "run.json").read_text())
        assert summary["slurm_job_id"] in submitted

    # The cancelled training job failed, was resubmitted, and the new job resumed.
    assert killed is not None, f"the K=2 training job was never seen running:\n{log[-4000:]}"
    assert f"SLURM-job '{killed}' failed" in log, log[-4000:]
    summary = json.loads((victim_run / "run.json").read_text())
    assert summary["slurm_job_id"] != killed
    assert summary["resumed_from_round"] >= 2, summary
    import pandas as pd

    metrics = pd.read_parquet(victim_run / "metrics.parquet")
    assert list(metrics["round"]) == list(range(rounds + 1))
