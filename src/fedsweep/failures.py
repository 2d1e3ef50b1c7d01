"""The causes of a run's failed jobs, for the console at the end of a failed `snakemake` run.

Under the slurm executor a job's stderr goes to its SLURM log, so what the job said (fedsweep's
one-line ``fedsweep: error: ...``) never reaches the console: Snakemake only reports
"SLURM status is FAILED" and the log paths. The Snakefile's ``onerror`` hands Snakemake's own log
to :func:`causes`, which reads each failed job's logs (the rule's ``log:`` first, then the
executor's, such as the SLURM log with "CANCELLED DUE TO TIME LIMIT") and gives one line per job.
Torch-free: it runs on the head node.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

_ERROR = re.compile(r"^Error in rule (\S+):\s*$")
_LOGS = re.compile(r"^\s+log: (.*?)(?: \(check log file\(s\) for error details\))?\s*$")
_JOBID = re.compile(r"^\s+jobid: (\d+)\s*$")
_FINISHED = re.compile(r"^Finished jobid: (\d+)\b")
_SAYS_WHY = re.compile(r"error|cancelled|killed|out of memory|oom|traceback", re.IGNORECASE)


def last_line(path: Path) -> str | None:
    """The last non-empty line of a log (of its last 8 KiB: logs grow long), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line]
    return lines[-1] if lines else None


def failed_jobs(text: str) -> list[tuple[str, list[str]]]:
    """(rule, log paths) of each job of a Snakemake log that failed and did not finish later
    (a retry that succeeded is no failure), in order, each job once."""
    failed: dict[str, tuple[str, list[str]]] = {}
    block: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        if (start := _ERROR.match(line)) is not None:
            block = (start.group(1), [])
        elif block is not None and (jobid := _JOBID.match(line)) is not None:
            failed.pop(jobid.group(1), None)  # its last failure is the one shown
            failed[jobid.group(1)] = block
        elif block is not None and (logs := _LOGS.match(line)) is not None:
            block[1].extend(p.strip() for p in logs.group(1).split(", ") if p.strip())
            block = None
        elif (done := _FINISHED.match(line)) is not None:
            failed.pop(done.group(1), None)
    return list(failed.values())


def causes(snakemake_logs: Iterable[str | os.PathLike], base_dir: str | os.PathLike = ".") -> list[str]:
    """One line per failed job of the run whose Snakemake log(s) these are: the last line of its
    logs, the first that reads like an error (else of the first log that has a line)."""
    found: list[str] = []
    for log in snakemake_logs:
        try:
            text = Path(log).read_text(errors="replace")
        except OSError:
            continue
        for rule, paths in failed_jobs(text):
            said = [(p, line) for p in paths if (line := last_line(Path(base_dir, p))) is not None]
            # A job killed from outside (time limit, memory) leaves its progress as the rule log's
            # last line and the reason in the executor's log: an error line wins.
            cause = next((c for c in said if _SAYS_WHY.search(c[1])), said[0] if said else None)
            found.append(f"cause: rule {rule}: no log says why (see Snakemake's messages above)" if cause is None
                         else f"cause (rule {rule}, log {cause[0]}): {cause[1]}")
    return found
