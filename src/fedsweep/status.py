"""``fedsweep status``: where a sweep stands, read from its run folders alone.

The grid comes from the config (:func:`fedsweep.config.load`, without the input checks), each
cell's state from the files of its run folder ``{results_dir}/runs/{CELL_PATH}`` and its log
(``train.log`` there, or ``{results_dir}/logs/train/{CELL_PATH}.log``, whichever was written
last). No Snakemake state is read, so it works on a partly finished grid copied from a cluster
(copy with the modification times: ``rsync -a``), and only JSON files and the logs' last lines
are: no torch, no pandas, 2,000 cells in well under a second (``benchmarks/bench_status.py``).

A cell is

- **finished**: ``metrics.parquet`` and ``run.json`` are there (the train rule's outputs) and
  run.json's rounds reach the data set's ``second_threshold``; *diverged* if run.json says so;
- **failed**: started (its run folder holds a log, a checkpoint or ``progress.json``), and its
  log's last line says the job ended (fedsweep's ``fedsweep: error: ...``, a Python exception,
  a ``slurmstepd``, ``CANCELLED`` or out-of-memory line, or fedsweep's ``SIGTERM: saved round
  N``/``SIGINT: ...``), or nothing was written for longer than the stall limit (a job killed
  without a word: SIGKILL, a lost node). A rerun, or the profile's retries, resumes it from its
  checkpoint;
- **running**: started, no such line, and a write (log or ``progress.json``) within the stall
  limit: the larger of ``stalled_after`` (30 min) and 3 rounds at the cell's pace (from its
  ``progress.json``, else the cluster estimate). A cell run as a chain of jobs counts as running
  between two of them (its log ends with a job's ``trained ...`` line and ``segments/`` exists);
- **not started**: none of those files, or a job that finished fewer rounds (its log ends with
  ``trained ...``; e.g. the second_threshold was raised since).

Rounds done: a finished cell's rounds, else the round its checkpoint holds (``progress.json``,
:mod:`fedsweep.progress`; ignored without ``checkpoint.pt``: the cell starts over). Time spent:
``progress.json``'s ``seconds`` (the rounds' training, aggregation and evaluation, every job's),
else (a finished cell without one) run.json's ``wall_seconds_this_run``. Remaining: for every
cell not finished, its share of rounds left of the examples the cluster estimate counts
(:class:`fedsweep.estimate.RuntimeEstimate`, evaluations included) at the median
``train_examples_per_second`` of the finished cells of its model ("measured"), else that share
of the cluster estimate's minutes (``resources.runtime``; with ``auto`` its 1.5x margin, no
start-up: "estimate").
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import FedsweepError, dataspec, grid, progress
from . import config as config_layer
from .failures import last_line

STATES = ("finished", "running", "failed", "not started")
STALLED_AFTER = 30 * 60  # seconds: start-up, loading and the first round without a line
STALL_ROUNDS = 3  # a running job writes after every round: 3 rounds of silence is a dead one
LISTED = 20  # cells listed per state unless --all

# The log's last line when the job is over: fedsweep's one-line error; an uncaught exception;
# a kill from outside (SLURM, the kernel's OOM killer); fedsweep train's own line on SIGTERM/SIGINT.
ENDED = re.compile(
    r"fedsweep: error:|^Traceback \(most recent call last\)|^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b"
    r"|slurmstepd|\bCANCELLED\b|out of memory|\boom[-_ ]?kill|^Killed\b|\b(SIGTERM|SIGINT): ")
# `fedsweep train`'s last line when a job trained all of its rounds (a chain link's, or fewer than now)
TRAINED = re.compile(r"^trained \S+ K=\d+: round \d+ ")


@dataclass
class CellStatus:
    """One cell: its state, the round its checkpoint holds of its rounds, its last write (seconds
    since the epoch), its log's last line, the time spent and what remains."""

    cell: dict[str, Any]
    name: str
    state: str
    round: int
    rounds: int
    last_write: float | None = None
    last_line: str | None = None
    diverged: dict[str, Any] | None = None
    note: str | None = None  # why a started cell is failed or running, when no line says it
    seconds_spent: float = 0.0
    seconds_per_round: float | None = None  # measured (progress.json)
    rate: float | None = None  # a finished cell's train_examples_per_second
    seconds_remaining: float = 0.0
    remaining_from: str | None = None  # "measured" or "estimate"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _newest_log(run: Path, names: set[str], log: Path) -> tuple[Path | None, float | None]:
    """The cell's log written last: the run folder's train.log (every job's, which the rule's log
    is a hard link to) or the rule's log (a copy where links fail); (None, None) if neither."""
    candidates = ([run / "train.log"] if "train.log" in names else []) + [log]
    found = [(t, p) for p in candidates if (t := _mtime(p)) is not None]
    if not found:
        return None, None
    t, path = max(found)
    return path, t


def _finished(status: CellStatus, run: Path, names: set[str], sidecar: dict | None) -> bool:
    """Fill in a finished cell (True); False if its outputs are missing or cover fewer rounds."""
    if not {"metrics.parquet", "run.json"} <= names:
        return False
    summary = _read_json(run / "run.json")
    if int((summary.get("config") or {}).get("rounds", status.rounds)) < status.rounds:
        return False
    status.state, status.round, status.diverged = "finished", status.rounds, summary.get("diverged")
    status.rate = summary.get("train_examples_per_second")
    if sidecar is not None and sidecar["round"] >= status.rounds:
        status.seconds_spent = float(sidecar.get("seconds") or 0.0)
    else:  # made before progress.json existed, or copied without it
        status.seconds_spent = float(summary.get("wall_seconds_this_run") or 0.0)
    status.last_write = (sidecar or {}).get("written") or _mtime(run / "run.json")
    return True


def _judge(status: CellStatus, names: set[str], now: float, stalled_after: float, plan_pace: float) -> None:
    """The state of a started cell that is not finished, from its log's last line and its last write."""
    line = status.last_line or ""
    pace = status.seconds_per_round or plan_pace
    limit = max(stalled_after, STALL_ROUNDS * pace)
    if ENDED.search(line):
        status.state = "failed"
    elif TRAINED.search(line):
        chain = "segments" in names
        status.state = "running" if chain else "not started"
        status.note = "between two jobs of its chain" if chain else "its last job trained fewer rounds"
    elif status.last_write is not None and now - status.last_write <= limit:
        status.state = "running"
    else:
        status.state = "failed"
        status.note = f"no line says why: nothing written for more than {_duration(limit)} (killed?)"


def read_cell(sweep: config_layer.Sweep, cell: dict[str, Any], now: float,
              stalled_after: float = STALLED_AFTER) -> CellStatus:
    """The state of one cell of ``sweep`` at time ``now``, from its run folder and log."""
    results = Path(sweep.base_dir, sweep.config["results_dir"])
    name = grid.cell_name(cell)
    rounds = int(sweep.config["datasets"][cell["dataset"]]["second_threshold"])
    status = CellStatus(cell, name, "not started", 0, rounds)
    run = results / "runs" / name
    try:  # one listing instead of a stat per file: a cluster's shared file system makes each one count
        names = {entry.name for entry in os.scandir(run)}
    except OSError:  # no run folder (Snakemake makes it before the job): no job has started
        return status
    sidecar = progress.read(run) if progress.PROGRESS_NAME in names else None
    if _finished(status, run, names, sidecar):
        return status
    log, log_time = _newest_log(run, names, results / "logs" / "train" / f"{name}.log")
    if log is None and not names & {"checkpoint.pt", progress.PROGRESS_NAME, "segments"}:
        return status
    checkpoint_time = _mtime(run / "checkpoint.pt") if sidecar is None and "checkpoint.pt" in names else None
    writes = [t for t in (log_time, sidecar and sidecar.get("written"), checkpoint_time) if t]
    status.last_write = max(writes, default=None)
    status.last_line = last_line(log) if log is not None else None
    if sidecar is not None and "checkpoint.pt" in names:  # without the checkpoint the cell starts over
        status.round = min(sidecar["round"], status.rounds)
        status.seconds_spent = float(sidecar.get("seconds") or 0.0)
        status.seconds_per_round = status.seconds_spent / sidecar["round"] if sidecar["round"] else None
    plan = sweep.plan(**cell)
    _judge(status, names, now, stalled_after, plan.estimate.work * 60 / plan.rounds)
    return status


def _model_rates(cells: list[CellStatus]) -> dict[str, float]:
    """Median train_examples_per_second of the finished cells, per model."""
    found: dict[str, list[float]] = {}
    for status in cells:
        if status.state == "finished" and status.rate:
            found.setdefault(status.cell["model"], []).append(float(status.rate))
    return {model: statistics.median(rates) for model, rates in found.items()}


def _rows_before_download(sweep: config_layer.Sweep) -> None:
    """The rows of the data sets not prepared yet, as ``fedsweep check`` knows them (presets,
    synthetic and local data), for their cells' estimates; prepared ones are read from their
    meta.json (:meth:`fedsweep.config.Sweep.estimate_rows`)."""
    results = Path(sweep.base_dir, sweep.config["results_dir"])
    for name, ds in sweep.config["datasets"].items():
        if sweep.rows.get(name) is None and not (results / "data" / name / "meta.json").exists():
            try:
                sweep.rows[name] = dataspec.dataset_rows(name, ds.get("spec", {}), sweep.base_dir)
            except (FedsweepError, OSError):  # the workflow says why; the estimate guesses the rows
                pass


def estimate_remaining(sweep: config_layer.Sweep, cells: list[CellStatus]) -> None:
    """Fill in each unfinished cell's remaining seconds (see the module docstring)."""
    rates = _model_rates(cells)
    for status in cells:
        if status.state == "finished":
            continue
        left = (status.rounds - status.round) / status.rounds
        estimate = sweep.plan(**status.cell).estimate
        rate = rates.get(status.cell["model"])
        if rate and estimate.examples is not None:
            status.seconds_remaining, status.remaining_from = estimate.examples * left / rate, "measured"
        else:
            status.seconds_remaining, status.remaining_from = estimate.work * 60 * left, "estimate"


# ----------------------------------------------------------------------------- the summary


GROUP_KEYS = ("dataset", "model", "algorithm", "partition")


@dataclass
class Group:
    """The cells of one data set x model x algorithm x partition (or all of them: the total)."""

    keys: dict[str, str]
    cells: int = 0
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    diverged: int = 0
    rounds_done: int = 0
    rounds: int = 0
    seconds_spent: float = 0.0
    seconds_remaining: float = 0.0
    remaining_from: dict[str, int] = field(default_factory=lambda: {"measured": 0, "estimate": 0})

    def add(self, status: CellStatus) -> None:
        self.cells += 1
        self.states[status.state] += 1
        self.diverged += status.diverged is not None
        self.rounds_done += status.round
        self.rounds += status.rounds
        self.seconds_spent += status.seconds_spent
        self.seconds_remaining += status.seconds_remaining
        if status.remaining_from:
            self.remaining_from[status.remaining_from] += 1

    def as_json(self) -> dict[str, Any]:
        return {**self.keys, "cells": self.cells, **{s.replace(" ", "_"): n for s, n in self.states.items()},
                "diverged": self.diverged, "rounds_done": self.rounds_done, "rounds": self.rounds,
                "seconds_spent": round(self.seconds_spent, 1), "seconds_remaining": round(self.seconds_remaining, 1),
                "remaining_from": dict(self.remaining_from)}


@dataclass
class SweepStatus:
    configfiles: list[str]
    results_dir: str
    now: float
    stalled_after: float
    cells: list[CellStatus]
    groups: list[Group]
    total: Group
    columns: list[str]  # the group keys the grid varies (data set and model always)


def collect(sweep: config_layer.Sweep, configfiles: Sequence[str] = (), now: float | None = None,
            stalled_after: float = STALLED_AFTER) -> SweepStatus:
    """Every cell's state and the sums per data set x model x algorithm x partition."""
    now = time.time() if now is None else now
    _rows_before_download(sweep)
    cells = [read_cell(sweep, cell, now, stalled_after) for cell in sweep.cells]
    estimate_remaining(sweep, cells)
    groups: dict[tuple[str, ...], Group] = {}
    total = Group({})
    for status in cells:
        key = tuple(status.cell[k] for k in GROUP_KEYS)
        groups.setdefault(key, Group(dict(zip(GROUP_KEYS, key)))).add(status)
        total.add(status)
    columns = [k for k in GROUP_KEYS if k in ("dataset", "model") or len({s.cell[k] for s in cells}) > 1]
    return SweepStatus([str(f) for f in configfiles], sweep.config["results_dir"], now, stalled_after, cells,
                       list(groups.values()), total, columns)


def as_json(found: SweepStatus) -> dict[str, Any]:
    """``fedsweep status --json`` (its keys: the command's help)."""
    def cell(status: CellStatus) -> dict[str, Any]:
        out = asdict(status)
        del out["cell"], out["rate"], out["seconds_per_round"]
        out.update(status.cell)
        out["age_seconds"] = None if status.last_write is None else round(found.now - status.last_write, 1)
        for key in ("seconds_spent", "seconds_remaining"):
            out[key] = round(out[key], 1)
        return out

    return {"configfiles": found.configfiles, "results_dir": found.results_dir, "time": found.now,
            "stalled_after_seconds": found.stalled_after, "total": found.total.as_json(),
            "groups": [g.as_json() for g in found.groups], "cells": [cell(s) for s in found.cells]}


# ----------------------------------------------------------------------------- the table


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _basis(group: Group) -> str:
    kinds = [k for k, n in group.remaining_from.items() if n]
    return " + ".join(kinds) if kinds else "-"


def _table(found: SweepStatus) -> list[str]:
    headers = [{"dataset": "data set"}.get(c, c) for c in found.columns] + [
        "cells", "finished", "running", "failed", "not started", "rounds done", "time spent", "remaining", "from"]
    rows = []
    for g in [*found.groups, found.total]:
        keys = [g.keys.get(c, "total" if i == 0 else "") for i, c in enumerate(found.columns)]
        rows.append(keys + [str(g.cells), *(str(g.states[s]) for s in STATES), f"{g.rounds_done} of {g.rounds}",
                            _duration(g.seconds_spent), _duration(g.seconds_remaining) if g.seconds_remaining else "-",
                            _basis(g)])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    text_columns = len(found.columns)
    lines = []
    for row in [headers, *rows]:
        cells = [v.ljust(w) if i < text_columns or i == len(row) - 1 else v.rjust(w)
                 for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _cell_line(status: CellStatus, now: float) -> str:
    if status.state == "finished":
        d = status.diverged
        return f"  {status.name}: at round {d['round']} (training loss {d['train_loss']:.3g})"
    age = f", last write {_duration(now - status.last_write)} ago" if status.last_write is not None else ""
    # a failed cell's last line says why; a running one's is its last round's progress
    line = status.last_line if status.state == "failed" else None
    said = "; ".join(x for x in (status.note, line and f"last line: {line}") if x)
    return f"  {status.name}: round {status.round} of {status.rounds}{age}" + (f": {said}" if said else "")


def render(found: SweepStatus, every_cell: bool = False) -> list[str]:
    """The table, then the running, failed and diverged cells (``LISTED`` each unless ``every_cell``)."""
    configs = " + ".join(found.configfiles) or "the config"
    lines = [f"{configs}: {found.total.cells} cells under {Path(found.results_dir, 'runs')} "
             f"(as of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(found.now))})", ""]
    lines += _table(found)
    listed = {"running": [s for s in found.cells if s.state == "running"],
              "failed": [s for s in found.cells if s.state == "failed"],
              "diverged": [s for s in found.cells if s.diverged is not None]}
    for title, cells in listed.items():
        if not cells:
            continue
        shown = cells if every_cell else cells[:LISTED]
        lines += ["", f"{title}:"] + [_cell_line(s, found.now) for s in shown]
        if len(shown) < len(cells):
            lines.append(f"  ... and {len(cells) - len(shown)} more (--all lists every one)")
    return lines


def status(configfiles: Sequence[str], base_dir: str = ".", *, as_json_output: bool = False,
           every_cell: bool = False, stalled_after: float = STALLED_AFTER, now: float | None = None) -> str:
    """What ``fedsweep status`` prints."""
    sweep = config_layer.load(list(configfiles), base_dir, inputs=False)
    found = collect(sweep, configfiles, now, stalled_after)
    if as_json_output:
        return json.dumps(as_json(found), indent=1)
    return "\n".join(render(found, every_cell))
