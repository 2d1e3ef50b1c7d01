"""Client updates: how a client trains from the global weights (as Flower's ``ClientApp.fit``).

A client update has two parts:

- the **local optimiser** (:class:`LocalOptimizer`), one per client (or per group of clients
  trained at once, :mod:`fedsweep.grouped`): it consumes autograd's gradients after each backward
  and steps the client's weights. ``sgd`` is plain SGD (constant lr within a round, no momentum,
  no weight decay: today's FedAvg client); ``adamw`` is ``torch.optim.AdamW`` (decoupled weight
  decay) whose state is reset for every client in every round, as FedNLP and OpenFedLLM do. Before
  the step it may correct the gradient: FedProx adds ``mu (w - w_global)`` (the gradient of the
  proximal term ``mu/2 ||w - w_global||^2``, Li et al. 2020); SCAFFOLD adds ``c - c_i``
  (Karimireddy et al. 2020).
- the **client algorithm** (:class:`ClientUpdate`): ``plain`` and ``fedprox`` keep no state;
  ``scaffold`` (:class:`Scaffold`) keeps the server control variate ``c`` (one model-sized fp32
  vector on the device) and one control variate ``c_i`` per client, on disk (see
  :class:`ControlVariateStore`), updated with the paper's option II.

The client learning rate of round ``t`` is :func:`client_lr` (constant, or a linear warmup and/or
decay over rounds). :func:`train_client` runs the E local epochs of one client.

Adding a client algorithm: subclass :class:`ClientUpdate`, list the settings it reads in
``SETTINGS`` and register it in ``CLIENT_UPDATES``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .engine import FlatParameters, Protocol, autocast, batches_on_device, client_batches, derive_seed, \
    seed_dropout, sgd_step
from .io import atomic_path
from .tokens import TokenTensors

CLIENT_OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "linear")


def client_lr(lr: float, schedule: str, warmup_rounds: int, rounds: int, round_: int) -> float:
    """The clients' learning rate in round ``round_`` (1-based) of ``rounds``.

    - warmup (either schedule): ``lr * round / warmup_rounds`` for rounds <= warmup_rounds;
    - ``constant``: ``lr`` after the warmup;
    - ``linear``: after the warmup, linear decay ``lr * (rounds - round + 1) / (rounds - warmup_rounds)``,
      so the first round after the warmup has ``lr`` and the last ``lr / (rounds - warmup_rounds)``.
      It depends on ``rounds``: a linear schedule's ``rounds`` is part of the config hash.
    """
    if round_ <= warmup_rounds:
        return lr * round_ / warmup_rounds
    if schedule == "constant":
        return lr
    return lr * (rounds - round_ + 1) / (rounds - warmup_rounds)


@dataclass(frozen=True)
class ClientSettings:
    """The client side of an algorithm (TrainConfig's fields of the same names)."""

    client: str = "plain"  # plain | fedprox | scaffold
    client_optimizer: str = "sgd"  # sgd | adamw
    mu: float = 0.0  # FedProx's proximal weight
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's decoupled weight decay


class LocalOptimizer:
    """The steps of one client, or of a group of clients (rows of a (G, P) buffer).

    ``params`` are the leaf tensors autograd fills, viewing ``weights`` (a (P,) or (G, P) fp32
    buffer) through ``views``. ``anchor`` (FedProx) is the global weights, a (P,) vector; ``correction``
    (SCAFFOLD) is ``c - c_i``, shaped like ``weights``. ``steps`` counts the steps taken.
    """

    def __init__(self, params: list[torch.Tensor], weights: torch.Tensor,
                 views: Callable[[torch.Tensor], list[torch.Tensor]], *, lr: float, settings: ClientSettings,
                 anchor: torch.Tensor | None = None, prox_scratch: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None, adamw: torch.optim.Optimizer | None = None):
        self.params, self.weights, self.lr, self.settings = params, weights, lr, settings
        self.steps = 0
        self.anchor = anchor
        self.mu = settings.mu
        if anchor is not None:
            self.prox_scratch = prox_scratch
            self.prox_views = views(prox_scratch)
        self.correction = correction
        self.correction_views = views(correction) if correction is not None else None
        self.adamw = adamw
        if adamw is not None:  # a fresh optimiser state: AdamW restarts for every client and round
            for group in adamw.param_groups:
                group["lr"] = lr
            for state in adamw.state.values():
                state["step"].zero_()
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    @torch.no_grad()
    def step(self) -> None:
        params = self.params
        if self.correction_views is None and self.anchor is None and self.adamw is None:
            sgd_step(params, self.lr)  # plain SGD: FedAvg's client, as before
            self.steps += 1
            return
        live = [i for i, p in enumerate(params) if p.grad is not None]  # unused parameters stay as they are
        grads = [params[i].grad for i in live]
        if self.correction_views is not None:  # SCAFFOLD: g - c_i + c
            torch._foreach_add_(grads, [self.correction_views[i] for i in live])
        if self.anchor is not None:  # FedProx: g + mu (w - w_global), rounded as written (mu x, then +)
            torch.sub(self.weights, self.anchor, out=self.prox_scratch).mul_(self.mu)
            torch._foreach_add_(grads, [self.prox_views[i] for i in live])
        if self.adamw is not None:
            self.adamw.step()
            for p in params:
                p.grad = None
        else:
            sgd_step(params, self.lr)
        self.steps += 1


class ClientUpdate:
    """``plain``: E local epochs of the client optimiser from the global weights; no state.

    The round loop calls :meth:`begin_round` once per round, :meth:`optimizer` for each client
    (or group) before it trains, :meth:`after_client` for each trained client (before the
    strategy adds it: ``weights`` still hold the client's model) and :meth:`finish_round` after
    every client of every rank was added.
    """

    name: ClassVar[str] = "plain"
    SETTINGS: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields beyond the optimiser's

    def __init__(self, settings: ClientSettings, global_weights: torch.Tensor):
        self.settings = settings
        self.global_weights = global_weights  # the strategy's weights: constant during a round
        self.lr = float("nan")
        self.round = 0
        self._adamw: dict[int, tuple[list[torch.Tensor], torch.optim.Optimizer]] = {}
        self._prox: dict[tuple[int, ...], torch.Tensor] = {}

    def begin_round(self, round_: int, lr: float, clients: Sequence[int], sizes: Sequence[int]) -> None:
        """``clients``: every client of the round (all ranks); ``sizes``: every client's shard size."""
        self.round, self.lr = round_, lr

    def optimizer(self, params: list[torch.Tensor], weights: torch.Tensor,
                  views: Callable[[torch.Tensor], list[torch.Tensor]], clients: Sequence[int]) -> LocalOptimizer:
        return LocalOptimizer(params, weights, views, lr=self.lr, settings=self.settings,
                              adamw=self._adamw_for(params), **self._prox_args(weights))

    def _adamw_for(self, params: list[torch.Tensor]) -> torch.optim.Optimizer | None:
        """One AdamW per parameter list (the model's, each group size's), its state zeroed per client."""
        if self.settings.client_optimizer != "adamw":
            return None
        key = id(params[0])
        if key not in self._adamw or self._adamw[key][0] is not params:
            s = self.settings
            opt = torch.optim.AdamW(params, lr=self.lr, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps,
                                    weight_decay=s.weight_decay)
            self._adamw[key] = (params, opt)
        return self._adamw[key][1]

    def _prox_args(self, weights: torch.Tensor) -> dict:
        return {}

    def after_client(self, local: LocalOptimizer, row: int, client: int, weights: torch.Tensor,
                     num_examples: int) -> None:
        """Client ``client`` (row ``row`` of its group) finished training; ``weights`` are its model."""

    def finish_round(self) -> dict[str, float]:
        """Server-side work after the average; returns metrics (name -> value)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"client update {self.name!r} keeps no state, got {sorted(state)}")

    def commit(self, saved: bool) -> None:
        """Called after every round; ``saved`` when the round's checkpoint was just written."""

    def close(self, keep: bool) -> None:
        """The run ended; ``keep``: whether its checkpoint (and what it needs) stays."""


class FedProx(ClientUpdate):
    """FedProx (Li et al. 2020): every step's gradient gains ``mu (w - w_global)``."""

    name = "fedprox"
    SETTINGS = ("mu",)

    def _prox_args(self, weights: torch.Tensor) -> dict:
        key = tuple(weights.shape)
        if key not in self._prox:  # one scratch per buffer shape: (P,) or (G, P)
            self._prox[key] = torch.empty_like(weights)
        return {"anchor": self.global_weights, "prox_scratch": self._prox[key]}


class ControlVariateStore:
    """SCAFFOLD's per-client control variates ``c_i``: one fp32 file per client that has been
    trained, ``c{client}.r{round}.f32`` in ``folder`` (the run folder's ``scaffold/``), never in
    device memory.

    Crash safety without copying: a round writes NEW files (named by the round) atomically, and
    which file is current for each client is ``versions[client]`` (the round it was last trained
    in; 0 = never, ``c_i = 0``), a small int64 array saved in the checkpoint. A run killed
    mid-round leaves files of an unfinished round, which the checkpoint does not name: they are
    deleted when the run resumes. A client's superseded file is deleted after the next
    checkpoint is saved. Disk: 4 x parameters bytes per client trained so far (plus, between a
    round and its checkpoint, the previous files of that round's clients). Host memory: one
    model-sized staging buffer (pinned on CUDA).
    """

    NAME = re.compile(r"^c(\d+)\.r(\d+)\.f32$")

    def __init__(self, folder: str | os.PathLike, num_clients: int, size: int, device: torch.device,
                 writer: bool = True):
        self.folder = Path(folder)
        self.size = size
        self.device = device
        self.writer = writer  # the rank that deletes files (every rank writes its own clients')
        self.versions = np.zeros(num_clients, dtype=np.int64)
        self.host = torch.empty(size, dtype=torch.float32, pin_memory=device.type == "cuda")
        self.superseded: list[tuple[int, int]] = []  # (client, round) files to delete after the next save

    def path(self, client: int, round_: int) -> Path:
        return self.folder / f"c{client}.r{round_}.f32"

    def read(self, client: int, out: torch.Tensor, version: int | None = None) -> None:
        """``c_i`` of ``client`` into ``out`` (a device vector): the current one, or that of round ``version``."""
        version = int(self.versions[client]) if version is None else version
        if version == 0:
            out.zero_()
            return
        path = self.path(client, version)
        with open(path, "rb") as f:
            read = f.readinto(memoryview(self.host.numpy()).cast("B"))
        if read != self.size * 4:
            raise RuntimeError(f"{path}: {read} bytes, expected {self.size * 4}")
        out.copy_(self.host, non_blocking=False)

    def write(self, client: int, round_: int, value: torch.Tensor) -> None:
        """The new ``c_i`` of ``client`` after round ``round_`` (current once the round commits)."""
        self.host.copy_(value)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(client, round_)) as tmp:
            with open(tmp, "wb") as f:
                f.write(memoryview(self.host.numpy()).cast("B"))

    def commit_round(self, clients: Sequence[int], round_: int) -> None:
        """Every client in ``clients`` (all ranks) has its file for ``round_``: make them current."""
        for client in clients:
            old = int(self.versions[client])
            if old not in (0, round_):
                self.superseded.append((client, old))
            self.versions[client] = round_

    def delete_superseded(self) -> None:
        """After a checkpoint naming the current versions was saved: the old files are not needed."""
        if self.writer:
            for client, round_ in self.superseded:
                self.path(client, round_).unlink(missing_ok=True)
        self.superseded.clear()

    def reconcile(self) -> list[Path]:
        """At the start of a run: delete every file the versions do not name (a killed round's,
        superseded ones, a stale run's) and temporary files of interrupted writes."""
        removed: list[Path] = []
        if not self.writer or not self.folder.is_dir():
            return removed
        for entry in self.folder.iterdir():
            m = self.NAME.match(entry.name)
            if m is not None:
                client, round_ = int(m.group(1)), int(m.group(2))
                if client < len(self.versions) and self.versions[client] == round_:
                    continue
            elif not entry.name.endswith(".tmp"):
                continue  # not ours
            entry.unlink(missing_ok=True)
            removed.append(entry)
        return removed

    def missing(self) -> list[Path]:
        """Files the versions name that are not there (a folder deleted by hand, a run moved without it)."""
        return [self.path(k, int(v)) for k, v in enumerate(self.versions) if v > 0 and not self.path(k, int(v)).exists()]

    def disk_bytes(self) -> int:
        return int((self.versions > 0).sum()) * self.size * 4


class Scaffold(ClientUpdate):
    """SCAFFOLD (Karimireddy et al. 2020), option II, with the server's own step left to the strategy.

    Client ``i`` steps with ``g - c_i + c`` and then sets ``c_i+ = c_i - c + (x - y_i) / (steps lr)``
    (``x``: the global weights of the round, ``y_i``: the client's model, ``steps``: its number of
    local steps). The server sets ``c <- c + sum_{i in S} (n_i / N) (c_i+ - c_i)``, N the examples of
    ALL clients, so that ``c`` stays the size-weighted mean of every client's ``c_i`` (the paper's
    ``|S|/N`` times the mean over S for equal shards); the model itself is moved by the strategy
    (``fedavg``: the size-weighted average of the ``y_i``, the paper's global step with lr 1).
    Local steps must be plain SGD (``client_optimizer=sgd``).

    The update of ``c`` is summed in float64 in the order of the client indices. One process trains
    its clients in that order and adds each as it finishes; with several ranks (``world > 1``)
    every rank sums after the round from the clients' files (the new ``c_i+`` and the ``c_i`` it
    replaces; both are on disk until the next checkpoint), in the same order with the same
    operations: every rank, and a single process, computes the same ``c`` to the bit, whichever
    ranks trained which clients. (Summed as each rank's clients finish, the order would follow the
    ranks, and ``c`` is a difference of such sums: its last bits would show.) At K=1, ``c = c_1``
    to the bit after every round, so the correction ``c - c_1`` is exactly 0: SGD.

    Device memory: ``c``, a correction buffer ``c - c_i`` (G of them for a group), two fp32
    scratch vectors and one fp64 accumulator: 6 x 4 bytes x parameters, flat in K. Per client and
    round: one file read and one written (several ranks: 2 more reads per client of the round,
    on every rank, after it; page cache: the files were just written).
    """

    name = "scaffold"

    def __init__(self, settings: ClientSettings, global_weights: torch.Tensor, store: ControlVariateStore,
                 world: int = 1):
        super().__init__(settings, global_weights)
        self.store = store
        self.world = world  # processes sharing the clients of a round
        device, size = global_weights.device, global_weights.numel()
        self.c = torch.zeros(size, device=device)
        self.accum = torch.zeros(size, dtype=torch.float64, device=device)
        self.old = torch.empty(size, device=device)
        self.old_client = -1  # whose c_i `old` holds
        self.sizes: list[int] = []
        self.q = torch.empty(size, device=device)
        self._corrections: dict[int, torch.Tensor] = {}
        self.chunk = min(1 << 17 if device.type == "cpu" else 1 << 22, size)
        self._cast = torch.empty(self.chunk, dtype=torch.float64, device=device)
        self.total = 0
        self.clients: list[int] = []

    def begin_round(self, round_: int, lr: float, clients: Sequence[int], sizes: Sequence[int]) -> None:
        super().begin_round(round_, lr, clients, sizes)
        self.clients = sorted(clients)
        self.sizes = list(sizes)
        self.total = sum(sizes)
        self.accum.copy_(self.c)
        self.old_client = -1

    @torch.no_grad()
    def optimizer(self, params, weights, views, clients):
        g = len(clients)
        if g not in self._corrections:
            self._corrections[g] = torch.empty(g, self.c.numel(), device=self.c.device) if weights.dim() == 2 \
                else torch.empty_like(self.c)
        correction = self._corrections[g]
        rows = correction if correction.dim() == 2 else correction[None]
        for row, client in zip(rows, clients):
            self.store.read(client, row)  # c_i
            if g == 1:  # kept for the sum of c's update
                self.old.copy_(row)
                self.old_client = client
            torch.sub(self.c, row, out=row)  # c - c_i
        return LocalOptimizer(params, weights, views, lr=self.lr, settings=self.settings, correction=correction)

    @torch.no_grad()
    def after_client(self, local, row, client, weights, num_examples):
        new = local.correction if local.correction.dim() == 1 else local.correction[row]
        q = self.q
        # q = (x - y_i) / (steps lr): the client's mean corrected gradient
        torch.sub(self.global_weights, weights, out=q).div_(local.steps * self.lr)
        # c_i+ = c_i - c + q = q - (c - c_i), rounded to fp32 as it is stored
        torch.sub(q, new, out=new)
        self.store.write(client, self.round, new)
        if self.world == 1:  # clients come in ascending order: sum as they finish
            if self.old_client != client:
                self.store.read(client, self.old)
            self._add(client, new, self.old)
            self.old_client = -1

    def _add(self, client: int, new: torch.Tensor, old: torch.Tensor) -> None:
        """accum += (n_i / N) (c_i+ - c_i), chunk by chunk in float64."""
        alpha = self.sizes[client] / self.total
        for start in range(0, self.c.numel(), self.chunk):
            stop = min(start + self.chunk, self.c.numel())
            cast = self._cast[:stop - start]
            self.accum[start:stop].add_(cast.copy_(new[start:stop]).sub_(old[start:stop]), alpha=alpha)

    @torch.no_grad()
    def finish_round(self) -> dict[str, float]:
        """``c <- c + sum_i (n_i / N) (c_i+ - c_i)`` over the round's clients, in client order."""
        if self.world > 1:
            self.accum.copy_(self.c)
            for client in self.clients:  # ascending: the order of one process
                self.store.read(client, self.q, version=self.round)
                self.store.read(client, self.old)  # the version before this round (never trained: 0)
                self._add(client, self.q, self.old)
        self.c.copy_(self.accum)
        self.store.commit_round(self.clients, self.round)
        return {"control_variate_norm": float(torch.linalg.vector_norm(self.c))}

    def state_dict(self) -> dict:
        return {"c": self.c, "versions": torch.from_numpy(self.store.versions.copy())}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"c", "versions"} or state["c"].shape != self.c.shape \
                or state["versions"].shape != self.store.versions.shape:
            raise ValueError("SCAFFOLD state does not match this model and number of clients")
        self.c.copy_(state["c"])
        self.store.versions[:] = state["versions"].numpy()

    def commit(self, saved: bool) -> None:
        if saved:
            self.store.delete_superseded()

    def close(self, keep: bool) -> None:
        if not keep and self.store.writer and self.store.folder.is_dir():
            for entry in self.store.folder.iterdir():
                if self.store.NAME.match(entry.name) or entry.name.endswith(".tmp"):
                    entry.unlink(missing_ok=True)
            try:
                self.store.folder.rmdir()
            except OSError:
                pass


CLIENT_UPDATES: dict[str, type[ClientUpdate]] = {cls.name: cls for cls in (ClientUpdate, FedProx, Scaffold)}


def train_client(model: torch.nn.Module, flat: FlatParameters, data: TokenTensors, lengths_cpu: np.ndarray,
                 shard: np.ndarray, *, epochs: int, batch_size: int, lr: float, protocol: Protocol,
                 seed: int, round_: int, client: int, bf16: bool, optimizer: LocalOptimizer | None = None,
                 on_batch: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, int]:
    """Train the model (whose flat weights the caller set) on one shard; return (loss sum, examples).

    ``optimizer`` takes the steps (default: plain SGD at ``lr``). The loss sum stays on the device
    (no host sync per step); callers read it once per client.
    """
    if not model.training:  # train() walks every module: once per eval, not once per client
        model.train()
    # Dropout masks depend only on (seed, round, client): resuming or reordering clients
    # reproduces them exactly.
    seed_dropout(flat.data.device, derive_seed(seed, "dropout", round_, client))
    step = optimizer.step if optimizer is not None else (lambda: flat.sgd_step(lr))
    loss_sum = torch.zeros((), dtype=torch.float64, device=flat.data.device)
    seen = 0
    for epoch in range(epochs):
        batches = client_batches(shard, batch_size, protocol, seed, round_, client, epoch)
        for ids, mask, labels in batches_on_device(data, lengths_cpu, batches, protocol):
            with autocast(flat.data.device, bf16):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            step()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
            if on_batch is not None:
                on_batch(len(labels))
            if should_stop is not None and should_stop():
                raise InterruptedError("stop requested")
    return loss_sum, seen
