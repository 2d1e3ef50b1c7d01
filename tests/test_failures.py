"""The causes of failed jobs at the end of a failed run (the Snakefile's onerror): read from
Snakemake's log and each failed job's own logs, so that they reach the console under the slurm
executor too, where a job's stderr goes to its SLURM log."""

from __future__ import annotations

from fedsweep.failures import causes, failed_jobs

# What the slurm executor writes into Snakemake's log (snakemake-executor-plugin-slurm): a job that
# fails on its own, a cancelled one (time limit) that was retried and then finished, and one whose
# rule log is empty.
SLURM_LOG = """\
Error in rule train:
    message: SLURM-job '41' failed, SLURM status is: 'FAILED'. For further error details see the cluster/cloud log and the log files of the involved rule(s).
    jobid: 7
    input: results/tokens/synthetic/tiny-bert_L32/meta.json
    output: results/runs/synthetic/tiny-bert/fedavg/iid_K2_seed0/metrics.parquet
    log: results/logs/train/a.log, .snakemake/slurm_logs/rule_train/41.log (check log file(s) for error details)
Error in rule train:
    message: SLURM-job '42' failed, SLURM status is: 'TIMEOUT'.
    jobid: 8
    log: results/logs/train/b.log, .snakemake/slurm_logs/rule_train/42.log (check log file(s) for error details)
Trying to restart job 8.
Finished jobid: 8 (Rule: train)
Error in rule train:
    message: SLURM-job '43' failed, SLURM status is: 'OUT_OF_MEMORY'.
    jobid: 9
    log: results/logs/train/c.log, .snakemake/slurm_logs/rule_train/43.log (check log file(s) for error details)
Error in rule partition:
    message: SLURM-job '44' failed, SLURM status is: 'NODE_FAIL'.
    jobid: 10
    log: results/logs/partition/d.log (check log file(s) for error details)
"""


def test_each_failed_job_gets_the_line_that_says_why(tmp_path):
    logs = {
        "results/logs/train/a.log": "round 1/4 ...\nfedsweep: error: train: clients=2 leaves a shard of 3 examples\n",
        "results/logs/train/c.log": "round 3/40 train loss 0.61\n",
        ".snakemake/slurm_logs/rule_train/43.log": "slurmstepd: error: Detected 1 oom_kill event in StepId=43.batch\n",
        "results/logs/partition/d.log": "",
    }
    for path, text in logs.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "snakemake.log").write_text(SLURM_LOG)
    assert [rule for rule, _ in failed_jobs(SLURM_LOG)] == ["train", "train", "partition"]  # job 8 finished
    assert causes([tmp_path / "snakemake.log"], tmp_path) == [
        "cause (rule train, log results/logs/train/a.log): fedsweep: error: train: clients=2 leaves a shard of 3 "
        "examples",
        "cause (rule train, log .snakemake/slurm_logs/rule_train/43.log): slurmstepd: error: Detected 1 oom_kill "
        "event in StepId=43.batch",
        "cause: rule partition: no log says why (see Snakemake's messages above)",
    ]
    assert causes([tmp_path / "missing.log"], tmp_path) == []
