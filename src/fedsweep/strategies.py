"""Server strategies: what the server makes of the round's client models (as Flower's ``Strategy``).

Every strategy first forms the average of the round's client models, weighted by their shard
sizes, as ``x + u`` with ``u = sum_k w_k (x_k - x)`` accumulated in place in ONE float64 buffer
(:meth:`Strategy.add`, one client at a time: memory independent of K, and the sum independent,
beyond its final rounding, of the order in which clients or ranks add their models; a client
that changed only some rows of the input embedding is added by those rows,
:mod:`fedsweep.row_support`). It then moves the global weights ``x`` with the
pseudo-gradient ``delta = x - average`` (Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2, with their sign of delta flipped so that it points like a gradient):

- ``fedavg``: ``x <- average`` (McMahan et al. 2017);
- ``fedavgm``: ``m <- momentum * m + delta; x <- x - server_lr * m`` (Hsu et al. 2019);
- ``fedadam``: ``m <- b1 m + (1 - b1) delta; v <- b2 v + (1 - b2) delta^2``;
- ``fedyogi``: the same ``m``; ``v <- v - (1 - b2) delta^2 sign(v - delta^2)``;
- ``fedadagrad``: the same ``m``; ``v <- v + delta^2``;

and for the last three ``x <- x - server_lr * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and
``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``), without bias correction (as in the paper);
``adaptive_convention=flower`` gives Flower's variant instead (:class:`AdaptiveStrategy`).

Precision: the average is summed in float64 and rounded to float32 (FedAvg's new weights; the
rounding makes it, in practice, independent of the order in which clients and ranks were added,
so 2 ranks give 1 process's numbers); from there the server step is float32 arithmetic, chunk by
chunk in reused scratch buffers (on a CPU with a free core, half of the chunks on a worker thread:
the same bits), and the moments ``m`` and ``v`` are float32 buffers (one or two model-sized
vectors on the device, flat in K). FedAvgM is evaluated as ``x_new = average + (1 - lr) * delta - lr * momentum * m_old`` (the same quantity as
``x - lr * m_new``), so that with ``server_lr=1, server_momentum=0`` it is ``average`` to the bit:
FedAvg. The round's norms and dot products (the metrics) are summed in fp64, chunk by chunk, over
exact fp64 differences (``x_k - x``, and their fp64 average ``u``) or fp32 vectors (:func:`dot64`).
The state (``m``, ``v``) is what :meth:`Strategy.state_dict` returns, saved in every
checkpoint so a resumed run continues bitwise.

Adding a strategy: subclass :class:`Strategy` (or :class:`AdaptiveStrategy` for another second
moment), register it in ``STRATEGIES``, and declare its name and the settings it reads in
:data:`fedsweep.algorithm.STRATEGY_SETTINGS` (torch-free: the workflow checks configs with it).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from .algorithm import STRATEGY_SETTINGS
from .background import free_core, single_thread_pool, split_map

if TYPE_CHECKING:
    from .layers import LayerDrift
    from .row_support import EmbeddingRows


def chunk_size(device: torch.device) -> int:
    """Elements per chunk of the server's elementwise passes.

    On a CPU, ``fp64.add_(fp32)`` casts the whole fp32 operand into a fresh fp64 temporary (35 MB
    of new pages per client for a 4.4M-parameter model, ~10x the arithmetic); chunks of 128k
    elements keep every temporary in a reused, cache-sized scratch. GPUs cast inside the kernel;
    their chunks only bound the server step's fp64 temporaries (32 MiB each).
    """
    return 1 << 17 if device.type == "cpu" else 1 << 22


def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int) -> float:
    """``<a, b>`` of two fp32 vectors, summed in fp64 (``dot64(a, a, chunk)``: ``||a||^2``).

    A product of two fp32 numbers is exact in fp64, while a sum over millions of them in fp32
    loses ~1e-5 relative. The casts are chunk-sized temporaries, never a model-sized fp64 copy;
    the same vector chunked the same way gives the same bits (FedAvgM(lr 1, momentum 0) measures
    FedAvg's step to the bit).
    """
    total = 0.0
    for start in range(0, a.numel(), chunk):
        x = a[start:start + chunk].double()
        total += float(torch.dot(x, x if b is a else b[start:start + chunk].double()))
    return total


def _span(start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A piece's ``get`` (:meth:`Strategy._pieces`) for the chunk ``[start, stop)``: a view."""
    return lambda vector: vector[start:stop]


@dataclass
class ServerStats:
    """What the server step did: the norm of the applied update ``x_new - x`` and of ``delta`` (the
    fp32 pseudo-gradient it stepped with); and for the drift metrics, with ``u = average - x`` from
    the unrounded fp64 average (:meth:`Strategy._update_sums`), ``||u||^2`` and ``<d, u>``, ``d``
    the clients' weighted unit updates (:meth:`Strategy.add`)."""

    update_norm: float
    pseudo_gradient_norm: float
    average_update_sq: float = math.nan
    direction_dot: float = math.nan


class Strategy:
    """FedAvg: the global model becomes the size-weighted average of the round's client models."""

    name: ClassVar[str] = "fedavg"
    CPU_CHUNK = 1 << 17

    def __init__(self, global_weights: torch.Tensor, **settings: float):
        self.weights = global_weights  # fp32, the global model between rounds
        # u = sum_k w_k u_k, the average's update (u_k = x_k - x): the average is x + accum
        self.accum = torch.zeros_like(global_weights, dtype=torch.float64)
        # d = sum_k w_k u_k / ||u_k|| for the update cosine. fp32: a diagnostic needs no more than
        # its ~1e-7, and fp64 would add 8 instead of 4 bytes per parameter (flat in K either way).
        self.direction = torch.zeros_like(global_weights)
        self.total = 0
        self.reduce: Callable[[torch.Tensor], None] | None = None  # all-reduce hook (multi-process)
        self.settings = settings
        cpu = global_weights.device.type == "cpu"
        # one chunking for every pass, so that equal vectors get bitwise-equal norms (K=1: rms 0)
        self.chunk = min(self.CPU_CHUNK if cpu else chunk_size(global_weights.device), global_weights.numel())
        self.host_casts = cpu  # cast through reused scratch (see chunk_size); tests set it off on a CPU
        # per-layer-group sums (fedsweep.layers.attach), fed the chunks below on the rounds it is active
        self.layers: LayerDrift | None = None
        # the input embedding's rows (fedsweep.row_support.attach): clients added by the rows they index
        self.embedding: EmbeddingRows | None = None
        self._touched: torch.Tensor | None = None  # this round's indexed rows (bool per row)
        self._sparse_round = False  # every add of this round was by rows: the server step is too
        self._added = 0  # clients added this round (this process)
        # fp64 scratch per lane (fedsweep.background.split_map: 0 this thread, 1 the server step's worker)
        self._casts = [self._scratch(torch.float64, 2)] if cpu else []

    def use_rows(self, embedding: EmbeddingRows | None) -> None:
        """Add clients that bring their rows (``add(..., rows=)``) by the rows of ``embedding`` (not
        where a row is longer than a chunk: a vector that small is added densely)."""
        self.embedding = embedding if embedding is not None and embedding.width <= self.chunk else None
        self._sparse_round = False
        if self.embedding is not None:
            self._touched = torch.zeros(embedding.rows, dtype=torch.bool, device=self.weights.device)

    # --- the average ------------------------------------------------------------------------------

    def begin_round(self, total_examples: int) -> None:
        """``total_examples``: the examples of the clients that enter this round's average."""
        self.total = total_examples
        self._added = 0
        # whole: zeroing a round's rows one by one (index_fill_) is slower than zeroing everything
        self.accum.zero_()
        self.direction.zero_()
        self._sparse_round = self.embedding is not None and not self._measuring()
        if self._touched is not None:
            self._touched.zero_()
        if self._measuring():
            self.layers.begin_round()

    def _measuring(self) -> bool:
        """Whether this round's layer groups are measured (:mod:`fedsweep.layers`)."""
        return self.layers is not None and self.layers.active

    def _scratch(self, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        return [torch.empty(self.chunk, dtype=dtype, device=self.weights.device) for _ in range(count)]

    def _f64(self, values: torch.Tensor, slot: int, lane: int = 0) -> torch.Tensor:
        """``values`` (at most a chunk) in fp64: in a reused scratch buffer on a CPU (see
        :func:`chunk_size`), a temporary elsewhere."""
        if not self.host_casts:
            return values.double()
        return self._casts[lane][slot][:values.numel()].copy_(values)

    @torch.no_grad()
    def add(self, client_weights: torch.Tensor, num_examples: int, rows: torch.Tensor | None = None) -> float:
        """Add ``w_k u_k`` (``w_k = n_k / N``, ``u_k = x_k - x``, ``x`` the global weights) to the
        average's update and ``w_k u_k / ||u_k||`` to the direction ``d`` (a client with ``u_k = 0``
        adds nothing to ``d``); return ``||u_k||``, measured as :meth:`_update_sums` measures ``u``.

        ``rows``: the input-embedding rows the client's tokens index (ascending,
        :meth:`EmbeddingRows.client_rows <fedsweep.row_support.EmbeddingRows.client_rows>`), from a
        client that changed no other row; only those rows of the matrix are then read. The sums get
        the same values either way, elementwise ``accum + alpha * u`` and ``d + s * u``: the rows'
        ``index_add_`` adds each row with the kernel of ``add_`` (``add_stub``), as the chunks' ``add_``
        adds them (tests/test_row_support.py: rows of 16 and of 13 elements).

        Afterwards ``client_weights`` holds the global weights again, ready for the next client.
        """
        alpha = num_examples / self.total
        self._added += 1
        measuring = self._measuring()
        by_rows = rows is not None and self.embedding is not None and not measuring
        if by_rows:
            self._touched[rows] = True
        else:
            self._sparse_round = False
        spans = self.embedding.outside(self.chunk) if by_rows else list(self._spans())
        squares = 0.0
        for index, (start, stop) in enumerate(spans):
            square, u = self._update_piece(client_weights[start:stop], self.weights[start:stop], alpha,
                                           index if measuring else None)
            squares += square
            self.accum[start:stop].add_(u, alpha=alpha)
        held = []  # the rows' fp32 u_k, for the direction once ||u_k|| is known
        matrix = self.embedding.matrix if by_rows else None
        for block in (self.embedding.blocks(rows, self.chunk) if by_rows else ()):
            x, w = (matrix(v).index_select(0, block) for v in (client_weights, self.weights))
            square, u = self._update_piece(x.view(-1), w.view(-1), alpha, None)
            squares += square
            matrix(self.accum).index_add_(0, block, u.view(x.shape), alpha=alpha)  # as add_ adds (add_stub)
            held.append((block, x, w))
        norm = math.sqrt(squares)
        # ||u_k|| is known only now: a second pass, fp32 only, with the reload of the global weights
        # chunk by chunk (each chunk of u_k is read once, while in cache)
        scale = alpha / norm if norm > 0 else 0.0
        for start, stop in spans:
            u = client_weights[start:stop]
            if scale:
                self.direction[start:stop].add_(u, alpha=scale)
            u.copy_(self.weights[start:stop])
        for block, u, w in held:
            if scale:
                matrix(self.direction).index_add_(0, block, u, alpha=scale)
            matrix(client_weights).index_copy_(0, block, w)
        return norm

    def _update_piece(self, x: torch.Tensor, w: torch.Tensor, alpha: float,
                      layer_index: int | None) -> tuple[float, torch.Tensor]:
        """One piece of :meth:`add`: ``u_k = x - w`` exact in fp64, and ``x -> u_k`` in place (fp32);
        returns ``||u_k||^2`` over the piece and ``u_k`` (fp64, in scratch: to be added before the
        next piece). ``layer_index``: the chunk's index, fed to the layer groups."""
        u = self._f64(x, 0).sub_(self._f64(w, 1))
        squares = float(torch.dot(u, u))
        if layer_index is not None:
            self.layers.add_client(layer_index, u, alpha)
        x.sub_(w)
        return squares, u

    def _spans(self):
        """The ``(start, stop)`` of every chunk: one chunking for every pass."""
        size = self.weights.numel()
        return ((start, min(start + self.chunk, size)) for start in range(0, size, self.chunk))

    def _by_rows(self) -> bool:
        """Whether this round's server step may read only the rows its clients indexed (and the
        rest of the vector): every add was by rows, and no other rank added others."""
        return self._sparse_round and self.reduce is None

    def _pieces(self):
        """This round's pieces for the server's sums: ``(get, put)`` pairs, ``get(vector)`` the
        piece of a vector (a view of a chunk, or a gathered block of rows) and ``put(vector,
        values)`` writing a piece back (None for a view). Pieces are in the order, and of the
        sizes, of :meth:`add`'s, so that at K=1 ``||u||^2`` is summed as ``||u_1||^2`` was (rms
        exactly 0)."""
        by_rows = self._by_rows()
        for start, stop in self.embedding.outside(self.chunk) if by_rows else self._spans():
            yield _span(start, stop), None
        if not by_rows:
            return
        matrix = self.embedding.matrix
        for block in self.embedding.blocks(torch.nonzero(self._touched).flatten(), self.chunk):
            yield ((lambda v, i=block: matrix(v).index_select(0, i).view(-1)),
                   (lambda v, values, i=block: matrix(v).index_copy_(0, i, values.view(len(i), -1))))

    def _update_sums(self, get, index: int) -> tuple[float, float, torch.Tensor]:
        """``||u||^2``, ``<d, u>`` and ``u`` over a piece (``get``, see :meth:`_pieces`; ``index``: its
        chunk's, for the layer groups), ``u = accum`` the unrounded fp64 average update."""
        u = get(self.accum)
        if self._measuring():
            self.layers.add_average(index, u, get(self.weights))
        return float(torch.dot(u, u)), float(torch.dot(get(self.direction).double(), u)), u

    # --- the server step --------------------------------------------------------------------------

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        """Move the global weights with this round's average (after the all-reduce, if any).

        ``scratch`` is any fp32 buffer of the model's size that may be overwritten (the model's
        own flat weights, which the next client reloads anyway): no allocation of model size.
        Where every client was added by rows, only the rest of the vector and the indexed rows move:
        elsewhere ``accum`` is 0 and ``x + 0 == x``.
        """
        self._all_reduce()
        average_sq = direction_dot = update_sq = 0.0
        for index, (get, put) in enumerate(self._pieces()):  # one pass (each piece read while in cache)
            square, dot, u = self._update_sums(get, index)
            average_sq, direction_dot = average_sq + square, direction_dot + dot
            x = get(self.weights)
            average = self._f64(x, 0).add_(u)  # x + u: at K=1 exactly x_1
            step = get(scratch) if put is None else torch.empty_like(x)
            step.copy_(average).sub_(x)  # x_new - x = -delta, fp32 as _ServerStep has delta
            update_sq += dot64(step, step, self.chunk)  # dot64's chunks are these: the same sum
            x.copy_(average)
            if put is not None:
                put(self.weights, x)
        update_norm = math.sqrt(update_sq)
        return ServerStats(update_norm, update_norm, average_sq, direction_dot)

    def _all_reduce(self) -> None:
        """Join the ranks' sums (the average's and the direction's) before a server step."""
        if self.reduce is not None:
            self.reduce(self.accum)
            self.reduce(self.direction)
            if self._measuring():
                self.reduce(self.layers.client_sq)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's state between rounds (beyond the global weights): saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"strategy {self.name!r} state has {sorted(state)}, expected {sorted(expected)}")
        for key, value in self.state_dict().items():
            if state[key].shape != value.shape:
                raise ValueError(f"strategy {self.name!r} state {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(value.shape)}")
            value.copy_(state[key])


FedAvg = Strategy


class _ServerStep(Strategy):
    """A strategy whose step is elementwise in ``(x, average, state)``: computed chunk by chunk in
    reused fp32 scratch buffers (no model-sized temporaries), the state in float32."""

    def __init__(self, global_weights: torch.Tensor, **settings: float):
        super().__init__(global_weights, **settings)
        self._f32 = [self._scratch(torch.float32, 3)]  # per lane, as the fp64 casts
        self._worker: ThreadPoolExecutor | None = None
        self._split: bool | None = None  # whether a worker takes half of the chunks: decided once

    def _lanes(self) -> ThreadPoolExecutor | None:
        """The worker that takes half of the server step's chunks (with its own scratch buffers), on a
        CPU with a free core (:mod:`fedsweep.background`; measured: 18 -> 13-16 ms for FedAdam's step
        of tiny-bert); None: this thread does them all. The chunks are independent and their sums are
        added in chunk order: the same bits either way (tests/test_row_support.py)."""
        if self._split is None:
            self._split = self.host_casts and free_core()
            if self._split:
                self._casts.append(self._scratch(torch.float64, 2))
                self._f32.append(self._scratch(torch.float32, 3))
                self._worker = single_thread_pool("fedsweep-server")
        return self._worker if not self._measuring() else None

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        self._all_reduce()
        # One client added by rows: the sums over its pieces (K=1: rms exactly 0). Otherwise, as the
        # state moves everywhere, the sums ride along the dense pass (the pieces' gathers cost ~5 ms).
        by_rows = self._by_rows() and self._added == 1
        average_sq = direction_dot = 0.0
        if by_rows:
            for index, (get, _) in enumerate(self._pieces()):
                square, dot, _ = self._update_sums(get, index)
                average_sq, direction_dot = average_sq + square, direction_dot + dot
        spans = list(self._spans())

        def chunk(index: int, lane: int) -> tuple[float, float, float, float]:
            start, stop = spans[index]
            average, delta, t = (b[:stop - start] for b in self._f32[lane])
            x = self.weights[start:stop]
            # The average rounded to fp32 first: FedAvg's new weights. The fp64 sum depends (in its
            # last bits) on the order clients and ranks added; its fp32 rounding practically never.
            average.copy_(self._f64(x, 0, lane).add_(self.accum[start:stop]))
            torch.sub(x, average, out=delta)
            # the base class's sums, chunk for chunk: FedAvgM(lr 1, momentum 0) gets FedAvg's bits
            delta_sq = dot64(delta, delta, self.chunk)
            square = dot = 0.0
            if not by_rows:
                square, dot, _ = self._update_sums(_span(start, stop), index)
            return delta_sq, square, dot, self._step(slice(start, stop), x, average, delta, t)

        delta_sq = update_sq = 0.0
        for d_sq, square, dot, u_sq in split_map(chunk, len(spans), self._lanes()):  # summed in chunk order
            delta_sq, update_sq = delta_sq + d_sq, update_sq + u_sq
            if not by_rows:
                average_sq, direction_dot = average_sq + square, direction_dot + dot
        return ServerStats(math.sqrt(update_sq), math.sqrt(delta_sq), average_sq, direction_dot)

    def _step(self, s: slice, x: torch.Tensor, average: torch.Tensor, delta: torch.Tensor, t: torch.Tensor) -> float:
        """Update the state's chunk ``s`` and the global weights' chunk ``x`` in place; return the
        squared norm of the change of ``x``. ``delta`` (= x - average), ``average`` and ``t`` may
        be overwritten."""
        raise NotImplementedError


class FedAvgM(_ServerStep):
    """Server momentum (Hsu et al. 2019): ``m <- momentum m + delta; x <- x - lr m``."""

    name = "fedavgm"

    def __init__(self, global_weights: torch.Tensor, *, server_lr: float, server_momentum: float):
        super().__init__(global_weights, server_lr=server_lr, server_momentum=server_momentum)
        self.lr, self.beta = float(server_lr), float(server_momentum)
        self.momentum = torch.zeros_like(global_weights)

    def _step(self, s, x, average, delta, t):
        m = self.momentum[s]
        # x_new = average + (1 - lr) delta - lr beta m_old (= x - lr (beta m_old + delta)): exactly
        # `average` when lr=1 and momentum=0, i.e. FedAvg to the bit
        torch.add(average, delta, alpha=1.0 - self.lr, out=t)
        t.sub_(m, alpha=self.lr * self.beta)
        m.mul_(self.beta).add_(delta)  # m_new = beta m_old + delta
        change = torch.sub(t, x, out=delta)
        squares = dot64(change, change, self.chunk)
        x.copy_(t)
        return squares

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"momentum": self.momentum}


class AdaptiveStrategy(_ServerStep):
    """Reddi et al.'s adaptive server optimisers; subclasses define the second moment.

    ``adaptive_convention`` says where the moments start and how large the step is:

    - ``reddi`` (Reddi et al. 2021, Algorithm 2): ``m`` starts at 0, ``v`` at ``tau^2``; every round
      steps with ``server_lr`` (no bias correction);
    - ``flower`` (flwr 1.x: ``fedopt.py``, and ``aggregate_fit`` of ``fedadam.py``, ``fedyogi.py``,
      ``fedadagrad.py``): ``m`` and ``v`` start at 0; FedAdam steps in round t with
      ``server_lr sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` (Flower's ``server_round + 1.0``), FedYogi
      and FedAdagrad with ``server_lr``. Flower's pseudo-gradient is ``average - x``, minus ours:
      its ``m`` is minus ours, its ``v`` is ours, and its ``x + eta m / (sqrt(v) + tau)`` is our
      ``x - eta m / (sqrt(v) + tau)``. That t is counted in the state (``rounds``), so a resumed
      run continues the correction.
    """

    BIAS_CORRECTED: ClassVar[bool] = False  # whether the flower convention corrects the server lr

    def __init__(self, global_weights: torch.Tensor, *, server_lr: float, beta1: float, tau: float,
                 beta2: float = 0.0, adaptive_convention: str = "reddi"):
        super().__init__(global_weights, server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau,
                         adaptive_convention=adaptive_convention)
        self.lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        flower = adaptive_convention == "flower"
        self.corrected = flower and self.BIAS_CORRECTED
        self.step_lr = self.lr  # this round's server lr
        self.rounds = torch.zeros((), dtype=torch.int64)  # server steps taken, counted for the correction
        self.m = torch.zeros_like(global_weights)
        self.v = torch.full_like(global_weights, 0.0 if flower else self.tau ** 2)

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        if self.corrected:  # fedadam.py's eta_norm, its server_round being the rounds stepped
            self.rounds += 1
            t = int(self.rounds) + 1.0
            self.step_lr = self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        return super().finish_round(scratch)

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor, scratch: torch.Tensor) -> None:
        """Update ``v`` in place with delta^2 (``delta`` and ``scratch`` may be overwritten)."""
        raise NotImplementedError

    def _step(self, s, x, average, delta, t):
        m, v = self.m[s], self.v[s]
        m.lerp_(delta, 1.0 - self.beta1)  # b1 m + (1 - b1) delta, in one pass
        self._second_moment(v, delta, average)  # the average is not needed any more: scratch
        torch.sqrt(v, out=t).add_(self.tau)
        step = torch.div(m, t, out=t)
        x.sub_(step, alpha=self.step_lr)  # x <- x - lr m / (sqrt(v) + tau)
        return self.step_lr * self.step_lr * dot64(step, step, self.chunk)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # the round count only where it matters: reddi checkpoints keep the keys they always had
        return {"m": self.m, "v": self.v, **({"rounds": self.rounds} if self.corrected else {})}


class FedAdam(AdaptiveStrategy):
    name = "fedadam"
    BIAS_CORRECTED = True

    def _second_moment(self, v, delta, scratch):
        v.mul_(self.beta2).addcmul_(delta, delta, value=1.0 - self.beta2)


class FedYogi(AdaptiveStrategy):
    name = "fedyogi"

    def _second_moment(self, v, delta, scratch):
        delta_sq = delta.mul_(delta)
        torch.sub(v, delta_sq, out=scratch).sign_()
        v.addcmul_(delta_sq, scratch, value=-(1.0 - self.beta2))


class FedAdagrad(AdaptiveStrategy):
    name = "fedadagrad"
    # no second-moment decay (beta2): v sums every delta^2

    def _second_moment(self, v, delta, scratch):
        v.addcmul_(delta, delta)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Strategy, FedAvgM, FedAdam, FedYogi, FedAdagrad)}


def build_strategy(name: str, global_weights: torch.Tensor, **settings: float | str) -> Strategy:
    """The strategy ``name`` with the settings it reads (fedsweep.algorithm.STRATEGY_SETTINGS;
    others are ignored, absent ones with a default take it: adaptive_convention)."""
    return STRATEGIES[name](global_weights, **{k: settings[k] for k in STRATEGY_SETTINGS[name] if k in settings})
