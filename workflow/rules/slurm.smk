# With the slurm executor, before the first job is submitted (onstart: the DAG is built; not in
# dry runs or jobs): stop with one line when sacct fails and the profile does not say
# `slurm-status-command: squeue` (the executor would poll sacct forever), or when a job asks for
# more memory, time or GPUs than the nodes of its partition have (sbatch would refuse it, or it
# would pend forever). The checks are fedsweep.slurm's; FEDSWEEP_SKIP_CLUSTER_CHECK=1 skips them.
import subprocess

from fedsweep import slurm as slurm_checks


class ClusterError(WorkflowError):
    """The slurm executor would hang, or SLURM would refuse or never start a job: one line."""


def _origin(rule_name, resource):
    """Where a job's resource value comes from, for the message."""
    if resource in workflow.resource_settings.overwrite_resources.get(rule_name, {}):
        return f"set-resources {rule_name}:{resource}"
    if rule_name in ("train", "train_segment"):
        return f"resources.{resource} of the config"
    return f"{resource} of default-resources"


def _job_name(job):
    wc = job.wildcards_dict
    if job.rule.name not in ("train", "train_segment"):
        return f"job {job.rule.name} {'/'.join(map(str, wc.values()))}".strip()
    rounds = f" (to round {wc['rounds']})" if "rounds" in wc else ""
    return f"training job {grid.cell_name(wc)}{rounds}"


def job_requests():
    """What each SLURM job of the DAG asks for (a group of jobs is one SLURM job)."""
    seen_groups = set()
    for job in workflow.dag.needrun_jobs():
        if job.is_local:
            continue
        group = workflow.dag.get_job_group(job)
        if group is not None and id(group) in seen_groups:
            continue
        if group is not None:
            seen_groups.add(id(group))
            rules = "/".join(sorted({j.rule.name for j in group.jobs}))
            name = f"group job {group.groupid} ({len(group.jobs)} {rules} jobs)"
            resources = group.resources
        else:
            name, resources = _job_name(job), job.resources
        value = lambda key: v if isinstance(v := resources.get(key), int) else None
        partition = job.resources.get("slurm_partition")
        yield slurm_checks.JobRequest(
            name=name,
            mem_mb=value("mem_mb"),
            runtime=value("runtime"),
            gpus=value("gpu") or 0,
            partition=str(partition) if partition else None,
            mem_origin=_origin(job.rule.name, "mem_mb"),
        )


def check_cluster():
    plugin = getattr(workflow, "executor_plugin", None)
    if getattr(plugin, "name", None) != "slurm" or os.environ.get(
        "FEDSWEEP_SKIP_CLUSTER_CHECK"
    ):
        return
    settings = workflow.executor_settings
    try:
        info = slurm_checks.query_cluster()
    except (FedsweepError, OSError, subprocess.SubprocessError) as exc:
        print(f"slurm: warning: cannot check the cluster ({exc})", file=sys.stderr)
        return
    problem = slurm_checks.accounting_problem(
        info,
        getattr(settings, "status_command", None),
        getattr(settings, "init_seconds_before_status_checks", None),
    )
    if problem:
        raise ClusterError(f"slurm: {problem}")
    requests = list(job_requests())
    problems = [p for r in requests for p in slurm_checks.request_problems(r, info)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ClusterError(f"slurm: {problems[0]}{more}")
    # Retries double a job's time: never beyond what the training jobs' partitions allow.
    limits = [
        part.max_time
        for r in requests
        if r.name.startswith("training job")
        and (part := info.partition(r.partition)) is not None
        and part.max_time is not None
    ]
    SWEEP.time_limit = min(limits, default=None)
