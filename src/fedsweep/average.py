"""The round's average: what every server strategy forms first (:mod:`fedsweep.strategies`).

:class:`Strategy` (FedAvg) sums ``u = sum_k w_k (x_k - x)`` in ONE float64 buffer, one client at a
time (:meth:`Strategy.add`: memory flat in K; a client that changed only some rows of the input
embedding is added by those rows, :mod:`fedsweep.row_support`; on a CPU with a free core the
add runs on a worker thread while the next client trains, :meth:`Strategy.submit`), and steps to
``x + u`` (:meth:`Strategy.finish_round`). The server optimisers that step otherwise are in
:mod:`fedsweep.server_steps`.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from .background import done, free_core, shared_worker, split_map

if TYPE_CHECKING:
    from .layers import LayerDrift
    from .row_support import EmbeddingRows
    from .scaffold_rows import Deferred


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
        # fp64 scratch per lane: 0 this thread, 1 the worker (submit; fedsweep.background.split_map)
        self._casts = [self._scratch(torch.float64, 2)] if cpu else []
        self._worker: ThreadPoolExecutor | None = None
        self._split: bool | None = None  # whether a worker thread takes work: decided on first use
        self._pending: deque[Future] = deque()  # submitted adds
        self._copies: dict[int, torch.Tensor] = {}  # free copies of what a client changed, by size (submit)

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
        self.drain()  # a round that stopped mid-way (an interrupted run) leaves nothing running
        self.total = total_examples
        self._added = 0
        # whole: zeroing a round's rows one by one (index_fill_) is slower than zeroing everything;
        # in two halves where a free core takes one (4-6 -> 2-3 ms for tiny-bert's 52 MB)
        size = self.accum.numel()
        halves = (slice(0, size // 2), slice(size // 2, size))

        def zero(index: int, lane: int) -> None:
            self.accum[halves[index]].zero_()
            self.direction[halves[index]].zero_()

        split_map(zero, 2, self._lanes())
        self._sparse_round = self.embedding is not None and not self._measuring()
        if self._touched is not None:
            self._touched.zero_()
        if self._measuring():
            self.layers.begin_round()

    def _measuring(self) -> bool:
        """Whether this round's layer groups are measured (:mod:`fedsweep.layers`)."""
        return self.layers is not None and self.layers.active

    def _background(self) -> ThreadPoolExecutor | None:
        """The worker thread of a CPU strategy whose process has a free core (fedsweep.background),
        with its own scratch (lane 1); None elsewhere: this thread does everything."""
        if self._split is None:
            self._split = self.host_casts and free_core()
            if self._split:
                self._casts.append(self._scratch(torch.float64, 2))
                self._worker = shared_worker()
        return self._worker

    def _lanes(self) -> ThreadPoolExecutor | None:
        """The worker that takes half of the server step's pieces (with its own scratch), on a CPU
        with a free core (measured: tiny-bert's dense FedAvg step 20 -> 13 ms); None: this thread
        does them all. The pieces are independent and their sums are added in piece order: the
        same bits either way (tests/test_row_support.py). Not while the layer groups are measured
        (their sums are fed piece by piece)."""
        worker = self._background()
        return worker if not self._measuring() else None

    def _scratch(self, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        return [torch.empty(self.chunk, dtype=dtype, device=self.weights.device) for _ in range(count)]

    def _f64(self, values: torch.Tensor, slot: int, lane: int = 0) -> torch.Tensor:
        """``values`` (at most a chunk) in fp64: in a reused scratch buffer on a CPU (see
        :func:`chunk_size`), a temporary elsewhere."""
        if not self.host_casts:
            return values.double()
        return self._casts[lane][slot][:values.numel()].copy_(values)

    @torch.no_grad()
    def add(self, client_weights: torch.Tensor, num_examples: int, rows: torch.Tensor | None = None,
            deferred: Deferred | None = None) -> float:
        """Add ``w_k u_k`` (``w_k = n_k / N``, ``u_k = x_k - x``, ``x`` the global weights) to the
        average's update and ``w_k u_k / ||u_k||`` to the direction ``d`` (a client with ``u_k = 0``
        adds nothing to ``d``); return ``||u_k||``, measured as :meth:`_update_sums` measures ``u``.

        ``rows``: the input-embedding rows the client's tokens index (ascending,
        :meth:`EmbeddingRows.client_rows <fedsweep.row_support.EmbeddingRows.client_rows>`), from a
        client that changed no other row; only those rows of the matrix are then read. The sums get
        the same values either way, elementwise ``accum + alpha * u`` and ``d + s * u``: the rows'
        ``index_add_`` adds each row with the kernel of ``add_`` (``add_stub``), as the chunks' ``add_``
        adds them (tests/test_row_support.py: rows of 16 and of 13 elements).

        ``deferred``: a part of ``u_k`` that ``client_weights`` do not hold (SCAFFOLD's rows,
        :mod:`fedsweep.scaffold_rows`): in ``||u_k||``, and it adds its rows to the sums itself.

        Afterwards ``client_weights`` holds the global weights again, ready for the next client.
        """
        self.drain()  # a submitted add still summing on the worker comes first
        alpha, spans, blocks = self._enter(num_examples, rows)
        matrix = self.embedding.matrix if blocks else None
        pieces = [(start, stop, client_weights[start:stop]) for start, stop in spans]  # u_k in place
        gathered = [(block, matrix(client_weights).index_select(0, block)) for block in blocks]
        norm = self._accumulate(alpha, pieces, gathered, 0, reload=True, deferred=deferred)
        for block, _ in gathered:
            matrix(client_weights).index_copy_(0, block, matrix(self.weights).index_select(0, block))
        return norm

    @torch.no_grad()
    def submit(self, client_weights: torch.Tensor, num_examples: int, rows: torch.Tensor | None = None,
               deferred: Deferred | None = None) -> Future:
        """:meth:`add`, as a future of ``||u_k||``. On a CPU with a free core the sums are formed on a
        worker thread while the next client trains: this thread copies what the client changed (by
        rows: the vector around the matrix and its rows, 2-2.7 ms of work per tiny-bert client moved
        off this thread; densely: the whole vector, 10-13 ms moved) and reloads the global weights
        there; the worker runs :meth:`_accumulate` on the copy, the same operations in the same
        order as :meth:`add`, so the same bits (tests/test_row_support.py). One client is summed at
        a time, so one copy of each size is kept. :meth:`drain` waits for the sums."""
        worker = self._background()
        if worker is None or self._measuring():
            return done(self.add(client_weights, num_examples, rows, deferred))
        self.drain()  # the previous client is summed (it had the whole of this client's training)
        alpha, spans, blocks = self._enter(num_examples, rows)
        size = sum(b - a for a, b in spans)
        copy = self._copies.pop(size, None)
        copy = torch.empty(size) if copy is None else copy
        pieces, offset = [], 0
        for start, stop in spans:
            pieces.append((start, stop, copy[offset:offset + stop - start].copy_(client_weights[start:stop])))
            client_weights[start:stop].copy_(self.weights[start:stop])
            offset += stop - start
        gathered = []
        for block in blocks:
            matrix = self.embedding.matrix
            gathered.append((block, matrix(client_weights).index_select(0, block)))
            matrix(client_weights).index_copy_(0, block, matrix(self.weights).index_select(0, block))

        def job() -> float:
            with torch.no_grad():
                norm = self._accumulate(alpha, pieces, gathered, 1, reload=False, deferred=deferred)
            self._copies[size] = copy
            return norm

        future = worker.submit(job)
        self._pending.append(future)
        return future

    def drain(self) -> None:
        """Wait for the clients :meth:`submit` handed to the worker (and raise their errors)."""
        while self._pending:
            self._pending.popleft().result()

    def _enter(self, num_examples: int, rows: torch.Tensor | None) -> tuple[float, list, tuple]:
        """An add's bookkeeping; returns its weight ``alpha``, the spans it reads whole and the
        blocks of rows it reads (none: a dense add)."""
        alpha = num_examples / self.total
        self._added += 1
        by_rows = rows is not None and self.embedding is not None and not self._measuring()
        if by_rows:
            self._touched[rows] = True
        else:
            self._sparse_round = False
        spans = self.embedding.outside(self.chunk) if by_rows else list(self._spans())
        return alpha, spans, (self.embedding.blocks(rows, self.chunk) if by_rows else ())

    def _accumulate(self, alpha: float, pieces: list, gathered: list, lane: int, reload: bool,
                    deferred: Deferred | None = None) -> float:
        """The sums of one add. ``pieces``: ``(start, stop, x)``, ``x`` the client's values of
        ``[start, stop)``; ``gathered``: ``(block, x)``, ``x`` the client's rows ``block``; every
        ``x`` becomes ``u_k`` (fp32). ``reload``: the pieces are views of the client's vector,
        which gets the global weights back (chunk by chunk: each ``u_k`` read once, while in cache).
        ``lane``: the scratch buffers (0 on the training thread, 1 on the worker). ``deferred``: see :meth:`add`."""
        measuring = self._measuring()
        squares = 0.0
        for index, (start, stop, x) in enumerate(pieces):
            square, u = self._update_piece(x, self.weights[start:stop], alpha, index if measuring else None, lane)
            squares += square
            self.accum[start:stop].add_(u, alpha=alpha)
        matrix = self.embedding.matrix if gathered else None
        for block, x in gathered:
            w = matrix(self.weights).index_select(0, block)
            square, u = self._update_piece(x.view(-1), w.view(-1), alpha, None, lane)
            squares += square
            matrix(self.accum).index_add_(0, block, u.view(x.shape), alpha=alpha)  # as add_ adds (add_stub)
        if deferred is not None:
            squares += deferred.square
            if measuring:
                self.layers.add_square(deferred.offset, alpha * deferred.square)
        norm = math.sqrt(squares)
        # ||u_k|| is known only now: a second pass, over the fp32 u_k
        scale = alpha / norm if norm > 0 else 0.0
        if deferred is not None:
            deferred.apply(self.accum, self.direction, alpha, scale)
        for start, stop, u in pieces:
            if scale:
                self.direction[start:stop].add_(u, alpha=scale)
            if reload:
                u.copy_(self.weights[start:stop])
        for block, u in gathered:
            if scale:
                matrix(self.direction).index_add_(0, block, u, alpha=scale)
        return norm

    def _update_piece(self, x: torch.Tensor, w: torch.Tensor, alpha: float,
                      layer_index: int | None, lane: int = 0) -> tuple[float, torch.Tensor]:
        """One piece of :meth:`add`: ``u_k = x - w`` exact in fp64, and ``x -> u_k`` in place (fp32);
        returns ``||u_k||^2`` over the piece and ``u_k`` (fp64, in scratch: to be added before the
        next piece). ``layer_index``: the chunk's index, fed to the layer groups."""
        u = self._f64(x, 0, lane).sub_(self._f64(w, 1, lane))
        squares = float(torch.dot(u, u))
        if layer_index is not None:
            self.layers.add_client(layer_index, u, alpha)
        x.sub_(w)
        return squares, u

    def add_term(self, term: Callable[[torch.Tensor, torch.Tensor], bool]) -> None:
        """Let ``term(accum, direction)`` add to the round's sums a part of the clients' updates
        that no add carried (:meth:`fedsweep.scaffold_rows.DeferredRows.finish`), after every add;
        where it says it added rows no client indexed, the server step reads every row."""
        self.drain()
        if term(self.accum, self.direction):
            self._sparse_round = False

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
        pieces = list(self._pieces())

        def piece(index: int, lane: int) -> tuple[float, float, float]:  # each piece read while in cache
            get, put = pieces[index]
            square, dot, u = self._update_sums(get, index)
            x = get(self.weights)
            average = self._f64(x, 0, lane).add_(u)  # x + u: at K=1 exactly x_1
            step = get(scratch) if put is None else torch.empty_like(x)
            step.copy_(average).sub_(x)  # x_new - x = -delta, fp32 as _ServerStep has delta
            step_sq = dot64(step, step, self.chunk)  # dot64's chunks are these: the same sum
            x.copy_(average)
            if put is not None:
                put(self.weights, x)
            return square, dot, step_sq

        average_sq = direction_dot = update_sq = 0.0
        for square, dot, step_sq in split_map(piece, len(pieces), self._lanes()):  # summed in piece order
            average_sq, direction_dot, update_sq = average_sq + square, direction_dot + dot, update_sq + step_sq
        update_norm = math.sqrt(update_sq)
        return ServerStats(update_norm, update_norm, average_sq, direction_dot)

    def _all_reduce(self) -> None:
        """Join the ranks' sums (the average's and the direction's) before a server step, once every
        submitted add is in them."""
        self.drain()
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
