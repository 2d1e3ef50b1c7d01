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
TIMINGS = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]  # differ run to run


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


@pytest.mark.slow
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


def _demo_config(path: Path, second_threshold: int, chain: bool = False, **resources) -> dict:
    """config/demo.yaml cut to tiny-bert and K in {1, 2}, for a few minutes on 2 CPU cores; with
    ``chain``, also the data set ``chain``: a copy of the demo's, whose cells have a max_runtime of
    two thirds of their runtime, so that each runs as a chain of two jobs."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results_dir"] = "results"
    cfg["models"] = {"tiny-bert": {k: v for k, v in cfg["models"]["tiny-bert"].items() if k != "seeds"}}
    cfg["clients"] = [1, 2]
    cfg["seeds"] = [0]
    cfg.pop("algorithms", None)  # FedAvg on iid shards only
    cfg.pop("partitions", None)
    (name,) = list(cfg["datasets"])[:1]
    cfg["datasets"] = {name: cfg["datasets"][name]}
    cfg["datasets"][name]["second_threshold"] = second_threshold
    cfg["datasets"][name]["budget"] = min(cfg["datasets"][name]["budget"], second_threshold)
    if chain:
        cfg["datasets"]["chain"] = {**cfg["datasets"][name], "resources": {"max_runtime": 20}}
    # CPU jobs of 30 min (a chain link: 15); memory estimated (tiny-bert: the 2000 MB floor)
    cfg["resources"] = {"gpus": 0, "runtime": 30, "mem_mb": "auto", **resources}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def _snakemake_cmd(config: Path, profiles=PROFILES) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--configfile", str(config)]
    for profile in profiles:
        cmd += ["--profile", str(profile)]
    return cmd


def _needs_workflow():
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    for needed in (REPO / "Snakefile", REPO / "config" / "demo.yaml"):
        if not needed.exists():
            pytest.skip(f"{needed} not present")


def _refused_before_any_job(cluster, work: Path, profiles, expected: str) -> str:
    """Run the workflow; it must stop with one line starting with ``expected`` before any job
    (not even the local ones) and any submission. Returns that line."""
    res = subprocess.run(_snakemake_cmd(work / "config.yaml", profiles), cwd=work, env=cluster.env,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("slurm: ")]
    assert len(lines) == 1 and lines[0].startswith(expected), out[-3000:]
    assert "submitted with SLURM jobid" not in out and not (work / ".snakemake" / "slurm_logs").exists()
    assert not (work / "results").exists(), "a job ran before the check"
    assert cluster.active_jobs() == []
    return lines[0]


def _cluster_check(cluster, work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["fedsweep", "cluster-check", *args], cwd=REPO, env=cluster.env, capture_output=True,
                          text=True, timeout=120)


def test_cluster_without_accounting_is_detected_before_any_submission(cluster, tmp_path):
    """The profile as shipped on a cluster without accounting: the slurm executor would poll a
    failing sacct forever after the first submission. The workflow stops before any job with one
    line, and `fedsweep cluster-check` says which setting fixes it."""
    _needs_workflow()
    work = tmp_path / "work"
    work.mkdir()
    _demo_config(work / "config.yaml", second_threshold=2)
    line = _refused_before_any_job(cluster, work, [REPO / "profiles" / "slurm"], "slurm: sacct fails")
    assert "add 'slurm-status-command: squeue' to the profile" in line

    res = _cluster_check(cluster, work, "--profile", str(REPO / "profiles" / "slurm"),
                         "--configfile", str(work / "config.yaml"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "accounting: sacct fails" in res.stdout and "\n  slurm-status-command: squeue\n" in res.stdout
    assert f"slurm_partition: {cluster.partition}" in res.stdout
    res = _cluster_check(cluster, work, "--profile", str(PROFILES[0]), "--profile", str(PROFILES[1]),
                         "--configfile", str(work / "config.yaml"))
    assert res.returncode == 0 and "no problems" in res.stdout, res.stdout + res.stderr


def test_memory_request_above_the_node_is_refused_with_one_line(cluster, tmp_path):
    """`sbatch --mem` above every node fails with a message shown nowhere useful; the workflow
    refuses it before submitting, naming the job, the value, its setting and the node's memory."""
    _needs_workflow()
    work = tmp_path / "work"
    work.mkdir()
    too_much = cluster.memory_mb + 1000
    _demo_config(work / "config.yaml", second_threshold=2, mem_mb=too_much)
    line = _refused_before_any_job(cluster, work, PROFILES, "slurm: training job synthetic/tiny-bert/fedavg/iid_K")
    assert (f"asks for mem_mb={too_much} (resources.mem_mb of the config), more than any node of partition "
            f"{cluster.partition} has ({cluster.memory_mb} MB)") in line, line
    res = _cluster_check(cluster, work, "--profile", str(PROFILES[0]), "--profile", str(PROFILES[1]),
                         "--configfile", str(work / "config.yaml"))
    assert res.returncode == 1 and f"asks for mem_mb={too_much} (resources.mem_mb)" in res.stdout, res.stdout


@pytest.mark.slow
def test_demo_workflow_through_slurm_survives_a_cancelled_training_job(cluster, tmp_path):
    """The demo grid (cut down) through `--profile profiles/slurm --profile profiles/slurm-ci`,
    under umask 002: every job but the local ones goes through sbatch, one training job is
    scancel'ed mid-run, Snakemake resubmits it (retries), the new job resumes from the checkpoint,
    and the cell's log keeps both attempts. The same cells with a max_runtime below their runtime
    run as chains of two jobs and end with the metrics of the single jobs. Every output file is
    group-readable and -writable (0664)."""
    _needs_workflow()
    work = tmp_path / "work"
    work.mkdir()
    rounds = 12
    cfg = _demo_config(work / "config.yaml", second_threshold=rounds, chain=True)
    dataset = next(iter(cfg["datasets"]))
    victim_log = work / "results" / "logs" / "train" / dataset / "tiny-bert" / "fedavg" / "iid_K2_seed0.log"
    victim_run = work / "results" / "runs" / dataset / "tiny-bert" / "fedavg" / "iid_K2_seed0"
    victim_comment = f"rule_train_wildcards_{dataset}_tiny-bert_fedavg_iid_2_0"

    cmd = _snakemake_cmd(work / "config.yaml")
    smk_log = work / "snakemake.log"
    killed = None
    timeout = 900
    t0 = time.monotonic()
    with open(smk_log, "w") as out:
        # cwd = the work folder: .snakemake/ (and its slurm_logs) go there, not into the repo.
        proc = subprocess.Popen(cmd, cwd=work, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, umask=0o002)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                done = [int(r) for r in re.findall(r"round (\d+)/", victim_log.read_text())] if victim_log.exists() else []
                if killed is None and done and 2 <= max(done) < rounds:
                    listing = cluster.run(["squeue", "-h", "-o", "%i|%k"]).stdout.split()
                    ids = [line.split("|")[0] for line in listing if line.split("|", 1)[1] == victim_comment]
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
    seconds = time.monotonic() - t0
    log = smk_log.read_text(errors="replace")
    assert proc.returncode == 0, f"snakemake exited with {proc.returncode} (timeout {timeout}s):\n{log[-6000:]}"
    print(f"demo through SLURM: {seconds:.0f} s")

    # The figures and tables of the report came out.
    results = work / "results"
    for figure in ("accuracy_vs_clients", "rounds_to_target", "accuracy_per_round"):
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{figure}.{ext}").stat().st_size > 0
    for table in ("accuracy_at_budget", "rounds_to_target"):
        assert (results / "tables" / f"{table}.csv").stat().st_size > 0

    # The jobs went through SLURM: sbatch ids in Snakemake's log, SLURM_JOB_ID in each run.json;
    # the cheap jobs (tokenise, shard) as one group job.
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    kinds = set(re.findall(r"slurm_logs/(rule|group)_(\w+?)/", log))
    assert {("rule", "train"), ("rule", "train_segment"), ("rule", "report")} <= kinds, log[-4000:]
    assert any(kind == "group" and name.startswith("prep") for kind, name in kinds), kinds
    assert ("rule", "tokenize") not in kinds and ("rule", "partition") not in kinds
    for k in (1, 2):
        summary = json.loads((results / "runs" / dataset / "tiny-bert" / "fedavg" / f"iid_K{k}_seed0" / "run.json").read_text())
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

    # The cell's log holds both attempts, each under its header, and the SIGTERM between them.
    text = victim_log.read_text()
    first = f"fedsweep train to round {rounds}: attempt 1, SLURM job {killed} on "
    second = f"fedsweep train to round {rounds}: attempt 2, SLURM job {summary['slurm_job_id']} on "
    assert first in text and second in text, text[-3000:]
    assert text.index(first) < text.index("SIGTERM: saved round") < text.index(second)
    assert os.path.samefile(victim_log, victim_run / "train.log")

    # The chains: two jobs each (rounds 1-6, then 7-12), the same metrics as one job.
    for k in (1, 2):
        chain = results / "runs" / "chain" / "tiny-bert" / "fedavg" / f"iid_K{k}_seed0"
        single = results / "runs" / dataset / "tiny-bert" / "fedavg" / f"iid_K{k}_seed0"
        assert (chain / "segments" / "r6.done").exists()
        part = json.loads((chain / "segments" / "r6.run.json").read_text())
        assert part["resumed_from_round"] == 0 and part["config"]["rounds"] == 6
        last = json.loads((chain / "run.json").read_text())
        assert last["resumed_from_round"] == 6 and last["slurm_job_id"] != part["slurm_job_id"]
        got = pd.read_parquet(chain / "metrics.parquet").drop(columns=TIMINGS + ["dataset"])
        want = pd.read_parquet(single / "metrics.parquet").drop(columns=TIMINGS + ["dataset"])
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        chain_log = (results / "logs" / "train" / "chain" / "tiny-bert" / "fedavg" / f"iid_K{k}_seed0.log").read_text()
        assert "fedsweep train to round 6: attempt 1" in chain_log
        assert "fedsweep train to round 12: attempt 1" in chain_log
    # each link asked for its share of the 30 minutes
    assert re.search(r"rule train_segment:(?:\n    .*)*?\n    resources: .*runtime=15,", log), log[-4000:]
    assert "Error in rule train_segment" not in log

    # umask 002: every file the jobs wrote is group-readable and -writable
    modes = {str(p.relative_to(results)): oct(p.stat().st_mode & 0o777) for p in results.rglob("*") if p.is_file()}
    wrong = {p: m for p, m in modes.items() if m != oct(0o664)}
    assert not wrong, wrong
    assert {"runs/synthetic/tiny-bert/fedavg/iid_K1_seed0/metrics.parquet",
            "runs/synthetic/tiny-bert/fedavg/iid_K1_seed0/checkpoint.pt",
            "logs/train/synthetic/tiny-bert/fedavg/iid_K1_seed0.log"} <= set(modes)


@pytest.mark.skipif(os.environ.get("FEDSWEEP_MEASURE_SLURM_OVERHEAD") != "1",
                    reason="a measurement (~10 min): FEDSWEEP_MEASURE_SLURM_OVERHEAD=1 runs it")
def test_measure_overhead_of_the_demo_through_slurm(cluster, tmp_path):
    """The whole demo (config/demo.yaml, 36 cells) through SLURM with the profile's status timing
    and groups, and with the plugin's defaults (40 s, no groups), printing both wall times; the
    README's numbers. Only the profile differs (the workflow is this one in both)."""
    _needs_workflow()
    overlay = {"slurm-status-command": "squeue",
               "default-resources": {"slurm_partition": cluster.partition, "runtime": 30, "mem_mb": 2000},
               "set-resources": {"train": {"gpu": 0}, "train_segment": {"gpu": 0}}}
    variants = {"profile": overlay,
                "plugin defaults": {**overlay, "slurm-init-seconds-before-status-checks": 40, "groups": [],
                                    "group-components": []}}
    times = {}
    for name, settings in variants.items():
        work = tmp_path / name.replace(" ", "-")
        (work / "overlay").mkdir(parents=True)
        (work / "overlay" / "config.yaml").write_text(yaml.safe_dump(settings))
        cmd = _snakemake_cmd(REPO / "config" / "demo.yaml", [PROFILES[0], work / "overlay"])
        t0 = time.monotonic()
        res = subprocess.run(cmd, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=1200)
        times[name] = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        times[name + " jobs"] = len(re.findall(r"submitted with SLURM jobid", out))
    print(f"demo through SLURM: {times}")
    assert times["profile"] < times["plugin defaults"]
