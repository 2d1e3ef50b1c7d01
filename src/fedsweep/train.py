"""One cell of the sweep: (data set, model, algorithm, K, seed) trained for R rounds.

This module is the orchestration: read and check the inputs, resume from the checkpoint
(:class:`fedsweep.checkpoint.RunCheckpoint`), build the model, the server strategy
(:mod:`fedsweep.strategies`) and the client update (:func:`fedsweep.clients.build_client_update`)
of the cell's algorithm (:mod:`fedsweep.algorithm`), run the rounds (:class:`fedsweep.rounds.Federation`),
evaluate, checkpoint and write the outputs (their contents: :mod:`fedsweep.record`). Ranks and
progress are :mod:`fedsweep.runtime`. No algorithm is special-cased here: what one keeps, checks
when resuming and records comes through its client update and strategy.

Outputs in ``out_dir``: ``metrics.parquet`` (one row per evaluated round, written at the end),
``layers.parquet`` (per evaluated round, the drift per layer group: :mod:`fedsweep.layers`),
``run.json`` (config, versions, device, threads, labels, data provenance, wall time, throughput)
and ``checkpoint.pt`` (after every round, atomically: the global weights, the round, the metrics
so far, the config hash, the thread count and the algorithm's state; ``progress.json`` beside it: its
round and times, which ``fedsweep status`` reads without torch), beside it the files a
client update keeps (per-client control variates: :mod:`fedsweep.scaffold`). With ``peft`` (LoRA,
:mod:`fedsweep.lora`) only the adapters and the head are trained, averaged and checkpointed;
every run's metrics count the trainable and total parameters, the bytes the round's clients
upload and download, and the peak memory (run.json: the bytes by dtype). Re-running the same
command resumes from the last complete round; since every random choice is a pure function of
(seed, round, client, epoch), the resumed run gives the numbers an uninterrupted run gives
(bitwise on CPU at the same number of threads: another count rounds sums differently, so a
resume at another count warns and run.json records both). ``rounds`` is not part of the config
hash (unless the client lr decays linearly over the rounds), so a finished run can be extended
(e.g. from the budget of 100 rounds to the second threshold, 200).

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import FedsweepError
from . import algorithm as algo
from . import client_eval
from . import layers, lora
from . import record
from . import stop as stop_signal
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAMES, RunCheckpoint
from .clients import build_client_update
from .engine import PROTOCOLS, FlatParameters, derive_seed, eval_batches, evaluate_classes, evaluate_holdout
from .grouped import ClientGroups
from .grouped import check_support as check_grouping_support
from .io import remove_stale_temps, write_json, write_parquet
from .models import build_model, is_decoder_classifier, model_fingerprint, total_parameters
from .partition import hashed_info, read_shards
from .record import METRIC_COLUMNS
from .rounds import Federation, clients_per_round
from .runtime import Progress, Ranks, check_device, pick_device
from .settings import HASH_ABSENT_AT_DEFAULT, JOB_TRAIN
from .shard_sizes import holdout_problem
from .strategies import build_strategy
from .tokens import load_split, read_tokens_meta
from .trainconfig import TrainConfig

__all__ = ["TrainConfig", "run", "METRIC_COLUMNS", "CHECKPOINT_FORMAT", "Ranks", "pick_device",
           "precision_settings"]

# Fields that do not change the numbers: excluded from the hash that guards resuming.
_UNHASHED = {"out_dir", "rounds", "device", "progress", "dataset", "checkpoint_every", "keep_checkpoint",
             "stale_checkpoint", "partition"}


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


class Interrupted(Exception):
    """A stop request (SIGTERM) reached a safe point: save what is finished and exit with 143."""


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
    """The tokens' metadata and the shards (read and checked once, before any compute)."""

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
    for name in HASH_ABSENT_AT_DEFAULT:  # absent from earlier versions: their checkpoints resume
        if hashed[name] == JOB_TRAIN[name].default:
            del hashed[name]
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


def _label(cfg: TrainConfig, inputs: _Inputs) -> str:
    """The cell's name in messages: data set, model, algorithm (unless the default) and K."""
    dataset = cfg.dataset or Path(cfg.tokens_dir).name
    algorithm = "" if cfg.algorithm == algo.DEFAULTS["algorithm"] else f"{cfg.algorithm}/"
    return f"{dataset}/{cfg.model}/{algorithm}K{inputs.num_clients}"


class _Cell:
    """The state of one training process of a cell: model, strategy, client update, data."""

    def __init__(self, cfg: TrainConfig, inputs: _Inputs, ranks: Ranks, out: Path):
        self.cfg, self.inputs, self.ranks, self.out = cfg, inputs, ranks, out
        self.label = _label(cfg, inputs)
        self.device = ranks.device
        self.protocol = dataclasses.replace(PROTOCOLS[cfg.protocol], pad_multiple=cfg.pad_multiple)
        self.num_clients = inputs.num_clients
        self.holdout = self._split_holdout()
        self.per_round = clients_per_round(self.num_clients, cfg.clients_per_round, cfg.client_fraction)
        self.built = False  # model, strategy and client update exist: there are weights to save

    def _split_holdout(self) -> list[np.ndarray] | None:
        """With ``client_holdout`` > 0, each client's held-out rows (None: off). From then on
        ``self.inputs.shards`` holds the training parts only: what the clients train on, the
        average's weights n_k, the progress counts and the label distributions all read them.
        Checked first (one line, before any compute): every client keeps a batch and holds out a row."""
        cfg, shards = self.cfg, self.inputs.shards
        if not cfg.client_holdout > 0:
            return None
        problem = holdout_problem(shards.sizes, cfg.client_holdout, cfg.batch_size)
        if problem:
            raise FedsweepError(f"train: {problem}")
        parts = [client_eval.split_holdout(shard, cfg.client_holdout, derive_seed(cfg.seed, "holdout", k))
                 for k, shard in enumerate(shards.indices)]
        self.inputs = dataclasses.replace(
            self.inputs, shards=dataclasses.replace(shards, indices=[kept for kept, _ in parts]))
        return [held for _, held in parts]

    def say(self, message: str) -> None:
        """``[label] message`` on stderr, from rank 0 only (one line per event, whatever the world size)."""
        if self.ranks.rank == 0:
            print(f"[{self.label}] {message}", file=sys.stderr, flush=True)

    def build(self, ckpt: RunCheckpoint) -> None:
        """Model, flat weights, strategy and client update, restored from ``ckpt.loaded`` if any."""
        cfg, device, ranks, loaded = self.cfg, self.device, self.ranks, ckpt.loaded
        model, decoder = self._model()
        flat = FlatParameters(model)
        if loaded is not None:
            if loaded["weights"].shape != (len(flat),):
                raise FedsweepError(
                    f"checkpoint {str(ckpt.path)!r} holds {loaded['weights'].numel()} weights, the model's layout "
                    f"has {len(flat)}; delete it to start over"
                )
            flat.data.copy_(loaded["weights"].to(device))
        self.model, self.flat = model, flat
        self.strategy = build_strategy(cfg.strategy, flat.data.clone(), **algo.strategy_settings(cfg))
        if self.peft.aggregation == "exact" and self.peft.enabled:
            self.strategy = lora.ExactAggregation(self.strategy, model, flat)
        self.layer_drift = layers.attach(self.strategy, model, flat)  # measured on evaluated rounds
        self.footprint = record.Footprint(flat.num_parameters, total_parameters(model),
                                          *lora.communication_bytes(flat, self.strategy))
        self.strategy.reduce = ranks.all_reduce_sum if ranks.world > 1 else None
        self.client_update = build_client_update(
            algo.client_settings(cfg), self.strategy.weights, out_dir=self.out, num_clients=self.num_clients,
            device=device, world=ranks.world, writer=ranks.rank == 0)
        if loaded is not None:
            try:
                self.strategy.load_state_dict({k: v.to(device) for k, v in loaded.get("server_state", {}).items()})
                self.client_update.load_state_dict(loaded.get("client_state", {}))
            except ValueError as exc:
                raise FedsweepError(f"checkpoint {str(ckpt.path)!r}: {exc}; delete it to start over") from None
        self.client_update.prepare(ckpt.path, self.say)
        self.groups = self._client_groups(model, flat, decoder)
        self.built = True

    def _model(self) -> tuple[torch.nn.Module, bool]:
        """The model on the device (LoRA applied, if configured) and whether it is a decoder."""
        cfg, tmeta = self.cfg, self.inputs.tmeta
        self.peft = lora.parse(cfg.peft)
        model = build_model(cfg.model, self.inputs.num_labels, seed=cfg.seed,
                            pad_token_id=tmeta.get("pad_token_id"), dtype=lora.base_dtype(self.peft))
        vocab, embeddings = tmeta["vocab_size"], model.get_input_embeddings().num_embeddings
        if vocab > embeddings:
            raise FedsweepError(
                f"model {cfg.model!r}: its {embeddings}-token embedding is "
                f"smaller than tokenizer {tmeta['tokenizer']!r} ({vocab} tokens)"
            )
        decoder = is_decoder_classifier(model)
        model = lora.apply(model, self.peft)  # the frozen base, adapters and head trainable (peft: none: as is)
        model.to(self.device)
        return model, decoder

    def _client_groups(self, model: torch.nn.Module, flat: FlatParameters, decoder: bool) -> ClientGroups | None:
        """The vmapped groups of clients trained at once (None: one client after another)."""
        cfg = self.cfg
        # This rank's clients in a round: at most ceil(per_round / world).
        most = -(-self.per_round // self.ranks.world)
        group_size = min(cfg.client_group, most)  # K=1 cells hold one model whatever client_group says
        if group_size > 1 and decoder:
            raise FedsweepError(
                f"train: client_group={cfg.client_group} trains encoders only: the vmapped step builds a "
                f"bidirectional attention mask, and model {cfg.model!r} is a decoder (use client_group=1)")
        return ClientGroups(model, flat, group_size) if group_size > 1 else None

    def load_data(self) -> None:
        cfg, tmeta = self.cfg, self.inputs.tmeta
        # Full width where batches are padded past their longest sequence (buckets reach max_length).
        width = tmeta["max_length"] if not self.protocol.dynamic_padding or cfg.pad_multiple else None
        train = load_split(cfg.tokens_dir, "train", width=width)
        test = load_split(cfg.tokens_dir, "test", width=width)
        self.train_len, self.test_len = train.lengths.numpy(), test.lengths.numpy()
        # Each client's label distribution, for the per-client accuracies (fedsweep.client_eval).
        self.client_labels = client_eval.label_distributions(train.labels.numpy(), self.inputs.shards.indices,
                                                             self.inputs.num_labels)
        self.train, self.test = train.to(self.device), test.to(self.device)
        self.test_batches = eval_batches(self.test_len, cfg.eval_batch_size)
        if self.holdout is not None:  # the union of the held-out rows, its clients, and its batches
            self.holdout_rows = np.concatenate(self.holdout)
            self.holdout_client = np.repeat(np.arange(self.num_clients), [len(h) for h in self.holdout])
            self.holdout_batches = eval_batches(self.train_len[self.holdout_rows], cfg.eval_batch_size)

    def federation(self, bf16: bool) -> None:
        cfg = self.cfg
        self.fed = Federation(
            self.model, self.flat, self.strategy, self.client_update, self.train, self.train_len,
            self.inputs.shards.indices, epochs=cfg.epochs, batch_size=cfg.batch_size, protocol=self.protocol,
            seed=cfg.seed, lr=cfg.lr, lr_schedule=cfg.lr_schedule, warmup_rounds=cfg.warmup_rounds, rounds=cfg.rounds,
            per_round=self.per_round, bf16=bf16, groups=self.groups, rank=self.ranks.rank, world=self.ranks.world,
            compile=cfg.compile)

    def evaluate_global(self, bf16: bool) -> tuple[float, float, float, dict[str, float]]:
        """(test accuracy, test loss, seconds, the per-client columns): one pass over the test set."""
        self.flat.data.copy_(self.strategy.weights)
        t0 = time.perf_counter()
        ranks = self.ranks
        # Ranks split the test batches; the summed counts cover the whole test set exactly once.
        sums = evaluate_classes(self.model, self.test, self.test_batches[ranks.rank::ranks.world], self.test_len,
                                self.protocol, bf16, num_classes=self.inputs.num_labels)
        (correct_c, count_c), losses = self._summed(torch.stack([sums.correct_c, sums.count_c]),
                                                    torch.cat([sums.loss_c, sums.loss_sum[None]]))
        clients = client_eval.summary(*client_eval.per_client(self.client_labels, correct_c, losses[:-1], count_c))
        if self.holdout is not None:
            clients.update(self._evaluate_holdout(bf16))
        n = len(self.test)
        return float(correct_c.sum()) / n, float(losses[-1]) / n, time.perf_counter() - t0, clients

    def _evaluate_holdout(self, bf16: bool) -> dict[str, float]:
        """The :data:`fedsweep.client_eval.HOLDOUT_COLUMNS`: one pass over the union of the clients'
        held-out rows (ranks split its batches), summed per client."""
        ranks = self.ranks
        correct_k, loss_k, count_k = evaluate_holdout(
            self.model, self.train, self.train_len, self.holdout_rows, self.holdout_client,
            self.holdout_batches[ranks.rank::ranks.world], self.num_clients, self.protocol, bf16)
        (correct_k, count_k), loss_k = self._summed(torch.from_numpy(np.stack([correct_k, count_k])),
                                                    torch.from_numpy(loss_k))
        return client_eval.summary(*client_eval.holdout_per_client(correct_k, loss_k, count_k),
                                   columns=client_eval.HOLDOUT_COLUMNS)

    def _summed(self, counts: torch.Tensor, losses: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Integer counts (exact in any order) and fp64 losses summed over the ranks, on the host."""
        if self.ranks.world > 1:
            counts, losses = counts.to(self.device), losses.to(self.device)
            self.ranks.all_reduce_sum(counts)
            self.ranks.all_reduce_sum(losses)
        return counts.cpu().numpy(), losses.cpu().numpy()

    def train_one_round(self, round_: int, progress: Progress) -> dict[str, Any]:
        """Train, all-reduce and aggregate round ``round_``; return its metrics row (not yet evaluated)."""
        cfg, ranks, sizes, fed = self.cfg, self.ranks, self.inputs.shards.sizes, self.fed
        mine = fed.my_clients(round_)
        self.layer_drift.active = self.evaluated(round_)  # off the hot path of the other rounds
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
                **fed.finish(stats), **self.footprint.metrics(stats.sampled, self.device),
                # (group, metric, value) triples: in the checkpoint's rows, so they survive a resume
                **({"layers": self.layer_drift.rows()} if self.layer_drift.active else {})}

    def evaluated(self, round_: int) -> bool:
        """Whether round ``round_`` is evaluated (and its layer groups measured)."""
        return round_ % self.cfg.eval_every == 0 or round_ == self.cfg.rounds

    def save(self, ckpt: RunCheckpoint, round_: int) -> None:
        if self.ranks.rank == 0:  # the only writer
            ckpt.save(round_, weights=self.strategy.weights, algorithm=algo.record(self.cfg),
                      server_state=self.strategy.state_dict(), client_state=self.client_update.state_dict())

    def stop_point(self) -> None:
        """Raise :class:`Interrupted` if a stop was requested; with several ranks, all of them decide
        together (a collective)."""
        if self.ranks.world == 1:
            requested = stop_signal.stop_requested()
        else:
            requested = self.ranks.max(float(stop_signal.stop_requested())) > 0
        if requested:
            raise Interrupted()


def _run(cfg: TrainConfig) -> pd.DataFrame:
    cfg.validate()
    check_device(cfg.device)
    inputs = _read_inputs(cfg)
    if cfg.client_group > 1:
        check_grouping_support()
    ranks = Ranks.from_env(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cell = _Cell(cfg, inputs, ranks, out)
    if ranks.rank == 0:  # the only writer: temporaries of a writer killed mid-write (up to a checkpoint's size)
        stale = remove_stale_temps(out, CHECKPOINT_NAMES)
        if stale:
            cell.say(f"removed {len(stale)} stale temporary file(s) of an interrupted write: "
                     f"{', '.join(p.name for p in stale)}")
    hashed = _hashed_config(cfg, inputs)
    ckpt = RunCheckpoint.open(out / "checkpoint.pt", config_hash(hashed), hashed, algo.record(cfg),
                              rounds=cfg.rounds, restart_stale=cfg.stale_checkpoint == "restart",
                              writer=ranks.rank == 0, log=cell.say)
    try:
        bf16, wall = _train(cell, ckpt)
    except (Interrupted, FedsweepError) as exc:
        _stopped(cell, ckpt, interrupted=isinstance(exc, Interrupted))  # after a SIGTERM: exits with 143
        raise
    # A SIGTERM from here on lets the final writes complete; the run then ends normally.
    metrics = record.metrics_frame(ckpt.rows, cfg, inputs.tmeta, inputs.num_clients, len(cell.test_len))
    summary = record.run_summary(
        cfg, metrics, checkpoint=ckpt, tmeta=inputs.tmeta, shards=inputs.shards, model=cell.model, peft=cell.peft,
        footprint=cell.footprint, clients_each_round=cell.per_round, test_rows=len(cell.test_len),
        client_update_sections=cell.client_update.summary(), bf16=bf16, wall_seconds=wall, device=ranks.device,
        world=ranks.world)
    if summary["diverged"]:
        d = summary["diverged"]
        cell.say(f"warning: diverged at round {d['round']}: training loss {d['train_loss']:.3g} > "
                 f"{d['factor']:g} x the initial {d['initial_loss']:.3g}; its accuracy is no result")
    if ranks.rank == 0:
        write_parquet(out / "metrics.parquet", metrics)
        write_parquet(out / layers.LAYERS_NAME, layers.layers_frame(ckpt.rows, metrics))
        write_json(out / "run.json", summary)
        if not cfg.keep_checkpoint and ckpt.path.exists():
            ckpt.path.unlink()
    cell.client_update.close(keep=cfg.keep_checkpoint)
    if stop_signal.stop_requested():
        cell.say(f"{stop_signal.requested_signal()} during the final writes: they completed, the run is complete")
        stop_signal.clear_stop_request()
    ranks.close()
    return metrics


def _train(cell: _Cell, ckpt: RunCheckpoint) -> tuple[bool, float]:
    """Set the cell up, evaluate round 0 (a fresh start) and train the rounds after ``ckpt``'s,
    saving every ``checkpoint_every``; return (bf16 autocast, seconds the rounds took).
    Raises :class:`Interrupted` at the safe points after a SIGTERM."""
    cfg, ranks = cell.cfg, cell.ranks
    cell.stop_point()
    cell.build(ckpt)
    if ckpt.loaded is not None:
        cell.say(f"resuming from round {ckpt.saved_round} ({ckpt.path.name})")
    bf16 = precision_settings(cfg.precision, ranks.device)
    cell.load_data()
    cell.federation(bf16)
    cell.stop_point()

    progress = Progress(cfg.progress if ranks.rank == 0 else "none", cfg.rounds, cell.label)
    if ckpt.loaded is None:
        acc, loss, secs, clients = cell.evaluate_global(bf16)
        ckpt.rows.append(record.initial_row(acc, loss, secs, {**cell.footprint.metrics(0, ranks.device), **clients}))
        progress.end_round(ckpt.rows[-1])
        cell.stop_point()

    t_start = time.perf_counter()
    for round_ in range(ckpt.start_round, cfg.rounds + 1):
        row = cell.train_one_round(round_, progress)
        if cell.evaluated(round_):
            row["test_accuracy"], row["test_loss"], row["eval_seconds"], clients = cell.evaluate_global(bf16)
            row.update(clients)
        ckpt.rows.append(row)
        progress.end_round(row)
        saved = round_ % cfg.checkpoint_every == 0 or round_ == cfg.rounds
        if saved:
            cell.save(ckpt, round_)
            ckpt.saved_round = round_
        cell.client_update.commit(saved)
        # Ranks stop together, at a round boundary (a signal may reach them at different times).
        cell.stop_point()
    wall = time.perf_counter() - t_start
    cell.stop_point()  # before the final writes: the checkpoint holds the last round
    return bf16, wall


def _stopped(cell: _Cell, ckpt: RunCheckpoint, *, interrupted: bool) -> None:
    """The run stops early (a SIGTERM, or an error the caller re-raises). The global weights are
    those of the last finished round: save them if not yet saved. After a SIGTERM, say what is
    saved and exit with 143."""
    saved_now = ckpt.unsaved() and cell.built
    if saved_now:
        cell.save(ckpt, ckpt.last_round)
    if interrupted:
        name, code = stop_signal.requested_signal(), stop_signal.exit_code()
        cell.say(f"{name}: {ckpt.stop_message(saved_now)}")
        stop_signal.clear_stop_request()  # served: a caller that goes on is not stopped again
        cell.ranks.close()
        raise SystemExit(code) from None
    cell.ranks.close()
