"""One cell of the sweep: (data set, model, K, seed) trained with FedAvg for R rounds.

Outputs in ``out_dir``: ``metrics.parquet`` (one row per evaluated round, written at the end),
``run.json`` (config, versions, device, threads, labels, data provenance, wall time, throughput)
and ``checkpoint.pt`` (after every round, atomically: the global weights, the round, the metrics
so far, the config hash and the thread count). Re-running the same command resumes from the last
complete round; since every random choice is a pure function of (seed, round, client, epoch),
the resumed run gives the numbers an uninterrupted run gives (bitwise on CPU at the same number
of threads: another count rounds sums differently, so a resume at another count warns and
run.json records both). ``rounds`` is not part of the config hash, so a finished run can be
extended (e.g. from the budget of 100 rounds to the second threshold, 200).

SIGTERM (see :mod:`fedsweep.stop`) is a request to stop at the next safe point: after the
checkpoint is read, after the model and data are set up, after the round-0 evaluation, between
SGD steps, between rounds and before the final writes. The run then saves the last finished
round if it is not saved yet and exits with 143, saying truthfully what was saved. A SIGTERM
during the final writes (metrics.parquet, run.json) lets them complete and the run ends
normally (exit 0): the cell is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
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
from . import stop as stop_signal
from .engine import PROTOCOLS, FedAvg, FlatParameters, eval_batches, evaluate, train_round
from .grouped import ClientGroups
from .grouped import check_support as check_grouping_support
from .io import atomic_path, remove_stale_temps, write_json, write_parquet
from .models import build_model, model_fingerprint, num_parameters
from .partition import read_shards
from .tokens import load_split, read_tokens_meta

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
METRIC_COLUMNS = [
    "round", "test_accuracy", "test_loss", "train_loss", "examples", "train_seconds",
    "aggregate_seconds", "eval_seconds", "client_update_norm", "mean_update_norm",
]
# Fields that do not change the numbers: excluded from the hash that guards resuming.
_UNHASHED = {"out_dir", "rounds", "device", "progress", "dataset", "checkpoint_every", "keep_checkpoint",
             "stale_checkpoint"}


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
    # A checkpoint made with other settings, data or model (or an older fedsweep): "error"
    # refuses it (by hand: never lose a run by accident); "restart" deletes it and starts over
    # (the workflow, which reruns a cell only because what it depends on changed).
    stale_checkpoint: str = "error"

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
        need(self.stale_checkpoint in ("error", "restart"), "stale_checkpoint")
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


class Interrupted(Exception):
    pass


# Format 2: the weights vector has FlatParameters' aligned layout (format 1's was unpadded, so
# its vector is shorter and would be mis-placed) and the thread count is recorded.
CHECKPOINT_FORMAT = 2
CHECKPOINT_NAMES = ("checkpoint.pt", "metrics.parquet", "run.json")  # what a run writes (atomically)


class StaleCheckpoint(FedsweepError):
    """A readable checkpoint that this run must not resume: other settings, data, model or format."""


def _load_checkpoint(path: Path, expected_hash: str, expected: dict[str, Any]) -> dict[str, Any] | None:
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
    if ckpt.get("config_hash") != expected_hash:
        old = ckpt.get("config", {})
        diff = [k for k in sorted(set(old) | set(expected)) if old.get(k) != expected.get(k)]
        first = diff[0] if diff else "?"
        raise StaleCheckpoint(
            f"checkpoint {str(path)!r} is from a different config ({first}: {old.get(first)!r} != "
            f"{expected.get(first)!r}); refusing to resume, delete it to start over"
        )
    return ckpt


def _save_checkpoint(path: Path, weights: torch.Tensor, round_: int, rows: list[dict], cfg_hash: str,
                     hashed: dict[str, Any], thread_history: list[list[int]]) -> None:
    state = {"format": CHECKPOINT_FORMAT, "layout": FlatParameters.LAYOUT, "config_hash": cfg_hash,
             "config": hashed, "round": round_, "weights": weights.detach().cpu(), "metrics": rows,
             "fedsweep_version": __version__,
             # CPU sums are exact to the bit only at the same thread count: the count each
             # stretch of rounds was trained at, as [first round, threads], and the last one.
             "threads": thread_history[-1][1] if thread_history else torch.get_num_threads(),
             "thread_history": thread_history,
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
    """Run (or resume) one cell; return its metrics. All checks happen before any compute.

    SIGTERM stops it at the next safe point with ``SystemExit(143)`` (see the module docstring).
    The handler is the one :func:`fedsweep.stop.install_stop_handler` installed (the command
    line does so before its imports); if none is installed, ``run`` installs it for its own
    duration and puts the previous one back when it returns.
    """
    owns_handler = not stop_signal.handler_installed() and stop_signal.install_stop_handler()
    try:
        return _run(cfg)
    finally:
        if owns_handler:
            stop_signal.uninstall_stop_handler()


def _run(cfg: TrainConfig) -> pd.DataFrame:
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
    label = f"{cfg.dataset or Path(cfg.tokens_dir).name}/{cfg.model}/K{len(shards.sizes)}"
    if ranks.rank == 0:  # the only writer: temporaries of a writer killed mid-write (up to a checkpoint's size)
        stale = remove_stale_temps(out, CHECKPOINT_NAMES)
        if stale:
            print(f"[{label}] removed {len(stale)} stale temporary file(s) of an interrupted write: "
                  f"{', '.join(p.name for p in stale)}", file=sys.stderr)
    hashed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _UNHASHED}
    hashed.update(tokens_sha256=tmeta["sha256"], shards_sha256_info=shards.info, num_labels=num_labels,
                  # the spec names the model; this says which weights (a local folder can be edited)
                  model_fingerprint=model_fingerprint(cfg.model))
    hashed["tokens_dir"] = hashed["shards"] = None  # paths may move; the contents are hashed
    if hashed["client_group"] == 1:  # the default, absent from earlier versions: their checkpoints resume
        del hashed["client_group"]
    cfg_hash = config_hash(hashed)
    ckpt_path = out / "checkpoint.pt"
    try:
        ckpt = _load_checkpoint(ckpt_path, cfg_hash, hashed)
    except StaleCheckpoint as exc:
        if cfg.stale_checkpoint != "restart":
            raise
        if ranks.rank == 0:
            print(f"[{label}] {str(exc).split('; ')[0]}; starting over (stale_checkpoint=restart)",
                  file=sys.stderr, flush=True)
            ckpt_path.unlink(missing_ok=True)
        ckpt = None

    rows: list[dict[str, Any]] = list(ckpt["metrics"]) if ckpt else []
    start_round = int(ckpt["round"]) + 1 if ckpt else 1
    saved_round = start_round - 1  # the round checkpoint.pt holds (0: none)
    threads = torch.get_num_threads()
    thread_history: list[list[int]] = [list(x) for x in ckpt.get("thread_history", [])] if ckpt else []
    threads_at_checkpoint = int(ckpt["threads"]) if ckpt and ckpt.get("threads") is not None else None
    if start_round <= cfg.rounds:  # rounds will be trained at this count
        if threads_at_checkpoint is not None and threads_at_checkpoint != threads and ranks.rank == 0:
            print(f"[{label}] warning: resuming at {threads} threads after {threads_at_checkpoint}: "
                  f"the result is exact only to rounding", file=sys.stderr, flush=True)
        if not thread_history or thread_history[-1][1] != threads:
            thread_history.append([start_round, threads])
    strategy: FedAvg | None = None

    def stopping() -> bool:
        """Whether to stop here; with several ranks, all of them decide together (a collective)."""
        if ranks.world == 1:
            return stop_signal.stop_requested()
        return ranks.max(float(stop_signal.stop_requested())) > 0

    try:
        if stopping():
            raise Interrupted()
        model = build_model(cfg.model, num_labels, seed=cfg.seed)
        if tmeta["vocab_size"] > model.get_input_embeddings().num_embeddings:
            raise FedsweepError(
                f"model {cfg.model!r}: its {model.get_input_embeddings().num_embeddings}-token embedding is "
                f"smaller than tokenizer {tmeta['tokenizer']!r} ({tmeta['vocab_size']} tokens)"
            )
        model.to(device)
        flat = FlatParameters(model)
        if ckpt is not None:
            if ckpt["weights"].shape != (len(flat),):
                raise FedsweepError(
                    f"checkpoint {str(ckpt_path)!r} holds {ckpt['weights'].numel()} weights, the model's layout "
                    f"has {len(flat)}; delete it to start over"
                )
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
        if stopping():
            raise Interrupted()

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        progress = _Progress(cfg.progress if ranks.rank == 0 else "none", cfg.rounds, label)

        def evaluate_global() -> tuple[float, float, float]:
            flat.data.copy_(strategy.weights)
            t0 = time.perf_counter()
            # Ranks split the test batches; the summed counts cover the whole test set exactly once.
            correct, loss_sum = evaluate(model, test, test_batches[ranks.rank::ranks.world], test_len, protocol,
                                         bf16)
            correct, loss_sum = ranks.sum([correct, loss_sum])
            return correct / len(test), loss_sum / len(test), time.perf_counter() - t0

        if ckpt is None:
            acc, loss, secs = evaluate_global()
            rows.append({"round": 0, "test_accuracy": acc, "test_loss": loss, "train_loss": float("nan"),
                         "examples": 0, "train_seconds": 0.0, "aggregate_seconds": 0.0, "eval_seconds": secs,
                         "client_update_norm": float("nan"), "mean_update_norm": float("nan")})
            progress.end_round(rows[-1])
            if stopping():
                raise Interrupted()

        t_start = time.perf_counter()
        total = sum(shards.sizes)
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
                    # Between steps with one process only: ranks must reach each collective together.
                    should_stop=stop_signal.stop_requested if ranks.world == 1 else None)
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
                    _save_checkpoint(ckpt_path, strategy.weights, round_, rows, cfg_hash, hashed, thread_history)
                saved_round = round_
            # Ranks stop together, at a round boundary (a signal may reach them at different times).
            if stopping():
                raise Interrupted()
        wall = time.perf_counter() - t_start
        if stopping():  # before the final writes: the checkpoint holds the last round
            raise Interrupted()
    except (Interrupted, FedsweepError) as exc:
        # The global weights are those of the last finished round: save them if not yet saved.
        done = int(rows[-1]["round"]) if rows else 0  # round 0 is the initial evaluation, not a trained round
        saved_now = done > saved_round and strategy is not None
        if saved_now and ranks.rank == 0:
            _save_checkpoint(ckpt_path, strategy.weights, done, rows, cfg_hash, hashed, thread_history)
        if isinstance(exc, Interrupted):
            if ranks.rank == 0:
                if saved_now or saved_round >= start_round:  # saved by this process: now or at its round's end
                    what = f"saved round {max(done, saved_round)} to {ckpt_path}; rerun to resume"
                elif saved_round > 0:
                    what = (f"stopped before round {saved_round + 1} finished; round {saved_round} is in "
                            f"{ckpt_path} (from an earlier run); rerun to resume")
                else:
                    what = "stopped before round 1 finished; nothing saved"
                print(f"[{label}] SIGTERM: {what}", file=sys.stderr, flush=True)
            stop_signal.clear_stop_request()  # served: a caller that goes on is not stopped again
            ranks.close()
            raise SystemExit(143) from None
        ranks.close()
        raise

    # A SIGTERM from here on lets the final writes complete; the run then ends normally.
    metrics = pd.DataFrame(rows)[METRIC_COLUMNS]
    metrics = metrics[metrics["round"] <= cfg.rounds].reset_index(drop=True)
    ids = {"dataset": cfg.dataset or tmeta["dataset"], "model": cfg.model, "clients": len(shards.sizes),
           "seed": cfg.seed, "protocol": cfg.protocol, "num_classes": num_labels,
           "chance_accuracy": float(tmeta["chance_accuracy"])}
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
        # Threads: CPU results are bitwise reproducible (and resumable) at one count only.
        "threads": threads, "threads_at_checkpoint": threads_at_checkpoint,
        "thread_history": [{"from_round": r, "threads": n} for r, n in thread_history],
        # The label mapping (class id -> name) and where the data came from: the prepared data
        # set's name and the sha256 of its train/test files, then the tokens and the shards.
        "class_names": tmeta.get("class_names"), "data_sha256": tmeta.get("source_sha256"),
        "data": {"dataset": tmeta.get("dataset"), "tokenizer": tmeta.get("tokenizer"),
                 "max_length": tmeta.get("max_length"), "tokens_sha256": tmeta.get("sha256"),
                 "shards": shards.info},
    }
    summary["world_size"] = ranks.world
    if ranks.rank == 0:
        write_parquet(out / "metrics.parquet", metrics)
        write_json(out / "run.json", summary)
        if not cfg.keep_checkpoint and ckpt_path.exists():
            ckpt_path.unlink()
    if stop_signal.stop_requested():
        if ranks.rank == 0:
            print(f"[{label}] SIGTERM during the final writes: they completed, the run is complete",
                  file=sys.stderr, flush=True)
        stop_signal.clear_stop_request()
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
