"""What a SLURM cluster offers, from SLURM's own tools, and whether a job request fits it.

``scontrol`` (partitions, nodes, MinJobAge), ``sacct`` (does accounting work: the slurm
executor's status queries hang when it does not) and ``sacctmgr`` (the user's accounts) are run
here and their text parsed; the Snakemake profiles' settings are read the way Snakemake merges
them. Shared by ``fedsweep cluster-check`` and the workflow's check before it submits any job.
Every problem is one line naming the setting to change.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import FedsweepError

# ----------------------------------------------------------------------------- SLURM's view


def parse_slurm_time(text: str) -> int | None:
    """Minutes of a SLURM time limit (``UNLIMITED``/``INFINITE`` -> None); formats: M, M:S,
    H:M:S, D-H, D-H:M, D-H:M:S."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        while len(parts) < 3:
            parts.append(0)
        h, m, s = parts
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return days * 1440 + h * 60 + m + (1 if s else 0)


def format_minutes(minutes: int | None) -> str:
    if minutes is None:
        return "unlimited"
    days, rest = divmod(int(minutes), 1440)
    return f"{minutes} min ({days}-{rest // 60:02d}:{rest % 60:02d}:00)" if days else f"{minutes} min"


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show ...`` output: one record per line, ``Key=Value`` items separated by
    spaces; a value may itself hold spaces (``OS=Linux 5.15 #1 SMP``): a word without ``=``
    belongs to the value before it."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line or "=" not in line:
            continue
        record: dict[str, str] = {}
        key = None
        for word in line.split(" "):
            m = re.match(r"^([A-Za-z][A-Za-z0-9_/.:]*)=(.*)$", word)
            if m:
                key = m.group(1)
                record[key] = m.group(2)
            elif key is not None and word:
                record[key] += " " + word
        records.append(record)
    return records


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    m = re.match(r"^(\d+)", value.strip())
    return int(m.group(1)) if m else None


def gpus_of_gres(gres: str | None) -> int:
    """GPUs in a node's ``Gres`` (``gpu:a100:4(S:0-1),gpu:v100:2``, ``gpu:4``, ``(null)``)."""
    if not gres or gres in ("(null)", "N/A"):
        return 0
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.strip().split(":")
        if fields and fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int  # what a job can get: RealMemory - MemSpecLimit
    gpus: int
    state: str
    partitions: list[str]


@dataclass
class Partition:
    name: str
    default: bool
    max_time: int | None  # minutes, None = unlimited
    default_time: int | None
    max_mem_per_node: int | None
    state: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def max_memory_mb(self) -> int:
        best = max((n.memory_mb for n in self.nodes), default=0)
        return min(best, self.max_mem_per_node) if self.max_mem_per_node else best

    @property
    def max_gpus(self) -> int:
        return max((n.gpus for n in self.nodes), default=0)

    @property
    def max_cpus(self) -> int:
        return max((n.cpus for n in self.nodes), default=0)


def parse_nodes(text: str) -> list[Node]:
    nodes = []
    for r in parse_records(text):
        if "NodeName" not in r:
            continue
        memory = (_int_or_none(r.get("RealMemory")) or 0) - (_int_or_none(r.get("MemSpecLimit")) or 0)
        nodes.append(Node(
            name=r["NodeName"], cpus=_int_or_none(r.get("CPUTot")) or _int_or_none(r.get("CPUs")) or 0,
            memory_mb=max(memory, 0), gpus=gpus_of_gres(r.get("Gres")), state=r.get("State", "?"),
            partitions=[p for p in r.get("Partitions", "").split(",") if p]))
    return nodes


def parse_partitions(text: str, nodes: Iterable[Node] = ()) -> list[Partition]:
    nodes = list(nodes)
    partitions = []
    for r in parse_records(text):
        if "PartitionName" not in r:
            continue
        mem = r.get("MaxMemPerNode", "UNLIMITED")
        p = Partition(name=r["PartitionName"], default=r.get("Default") == "YES",
                      max_time=parse_slurm_time(r.get("MaxTime", "UNLIMITED")),
                      default_time=parse_slurm_time(r.get("DefaultTime", "NONE")),
                      max_mem_per_node=None if mem.upper() == "UNLIMITED" else _int_or_none(mem),
                      state=r.get("State", "?"))
        p.nodes = [n for n in nodes if p.name in n.partitions]
        partitions.append(p)
    return partitions


def parse_min_job_age(config_text: str) -> int | None:
    """MinJobAge (seconds) from ``scontrol show config``."""
    for line in config_text.splitlines():
        if line.strip().startswith("MinJobAge"):
            m = re.search(r"=\s*(\d+)", line)
            return int(m.group(1)) if m else None
    return None


@dataclass
class Accounting:
    works: bool
    message: str  # sacct's complaint when it does not work


def sacct_result(returncode: int, stdout: str, stderr: str) -> Accounting:
    text = " ".join((stderr.strip() or stdout.strip()).split())
    if returncode != 0:
        return Accounting(False, text or f"exit status {returncode}")
    if re.search(r"accounting storage is disabled|not running a supported accounting", text, re.I):
        return Accounting(False, text)
    return Accounting(True, "")


def _run(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def check_sacct() -> Accounting:
    """Whether ``sacct`` answers (the slurm executor's default status command)."""
    try:
        res = _run(["sacct", "-n", "-X", "-o", "JobID", "-S", "now-1minute"])
    except FileNotFoundError:
        return Accounting(False, "sacct is not installed")
    except subprocess.TimeoutExpired:
        return Accounting(False, "sacct did not answer in 30 s")
    return sacct_result(res.returncode, res.stdout, res.stderr)


@dataclass
class ClusterInfo:
    partitions: list[Partition]
    accounting: Accounting
    min_job_age: int | None
    version: str = ""

    def partition(self, name: str | None) -> Partition | None:
        if name:
            return next((p for p in self.partitions if p.name == name), None)
        return next((p for p in self.partitions if p.default), self.partitions[0] if self.partitions else None)


def query_cluster(accounting: bool = True) -> ClusterInfo:
    """Ask SLURM (scontrol, sacct) about its partitions, nodes and accounting."""
    try:
        nodes = parse_nodes(_run(["scontrol", "-o", "show", "node"]).stdout)
        part_res = _run(["scontrol", "-o", "show", "partition"])
    except FileNotFoundError:
        raise FedsweepError("cluster-check: scontrol not found: run this on a SLURM login node") from None
    if part_res.returncode != 0:
        raise FedsweepError(f"cluster-check: scontrol show partition failed: {part_res.stderr.strip()}")
    partitions = parse_partitions(part_res.stdout, nodes)
    conf = _run(["scontrol", "show", "config"])
    version = ""
    m = re.search(r"SLURM_VERSION\s*=\s*(\S+)", conf.stdout)
    if m:
        version = m.group(1)
    return ClusterInfo(partitions=partitions, accounting=check_sacct() if accounting else Accounting(True, ""),
                       min_job_age=parse_min_job_age(conf.stdout), version=version)


def user_accounts() -> list[str]:
    """The user's SLURM accounts per ``sacctmgr`` (empty without accounting)."""
    import getpass

    try:
        res = _run(["sacctmgr", "-n", "-P", "-s", "list", "user", getpass.getuser(), "format=account"])
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0:
        return []
    return sorted({line.strip() for line in res.stdout.splitlines() if line.strip()})


# ----------------------------------------------------------------------------- requests vs cluster


@dataclass
class JobRequest:
    """One job as it would be submitted: who it is and what it asks for."""

    name: str  # e.g. "train imdb/bert-base-cased/K1_seed0"
    mem_mb: int | None
    runtime: int | None  # minutes
    gpus: int
    partition: str | None
    mem_origin: str = "mem_mb"  # which setting the value came from, for the message


def request_problems(req: JobRequest, cluster: ClusterInfo, max_runtime_hint: str = "resources.max_runtime"
                     ) -> list[str]:
    """One-line problems of a job request on this cluster (empty: it fits)."""
    part = cluster.partition(req.partition)
    if part is None:
        known = ", ".join(p.name for p in cluster.partitions) or "none"
        return [f"{req.name}: partition {req.partition!r} does not exist (partitions: {known})"]
    problems = []
    if req.mem_mb and part.nodes and req.mem_mb > part.max_memory_mb:
        problems.append(
            f"{req.name} asks for mem_mb={req.mem_mb} ({req.mem_origin}), more than any node of partition "
            f"{part.name} has ({part.max_memory_mb} MB): set it to at most {part.max_memory_mb}, or leave "
            f"resources.mem_mb at auto")
    if req.runtime and part.max_time is not None and req.runtime > part.max_time:
        problems.append(
            f"{req.name} asks for {req.runtime} min, partition {part.name} allows {part.max_time} (MaxTime): "
            f"set {max_runtime_hint}: {part.max_time} (a longer cell then runs as a chain of jobs)")
    if req.gpus and part.nodes and req.gpus > part.max_gpus:
        has = f"at most {part.max_gpus} GPUs per node" if part.max_gpus else "no GPUs"
        problems.append(f"{req.name} asks for {req.gpus} GPU(s), partition {part.name} has {has}: "
                        f"choose a GPU partition (slurm_partition) or set resources.gpus")
    return problems


def accounting_problem(cluster: ClusterInfo, status_command: str | None, init_seconds: int | None) -> str | None:
    """Why the slurm executor would hang or misjudge jobs, as one line (None: fine)."""
    init = init_seconds or 40
    if status_command in (None, "sacct") and not cluster.accounting.works:
        return (f"sacct fails ({cluster.accounting.message}): the slurm executor would wait for job states "
                f"forever; add 'slurm-status-command: squeue' to the profile (see fedsweep cluster-check)")
    if status_command == "squeue" and cluster.min_job_age is not None and cluster.min_job_age < 3 * init:
        if cluster.accounting.works:
            return None  # the plugin falls back to sacct, which works
        return (f"MinJobAge={cluster.min_job_age} s is below 3 x slurm-init-seconds-before-status-checks "
                f"({init} s): squeue forgets finished jobs before they are checked; lower that setting to "
                f"{max(cluster.min_job_age // 3, 1)}")
    return None


# ----------------------------------------------------------------------------- profiles


def read_profiles(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Snakemake profiles (folders with config.yaml, or the files), later ones replacing the
    top-level keys of earlier ones, as Snakemake does."""
    import yaml

    merged: dict[str, Any] = {}
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "config.yaml"
        if not path.exists():
            raise FedsweepError(f"profile {str(p)!r}: no {path}")
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def resource_items(value: Any) -> dict[str, Any]:
    """A profile's resources as a mapping (they may be a mapping or a list of ``name=value``)."""
    if isinstance(value, dict):
        return dict(value)
    items: dict[str, Any] = {}
    for item in value or []:
        name, _, v = str(item).partition("=")
        items[name.strip()] = v.strip()
    return items


def set_resources_of(profile: dict[str, Any], rule: str) -> dict[str, Any]:
    value = profile.get("set-resources") or {}
    if isinstance(value, dict):
        return dict(value.get(rule) or {})
    out = {}
    for item in value:
        target, _, assignment = str(item).partition(":")
        if target == rule:
            name, _, v = assignment.partition("=")
            out[name] = v
    return out
