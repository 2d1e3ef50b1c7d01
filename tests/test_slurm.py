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


def test_sbatch_runs_a_job(cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = cluster.sbatch("-p", cluster.partition, "-o", str(out), "--wrap", "echo hello from job $SLURM_JOB_ID")
    assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.diagnostics()
    assert out.read_text().strip() == f"hello from job {job}"


def _demo_config(path: Path, second_threshold: int, chain: bool = False, **resources) -> dict:
    """config/demo.yaml cut to tiny-bert and K in {1, 2}, for a few minutes on 2 CPU cores; with
    ``chain``, its cells have a max_runtime of two thirds of their runtime, so that each runs as a
    chain of two jobs."""
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
        cfg["datasets"][name]["resources"] = {"max_runtime": 20}
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


def _uninterrupted(work: Path, summary_file: Path, rounds: int, out: Path) -> subprocess.Popen:
    """The cell of ``summary_file`` (a run.json) trained to ``rounds`` in one local process, started
    now, from its settings and the workflow's tokens and shards, with the job's threads (CPU
    results are bitwise at one thread count)."""
    from fedsweep.trainconfig import CELL_KEYS

    summary = json.loads(summary_file.read_text())
    cfg = summary["config"]
    settings = {key: cfg[key] for key in CELL_KEYS if key in cfg}
    cmd = ["fedsweep", "train", "--tokens-dir", cfg["tokens_dir"], "--shards", cfg["shards"], "--model", cfg["model"],
           "--rounds", str(rounds), "--seed", str(cfg["seed"]), "--dataset", cfg["dataset"], "--device", "cpu",
           "--progress", "none", "--out-dir", str(out), "--settings", json.dumps(settings)]
    threads = str(summary["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_demo_workflow_through_slurm_survives_a_cancelled_training_job(cluster, tmp_path):
    """The demo grid (cut down) through `--profile profiles/slurm --profile profiles/slurm-ci`,
    under umask 002: every job but the local ones goes through sbatch, each cell runs as a chain of
    two jobs (its max_runtime is below its runtime), the first job of one cell is scancel'ed
    mid-run (SIGTERM: it saves its round), Snakemake resubmits it (retries), the new job resumes
    from the checkpoint, and the chain ends with the metrics of one uninterrupted local run
    (bitwise, on a CPU); the cell's log keeps every job. Every output file is group-readable and
    -writable (0664)."""
    _needs_workflow()
    work = tmp_path / "work"
    work.mkdir()
    rounds, first_link = 12, 6
    cfg = _demo_config(work / "config.yaml", second_threshold=rounds, chain=True)
    dataset = next(iter(cfg["datasets"]))
    runs = work / "results" / "runs" / dataset / "tiny-bert" / "fedavg"
    victim_run = runs / "iid_K2_seed0"
    victim_comment = f"rule_train_segment_wildcards_{dataset}_tiny-bert_fedavg_iid_2_0_{first_link}"

    cmd = _snakemake_cmd(work / "config.yaml")
    smk_log = work / "snakemake.log"
    killed = baseline = None
    timeout = 900
    t0 = time.monotonic()
    # the plugin's status queries at the profile's 2 s, without its back-off (tests/slurm_status)
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "slurm_status"),
                                                                      cluster.env.get("PYTHONPATH")]))}
    with open(smk_log, "w") as out:
        # cwd = the work folder: .snakemake/ (and its slurm_logs) go there, not into the repo.
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, umask=0o002)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                log = victim_run / "train.log"
                done = [int(r) for r in re.findall(r"round (\d+)/", log.read_text())] if log.exists() else []
                if killed is None and done and 2 <= max(done) < first_link - 1:
                    listing = cluster.run(["squeue", "-h", "-o", "%i|%k"]).stdout.split()
                    ids = [line.split("|")[0] for line in listing if line.split("|", 1)[1] == victim_comment]
                    if ids:
                        killed = ids[0]
                        cluster.run(["scancel", killed])
                # the uninterrupted run to compare with, while the workflow mostly waits for SLURM
                first_summary = victim_run / "segments" / f"r{first_link}.run.json"
                if baseline is None and first_summary.exists():
                    baseline = _uninterrupted(work, first_summary, rounds, tmp_path / "baseline")
                time.sleep(0.2)
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

    # The figures and tables of the report came out (a local rule: on the login node).
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
    assert {("rule", "train"), ("rule", "train_segment")} <= kinds, log[-4000:]
    assert any(kind == "group" and name.startswith("prep") for kind, name in kinds), kinds
    assert not {("rule", "tokenize"), ("rule", "partition"), ("rule", "report")} & kinds, kinds

    # The cancelled job failed, was resubmitted, and the new job resumed from its checkpoint.
    assert killed is not None, f"the K=2 cell's first job was never seen running:\n{log[-4000:]}"
    assert f"SLURM-job '{killed}' failed" in log, log[-4000:]
    link = json.loads((victim_run / "segments" / f"r{first_link}.run.json").read_text())
    assert link["slurm_job_id"] in submitted and link["slurm_job_id"] != killed
    assert 2 <= link["resumed_from_round"] < first_link, link

    # Each cell: a chain of two jobs (rounds 1-6, then 7-12), each asking for its share of the
    # 30 minutes; the interrupted one ends with the metrics of one uninterrupted run.
    import pandas as pd

    for k in (1, 2):
        run = runs / f"iid_K{k}_seed0"
        part = json.loads((run / "segments" / f"r{first_link}.run.json").read_text())
        last = json.loads((run / "run.json").read_text())
        assert part["config"]["rounds"] == first_link and (k == 2 or part["resumed_from_round"] == 0)
        assert last["resumed_from_round"] == first_link and last["slurm_job_id"] in submitted
        assert last["slurm_job_id"] != part["slurm_job_id"]
        assert list(pd.read_parquet(run / "metrics.parquet")["round"]) == list(range(rounds + 1))
    assert baseline is not None and baseline.wait(timeout=300) == 0, baseline.stdout.read()
    got = pd.read_parquet(victim_run / "metrics.parquet").drop(columns=TIMINGS)
    want = pd.read_parquet(tmp_path / "baseline" / "metrics.parquet").drop(columns=TIMINGS)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert re.search(r"rule train_segment:(?:\n    .*)*?\n    resources: .*runtime=15,", log), log[-4000:]

    # The cell's log holds every job under its header, and the SIGTERM after the first.
    text = (victim_run / "train.log").read_text()
    headers = [f"fedsweep train to round {first_link}: attempt 1, SLURM job {killed} on ",
               f"fedsweep train to round {first_link}: attempt 2, SLURM job {link['slurm_job_id']} on ",
               f"fedsweep train to round {rounds}: attempt 1, SLURM job {last['slurm_job_id']} on "]
    assert all(h in text for h in headers), text[-3000:]
    assert text.index(headers[0]) < text.index("SIGTERM: saved round") < text.index(headers[1]) < text.index(headers[2])
    assert os.path.samefile(victim_run / "train.log",
                            results / "logs" / "train" / dataset / "tiny-bert" / "fedavg" / "iid_K2_seed0.log")

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
