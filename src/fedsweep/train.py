"""One cell of the sweep: (data set, model, algorithm, K, seed) trained for R rounds.

This module is the orchestration: read and check the inputs, resume from the checkpoint, build
the model, the server strategy (:mod:`fedsweep.strategies`) and the client update
(:mod:`fedsweep.clients`) of the cell's algorithm (:mod:`fedsweep.algorithm`), run the rounds
(:func:`fedsweep.rounds.train_round`), evaluate, checkpoint and write the outputs. Checkpoints
are :mod:`fedsweep.checkpoint`; ranks and progress :mod:`fedsweep.runtime`.

Outputs in ``out_dir``: ``metrics.parquet`` (one row per evaluated round, written at the end),
``run.json`` (config, versions, device, threads, labels, data provenance, wall time, throughput)
and ``checkpoint.pt`` (after every round, atomically: the global weights, the round, the metrics
so far, the config hash, the thread count and the algorithm's state); with SCAFFOLD also
``scaffold/``, the clients' control variates. With ``peft`` (LoRA, :mod:`fedsweep.lora`) only the
adapters and the head are trained, averaged and checkpointed; every run's metrics count the
trainable and total parameters, the bytes the round's clients upload and download, and the peak
memory (run.json: the bytes by dtype). Re-running the same command resumes from the last
complete round; since every random choice is a pure function of (seed, round, client, epoch),
the resumed run gives the numbers an uninterrupted run gives (bitwise on CPU at the same number
of threads: another count rounds sums differently, so a resume at another count warns and
run.json records both). ``rounds`` is not part of the config hash (unless the client lr decays
linearly over the rounds), so a finished run can be extended (e.g. from the budget of 100
rounds to the second threshold, 200).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import FedsweepError, __version__
from . import algorithm as algo
from . import lora
from . import stop as stop_signal
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAMES, StaleCheckpoint, load_checkpoint, save_checkpoint
from .clients import CLIENT_UPDATES, ControlVariateStore, Scaffold
from .engine import PROTOCOLS, FlatParameters, eval_batches, evaluate
from .grouped import ClientGroups
from .grouped import check_support as check_grouping_support
from .io import remove_stale_temps, write_json, write_parquet
from .models import build_model, is_decoder_classifier, model_fingerprint, num_parameters, total_parameters
from .partition import hashed_info, partition_record, read_shards
from .rounds import Federation, clients_per_round
from .runtime import Progress, Ranks, pick_device
from .strategies import build_strategy
from .tokens import load_split, read_tokens_meta

__all__ = ["TrainConfig", "run", "METRIC_COLUMNS", "CHECKPOINT_FORMAT", "Ranks", "pick_device",
           "precision_settings"]

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
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
]
# Fields that do not change the numbers: excluded from the hash that guards resuming.
_UNHASHED = {"out_dir", "rounds", "device", "progress", "dataset", "checkpoint_every", "keep_checkpoint",
             "stale_checkpoint", "partition"}


@dataclass
class TrainConfig:
    tokens_dir: str
    shards: str
    model: str
    out_dir: str
    rounds: int
    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-5  # the clients' learning rate (the peak of a schedule)
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
    # The partition's name (slug), a label like `algorithm`: recorded in metrics and run.json. The
    # split itself is the shards file (hashed through its metadata), so the label is not hashed.
    partition: str = "iid"
    # --- the federated algorithm (fedsweep.algorithm; README "Algorithms") ---------------------
    algorithm: str = "fedavg"  # its name (slug): recorded in metrics, run.json and the checkpoint
    strategy: str = "fedavg"  # server: fedavg | fedavgm | fedadam | fedyogi | fedadagrad
    server_lr: float | None = None  # fedavgm (default 1), fedadam/fedyogi/fedadagrad (required)
    server_momentum: float = 0.0  # fedavgm
    beta1: float = 0.9  # fedadam / fedyogi / fedadagrad: first moment
    beta2: float = 0.99  # fedadam / fedyogi: second moment
    tau: float = 1e-3  # fedadam / fedyogi / fedadagrad: adaptivity (v starts at tau^2)
    client: str = "plain"  # plain | fedprox | scaffold
    mu: float = 0.0  # fedprox: proximal weight
    client_optimizer: str = "sgd"  # sgd | adamw (state reset for every client every round)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # adamw: decoupled weight decay
    lr_schedule: str = "constant"  # constant | linear (decay over the rounds)
    warmup_rounds: int = 0  # linear warmup of the client lr over the first rounds
    clients_per_round: int = 0  # clients sampled per round (0 = all; capped at K)
    client_fraction: float = 1.0  # or this fraction of K (at least 1)
    # --- parameter-efficient fine-tuning (fedsweep.lora): None or {method: lora, r: ..., ...} ---
    peft: dict | None = None

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
        if not isinstance(self.partition, str) or not algo.SLUG.match(self.partition):
            raise FedsweepError(f"train: partition={self.partition!r} must be a slug: letters, digits, '_', '.', "
                                f"'+', '-' (not first), at most 64")
        algo.validate(self)
        lora.parse(self.peft, "train: peft")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise FedsweepError(f"train: invalid device={self.device!r}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise FedsweepError(f"train: device={self.device!r} but CUDA is not available")


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


@dataclass
class _Inputs:
    tmeta: dict[str, Any]
    shards: Any  # partition.Shards
    num_labels: int

    @property
    def num_clients(self) -> int:
        return len(self.shards.sizes)


def _read_inputs(cfg: TrainConfig) -> _Inputs:
    """The tokens' metadata and the shards, checked against each other and the batch size."""
    tmeta = read_tokens_meta(cfg.tokens_dir)
    shards = read_shards(cfg.shards)
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
    return _Inputs(tmeta, shards, int(tmeta["num_classes"]))


def _hashed_config(cfg: TrainConfig, inputs: _Inputs) -> dict[str, Any]:
    """The settings that decide the numbers: a checkpoint resumes only under the same ones."""
    hashed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _UNHASHED}
    hashed.update(tokens_sha256=inputs.tmeta["sha256"], shards_sha256_info=hashed_info(inputs.shards.info),
                  num_labels=inputs.num_labels,
                  # the spec names the model; this says which weights (a local folder can be edited)
                  model_fingerprint=model_fingerprint(cfg.model))
    hashed["tokens_dir"] = hashed["shards"] = None  # paths may move; the contents are hashed
    if hashed["client_group"] == 1:  # the default, absent from earlier versions: their checkpoints resume
        del hashed["client_group"]
    for name, default in algo.DEFAULTS.items():  # FedAvg's defaults: absent from earlier versions too
        if hashed[name] == default:
            del hashed[name]
    if cfg.lr_schedule == "linear":  # the decay spans the rounds: another R is another schedule
        hashed["schedule_rounds"] = cfg.rounds
    peft = lora.parse(cfg.peft).record()
    if peft is None:  # full fine-tuning: absent, as before LoRA existed (its checkpoints resume)
        del hashed["peft"]
    else:
        hashed["peft"] = peft
    return hashed


class _Cell:
    """The state of one training process of a cell: model, strategy, client update, data."""

    def __init__(self, cfg: TrainConfig, inputs: _Inputs, ranks: Ranks, out: Path, label: str):
        self.cfg, self.inputs, self.ranks, self.out, self.label = cfg, inputs, ranks, out, label
        self.device = ranks.device
        self.protocol = PROTOCOLS[cfg.protocol]
        self.num_clients = inputs.num_clients
        self.per_round = clients_per_round(self.num_clients, cfg.clients_per_round, cfg.client_fraction)

    def build(self, ckpt: dict[str, Any] | None, ckpt_path: Path) -> None:
        """Model, flat weights, strategy and client update, restored from ``ckpt`` if given."""
        cfg, device, ranks = self.cfg, self.device, self.ranks
        self.peft = lora.parse(cfg.peft)
        model = build_model(cfg.model, self.inputs.num_labels, seed=cfg.seed,
                            pad_token_id=self.inputs.tmeta.get("pad_token_id"), dtype=lora.base_dtype(self.peft))
        vocab = self.inputs.tmeta["vocab_size"]
        if vocab > model.get_input_embeddings().num_embeddings:
            raise FedsweepError(
                f"model {cfg.model!r}: its {model.get_input_embeddings().num_embeddings}-token embedding is "
                f"smaller than tokenizer {self.inputs.tmeta['tokenizer']!r} ({vocab} tokens)"
            )
        decoder = is_decoder_classifier(model)
        model = lora.apply(model, self.peft)  # the frozen base, adapters and head trainable (peft: none: as is)
        model.to(device)
        flat = FlatParameters(model)
        if ckpt is not None:
            if ckpt["weights"].shape != (len(flat),):
                raise FedsweepError(
                    f"checkpoint {str(ckpt_path)!r} holds {ckpt['weights'].numel()} weights, the model's layout "
                    f"has {len(flat)}; delete it to start over"
                )
            flat.data.copy_(ckpt["weights"].to(device))
        self.model, self.flat = model, flat
        self.strategy = build_strategy(cfg.strategy, flat.data.clone(), **algo.strategy_settings(cfg))
        if self.peft.aggregation == "exact" and self.peft.enabled:
            self.strategy = lora.ExactAggregation(self.strategy, model, flat)
        self.upload_bytes, self.download_bytes = lora.communication_bytes(flat, self.strategy)
        self.trainable_parameters, self.total_parameters = flat.num_parameters, total_parameters(model)
        self.strategy.reduce = ranks.all_reduce_sum if ranks.world > 1 else None
        settings = algo.client_settings(cfg)
        if cfg.client == "scaffold":
            store = ControlVariateStore(self.out / "scaffold", self.num_clients, len(flat), device,
                                        writer=ranks.rank == 0)
            self.client_update = Scaffold(settings, self.strategy.weights, store, world=ranks.world)
        else:
            self.client_update = CLIENT_UPDATES[cfg.client](settings, self.strategy.weights)
        if ckpt is not None:
            try:
                self.strategy.load_state_dict({k: v.to(device) for k, v in ckpt.get("server_state", {}).items()})
                self.client_update.load_state_dict(
                    {k: v.to(device) if k != "versions" else v for k, v in ckpt.get("client_state", {}).items()})
            except ValueError as exc:
                raise FedsweepError(f"checkpoint {str(ckpt_path)!r}: {exc}; delete it to start over") from None
        if isinstance(self.client_update, Scaffold):
            missing = self.client_update.store.missing()
            if missing:
                raise FedsweepError(
                    f"checkpoint {str(ckpt_path)!r} needs {len(missing)} control-variate file(s) that are missing, "
                    f"e.g. {str(missing[0])!r}; delete the checkpoint to start over")
            # Files of a killed round, superseded ones, a stale run's: before any rank trains
            # (the collective after the data set-up keeps the others waiting).
            removed = self.client_update.store.reconcile()
            if removed:
                print(f"[{self.label}] removed {len(removed)} control-variate file(s) the checkpoint does not use",
                      file=sys.stderr, flush=True)
        # This rank's clients in a round: at most ceil(per_round / world).
        most = -(-self.per_round // ranks.world)
        group_size = min(cfg.client_group, most)  # K=1 cells hold one model whatever client_group says
        if group_size > 1 and decoder:
            raise FedsweepError(
                f"train: client_group={cfg.client_group} trains encoders only: the vmapped step builds a "
                f"bidirectional attention mask, and model {cfg.model!r} is a decoder (use client_group=1)")
        self.groups = ClientGroups(model, flat, group_size) if group_size > 1 else None

    def load_data(self) -> None:
        cfg, tmeta = self.cfg, self.inputs.tmeta
        width = tmeta["max_length"] if not self.protocol.dynamic_padding else None
        train = load_split(cfg.tokens_dir, "train", width=width)
        test = load_split(cfg.tokens_dir, "test", width=width)
        self.train_len, self.test_len = train.lengths.numpy(), test.lengths.numpy()
        self.train, self.test = train.to(self.device), test.to(self.device)
        self.test_batches = eval_batches(self.test_len, cfg.eval_batch_size)

    def federation(self, bf16: bool) -> None:
        cfg = self.cfg
        self.fed = Federation(
            self.model, self.flat, self.strategy, self.client_update, self.train, self.train_len,
            self.inputs.shards.indices, epochs=cfg.epochs, batch_size=cfg.batch_size, protocol=self.protocol,
            seed=cfg.seed, lr=cfg.lr, lr_schedule=cfg.lr_schedule, warmup_rounds=cfg.warmup_rounds, rounds=cfg.rounds,
            per_round=self.per_round, bf16=bf16, groups=self.groups, rank=self.ranks.rank, world=self.ranks.world)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate_global(self, bf16: bool) -> tuple[float, float, float]:
        self.flat.data.copy_(self.strategy.weights)
        t0 = time.perf_counter()
        ranks = self.ranks
        # Ranks split the test batches; the summed counts cover the whole test set exactly once.
        correct, loss_sum = evaluate(self.model, self.test, self.test_batches[ranks.rank::ranks.world], self.test_len,
                                     self.protocol, bf16)
        correct, loss_sum = ranks.sum([correct, loss_sum])
        return correct / len(self.test), loss_sum / len(self.test), time.perf_counter() - t0

    def train_one_round(self, round_: int, progress: Progress) -> dict[str, Any]:
        """Train, all-reduce and aggregate round ``round_``; return its metrics row (not yet evaluated)."""
        cfg, ranks, sizes, fed = self.cfg, self.ranks, self.inputs.shards.sizes, self.fed
        mine = fed.my_clients(round_)
        progress.start_round(round_, sum(
            (sizes[k] - sizes[k] % cfg.batch_size if self.protocol.drop_last else sizes[k]) * cfg.epochs
            for k in mine))
        try:
            # Between steps with one process only: ranks must reach each collective together.
            stats = fed.train(round_, on_batch=progress.step,
                              should_stop=stop_signal.stop_requested if ranks.world == 1 else None)
        except InterruptedError:
            raise Interrupted() from None
        stats = stats.joined(ranks)
        if math.isfinite(stats.first_bad_client):
            where = (f"the last good state is round {round_ - 1} in {str(self.out / 'checkpoint.pt')!r}"
                     if round_ > 1 else "no round had finished")
            raise FedsweepError(
                f"train: loss is not finite at round {round_} (client {int(stats.first_bad_client)}); stopped, {where}"
            )
        return {"round": round_, "test_accuracy": float("nan"), "test_loss": float("nan"), "eval_seconds": 0.0,
                **fed.finish(stats), **self.size_metrics(stats.sampled)}

    def size_metrics(self, clients: int) -> dict[str, int]:
        """The round's parameter counts, bytes communicated by ``clients`` clients, and peak memory."""
        up, down = sum(self.upload_bytes.values()), sum(self.download_bytes.values())
        return {"trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
                "upload_bytes": up * clients, "download_bytes": down * clients, "upload_bytes_per_client": up,
                "peak_memory_bytes": _peak_memory(self.device)}

    def save(self, path: Path, round_: int, rows: list[dict], cfg_hash: str, hashed: dict[str, Any],
             thread_history: list[list[int]]) -> None:
        if self.ranks.rank == 0:
            save_checkpoint(path, weights=self.strategy.weights, round_=round_, rows=rows, cfg_hash=cfg_hash,
                            hashed=hashed, thread_history=thread_history, algorithm=algo.record(self.cfg),
                            server_state=self.strategy.state_dict(), client_state=self.client_update.state_dict())


def _run(cfg: TrainConfig) -> pd.DataFrame:
    cfg.validate()
    inputs = _read_inputs(cfg)
    if cfg.client_group > 1:
        check_grouping_support()
    ranks = Ranks.from_env(cfg.device)
    device = ranks.device
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = cfg.dataset or Path(cfg.tokens_dir).name
    label = (f"{dataset}/{cfg.model}/K{inputs.num_clients}" if cfg.algorithm == algo.DEFAULTS["algorithm"]
             else f"{dataset}/{cfg.model}/{cfg.algorithm}/K{inputs.num_clients}")
    if ranks.rank == 0:  # the only writer: temporaries of a writer killed mid-write (up to a checkpoint's size)
        stale = remove_stale_temps(out, CHECKPOINT_NAMES)
        if stale:
            print(f"[{label}] removed {len(stale)} stale temporary file(s) of an interrupted write: "
                  f"{', '.join(p.name for p in stale)}", file=sys.stderr)
    hashed = _hashed_config(cfg, inputs)
    cfg_hash = config_hash(hashed)
    ckpt_path = out / "checkpoint.pt"
    try:
        ckpt = load_checkpoint(ckpt_path, cfg_hash, hashed, algo.record(cfg))
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
    cell = _Cell(cfg, inputs, ranks, out, label)
    built = False

    def stopping() -> bool:
        """Whether to stop here; with several ranks, all of them decide together (a collective)."""
        if ranks.world == 1:
            return stop_signal.stop_requested()
        return ranks.max(float(stop_signal.stop_requested())) > 0

    def save(round_: int) -> None:
        cell.save(ckpt_path, round_, rows, cfg_hash, hashed, thread_history)

    try:
        if stopping():
            raise Interrupted()
        cell.build(ckpt, ckpt_path)
        built = True
        if ckpt is not None and ranks.rank == 0:
            print(f"[{label}] resuming from round {saved_round} ({ckpt_path.name})", file=sys.stderr, flush=True)
        bf16 = precision_settings(cfg.precision, device)
        cell.load_data()
        cell.federation(bf16)
        if stopping():
            raise Interrupted()

        progress = Progress(cfg.progress if ranks.rank == 0 else "none", cfg.rounds, label)
        if ckpt is None:
            acc, loss, secs = cell.evaluate_global(bf16)
            rows.append({**{c: float("nan") for c in METRIC_COLUMNS}, "round": 0, "test_accuracy": acc,
                         "test_loss": loss, "examples": 0, "train_seconds": 0.0, "aggregate_seconds": 0.0,
                         "eval_seconds": secs, "clients_sampled": 0, **cell.size_metrics(0)})
            progress.end_round(rows[-1])
            if stopping():
                raise Interrupted()

        t_start = time.perf_counter()
        for round_ in range(start_round, cfg.rounds + 1):
            row = cell.train_one_round(round_, progress)
            if round_ % cfg.eval_every == 0 or round_ == cfg.rounds:
                row["test_accuracy"], row["test_loss"], row["eval_seconds"] = cell.evaluate_global(bf16)
            rows.append(row)
            progress.end_round(row)
            saved = round_ % cfg.checkpoint_every == 0 or round_ == cfg.rounds
            if saved:
                save(round_)
                saved_round = round_
            cell.client_update.commit(saved)
            # Ranks stop together, at a round boundary (a signal may reach them at different times).
            if stopping():
                raise Interrupted()
        wall = time.perf_counter() - t_start
        if stopping():  # before the final writes: the checkpoint holds the last round
            raise Interrupted()
    except (Interrupted, FedsweepError) as exc:
        # The global weights are those of the last finished round: save them if not yet saved.
        done = int(rows[-1]["round"]) if rows else 0  # round 0 is the initial evaluation, not a trained round
        saved_now = done > saved_round and built
        if saved_now:
            save(done)
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
    metrics = pd.DataFrame(rows).reindex(columns=METRIC_COLUMNS)  # rows of older checkpoints lack new columns
    metrics = metrics[metrics["round"] <= cfg.rounds].reset_index(drop=True)
    tmeta, shards = inputs.tmeta, inputs.shards
    ids = {"dataset": cfg.dataset or tmeta["dataset"], "model": cfg.model, "algorithm": cfg.algorithm,
           "partition": cfg.partition, "clients": inputs.num_clients, "seed": cfg.seed, "protocol": cfg.protocol,
           "num_classes": inputs.num_labels,
           "chance_accuracy": float(tmeta["chance_accuracy"]),
           # the test-set size: the report's binomial standard error of each accuracy
           "test_rows": len(cell.test_len)}
    for k, v in reversed(ids.items()):
        metrics.insert(0, k, v)
    trained = metrics[metrics["round"] > 0]
    summary = {
        "config": dataclasses.asdict(cfg), "config_hash": cfg_hash, "resumed_from_round": start_round - 1,
        "fedsweep": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
        "python": platform.python_version(), "git_commit": _git_commit(), "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bf16_autocast": bf16, "parameters": num_parameters(cell.model), "clients": inputs.num_clients,
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
        # The partition: its name, scheme, parameters and kind (fixed_total / per_client).
        "partition": {"name": cfg.partition, **partition_record(shards.info)},
        "test_rows": len(cell.test_len),
        # The algorithm: its name, every setting, and how many clients each round trained.
        "algorithm": {**algo.settings(cfg), "server_lr": algo.server_lr(cfg), "clients_each_round": cell.per_round},
    }
    # Bytes by dtype: one client's per round, and every client's over the rounds in the metrics.
    sampled = int(trained["clients_sampled"].sum())
    summary["peft"] = cell.peft.record() or {"method": "none"}
    summary["trainable_parameters"], summary["total_parameters"] = cell.trainable_parameters, cell.total_parameters
    summary["communication"] = {
        "upload_bytes_per_client_per_round": cell.upload_bytes,
        "download_bytes_per_client_per_round": cell.download_bytes,
        "upload_bytes_total": {k: v * sampled for k, v in cell.upload_bytes.items()},
        "download_bytes_total": {k: v * sampled for k, v in cell.download_bytes.items()},
    }
    if isinstance(cell.client_update, Scaffold):
        store = cell.client_update.store
        summary["control_variates"] = {"folder": str(store.folder), "clients_stored": int((store.versions > 0).sum()),
                                       "bytes": store.disk_bytes()}
    summary["world_size"] = ranks.world
    if ranks.rank == 0:
        write_parquet(out / "metrics.parquet", metrics)
        write_json(out / "run.json", summary)
        if not cfg.keep_checkpoint and ckpt_path.exists():
            ckpt_path.unlink()
    cell.client_update.close(keep=cfg.keep_checkpoint)
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
