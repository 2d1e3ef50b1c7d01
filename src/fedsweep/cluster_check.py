"""``fedsweep cluster-check``: the cluster, the settings to use, and each problem of a config's
jobs on it; and ``--calibrate``: the throughput of finished cells, as settings for the config.

The cluster comes from :mod:`fedsweep.slurm`, each cell's request from :mod:`fedsweep.estimate`
(as the workflow computes it), the config checked by :func:`fedsweep.config.load`, as the
workflow checks it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import grid
from .config import Sweep
from .estimate import CellPlan
from .slurm import (ClusterInfo, JobRequest, Partition, accounting_problem, format_minutes, request_problems,
                    resource_items, set_resources_of)

# ----------------------------------------------------------------------------- the report


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        self.lines.append(text)


def _profile_value(profile: dict[str, Any], key: str) -> Any:
    return profile.get(key, profile.get(key.replace("-", "_")))


def check_cluster_report(info: ClusterInfo, *, profile: dict[str, Any], profile_names: Sequence[str],
                         sweep: Sweep | None, config_names: Sequence[str],
                         partition: str | None = None, accounts: Sequence[str] = (),
                         status_command: str | None = None) -> CheckReport:
    """What ``fedsweep cluster-check`` prints: the cluster, the settings to use, and each problem
    (a line that would make the run hang or a job be refused). ``status_command``: the
    ``--slurm-status-command`` the run will be given on the command line (over the profile's)."""
    if status_command:
        profile = {**profile, "slurm-status-command": status_command}
    rep = CheckReport()
    defaults = resource_items(profile.get("default-resources"))
    train_set = set_resources_of(profile, "train")
    part = _cluster_lines(rep, info, partition or train_set.get("slurm_partition") or defaults.get("slurm_partition"))
    status = _profile_value(profile, "slurm-status-command")
    needs_squeue = _status_lines(rep, info, profile, profile_names) and status != "squeue"
    account = defaults.get("slurm_account") or train_set.get("slurm_account")
    _account_lines(rep, account, accounts)
    max_runtime_needed = False
    config = sweep.config if sweep is not None else None
    if sweep is not None and part is not None:
        plans, max_runtime_needed = _plan_cells(rep, info, part, sweep, train_set)
        _cell_lines(rep, part, plans, config_names)
    _settings_lines(rep, part, config, needs_squeue, account, accounts)
    if max_runtime_needed and part is not None and part.max_time is not None:
        rep.problems.append(f"config: set resources.max_runtime: {part.max_time} (partition {part.name}'s MaxTime)")
    return rep


def _cluster_lines(rep: CheckReport, info: ClusterInfo, chosen: str | None) -> Partition | None:
    """The partitions; the one the training jobs go to (the default when ``chosen`` does not exist)."""
    rep.add(f"SLURM {info.version or '(version unknown)'}: {len(info.partitions)} partition(s)")
    for p in info.partitions:
        gpus = f"{p.max_gpus} GPUs" if p.max_gpus else "no GPUs"
        rep.add(f"  {p.name}{' (default)' if p.default else ''}: {len(p.nodes)} node(s), up to {p.max_cpus} CPUs, "
                f"{p.max_memory_mb} MB and {gpus} per node, MaxTime {format_minutes(p.max_time)}, {p.state}")
    part = info.partition(chosen)
    if part is None:
        rep.problems.append(f"partition {chosen!r} does not exist (partitions: "
                            f"{', '.join(p.name for p in info.partitions) or 'none'})")
        part = info.partition(None)
    rep.add()
    return part


def _status_lines(rep: CheckReport, info: ClusterInfo, profile: dict[str, Any], profile_names: Sequence[str]
                  ) -> bool:
    """Status queries, the silent hang: whether they need squeue."""
    status = _profile_value(profile, "slurm-status-command")
    init = _profile_value(profile, "slurm-init-seconds-before-status-checks")
    if info.accounting.works:
        rep.add("accounting: sacct works: the executor's default status queries (sacct) are fine")
    else:
        rep.add(f"accounting: sacct fails ({info.accounting.message}): status queries need squeue")
        age = info.min_job_age
        if age is not None:
            enough = "enough" if age >= 3 * (init or 40) else "too short"
            rep.add(f"  MinJobAge = {age} s: squeue shows finished jobs for {age} s, {enough} for queries every "
                    f"slurm-init-seconds-before-status-checks = {init or 40} s (needs 3x)")
    problem = accounting_problem(info, status, init)
    if problem:
        rep.problems.append(f"profile {' + '.join(profile_names) or '(none)'}: {problem}")
    return not info.accounting.works


def _account_lines(rep: CheckReport, account: str | None, accounts: Sequence[str]) -> None:
    """Accounts: the plugin's guess."""
    if account:
        rep.add(f"account: slurm_account={account} (the plugin does not guess)")
    elif accounts:
        rep.add(f"accounts: {', '.join(accounts)}: set slurm_account to one of them (the plugin then does not "
                f"guess, printing three lines)")
    else:
        rep.add("accounts: none listed by sacctmgr: leave slurm_account unset (the plugin prints three lines "
                "about guessing it, harmless)")


def _plan_cells(rep: CheckReport, info: ClusterInfo, part: Partition, sweep: Sweep, train_set: dict[str, Any]
                ) -> tuple[list[tuple[str, str, CellPlan]], bool]:
    """(data set, model, plan) of each cell of the sweep, each request that does not fit the
    partition a problem; and whether a MaxTime problem needs resources.max_runtime."""
    set_mem = train_set.get("mem_mb")
    set_gpu = train_set.get("gpu")
    plans: list[tuple[str, str, CellPlan]] = []
    max_runtime_needed = False
    for cell in sweep.cells:
        plan = sweep.plan(**cell)
        mem = int(set_mem) if set_mem else plan.mem_mb
        origin = "set-resources train:mem_mb" if set_mem else (
            "resources.mem_mb: auto" if plan.memory else "resources.mem_mb")
        minutes = [plan.minutes(t) for t in plan.targets]
        gpus = int(set_gpu) if set_gpu is not None else plan.gpus
        problems = request_problems(
            JobRequest(f"training job {grid.cell_name(cell)}", mem, max(minutes), gpus, part.name, origin), info)
        if any("MaxTime" in p for p in problems) and not plan.max_runtime:
            max_runtime_needed = True
        rep.problems.extend(problems)
        plans.append((cell["dataset"], cell["model"], plan))
    return plans, max_runtime_needed


def _cell_lines(rep: CheckReport, part: Partition, plans: list[tuple[str, str, CellPlan]],
                config_names: Sequence[str]) -> None:
    """A table of the cells, one line per data set, model and request (K does not change them)."""
    rep.add()
    rep.add(f"{' + '.join(config_names)}: {len(plans)} training cell(s) on partition {part.name} "
            f"(memory: {part.max_memory_mb} MB per node, MaxTime {format_minutes(part.max_time)})")
    rep.add(f"  {'data set':<20} {'model':<24} {'parameters':<18} {'mem_mb':>7} {'gpus':>4} {'jobs':>5}  "
            f"minutes per job")
    shown_cells: set[tuple[str, str, int, int, tuple[int, ...]]] = set()
    for dataset, model, plan in plans:
        minutes = [plan.minutes(t) for t in plan.targets]
        key = (dataset, model, plan.mem_mb, plan.gpus, tuple(minutes))
        if key in shown_cells:
            continue
        shown_cells.add(key)
        shown = "+".join(str(m) for m in minutes) if len(minutes) <= 4 else (
            f"{len(minutes)} x ~{max(minutes)}")
        shape = f"{plan.shape.params / 1e6:.1f}M {plan.shape.source}"
        rep.add(f"  {dataset:<20} {model:<24} {shape:<18} {plan.mem_mb:>7} {plan.gpus:>4} {len(plan.targets):>5}  "
                f"{shown}")


def _settings_lines(rep: CheckReport, part: Partition | None, config: dict[str, Any] | None, needs_squeue: bool,
                    account: str | None, accounts: Sequence[str]) -> None:
    """The settings to use: in the profile, on the command line, in the workflow config."""
    rep.add()
    rep.add("Settings for this cluster (the profile's config.yaml; on the command line, a --default-resources "
            "replaces the profile's whole list):")
    lines = ["slurm-status-command: squeue"] if needs_squeue else []
    lines.append("default-resources:")
    if part is not None:
        lines.append(f"  slurm_partition: {part.name}")
    if account or accounts:  # no accounts found: nothing to set (the plugin's guess is harmless)
        lines.append(f"  slurm_account: {account or accounts[0]}")
    runtime_default = 120 if part is None or part.max_time is None else min(120, part.max_time)
    mem_default = 8000 if part is None or not part.nodes else min(8000, part.max_memory_mb)
    lines.append(f"  runtime: {runtime_default}")
    lines.append(f"  mem_mb: {mem_default}")
    rep.lines.extend("  " + line for line in lines)
    flags = ["--slurm-status-command squeue"] if needs_squeue else []
    res = [f"slurm_partition={part.name}"] if part is not None else []
    if account or accounts:
        res.append(f"slurm_account={account or accounts[0]}")
    res += [f"runtime={runtime_default}", f"mem_mb={mem_default}"]
    rep.add("or on the command line:")
    rep.add(f"  snakemake --profile slurm {' '.join(flags + ['--default-resources'] + res)}")
    if part is not None and (part.max_time is not None or not part.max_gpus):
        rep.add("and in the workflow config:")
        rep.add("  resources:")
        if part.max_time is not None:
            current = (config or {}).get("resources", {}).get("max_runtime")
            note = "" if current else "   # cells longer than this run as chains of jobs"
            rep.add(f"    max_runtime: {part.max_time}{note}")
        if not part.max_gpus:
            rep.add(f"    gpus: 0   # partition {part.name} has no GPUs")


def summarize_problems(problems: Sequence[str]) -> list[str]:
    """The problems, those that differ only in the cell named once each with a count."""
    pattern = re.compile(r"(training job )\S+")
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for problem in problems:
        key = pattern.sub(r"\1*", problem)
        key = re.sub(r"mem_mb=\d+|asks for \d+ min", "#", key)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, problem)
    return [first[k] + (f" (and {counts[k] - 1} more cell(s) like it)" if counts[k] > 1 else "") for k in first]


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    model: str
    device: str
    cells: int
    throughput: float  # median examples/s per GPU (or per job on CPUs)
    peak_mb: float | None  # median peak host memory (CPU runs)


def calibrate(results_dir: str | os.PathLike) -> list[Calibration]:
    """Median training examples/s of the finished cells under ``results_dir/runs``, by model
    (the folder name, as in the config) and device."""
    import statistics

    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(Path(results_dir).glob("runs/**/run.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rate = run.get("train_examples_per_second")
        if not rate:
            continue
        model = path.relative_to(Path(results_dir) / "runs").parts[1]  # runs/{dataset}/{model}/...
        found.setdefault((model, str(run.get("device") or "?")), []).append(run)
    out = []
    for (model, device), runs in sorted(found.items()):
        per_gpu = [r["train_examples_per_second"] / max(int(r.get("world_size") or 1), 1) for r in runs]
        cpu = "cuda" not in device.lower() and "nvidia" not in device.lower()
        peaks = [r["peak_memory_bytes"] / 2 ** 20 for r in runs if cpu and r.get("peak_memory_bytes")]
        out.append(Calibration(model, device, len(runs), statistics.median(per_gpu),
                               statistics.median(peaks) if peaks else None))
    return out


def calibration_report(results_dir: str | os.PathLike) -> list[str]:
    found = calibrate(results_dir)
    if not found:
        return [f"no finished cells under {results_dir}/runs (run.json with train_examples_per_second)"]
    lines = [f"Training throughput of the finished cells under {results_dir} (median per model and device):",
             f"  {'model':<24} {'device':<32} {'cells':>5} {'examples/s':>11} {'peak MB':>8}"]
    for c in found:
        peak = f"{c.peak_mb:.0f}" if c.peak_mb else "-"
        lines.append(f"  {c.model:<24} {c.device[:32]:<32} {c.cells:>5} {c.throughput:>11.1f} {peak:>8}")
    lines.append("In the workflow config (merge into your models: entries; runtime auto then uses them; with "
                 "several devices, take the one the cells will run on):")
    lines.append("models:")
    best: dict[str, Calibration] = {}
    for c in found:
        if c.model not in best or c.cells > best[c.model].cells:
            best[c.model] = c
    for model, c in best.items():
        lines.append(f"  {model}:")
        lines.append(f"    resources: {{throughput: {c.throughput:.4g}}}   # {c.device}, {c.cells} cell(s)")
    return lines
