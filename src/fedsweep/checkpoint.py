"""A cell's checkpoint: what it holds, how it is written (atomically) and when it is refused.

``checkpoint.pt`` holds the global weights (FlatParameters' aligned layout), the round, the metrics
so far, the config hash and config, the thread counts, the algorithm (its slug and non-default
settings), the server strategy's state (momentum, moments) and the client update's state
(SCAFFOLD: the server control variate and which file holds each client's). Every random draw is
a pure function of (seed, round, client, epoch), so the round number and seed ARE the RNG state.

With LoRA (:mod:`fedsweep.lora`) the weights vector holds only the trainable tensors (adapters and
classification head): the frozen base is rebuilt from the model spec and seed. ``exact``
aggregation changes the base weights of the adapted layers every round; those are part of the
strategy's state (``lora_base.<layer>`` in ``server_state``), so a resumed run continues bitwise.

:class:`RunCheckpoint` is one run's side of it: whether the run resumes (a stale checkpoint is
refused, or deleted with ``stale_checkpoint=restart``), from which round, the thread counts the
rounds were trained at, the rounds it has saved since, and what a SIGTERM leaves saved. Every save
also writes ``progress.json`` (:mod:`fedsweep.progress`): the round and times, for the head node.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import FedsweepError, __version__
from . import progress
from .algorithm import FEDAVG_RECORD, describe
from .engine import FlatParameters
from .io import atomic_path, write_json

# Format 2: the weights vector has FlatParameters' aligned layout (format 1's was unpadded, so
# its vector is shorter and would be mis-placed) and the thread count is recorded. The
# algorithm's keys (algorithm, server_state, client_state) were added within format 2: a
# checkpoint without them is FedAvg's, with no state, which is what it was.
CHECKPOINT_FORMAT = 2
# What a run writes (atomically); progress.json: the checkpoint's round and times for `fedsweep status`
CHECKPOINT_NAMES = ("checkpoint.pt", progress.PROGRESS_NAME, "metrics.parquet", "layers.parquet", "run.json")


class StaleCheckpoint(FedsweepError):
    """A readable checkpoint that this run must not resume: other settings, data, model, algorithm or format."""


def load_checkpoint(path: Path, expected_hash: str, expected: dict[str, Any],
                    algorithm: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if there is none), after checking that this run may resume it."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt checkpoint cannot be trusted; say so rather than guess
        raise FedsweepError(f"checkpoint {str(path)!r} is unreadable ({exc}); delete it to start over") from exc
    if not isinstance(ckpt, dict) or "weights" not in ckpt:
        raise FedsweepError(f"checkpoint {str(path)!r} is not a fedsweep checkpoint; delete it to start over")
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("layout") != FlatParameters.LAYOUT:
        raise StaleCheckpoint(
            f"checkpoint {str(path)!r} has format {ckpt.get('format')!r} (weights layout "
            f"{ckpt.get('layout', 'unaligned')!r}); this fedsweep reads format {CHECKPOINT_FORMAT} "
            f"({FlatParameters.LAYOUT!r}): delete it to start over"
        )
    old_algorithm = ckpt.get("algorithm", FEDAVG_RECORD)
    if old_algorithm != algorithm:
        raise StaleCheckpoint(
            f"checkpoint {str(path)!r} is from algorithm {describe(old_algorithm)}, this run is "
            f"{describe(algorithm)}; refusing to resume, delete it to start over"
        )
    if ckpt.get("config_hash") != expected_hash:
        old = ckpt.get("config", {})
        diff = [k for k in sorted(set(old) | set(expected)) if old.get(k) != expected.get(k)]
        first = diff[0] if diff else "?"
        raise StaleCheckpoint(
            f"checkpoint {str(path)!r} is from a different config ({first}: {old.get(first)!r} != "
            f"{expected.get(first)!r}); refusing to resume, delete it to start over"
        )
    return ckpt


def save_checkpoint(path: Path, *, weights: torch.Tensor, round_: int, rows: list[dict], cfg_hash: str,
                    hashed: dict[str, Any], thread_history: list[list[int]], algorithm: dict[str, Any],
                    server_state: dict[str, torch.Tensor], client_state: dict[str, torch.Tensor]) -> None:
    def cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in state.items()}

    state = {"format": CHECKPOINT_FORMAT, "layout": FlatParameters.LAYOUT, "config_hash": cfg_hash,
             "config": hashed, "round": round_, "weights": weights.detach().cpu(), "metrics": rows,
             "fedsweep_version": __version__,
             # CPU sums are exact to the bit only at the same thread count: the count each
             # stretch of rounds was trained at, as [first round, threads], and the last one.
             "threads": thread_history[-1][1] if thread_history else torch.get_num_threads(),
             "thread_history": thread_history,
             "algorithm": algorithm, "server_state": cpu(server_state), "client_state": cpu(client_state),
             # Every random draw is derived from (seed, round, client, epoch): the round number
             # and seed ARE the RNG state. The generators are stored for inspection only.
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def keep_aside(path: Path) -> Path:
    """Move a stale checkpoint (made with other settings, data or model) to
    ``replaced/<its time>/checkpoint.pt`` beside it, rather than deleting it: it holds the metrics
    of every round it trained, the results of the earlier settings (e.g. another config that
    shares the results folder and the cell's names). Returns where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    folder = path.parent / "replaced" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    os.replace(path, target)
    sidecar = path.parent / progress.PROGRESS_NAME
    if sidecar.exists():  # it describes the checkpoint kept aside, not the run starting over
        os.replace(sidecar, folder / sidecar.name)
    return target


class RunCheckpoint:
    """The checkpoint of one run: the one it resumed (``loaded``, None for a fresh start), the
    metrics rows so far (``rows``: the checkpoint's, then this run's), the round it starts at, the
    round ``path`` holds (``saved_round``, 0: none), the rounds the run trains to and the thread counts."""

    def __init__(self, path: Path, cfg_hash: str, hashed: dict[str, Any], loaded: dict[str, Any] | None,
                 rounds: int):
        self.path, self.cfg_hash, self.hashed, self.loaded, self.rounds = path, cfg_hash, hashed, loaded, rounds
        self.rows: list[dict[str, Any]] = list(loaded["metrics"]) if loaded else []
        self.start_round = int(loaded["round"]) + 1 if loaded else 1
        self.saved_round = self.start_round - 1
        self.threads = torch.get_num_threads()
        self.thread_history: list[list[int]] = [list(x) for x in loaded.get("thread_history", [])] if loaded else []
        self.threads_at_checkpoint = int(loaded["threads"]) if loaded and loaded.get("threads") is not None else None

    @classmethod
    def open(cls, path: Path, cfg_hash: str, hashed: dict[str, Any], algorithm: dict[str, Any], *, rounds: int,
             restart_stale: bool, writer: bool, log: Callable[[str], None]) -> "RunCheckpoint":
        """The checkpoint at ``path`` for a run of ``rounds`` rounds. A stale one is refused
        (:class:`StaleCheckpoint`) or, with ``restart_stale``, moved aside by the ``writer``
        process (:func:`keep_aside`: the earlier settings' results are never lost); ``log`` says
        so, and warns of a resume at another thread count."""
        try:
            loaded = load_checkpoint(path, cfg_hash, hashed, algorithm)
        except StaleCheckpoint as exc:
            if not restart_stale:
                raise
            if writer:
                kept = keep_aside(path)
                log(f"warning: {str(exc).split('; ')[0]}; its results (metrics of every round) are kept in "
                    f"{kept}; starting over (stale_checkpoint=restart)")
            loaded = None
        run = cls(path, cfg_hash, hashed, loaded, rounds)
        if run.start_round <= rounds:  # rounds will be trained at this count
            before, threads = run.threads_at_checkpoint, run.threads
            if before is not None and before != threads:
                log(f"warning: resuming at {threads} threads after {before}: the result is exact only to rounding")
            if not run.thread_history or run.thread_history[-1][1] != threads:
                run.thread_history.append([run.start_round, threads])
        return run

    def save(self, round_: int, *, weights: torch.Tensor, algorithm: dict[str, Any],
             server_state: dict[str, torch.Tensor], client_state: dict[str, torch.Tensor]) -> None:
        """Write round ``round_`` (the caller records it in ``saved_round`` on every process), then
        its sidecar (:mod:`fedsweep.progress`; after the checkpoint: it never claims an unsaved round)."""
        save_checkpoint(self.path, weights=weights, round_=round_, rows=self.rows, cfg_hash=self.cfg_hash,
                        hashed=self.hashed, thread_history=self.thread_history, algorithm=algorithm,
                        server_state=server_state, client_state=client_state)
        write_json(self.path.parent / progress.PROGRESS_NAME,
                   progress.summary(round_, self.rounds, self.rows, time.time()))

    @property
    def last_round(self) -> int:
        """The last finished round (round 0 is the initial evaluation, not a trained round)."""
        return int(self.rows[-1]["round"]) if self.rows else 0

    def unsaved(self) -> bool:
        """Whether the last finished round is newer than the one ``path`` holds."""
        return self.last_round > self.saved_round

    def stop_message(self, saved_now: bool) -> str:
        """What a run stopped by SIGTERM leaves; ``saved_now``: it just saved its last finished round."""
        if saved_now or self.saved_round >= self.start_round:  # saved by this process: now or at its round's end
            return f"saved round {max(self.last_round, self.saved_round)} to {self.path}; rerun to resume"
        if self.saved_round > 0:
            return (f"stopped before round {self.saved_round + 1} finished; round {self.saved_round} is in "
                    f"{self.path} (from an earlier run); rerun to resume")
        return "stopped before round 1 finished; nothing saved"
