"""A real single-node SLURM cluster for tests, started and stopped by the test itself.

``slurm_cluster()`` writes a ``slurm.conf`` into a temporary folder, starts its own ``munged``
(own key and socket, so nothing in ``/etc/munge`` or ``/run/munge`` is touched or needed),
``slurmctld`` and ``slurmd`` in the foreground (so their PIDs are known), waits until ``sinfo``
shows the node idle, yields a :class:`SlurmCluster` and, at the end, cancels every job still in
the cluster, stops the three daemons it started by PID and waits for them to exit.

Every client command must see ``SLURM_CONF``: use ``cluster.env`` (or ``cluster.run``).
Needs root (slurmd runs jobs as their submitter and must be root) and Debian's packages
``slurmctld slurmd slurm-client munge`` (``.ci/install-slurm.sh`` installs them).

Run by hand: ``python tests/slurm_cluster.py`` starts a cluster, prints how to use it and
stops it on Enter or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "scontrol", "srun")
# Client commands given a wrapper that pins SLURM_CONF (see _write_wrappers).
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scancel", "scontrol", "sacct", "salloc", "sattach", "sstat")
PARTITION = "ci"


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, or binaries missing)."""


class SlurmStartError(RuntimeError):
    """The daemons were started but the cluster did not come up."""


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd runs jobs as their submitter)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM/MUNGE binaries missing: {', '.join(missing)} "
                "(install with: bash .ci/install-slurm.sh)")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware(timeout: float = 30) -> dict[str, str]:
    """``slurmd -C``: what slurmd will report for this machine (CPUs, sockets, memory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=timeout, check=True,
                         env={**os.environ, "SLURM_CONF": "/nonexistent/slurm.conf"}).stdout
    first = out.strip().splitlines()[0]
    return dict(item.split("=", 1) for item in first.split() if "=" in item)


def slurm_conf(root: Path, node: str, hw: dict[str, str], ctld_port: int, slurmd_port: int,
               munge_socket: Path, partition: str = PARTITION) -> str:
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    hw_text = " ".join(f"{k}={hw[k]}" for k in keys if k in hw)
    # A little under what slurmd measures: a node reporting less memory than configured is drained.
    memory = max(int(int(hw.get("RealMemory", "1024")) * 0.9), 256)
    return f"""\
# Written by tests/slurm_cluster.py: a throw-away single-node cluster.
ClusterName=fedsweep-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes (the snakemake plugin polls with squeue).
MinJobAge=300
# SIGTERM, then SIGKILL this many seconds later, on scancel and time-outs: time to checkpoint.
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} {hw_text} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _write_wrappers(bin_dir: Path, conf: Path) -> None:
    """Put ``bin_dir/srun`` etc. that run the real command with ``SLURM_CONF=conf``.

    The environment variable alone is not enough: Snakemake's SLURM jobstep plugin strips every
    ``SLURM_*`` variable, SLURM_CONF included, before it calls ``srun`` inside a job, and srun
    then looks for /etc/slurm/slurm.conf. With ``bin_dir`` first on PATH (jobs inherit PATH
    through ``sbatch --export=ALL``) every client call finds this cluster's config, and the
    machine's own /etc/slurm stays untouched.
    """
    bin_dir.mkdir(exist_ok=True)
    os.chmod(bin_dir, 0o755)
    for name in CLIENTS:
        real = shutil.which(name)
        if real is None:
            continue
        wrapper = bin_dir / name
        wrapper.write_text(f"#!/bin/sh\nSLURM_CONF={shlex.quote(str(conf))} exec {shlex.quote(real)} \"$@\"\n")
        os.chmod(wrapper, 0o755)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    partition: str
    node: str
    cpus: int
    memory_mb: int
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, cmd: Sequence[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    def sbatch(self, *args: str, timeout: float = 30) -> str:
        """Submit; return the job id (``sbatch --parsable``)."""
        out = self.run(["sbatch", "--parsable", *args], timeout=timeout).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job_id: str) -> str | None:
        """The job's state (PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, ...), None if unknown."""
        res = self.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], check=False)
        lines = res.stdout.split()
        if res.returncode == 0 and lines:
            return lines[0]
        res = self.run(["scontrol", "show", "job", job_id], check=False)
        for item in res.stdout.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return None

    def job_exit_code(self, job_id: str) -> str | None:
        res = self.run(["scontrol", "show", "job", job_id], check=False)
        for item in res.stdout.split():
            if item.startswith("ExitCode="):
                return item.split("=", 1)[1]
        return None

    def wait_job(self, job_id: str, timeout: float = 120, poll: float = 0.5,
                 states: Sequence[str] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> str:
        """Poll until the job reaches one of ``states``; return it (TimeoutError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout:.0f}s\n{self.diagnostics()}")

    def active_jobs(self) -> list[str]:
        res = self.run(["squeue", "-h", "-o", "%i"], check=False)
        return res.stdout.split() if res.returncode == 0 else []

    def diagnostics(self, lines: int = 30) -> str:
        parts = []
        for cmd in (["sinfo", "-N", "-l"], ["squeue", "-t", "all"]):
            try:
                res = self.run(cmd, timeout=10, check=False)
                parts.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
            except subprocess.TimeoutExpired:
                parts.append(f"$ {' '.join(cmd)}: timed out")
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def _wait_for(predicate, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process we started (by PID), then SIGKILL if it has not exited in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def slurm_cluster(root: str | os.PathLike | None = None, start_timeout: float = 60,
                  partition: str = PARTITION) -> Iterator[SlurmCluster]:
    """Start munged + slurmctld + slurmd on this machine; stop them at the end.

    ``root`` (default: a new temporary folder, removed at the end) holds the config, the
    state and spool folders, the logs and the PID files. Raises :class:`SlurmUnavailable`
    when the machine cannot host a cluster, :class:`SlurmStartError` (with the daemons'
    logs) when the node is not idle within ``start_timeout`` seconds.
    """
    reason = unavailable_reason()
    if reason:
        raise SlurmUnavailable(reason)
    own_root = root is None
    base = Path(tempfile.mkdtemp(prefix="fedsweep-slurm-")) if own_root else Path(root)
    # munged insists that every folder above its socket is searchable by all and writable only
    # by its owner; mkdtemp gives 0700.
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    for sub in ("munge", "state", "spool", "run", "log"):
        (base / sub).mkdir(exist_ok=True)
        os.chmod(base / sub, 0o755)
    node = socket.gethostname().split(".")[0]
    hw = _node_hardware()
    munge_dir = base / "munge"
    munge_socket = munge_dir / "munge.socket"
    key = munge_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    conf = base / "slurm.conf"
    conf.write_text(slurm_conf(base, node, hw, _free_port(), _free_port(), munge_socket, partition))
    bin_dir = base / "bin"
    _write_wrappers(bin_dir, conf)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # A cluster started from inside a SLURM job must not inherit that job's identity.
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]
    cluster = SlurmCluster(root=base, conf=conf, partition=partition, node=node, cpus=int(hw.get("CPUs", 1)),
                           memory_mb=int(int(hw.get("RealMemory", "1024")) * 0.9), env=env)
    logs: list = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(base / "log" / f"{name}.stdout", "wb")
        logs.append(out)
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        cluster.procs[name] = proc
        return proc

    try:
        start("munged", ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                         f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
                         f"--seed-file={munge_dir / 'munged.seed'}"])
        if not _wait_for(lambda: munge_socket.exists() or cluster.procs["munged"].poll() is not None, 20):
            raise SlurmStartError("munged did not create its socket in 20 s")
        if cluster.procs["munged"].poll() is not None:
            raise SlurmStartError(f"munged exited with {cluster.procs['munged'].returncode}: "
                                  f"{(base / 'log' / 'munged.stdout').read_text(errors='replace')}")
        # -D: stay in the foreground (the PID is ours); -i: ignore state files (there are none).
        start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        start("slurmd", ["slurmd", "-D", "-f", str(conf), "-N", node])

        def idle() -> bool:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise SlurmStartError(f"{name} exited with {proc.returncode}\n{cluster.diagnostics()}")
            try:
                res = cluster.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%t"], timeout=10, check=False)
            except subprocess.TimeoutExpired:
                return False
            return res.returncode == 0 and res.stdout.split() == ["idle"]

        if not _wait_for(idle, start_timeout):
            raise SlurmStartError(f"the SLURM node did not become idle in {start_timeout:.0f}s\n"
                                  f"{cluster.diagnostics()}")
        yield cluster
    finally:
        try:
            if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
                jobs = cluster.active_jobs()
                if jobs:
                    cluster.run(["scancel", *jobs], check=False)
                    _wait_for(lambda: not cluster.active_jobs(), 45, poll=1)
        except (subprocess.TimeoutExpired, OSError):
            pass
        # slurmd first (it ends the job steps it still runs), then the controller, then munge.
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        for f in logs:
            f.close()
        if own_root and not os.environ.get("FEDSWEEP_KEEP_SLURM_DIR"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    why = unavailable_reason()
    if why:
        raise SystemExit(f"cannot start: {why}")
    with slurm_cluster() as c:
        print(f"SLURM is up: partition {c.partition!r}, node {c.node} ({c.cpus} CPUs, {c.memory_mb} MB)")
        # PATH too: its wrappers keep SLURM_CONF inside Snakemake's jobs (see _write_wrappers).
        print(f"  export SLURM_CONF={c.conf} PATH={c.root / 'bin'}:$PATH")
        print("Enter (or Ctrl-C) stops it.")
        with contextlib.suppress(KeyboardInterrupt, EOFError):
            input()
    print("stopped")
