"""Client updates: how a client trains from the global weights (as Flower's ``ClientApp.fit``).

A client update has two parts:

- the **local optimiser** (:class:`~fedsweep.client_update.LocalOptimizer`), one per client (or
  per group of clients trained at once, :mod:`fedsweep.grouped`): it consumes autograd's gradients
  after each backward and steps the client's weights. ``sgd`` is plain SGD (constant lr within a
  round, no momentum, no weight decay: today's FedAvg client); ``adamw`` is ``torch.optim.AdamW``
  (decoupled weight decay) whose state is reset for every client in every round, as FedNLP and
  OpenFedLLM do. Before the step it may correct the gradient: FedProx adds ``mu (w - w_global)``
  (the gradient of the proximal term ``mu/2 ||w - w_global||^2``, Li et al. 2020); SCAFFOLD adds
  ``c - c_i`` (Karimireddy et al. 2020).
- the **client algorithm** (:class:`~fedsweep.client_update.ClientUpdate`): ``plain`` and
  ``fedprox`` keep no state (:mod:`fedsweep.client_update`); ``scaffold``
  (:class:`~fedsweep.scaffold.Scaffold`, :mod:`fedsweep.scaffold`) keeps the server control
  variate ``c`` (one model-sized fp32 vector on the device) and one control variate ``c_i`` per
  client, on disk (see :class:`~fedsweep.scaffold.ControlVariateStore`), updated with the paper's
  option II.

A run builds its client update with :func:`build_client_update` (by name, from ``CLIENT_UPDATES``):
the update creates what it keeps (SCAFFOLD: its store in the run folder), checks and tidies it
when the run starts or resumes (:meth:`ClientUpdate.prepare`) and says what run.json records
about it (:meth:`ClientUpdate.summary`), so the orchestration (:mod:`fedsweep.train`) names no
algorithm.

The client learning rate of round ``t`` is :func:`client_lr` (constant, or a linear warmup and/or
decay over rounds). :func:`train_client` runs the E local epochs of one client.

Adding a client algorithm: subclass :class:`ClientUpdate` in a module of its own (as
:mod:`fedsweep.scaffold`), list the settings it reads in ``SETTINGS`` and register it in
``CLIENT_UPDATES`` here; if it keeps state beyond ``state_dict`` (files), override
:meth:`~ClientUpdate.build`, :meth:`~ClientUpdate.prepare` and :meth:`~ClientUpdate.summary`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .client_update import ClientSettings, ClientUpdate, FedProx, LocalOptimizer
from .engine import BatchLoss, FlatParameters, Protocol, batch_loss, batches_on_device, client_batches, \
    derive_seed, seed_dropout
from .scaffold import Scaffold
from .tokens import TokenTensors


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


# The registry lives here, above the modules that define the algorithms: they import nothing
# of this one, so holding them all makes no import circle.
CLIENT_UPDATES: dict[str, type[ClientUpdate]] = {cls.name: cls for cls in (ClientUpdate, FedProx, Scaffold)}


def build_client_update(settings: ClientSettings, global_weights: torch.Tensor, *, out_dir: str | os.PathLike,
                        num_clients: int, device: torch.device, world: int = 1, writer: bool = True) -> ClientUpdate:
    """The client update ``settings.client`` (a name in ``CLIENT_UPDATES``) of a run writing to
    ``out_dir``: ``global_weights`` are the strategy's (constant during a round); ``world``
    processes share the clients; ``writer``: this process deletes the run's files."""
    return CLIENT_UPDATES[settings.client].build(settings, global_weights, out_dir=Path(out_dir),
                                                 num_clients=num_clients, device=device, world=world, writer=writer)


def train_client(model: torch.nn.Module, flat: FlatParameters, data: TokenTensors, lengths_cpu: np.ndarray,
                 shard: np.ndarray, *, epochs: int, batch_size: int, lr: float, protocol: Protocol,
                 seed: int, round_: int, client: int, bf16: bool, optimizer: LocalOptimizer | None = None,
                 on_batch: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 loss_fn: BatchLoss | None = None) -> tuple[torch.Tensor, int]:
    """Train the model (whose flat weights the caller set) on one shard; return (loss sum, examples).

    ``optimizer`` takes the steps (default: plain SGD at ``lr``); ``loss_fn`` computes a batch's
    loss (default: :func:`~fedsweep.engine.batch_loss`, eager). Nothing in a step reads the device:
    the loss sum stays there and callers read it once per client.
    """
    if not model.training:  # train() walks every module: once per eval, not once per client
        model.train()
    # Dropout masks depend only on (seed, round, client): resuming or reordering clients
    # reproduces them exactly.
    seed_dropout(flat.data.device, derive_seed(seed, "dropout", round_, client))
    step = optimizer.step if optimizer is not None else (lambda ids: flat.sgd_step(lr))
    loss_fn = loss_fn if loss_fn is not None else batch_loss(model, bf16)
    loss_sum = torch.zeros((), dtype=torch.float64, device=flat.data.device)
    seen = 0
    for epoch in range(epochs):
        batches = client_batches(shard, batch_size, protocol, seed, round_, client, epoch)
        for ids, mask, labels in batches_on_device(data, lengths_cpu, batches, protocol):
            loss = loss_fn(ids, mask, labels)
            loss.backward()
            step(ids)
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
            if on_batch is not None:
                on_batch(len(labels))
            if should_stop is not None and should_stop():
                raise InterruptedError("stop requested")
    return loss_sum, seen
