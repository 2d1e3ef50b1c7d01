"""Rounds of federated training in one process: which clients, their training, the server step.

- :func:`sample_clients`: the round's clients, drawn uniformly without replacement from a
  generator seeded by (seed, round) only, so a resumed run or another rank draws the same ones.
- :func:`train_round`: trains this process's share of them from the global weights, each with
  the client update's optimiser, and adds each to the strategy's float64 sum (clients one after
  another on one model, or several at once with :class:`~fedsweep.grouped.ClientGroups`).
- :class:`Federation`: a model with its strategy and client update, run round by round:
  :meth:`~Federation.train` (sampling, the client lr, ``begin_round`` of both, ``train_round``) and
  :meth:`~Federation.finish` (the client update's and the strategy's server step, the round's
  metrics). :mod:`fedsweep.train` wraps it with inputs, checkpoints and ranks; tests and
  benchmarks drive it directly.

With several processes each trains its own clients (dealt round-robin over the sampled ones);
the strategy's and the client update's all-reduce hooks join their sums, and
:meth:`RoundStats.joined` joins the statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import row_support
from .clients import ClientSettings, ClientUpdate, client_lr, train_client
from .engine import BatchLoss, FlatParameters, Protocol, batch_loss, derive_seed
from .strategies import ServerStats, Strategy
from .tokens import TokenTensors

if TYPE_CHECKING:
    from .grouped import ClientGroups


def clients_per_round(num_clients: int, clients_per_round: int = 0, client_fraction: float = 1.0) -> int:
    """How many clients a round trains: ``clients_per_round`` (capped at K; 0 = all) or
    ``floor(client_fraction x K)``, at least 1."""
    if clients_per_round:
        return min(clients_per_round, num_clients)
    return max(1, min(num_clients, math.floor(client_fraction * num_clients + 1e-9)))


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    """``per_round`` distinct clients of ``num_clients``, uniformly, from (seed, round) alone; ascending."""
    rng = np.random.default_rng(derive_seed(seed, "sample", round_))
    return sorted(int(k) for k in rng.choice(num_clients, size=per_round, replace=False))


@dataclass
class RoundStats:
    """What one process's clients did in a round (sums and maxima, so ranks can join theirs)."""

    loss_sum: float = 0.0  # training loss summed over every example of every epoch
    examples: int = 0
    clients: int = 0
    drift_sum: float = 0.0  # sum over clients of ||x_k - x_global||
    drift_max: float = 0.0  # max over clients of ||x_k - x_global||
    drift_weighted_sq: float = 0.0  # sum over clients of w_k ||x_k - x_global||^2 (w_k: the average's weight)
    train_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    first_bad_client: float = math.inf  # the lowest client whose loss was not finite
    sampled: int = 0  # clients of the round, all ranks
    lr: float = math.nan  # the clients' lr this round

    def add_client(self, drift: float, share: float, loss: float, seen: int) -> None:
        """One client: ``drift`` = ``||x_k - x_global||`` (what :meth:`Strategy.add` returns), ``share``
        = its weight in the average, its training loss sum and the examples it saw."""
        self.drift_sum += drift
        self.drift_max = max(self.drift_max, drift)
        self.drift_weighted_sq += share * drift * drift
        self.clients += 1
        self.loss_sum += loss
        self.examples += seen

    def joined(self, ranks) -> "RoundStats":
        """The sums and maxima over every rank (``ranks``: :class:`fedsweep.runtime.Ranks`); timings stay local."""
        loss_sum, examples, drift_sum, weighted_sq, clients = ranks.sum(
            [self.loss_sum, self.examples, self.drift_sum, self.drift_weighted_sq, self.clients])
        return RoundStats(loss_sum, int(examples), int(clients), drift_sum, ranks.max(self.drift_max), weighted_sq,
                          self.train_seconds, self.aggregate_seconds, ranks.min(self.first_bad_client),
                          self.sampled, self.lr)


def drift_metrics(stats: RoundStats, server: ServerStats) -> dict[str, float]:
    """The round's update and drift metrics (README, "Drift metrics") from the clients' sums
    (``stats``, joined over the ranks) and the server step's norms.

    ``x``: the round's global model, ``x_k``: client k's model after local training, ``u_k = x_k - x``,
    ``w_k``: its weight in the average (summing to 1), ``u = sum_k w_k u_k = average - x``. The
    spread and the cosine use ``u`` from the unrounded fp64 average, for which the identities
    below hold to fp64 rounding (the fp32 average's rounding would add ~1e-8 ||x|| to ``u``).
    """
    u_sq = server.average_update_sq
    moved = stats.drift_sum > 0 and u_sq > 0  # else no direction to take a cosine with
    return {
        "client_update_norm": stats.drift_sum / stats.clients,  # mean_k ||u_k||, unweighted
        "mean_update_norm": server.update_norm,  # ||x_new - x||: the server's applied step
        "pseudo_gradient_norm": server.pseudo_gradient_norm,  # ||x - average||, the fp32 step's delta
        "client_drift_max": stats.drift_max,  # max_k ||x_k - x|| (SCAFFOLD's drift: from the server model)
        # sqrt(sum_k w_k ||x_k - average||^2) = sqrt(sum_k w_k ||u_k||^2 - ||u||^2), as sum_k w_k = 1
        "client_drift_rms": math.sqrt(max(stats.drift_weighted_sq - u_sq, 0.0)),
        # sum_k w_k cos(u_k, u) = <sum_k w_k u_k / ||u_k||, u> / ||u|| (Strategy.add sums the left factor)
        "update_cosine": server.direction_dot / math.sqrt(u_sq) if moved else float("nan"),
    }


def train_round(model: torch.nn.Module, flat: FlatParameters, strategy: Strategy, data: TokenTensors,
                lengths_cpu: np.ndarray, shards: Sequence[np.ndarray], clients: Sequence[int], *,
                epochs: int, batch_size: int, lr: float, protocol: Protocol, seed: int, round_: int,
                bf16: bool, groups: "ClientGroups | None" = None, client_update: ClientUpdate | None = None,
                on_batch: Callable[[int], None] | None = None,
                should_stop: Callable[[], bool] | None = None, loss_fn: BatchLoss | None = None) -> RoundStats:
    """Train ``clients`` (indices into ``shards``) from the global weights and add them to ``strategy``.

    ``client_update`` (default: plain SGD at ``lr``, begun for this round here) makes each client's
    optimiser; the caller has called its ``begin_round`` with this round's lr. ``loss_fn``: a batch's
    loss (:func:`~fedsweep.engine.batch_loss`, eager or compiled; built here if None). ``groups`` trains
    clients with equal shard sizes several at a time (see :mod:`fedsweep.grouped`); without it,
    one after another on the one model.
    """
    device = flat.data.device
    stats = RoundStats()
    loss_fn = loss_fn if loss_fn is not None else batch_loss(model, bf16)
    if client_update is None:
        client_update = ClientUpdate(ClientSettings(), strategy.weights)
        client_update.begin_round(round_, lr, clients, [len(s) for s in shards])

    def sync() -> None:  # honest timings on a GPU (kernels run asynchronously)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # the input-embedding rows a client indexes, where the strategy adds by them (Federation): the
    # client's SGD steps that matrix by them too, and the strategy adds it by them
    embedding = strategy.embedding if client_update.row_sparse else None
    embedding_param = flat.offsets.index(embedding.start) if embedding is not None else None

    def rows_of(client: int) -> torch.Tensor | None:
        return embedding.client_rows(data.ids, shards[client]) if embedding is not None else None
    plan = groups.plan(clients, [len(shards[c]) for c in clients]) if groups is not None else [[c] for c in clients]
    flat.data.copy_(strategy.weights)  # from here on, each strategy.add reloads them
    added = []  # (||u_k||, a future; the client's share of the average; its loss; its examples)
    for members in plan:
        sync()
        t0 = time.perf_counter()
        if len(members) == 1:
            client = members[0]
            rows = rows_of(client)
            local = client_update.optimizer(flat.params, flat.data, flat.views, members,
                                            (embedding_param, rows) if embedding is not None else None)
            loss_sum, seen = train_client(
                model, flat, data, lengths_cpu, shards[client], epochs=epochs, batch_size=batch_size,
                lr=client_update.lr, protocol=protocol, seed=seed, round_=round_, client=client, bf16=bf16,
                optimizer=local, on_batch=on_batch, should_stop=should_stop, loss_fn=loss_fn)
            losses, trained = [float(loss_sum)], [(client, flat.data, seen, rows)]  # one host sync per client
        else:
            g = len(members)
            local = client_update.optimizer(groups.params(g), groups.data[:g], groups.views(g), members)
            loss_sums, seen = groups.train(
                strategy.weights, data, lengths_cpu, [shards[c] for c in members], members, epochs=epochs,
                batch_size=batch_size, lr=client_update.lr, protocol=protocol, seed=seed, round_=round_, bf16=bf16,
                optimizer=local, on_batch=on_batch, should_stop=should_stop)
            losses = loss_sums.tolist()
            trained = [(c, groups.data[i], seen, rows_of(c)) for i, c in enumerate(members)]
        t1 = time.perf_counter()
        for row, (loss, (client, weights, seen, rows)) in enumerate(zip(losses, trained)):
            if not math.isfinite(loss):
                stats.first_bad_client = min(stats.first_bad_client, client)
            deferred = client_update.after_client(local, row, client, weights, len(shards[client]))
            weight = client_update.average_weight(len(shards[client]))  # n_k (SCAFFOLD uniform: 1)
            added.append((strategy.submit(weights, weight, rows, deferred), weight / strategy.total, loss, seen))
        sync()
        stats.train_seconds += t1 - t0
        stats.aggregate_seconds += time.perf_counter() - t1
    t2 = time.perf_counter()
    strategy.drain()  # the adds a worker thread took (Strategy.submit)
    stats.aggregate_seconds += time.perf_counter() - t2
    for drift, share, loss, seen in added:  # in the order of the adds: the same sums either way
        stats.add_client(drift.result(), share, loss, seen)
    return stats


class Federation:
    """One process's share of a federated run: the model (in ``flat``), the strategy holding the
    global weights, the client update, the training data and its shards; round by round."""

    def __init__(self, model: torch.nn.Module, flat: FlatParameters, strategy: Strategy, client_update: ClientUpdate,
                 data: TokenTensors, lengths_cpu: np.ndarray, shards: Sequence[np.ndarray], *, epochs: int,
                 batch_size: int, protocol: Protocol, seed: int, lr: float, lr_schedule: str = "constant",
                 warmup_rounds: int = 0, rounds: int = 1, per_round: int | None = None, bf16: bool = False,
                 groups: "ClientGroups | None" = None, rank: int = 0, world: int = 1, compile: bool = False):
        self.model, self.flat, self.strategy, self.client_update = model, flat, strategy, client_update
        self.data, self.lengths_cpu, self.shards = data, lengths_cpu, shards
        self.sizes = [len(s) for s in shards]
        self.epochs, self.batch_size, self.protocol, self.seed, self.bf16 = epochs, batch_size, protocol, seed, bf16
        self.lr, self.lr_schedule, self.warmup_rounds, self.rounds = lr, lr_schedule, warmup_rounds, rounds
        self.per_round = per_round or len(shards)
        self.groups, self.rank, self.world = groups, rank, world
        self.loss_fn = batch_loss(model, bf16, compile)  # one compiled step for every client and round
        # the server then adds each client by the rows it indexed; SCAFFOLD restricts its
        # correction to them (fedsweep.scaffold_rows) where the strategy can
        embedding = row_support.attach(strategy, model, flat)
        if embedding is None or not (client_update.row_sparse or client_update.use_rows(
                embedding, lambda k: embedding.client_rows(data.ids, shards[k]), row_support.base(strategy))):
            row_support.detach(strategy)

    def round_clients(self, round_: int) -> list[int]:
        """Every client of round ``round_`` (all ranks)."""
        return sample_clients(len(self.shards), self.per_round, self.seed, round_)

    def my_clients(self, round_: int) -> list[int]:
        return self.round_clients(round_)[self.rank::self.world]

    def client_lr(self, round_: int) -> float:
        return client_lr(self.lr, self.lr_schedule, self.warmup_rounds, self.rounds, round_)

    def train(self, round_: int, on_batch: Callable[[int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> RoundStats:
        """Train this process's clients of round ``round_`` and add them to the strategy's sum."""
        chosen = self.round_clients(round_)
        lr = self.client_lr(round_)
        self.strategy.begin_round(sum(self.client_update.average_weight(self.sizes[k]) for k in chosen))
        self.client_update.begin_round(round_, lr, chosen, self.sizes)
        stats = train_round(self.model, self.flat, self.strategy, self.data, self.lengths_cpu, self.shards,
                            chosen[self.rank::self.world], epochs=self.epochs, batch_size=self.batch_size, lr=lr,
                            protocol=self.protocol, seed=self.seed, round_=round_, bf16=self.bf16, groups=self.groups,
                            client_update=self.client_update, on_batch=on_batch, should_stop=should_stop,
                            loss_fn=self.loss_fn)
        stats.sampled, stats.lr = len(chosen), lr
        return stats

    def finish(self, stats: RoundStats) -> dict[str, float]:
        """The server step after :meth:`train` (``stats`` joined over the ranks); the round's metrics."""
        device = self.flat.data.device
        t0 = time.perf_counter()
        extra = self.client_update.finish_round()
        server = self.strategy.finish_round(scratch=self.flat.data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {
            "train_loss": stats.loss_sum / stats.examples, "examples": int(stats.examples),
            "train_seconds": stats.train_seconds,
            "aggregate_seconds": stats.aggregate_seconds + time.perf_counter() - t0,
            **drift_metrics(stats, server),
            "control_variate_norm": extra.get("control_variate_norm", float("nan")),
            "clients_sampled": stats.sampled, "client_lr": stats.lr,
        }
