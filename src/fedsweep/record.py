"""What a cell records: its metrics columns, the finished metrics frame and run.json's summary.

:mod:`fedsweep.train` collects one row per evaluated round (:data:`METRIC_COLUMNS`); at the end
:func:`metrics_frame` keeps the rows up to the configured round and leads them with the columns
that name the cell (data set, model, algorithm, partition, K, seed, ...), and :func:`run_summary`
is run.json: the config, versions, device, threads, labels, data provenance, wall time,
throughput, sizes and communication, and the client update's own sections
(:meth:`fedsweep.clients.ClientUpdate.summary`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from . import __version__
from . import algorithm as algo
from .client_eval import CLIENT_COLUMNS, HOLDOUT_COLUMNS
from .models import num_parameters
from .partition import partition_record

if TYPE_CHECKING:
    from .checkpoint import RunCheckpoint
    from .lora import PeftSpec

METRIC_COLUMNS = [
    "round", "test_accuracy", "test_loss", "train_loss", "examples", "train_seconds",
    "aggregate_seconds", "eval_seconds", "client_update_norm", "mean_update_norm",
    # drift (see README "Algorithms"): the pseudo-gradient, the clients' spread, their agreement
    "pseudo_gradient_norm", "client_drift_max", "client_drift_rms", "update_cosine",
    "control_variate_norm", "clients_sampled", "client_lr",
    # size and communication (README "LoRA"): parameters trained / held; bytes every sampled client
    # uploads and downloads this round, all together (run.json splits them by dtype); the process's
    # peak memory so far (GPU: torch.cuda.max_memory_allocated; CPU: the peak RSS from getrusage)
    "trainable_parameters", "total_parameters", "upload_bytes", "download_bytes", "upload_bytes_per_client",
    "peak_memory_bytes",
    # the global model on each client's label distribution, summarised over clients (evaluated
    # rounds; NaN on the others): mean, std, worst client, 10th percentile, mean loss (client_eval)
    *CLIENT_COLUMNS,
    # the same on each client's held-out rows (train setting client_holdout; NaN when it is 0)
    *HOLDOUT_COLUMNS,
    # True from the round whose training loss exploded on (DIVERGENCE_FACTOR; run.json "diverged")
    "diverged",
]


def peak_memory(device: torch.device) -> int:
    """The process's peak memory so far: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except ImportError:
        return 0


@dataclass
class Footprint:
    """The model's parameter counts and what ONE client uploads and downloads per round (bytes by dtype)."""

    trainable_parameters: int
    total_parameters: int
    upload_bytes: dict[str, int]
    download_bytes: dict[str, int]

    def metrics(self, clients: int, device: torch.device) -> dict[str, int]:
        """A round's columns: the parameter counts, the bytes ``clients`` clients communicated, the peak memory."""
        up, down = sum(self.upload_bytes.values()), sum(self.download_bytes.values())
        return {"trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
                "upload_bytes": up * clients, "download_bytes": down * clients, "upload_bytes_per_client": up,
                "peak_memory_bytes": peak_memory(device)}

    def summary(self, sampled: int) -> dict[str, Any]:
        """run.json's counts, and bytes by dtype: one client's per round, and ``sampled`` clients' in all."""
        return {
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "communication": {
                "upload_bytes_per_client_per_round": self.upload_bytes,
                "download_bytes_per_client_per_round": self.download_bytes,
                "upload_bytes_total": {k: v * sampled for k, v in self.upload_bytes.items()},
                "download_bytes_total": {k: v * sampled for k, v in self.download_bytes.items()},
            },
        }


def initial_row(accuracy: float, loss: float, eval_seconds: float, sizes: dict[str, int]) -> dict[str, Any]:
    """Round 0: the evaluation of the initial weights (nothing trained: the other columns NaN)."""
    return {**{c: float("nan") for c in METRIC_COLUMNS}, "round": 0, "test_accuracy": accuracy,
            "test_loss": loss, "examples": 0, "train_seconds": 0.0, "aggregate_seconds": 0.0,
            "eval_seconds": eval_seconds, "clients_sampled": 0, **sizes}


# A cell diverged when a round's training loss exceeds this many times the initial test loss
# (round 0, ~ln C): its accuracy is then no result about K, and it is marked so everywhere.
DIVERGENCE_FACTOR = 100.0


def divergence(metrics: pd.DataFrame) -> dict[str, float] | None:
    """The first round whose training loss exploded (see DIVERGENCE_FACTOR), or None."""
    start = metrics.loc[metrics["round"] == 0, "test_loss"]
    initial = float(start.iloc[0]) if len(start) and math.isfinite(start.iloc[0]) else math.log(2)
    limit = DIVERGENCE_FACTOR * max(initial, math.log(2))
    exploded = metrics[(metrics["round"] > 0) & (metrics["train_loss"] > limit)]
    if exploded.empty:
        return None
    first = exploded.iloc[0]
    return {"round": int(first["round"]), "train_loss": float(first["train_loss"]), "initial_loss": initial,
            "factor": DIVERGENCE_FACTOR}


def metrics_frame(rows: list[dict[str, Any]], cfg: Any, tmeta: dict[str, Any], num_clients: int,
                  test_rows: int) -> pd.DataFrame:
    """The rows up to round ``cfg.rounds`` (a checkpoint may hold more), in :data:`METRIC_COLUMNS`,
    after the columns that name the cell."""
    metrics = pd.DataFrame(rows).reindex(columns=METRIC_COLUMNS)  # rows of older checkpoints lack new columns
    metrics = metrics[metrics["round"] <= cfg.rounds].reset_index(drop=True)
    ids = {"dataset": cfg.dataset or tmeta["dataset"], "model": cfg.model, "algorithm": cfg.algorithm,
           "partition": cfg.partition, "clients": num_clients, "seed": cfg.seed, "protocol": cfg.protocol,
           "num_classes": int(tmeta["num_classes"]),
           "chance_accuracy": float(tmeta["chance_accuracy"]),
           # the test-set size: the report's binomial standard error of each accuracy
           "test_rows": test_rows}
    for k, v in reversed(ids.items()):
        metrics.insert(0, k, v)
    diverged = divergence(metrics)
    metrics["diverged"] = metrics["round"] >= diverged["round"] if diverged else False
    return metrics


def run_summary(cfg: Any, metrics: pd.DataFrame, *, checkpoint: RunCheckpoint, tmeta: dict[str, Any],
                shards: Any, model: torch.nn.Module, peft: PeftSpec, footprint: Footprint, clients_each_round: int,
                test_rows: int, client_update_sections: dict[str, Any], bf16: bool, wall_seconds: float,
                device: torch.device, world: int) -> dict[str, Any]:
    """run.json of a finished cell. ``checkpoint``: the run's (its resume point and thread counts);
    ``shards``: :class:`fedsweep.partition.Shards`; ``client_update_sections``: what
    :meth:`fedsweep.clients.ClientUpdate.summary` returned."""
    trained = metrics[metrics["round"] > 0]
    sizes = shards.sizes
    return {
        "diverged": divergence(metrics),
        "config": dataclasses.asdict(cfg), "config_hash": checkpoint.cfg_hash,
        "resumed_from_round": checkpoint.start_round - 1,
        "fedsweep": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
        "python": platform.python_version(), "git_commit": _git_commit(), "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bf16_autocast": bf16, "parameters": num_parameters(model), "clients": len(sizes),
        "shard_sizes": sizes, "wall_seconds_this_run": wall_seconds,
        "train_examples_per_second": float(trained["examples"].sum() / max(trained["train_seconds"].sum(), 1e-9)),
        "peak_memory_bytes": peak_memory(device),
        "final_test_accuracy": float(metrics["test_accuracy"].dropna().iloc[-1]),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        # what the job asked SLURM for (--gpus), beside what it saw ("device", "world_size")
        "slurm_gpus": os.environ.get("SLURM_GPUS") or os.environ.get("SLURM_GPUS_ON_NODE"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        # Threads: CPU results are bitwise reproducible (and resumable) at one count only.
        "threads": checkpoint.threads, "threads_at_checkpoint": checkpoint.threads_at_checkpoint,
        "thread_history": [{"from_round": r, "threads": n} for r, n in checkpoint.thread_history],
        # The label mapping (class id -> name) and where the data came from: the prepared data
        # set's name and the sha256 of its train/test files, then the tokens and the shards.
        "class_names": tmeta.get("class_names"), "data_sha256": tmeta.get("source_sha256"),
        "data": {"dataset": tmeta.get("dataset"), "tokenizer": tmeta.get("tokenizer"),
                 "max_length": tmeta.get("max_length"), "tokens_sha256": tmeta.get("sha256"),
                 "shards": shards.info},
        # The partition: its name, scheme, parameters and kind (fixed_total / per_client).
        "partition": {"name": cfg.partition, **partition_record(shards.info)},
        "test_rows": test_rows,
        # The algorithm: its name, every setting, and how many clients each round trained.
        "algorithm": {**algo.settings(cfg), "server_lr": algo.server_lr(cfg), "clients_each_round": clients_each_round},
        "peft": peft.record() or {"method": "none"},
        **footprint.summary(int(trained["clients_sampled"].sum())),
        **client_update_sections,
        "world_size": world,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None
