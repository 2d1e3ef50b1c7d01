"""One cell of the sweep: (data set, model, K, seed) trained with FedAvg for R rounds.

Outputs in ``out_dir``: ``metrics.parquet`` (one row per evaluated round, written at the end),
``run.json`` (config, versions, device, wall time, throughput) and ``checkpoint.pt`` (after every
round, atomically: the global weights, the round, the metrics so far and the config hash).
Re-running the same command resumes from the last complete round; since every random choice is
a pure function of (seed, round, client, epoch), the resumed run gives the numbers an
uninterrupted run gives (bitwise on CPU). ``rounds`` is not part of the config hash, so a
finished run can be extended (e.g. from the budget of 100 rounds to the second threshold, 200).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import FedsweepError, __version__
from .engine import PROTOCOLS, FedAvg, FlatParameters, eval_batches, evaluate, train_round
from .grouped import ClientGroups
from .grouped import check_support as check_grouping_support
from .io import atomic_path, write_json, write_parquet
from .models import build_model, num_parameters
from .partition import read_shards
from .tokens import load_split, read_tokens_meta

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
METRIC_COLUMNS = [
    "round", "test_accuracy", "test_loss", "train_loss", "examples", "train_seconds",
    "aggregate_seconds", "eval_seconds", "client_update_norm", "mean_update_norm",
]
# Fields that do not change the numbers: excluded from the hash that guards resuming.
_UNHASHED = {"out_dir", "rounds", "device", "progress", "dataset", "checkpoint_every", "keep_checkpoint"}


@dataclass
class TrainConfig:
    tokens_dir: str
    shards: str
    model: str
    out_dir: str
    rounds: int
    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-5
    protocol: str = "standard"
    precision: str = "auto"
    eval_every: int = 1
    eval_batch_size: int = 256
    client_group: int = 1  # clients trained at once (vmapped); 1 = one after another
    seed: int = 0
    device: str = "auto"
    dataset: str = ""
    checkpoint_every: int = 1
    keep_checkpoint: bool = True
    progress: str = "auto"  # auto: a bar on a terminal, one line per round otherwise

    def validate(self) -> None:
        def need(ok: bool, name: str) -> None:
            if not ok:
                raise FedsweepError(f"train: invalid {name}={getattr(self, name)!r}")

        for name in ("rounds", "epochs", "batch_size", "eval_every", "eval_batch_size", "checkpoint_every",
                     "client_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FedsweepError(f"train: {name}={value!r} must be a positive integer")
        lr = self.lr
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise FedsweepError(f"train: lr={lr!r} must be a positive number")
        need(self.protocol in PROTOCOLS, "protocol")
        need(self.precision in PRECISIONS, "precision")
        need(self.progress in ("auto", "bar", "lines", "none"), "progress")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise FedsweepError(f"train: invalid device={self.device!r}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise FedsweepError(f"train: device={self.device!r} but CUDA is not available")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision_settings(precision: str, device: torch.device) -> bool:
    """Apply the matmul precision; return whether to autocast to bf16.

    auto = bf16 autocast + TF32 on a GPU (fast), strict fp32 on a CPU (exact, reproducible).
    """
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return precision == "bf16"


def config_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class _StopFlag:
    """SIGTERM (SLURM's warning before a kill, or a preemption) sets a flag the loop checks
    between steps; the run then saves the last finished round and exits with 143."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __call__(self) -> bool:
        return self.set

    def install(self) -> None:
        def handler(signum, frame):
            self.set = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Interrupted(Exception):
    pass


def _load_checkpoint(path: Path, expected_hash: str, expected: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt checkpoint cannot be trusted; say so rather than guess
        raise FedsweepError(f"checkpoint {str(path)!r} is unreadable ({exc}); delete it to start over") from exc
    if ckpt.get("config_hash") != expected_hash:
        old = ckpt.get("config", {})
        diff = [k for k in sorted(set(old) | set(expected)) if old.get(k) != expected.get(k)]
        first = diff[0] if diff else "?"
        raise FedsweepError(
            f"checkpoint {str(path)!r} is from a different config ({first}: {old.get(first)!r} != "
            f"{expected.get(first)!r}); refusing to resume, delete it to start over"
        )
    return ckpt


def _save_checkpoint(path: Path, weights: torch.Tensor, round_: int, rows: list[dict], cfg_hash: str,
                     hashed: dict[str, Any]) -> None:
    state = {"format": 1, "config_hash": cfg_hash, "config": hashed, "round": round_,
             "weights": weights.detach().cpu(), "metrics": rows, "fedsweep_version": __version__,
             # Every random draw is derived from (seed, round, client, epoch): the round number
             # and seed ARE the RNG state. The generators are stored for inspection only.
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class _Progress:
    def __init__(self, mode: str, rounds: int, label: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.rounds, self.label = mode, rounds, label
        self.bar = None

    def start_round(self, round_: int, examples: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=examples, desc=f"{self.label} round {round_}/{self.rounds}",
                            unit="ex", leave=False, file=sys.stderr)

    def step(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end_round(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode == "none":
            return
        acc = row.get("test_accuracy")
        acc_s = "" if acc is None or (isinstance(acc, float) and math.isnan(acc)) else f"acc {acc:.4f} "
        loss = row.get("train_loss", float("nan"))
        secs = row.get("train_seconds", 0.0)
        rate = row["examples"] / secs if secs else float("nan")
        print(f"[{self.label}] round {row['round']}/{self.rounds} {acc_s}train_loss {loss:.4f} "
              f"train {secs:.1f}s eval {row.get('eval_seconds', 0.0):.1f}s {rate:.0f} ex/s",
              file=sys.stderr, flush=True)


class Ranks:
    """The processes sharing one cell (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK).

    Clients are dealt round-robin over ranks; each rank adds its clients' weighted models into
    its float64 accumulator and an all-reduce sums them (NCCL on GPUs, gloo on CPUs). Every
    random draw depends on (seed, round, client, epoch), never on the rank, so a client trains
    identically wherever it runs; only the order of the float64 additions changes, far below
    fp32 resolution. One process (world 1) is the same code with the collectives skipped.
    """

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_env(cls, device_name: str) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, pick_device(device_name))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def _reduce(self, values: list[float], op) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.SUM)

    def min(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        return self._reduce([value], dist.ReduceOp.MIN)[0]

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        return self._reduce([value], dist.ReduceOp.MAX)[0]

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run(cfg: TrainConfig) -> pd.DataFrame:
    """Run (or resume) one cell; return its metrics. All checks happen before any compute."""
    cfg.validate()
    tmeta = read_tokens_meta(cfg.tokens_dir)
    shards = read_shards(cfg.shards)
    protocol = PROTOCOLS[cfg.protocol]
    if shards.info.get("train_rows") not in (None, tmeta["rows"]["train"]):
        raise FedsweepError(
            f"shards {cfg.shards!r}: made for {shards.info['train_rows']} training rows, tokens have {tmeta['rows']['train']}"
        )
    if shards.info.get("train_sha256") not in (None, tmeta["source_sha256"]["train"]):
        raise FedsweepError(f"shards {cfg.shards!r}: made from another training set than {cfg.tokens_dir!r}")
    smallest = min(shards.sizes)
    if smallest < cfg.batch_size:
        raise FedsweepError(
            f"train: clients={len(shards.sizes)} leaves a shard of {smallest} examples, no full batch of "
            f"batch_size={cfg.batch_size}"
        )
    num_labels = int(tmeta["num_classes"])
    if cfg.client_group > 1:
        check_grouping_support()
    ranks = Ranks.from_env(cfg.device)
    device = ranks.device
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hashed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _UNHASHED}
    hashed.update(tokens_sha256=tmeta["sha256"], shards_sha256_info=shards.info, num_labels=num_labels)
    hashed["tokens_dir"] = hashed["shards"] = None  # paths may move; the contents are hashed
    if hashed["client_group"] == 1:  # the default, absent from earlier versions: their checkpoints resume
        del hashed["client_group"]
    cfg_hash = config_hash(hashed)
    ckpt_path = out / "checkpoint.pt"
    ckpt = _load_checkpoint(ckpt_path, cfg_hash, hashed)

    model = build_model(cfg.model, num_labels, seed=cfg.seed)
    if tmeta["vocab_size"] > model.get_input_embeddings().num_embeddings:
        raise FedsweepError(
            f"model {cfg.model!r}: its {model.get_input_embeddings().num_embeddings}-token embedding is smaller "
            f"than tokenizer {tmeta['tokenizer']!r} ({tmeta['vocab_size']} tokens)"
        )
    model.to(device)
    flat = FlatParameters(model)
    if ckpt is not None:
        flat.data.copy_(ckpt["weights"].to(device))
    global_weights = flat.data.clone()
    strategy = FedAvg(global_weights)
    strategy.reduce = ranks.all_reduce_sum if ranks.world > 1 else None
    mine = list(range(ranks.rank, len(shards.indices), ranks.world))  # this rank's clients
    # No larger than this rank's clients: K=1 cells hold one model whatever client_group says.
    group_size = min(cfg.client_group, len(mine))
    groups = ClientGroups(model, flat, group_size) if group_size > 1 else None
    bf16 = precision_settings(cfg.precision, device)

    width = tmeta["max_length"] if not protocol.dynamic_padding else None
    train = load_split(cfg.tokens_dir, "train", width=width)
    test = load_split(cfg.tokens_dir, "test", width=width)
    train_len, test_len = train.lengths.numpy(), test.lengths.numpy()
    train, test = train.to(device), test.to(device)
    test_batches = eval_batches(test_len, cfg.eval_batch_size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    label = f"{cfg.dataset or Path(cfg.tokens_dir).name}/{cfg.model}/K{len(shards.sizes)}"
    progress = _Progress(cfg.progress if ranks.rank == 0 else "none", cfg.rounds, label)
    ids = {"dataset": cfg.dataset or tmeta["dataset"], "model": cfg.model, "clients": len(shards.sizes),
           "seed": cfg.seed, "protocol": cfg.protocol, "num_classes": num_labels,
           "chance_accuracy": float(tmeta["chance_accuracy"])}

    def evaluate_global() -> tuple[float, float, float]:
        flat.data.copy_(strategy.weights)
        t0 = time.perf_counter()
        # Ranks split the test batches; the summed counts cover the whole test set exactly once.
        correct, loss_sum = evaluate(model, test, test_batches[ranks.rank::ranks.world], test_len, protocol, bf16)
        correct, loss_sum = ranks.sum([correct, loss_sum])
        return correct / len(test), loss_sum / len(test), time.perf_counter() - t0

    rows: list[dict[str, Any]] = list(ckpt["metrics"]) if ckpt else []
    start_round = int(ckpt["round"]) + 1 if ckpt else 1
    if ckpt is None:
        acc, loss, secs = evaluate_global()
        rows.append({"round": 0, "test_accuracy": acc, "test_loss": loss, "train_loss": float("nan"),
                     "examples": 0, "train_seconds": 0.0, "aggregate_seconds": 0.0, "eval_seconds": secs,
                     "client_update_norm": float("nan"), "mean_update_norm": float("nan")})
        progress.end_round(rows[-1])

    stop = _StopFlag()
    stop.install()
    t_start = time.perf_counter()
    last_saved = start_round - 1
    total = sum(shards.sizes)
    try:
        for round_ in range(start_round, cfg.rounds + 1):
            examples_round = sum(
                (shards.sizes[k] - shards.sizes[k] % cfg.batch_size if protocol.drop_last else shards.sizes[k])
                * cfg.epochs for k in mine
            )
            progress.start_round(round_, examples_round)
            strategy.begin_round(total)
            try:
                stats = train_round(
                    model, flat, strategy, train, train_len, shards.indices, mine, epochs=cfg.epochs,
                    batch_size=cfg.batch_size, lr=cfg.lr, protocol=protocol, seed=cfg.seed, round_=round_,
                    bf16=bf16, groups=groups, on_batch=progress.step,
                    should_stop=stop if ranks.world == 1 else None)
            except InterruptedError:
                raise Interrupted() from None
            train_secs, agg_secs = stats.train_seconds, stats.aggregate_seconds
            loss_total, seen_total, norm_sum = ranks.sum([stats.loss_sum, stats.examples, stats.drift_sum])
            first_bad = ranks.min(stats.first_bad_client)
            if math.isfinite(first_bad):
                where = (f"the last good state is round {round_ - 1} in {str(ckpt_path)!r}" if round_ > 1
                         else "no round had finished")
                raise FedsweepError(
                    f"train: loss is not finite at round {round_} (client {int(first_bad)}); stopped, {where}"
                )
            t0 = time.perf_counter()
            mean_norm = strategy.finish_round(scratch=flat.data)
            sync()
            agg_secs += time.perf_counter() - t0
            row = {"round": round_, "test_accuracy": float("nan"), "test_loss": float("nan"),
                   "train_loss": loss_total / seen_total, "examples": int(seen_total), "train_seconds": train_secs,
                   "aggregate_seconds": agg_secs, "eval_seconds": 0.0,
                   "client_update_norm": norm_sum / len(shards.indices), "mean_update_norm": mean_norm}
            if round_ % cfg.eval_every == 0 or round_ == cfg.rounds:
                row["test_accuracy"], row["test_loss"], row["eval_seconds"] = evaluate_global()
            rows.append(row)
            progress.end_round(row)
            if round_ % cfg.checkpoint_every == 0 or round_ == cfg.rounds:
                if ranks.rank == 0:
                    _save_checkpoint(ckpt_path, strategy.weights, round_, rows, cfg_hash, hashed)
                last_saved = round_
            # Ranks stop together, at a round boundary (a signal may reach them at different times).
            if ranks.max(float(stop())) > 0:
                raise Interrupted()
    except (Interrupted, FedsweepError) as exc:
        # The global weights are those of the last finished round: save them if not yet saved.
        done = rows[-1]["round"] if rows else 0
        if done > last_saved and ranks.rank == 0:
            _save_checkpoint(ckpt_path, strategy.weights, done, rows, cfg_hash, hashed)
        if isinstance(exc, Interrupted):
            print(f"[{label}] SIGTERM: saved round {done} to {ckpt_path}; rerun to resume", file=sys.stderr)
            ranks.close()
            raise SystemExit(143) from None
        ranks.close()
        raise
    finally:
        stop.uninstall()
    wall = time.perf_counter() - t_start

    metrics = pd.DataFrame(rows)[METRIC_COLUMNS]
    metrics = metrics[metrics["round"] <= cfg.rounds].reset_index(drop=True)
    for k, v in reversed(ids.items()):
        metrics.insert(0, k, v)
    trained = metrics[metrics["round"] > 0]
    summary = {
        "config": dataclasses.asdict(cfg), "config_hash": cfg_hash, "resumed_from_round": start_round - 1,
        "fedsweep": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
        "python": platform.python_version(), "git_commit": _git_commit(), "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bf16_autocast": bf16, "parameters": num_parameters(model), "clients": len(shards.sizes),
        "shard_sizes": shards.sizes, "wall_seconds_this_run": wall,
        "train_examples_per_second": float(trained["examples"].sum() / max(trained["train_seconds"].sum(), 1e-9)),
        "peak_memory_bytes": _peak_memory(device),
        "final_test_accuracy": float(metrics["test_accuracy"].dropna().iloc[-1]),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    summary["world_size"] = ranks.world
    if ranks.rank == 0:
        write_parquet(out / "metrics.parquet", metrics)
        write_json(out / "run.json", summary)
        if not cfg.keep_checkpoint and ckpt_path.exists():
            ckpt_path.unlink()
    ranks.close()
    return metrics


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except ImportError:
        return 0
