"""SCAFFOLD (Karimireddy et al. 2020): the client update that keeps control variates.

:class:`Scaffold` keeps the server control variate ``c`` (one model-sized fp32 vector on the
device) and one control variate ``c_i`` per client, on disk (:class:`ControlVariateStore`; the
latest ones also in host memory up to ``DEFAULT_MEMORY_MIB``, files written by a background
thread), updated with the paper's option II. Its local optimiser
(:class:`fedsweep.client_update.LocalOptimizer`) adds ``c - c_i`` to every step's gradient: on the
input-embedding rows a client indexes and the rest of the model, where the model and strategy
allow it (:meth:`Scaffold.use_rows`), the server applying it on the client's other rows in closed
form (:mod:`fedsweep.scaffold_rows`). A run gets it by name from ``CLIENT_UPDATES``
(:mod:`fedsweep.clients`).
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import FedsweepError
from .client_update import ClientSettings, ClientUpdate, LocalOptimizer
from .background import free_core, shared_worker
from .scaffold_rows import CompactVectors, Deferred, DeferredRows, RowSum
from .scaffold_store import DEFAULT_MEMORY_MIB, ControlVariateStore


class Scaffold(ClientUpdate):
    """SCAFFOLD (Karimireddy et al. 2020), option II, with the server's own step left to the strategy.

    Client ``i`` steps with ``g - c_i + c`` and then sets ``c_i+ = c_i - c + (x - y_i) / (steps lr)``
    (``x``: the global weights of the round, ``y_i``: the client's model, ``steps``: its number of
    local steps). The server sets ``c <- c + sum_{i in S} w_i (c_i+ - c_i)`` and the strategy moves
    the model with the average ``sum_{i in S} a_i y_i`` (``fedavg``: the paper's global step with
    lr 1). ``scaffold_weighting`` chooses the weights:

    - ``size`` (the default): ``w_i = n_i / N``, N the examples of ALL clients, so that ``c`` stays
      the size-weighted mean of every client's ``c_i``, and ``a_i = n_i / N_S`` (FedAvg's average,
      as every other algorithm here weighs its clients); with equal shards, the paper's i.i.d.
      setting, both are the paper's;
    - ``uniform``: ``w_i = 1 / K`` and ``a_i = 1 / |S|``, the paper's formulas (Karimireddy et al.
      2020, Algorithm 1: ``c <- c + 1/N sum dc_i``, ``x <- x + 1/|S| sum dy_i``) whatever the shards.

    Local steps must be plain SGD (``client_optimizer=sgd``).

    The update of ``c`` is summed in float64 in the order of the client indices. One process trains
    its clients in that order and adds each as it finishes; with several ranks (``world > 1``)
    every rank sums after the round from the clients' files (the new ``c_i+`` and the ``c_i`` it
    replaces; both are on disk until the next checkpoint), in the same order with the same
    operations: every rank, and a single process, computes the same ``c`` to the bit, whichever
    ranks trained which clients. (Summed as each rank's clients finish, the order would follow the
    ranks, and ``c`` is a difference of such sums: its last bits would show.) At K=1, ``c = c_1``
    to the bit after every round, so the correction ``c - c_1`` is exactly 0: SGD.

    Rows (:meth:`use_rows`, which a :class:`~fedsweep.rounds.Federation` calls where the strategy adds
    clients by their input-embedding rows): a client's correction covers the rows its shard's
    tokens index and the rest of the vector, and its ``c_i+`` is stored as those rows
    (:class:`~fedsweep.scaffold_rows.CompactVectors`: ~2.4 MB instead of 17.5 MB for tiny-bert in a
    cross-device sweep); the other rows' correction, ``-S_i eta (c - c_i)``, is added to the
    average in closed form by :class:`~fedsweep.scaffold_rows.DeferredRows`. The same algorithm, to
    float rounding (tests/test_scaffold_rows.py); a client that indexes over half the vocabulary is
    corrected and stored densely.

    Device memory: ``c``, a correction buffer ``c - c_i`` (G of them for a group), two fp32
    scratch vectors and one fp64 accumulator: 6 x 4 bytes x parameters, flat in K. Per client and
    round: one file read and one written (several ranks: 2 more reads per client of the round,
    on every rank, after it; page cache: the files were just written).

    One process on the CPU with a core its training threads leave free (``background``, the
    default; :func:`fedsweep.background.free_core`) moves the per-client work off the training
    thread, onto the process's background thread (:func:`fedsweep.background.shared_worker`, which
    the server's adds share) that runs the same torch ops in the same order
    (clients in the order they finish, one at a time): while a client trains, it reads the next
    client's ``c_i`` (from the store's memory or its file) and computes its ``c - c_i``; after a
    client, the training thread only computes ``x - y_i`` (``y_i`` is overwritten by the next
    client) and the background thread computes ``c_i+``, hands it to the store (whose own thread
    writes the file) and adds it to the fp64 sum. :meth:`finish_round` waits for it, and
    :meth:`state_dict` for the files: the numbers, and the files a checkpoint names, are those of
    the sequential code. Memory: 3-4 more model-sized fp32 vectors (host) than above, plus the
    store's ``memory_mib``.
    """

    name = "scaffold"

    def __init__(self, settings: ClientSettings, global_weights: torch.Tensor, store: ControlVariateStore,
                 world: int = 1, background: bool = True):
        super().__init__(settings, global_weights)
        self.store = store
        self.world = world  # processes sharing the clients of a round
        device, size = global_weights.device, global_weights.numel()
        self.c = torch.zeros(size, device=device)
        self.accum = torch.zeros(size, dtype=torch.float64, device=device)
        self.old = torch.empty(size, device=device)
        self.sizes: list[int] = []
        self.q = torch.empty(size, device=device)
        self._corrections: dict[int, torch.Tensor] = {}
        self.chunk = min(1 << 17 if device.type == "cpu" else 1 << 22, size)
        self._cast = torch.empty(self.chunk, dtype=torch.float64, device=device)
        self.total = 0  # the sum of every client's average_weight: c's update divides by it
        self.clients: list[int] = []
        self.uniform = settings.scaffold_weighting == "uniform"
        # the pipeline (one process on the CPU, with a core its training threads leave free): a
        # background thread for the per-client work, the one the server's adds use too
        # (fedsweep.background.shared_worker). Without a free core it would compete with the
        # training threads for theirs (measured: slower than inline on a loaded machine).
        self.pipelined = background and world == 1 and device.type == "cpu" and free_core()
        self._worker = shared_worker() if self.pipelined else None
        self._jobs: deque[Future] = deque()
        self._spare: list[torch.Tensor] = []  # free model-sized fp32 vectors
        self._next: tuple[int, torch.Tensor, Future] | None = None  # (client, its c - c_i buffer, c_i's future)
        self._training: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # client -> (c - c_i, c_i)
        # the rows a client does not index, corrected by the server (fedsweep.scaffold_rows; use_rows)
        self.deferred: DeferredRows | None = None
        self.row_sum: RowSum | None = None  # c's fp64 sum by rows (with deferred)
        self.strategy = None
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # recycled buffers' views (rows mode)

    @property
    def row_sparse(self) -> bool:
        """With :meth:`use_rows`: the correction moves only the rows a client indexes."""
        return self.deferred is not None

    def use_rows(self, embedding, rows_of, strategy) -> bool:
        fits = embedding is not None and CompactVectors.fits(embedding)
        self.deferred = DeferredRows(embedding, self.c, rows_of) if fits else None
        self.row_sum = RowSum(embedding, self.c, self.accum) if fits else None
        self.strategy = strategy
        return self.deferred is not None

    @classmethod
    def build(cls, settings: ClientSettings, global_weights: torch.Tensor, *, out_dir: Path, num_clients: int,
              device: torch.device, world: int, writer: bool) -> "Scaffold":
        """With its control variates in ``out_dir/scaffold``, beside the checkpoint that names their versions.
        Several ranks write synchronously: every rank reads the round's files after it."""
        memory_mib = getattr(settings, "scaffold_memory_mib", DEFAULT_MEMORY_MIB)
        store = ControlVariateStore(Path(out_dir) / "scaffold", num_clients, writer=writer, memory_mib=memory_mib,
                                    background=world == 1)
        return cls(settings, global_weights, store, world=world)

    def prepare(self, checkpoint: Path, log: Callable[[str], None]) -> None:
        missing = self.store.missing()
        if missing:
            raise FedsweepError(
                f"checkpoint {str(checkpoint)!r} needs {len(missing)} control-variate file(s) that are missing, "
                f"e.g. {str(missing[0])!r}; delete the checkpoint to start over")
        # Files of a killed round, superseded ones, a stale run's: before any rank trains (the
        # caller's collective after its data set-up keeps the other ranks waiting).
        removed = self.store.reconcile()
        if removed:
            log(f"removed {len(removed)} control-variate file(s) the checkpoint does not use")

    def summary(self) -> dict[str, Any]:
        store = self.store
        return {"control_variates": {"folder": str(store.folder), "clients_stored": int((store.versions > 0).sum()),
                                     "bytes": store.disk_bytes(), "memory_budget_bytes": store.budget,
                                     # fedsweep.scaffold_rows: the rows a client does not index, by the server
                                     "rows_corrected_by_server": self.deferred is not None}}

    def begin_round(self, round_: int, lr: float, clients: Sequence[int], sizes: Sequence[int]) -> None:
        self._drain()
        super().begin_round(round_, lr, clients, sizes)
        self.clients = sorted(clients)
        self.sizes = list(sizes)
        self.total = sum(self.average_weight(n) for n in sizes)
        if self.deferred is not None:
            self.row_sum.begin()
            self.deferred.begin_round()
        else:
            self.accum.copy_(self.c)
        if self.pipelined and self.clients:
            self._prefetch(self.clients[0])

    # --- one client's vectors (on the background thread where there is one) ----------------------

    def _vector(self) -> torch.Tensor:
        return self._spare.pop() if self._spare else torch.empty_like(self.c)

    def _get(self, client: int, version: int | None = None) -> torch.Tensor | None:
        """``c_i`` of ``client`` as stored (dense or packed; None: 0), on the device."""
        value = self.store.get(client, version)
        return value if value is None or value.device == self.c.device else value.to(self.c.device)

    def _rows(self, client: int) -> torch.Tensor | None:
        """The rows ``client``'s correction covers (fedsweep.scaffold_rows), None: every row."""
        return self.deferred.rows(client) if self.deferred is not None else None

    def _is_dense(self, value: torch.Tensor | None) -> bool:
        """Whether a variate is of the model's size (not packed by rows; None, for 0, is not)."""
        return value is not None and value.numel() == self.c.numel()

    def _dense(self, value: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """A stored ``c_i`` (None: 0) as a dense vector in ``out``."""
        if self.deferred is not None:
            return self.deferred.compact.dense(value, out)
        return out.zero_() if value is None else out.copy_(value)

    def _correction(self, client: int, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``c - c_i`` of ``client`` into ``out``; returns (``c_i`` as stored, the values of its rows:
        then ``out`` holds the correction around the matrix and on those rows only)."""
        old = self._get(client)
        rows = self._rows(client)
        if rows is not None:
            return old, self.deferred.compact.correction(self.c, old, rows, out)
        if old is None:  # c - 0 = c, to the bit
            out.copy_(self.c)
        else:
            torch.sub(self.c, old, out=out)
        return old, None

    def _prefetch(self, client: int) -> None:
        """On the background thread: ``c_i`` of ``client`` and ``c - c_i`` into a free vector."""
        out = self._vector()
        self._next = (client, out, self._worker.submit(self._correction, client, out))

    def _take(self, client: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(``c - c_i``, ``c_i``, its rows' values) of ``client``: prefetched, or computed here."""
        nxt, self._next = self._next, None
        if nxt is not None:
            if nxt[0] == client:
                return (nxt[1], *nxt[2].result())
            nxt[2].result()  # a wrong guess (client groups): its vector is free again
            self._spare.append(nxt[1])
        out = self._vector()
        return (out, *self._correction(client, out))

    def _run(self, job: Callable[..., None], *args) -> None:
        """``job(*args)`` on the background thread (at most two queued), or here."""
        if not self.pipelined:
            job(*args)
            return
        while len(self._jobs) >= 2:  # bounded: the training thread is rarely this far ahead
            self._jobs.popleft().result()
        self._jobs.append(self._worker.submit(job, *args))

    def _drain(self) -> None:
        """Wait for the background work (and raise its errors)."""
        if self._next is not None:
            client, out, future = self._next
            self._next = None
            future.result()
            self._spare.append(out)
        while self._jobs:
            self._jobs.popleft().result()

    def _finish_client(self, client: int, q: torch.Tensor, correction: torch.Tensor, old: torch.Tensor | None,
                       steps_lr: float, owned: bool) -> None:
        """``c_i+ = q / (S eta) - (c - c_i)`` from ``q = x - y_i`` (packed where the client has rows;
        else into ``correction``), to the store and (one process) c's sum."""
        if not self._is_dense(q):  # packed: c_i+ in place of q
            new = self.deferred.compact.new_variate(q, correction, steps_lr)
            self.store.put(client, self.round, new, owned=True)
            if owned:
                self._spare.append(correction)
        else:
            q.div_(steps_lr)
            torch.sub(q, correction, out=correction)  # c_i+ = q - (c - c_i), rounded to fp32 as it is stored
            new = correction
            self.store.put(client, self.round, new, owned=owned)
            self._spare.append(q)
        if self.world == 1:  # clients come in ascending order: sum as they finish
            self._add(client, new, old)

    def average_weight(self, num_examples: int) -> int:
        return 1 if self.uniform else num_examples

    @torch.no_grad()
    def optimizer(self, params, weights, views, clients, rows=None):
        if weights.dim() == 1:  # one client
            client = clients[0]
            correction, old, values = self._take(client)
            self._training[client] = (correction, old)
            later = [k for k in self.clients if k > client]
            if self.pipelined and later:
                self._prefetch(later[0])
            if values is not None:  # the embedding's gradient is corrected on the client's rows only
                # rows: (the embedding's parameter index, the client's rows) from the round loop,
                # which offers them whenever this update takes rows (use_rows)
                rows = (rows[0], self._rows(client))
                views = self._recycled_views(views)
            return LocalOptimizer(params, weights, views, lr=self.lr, settings=self.settings, correction=correction,
                                  rows=rows, row_correction=values)
        self._drain()  # a group's buffer is reused: the background thread must be done with it
        g = len(clients)
        if g not in self._corrections:
            self._corrections[g] = torch.empty(g, self.c.numel(), device=self.c.device)
        correction = self._corrections[g]
        for row, client in zip(correction, clients):
            torch.sub(self.c, self._dense(self._get(client), row), out=row)  # c - c_i
            if self.deferred is not None:
                self.deferred.restrict(row, client)
        return LocalOptimizer(params, weights, views, lr=self.lr, settings=self.settings, correction=correction)

    @torch.no_grad()
    def after_client(self, local, row, client, weights, num_examples) -> Deferred | None:
        """``c_i+`` of ``client`` (to the store and c's sum); returns what the server corrects."""
        if client in self._training:
            correction, old = self._training.pop(client)
            owned = True
        else:  # a row of a group: c_i again (the version before this round)
            correction, old, owned = local.correction[row], self._get(client), False
        deferred = self._deferred(client, old, local.steps)
        rows = self._rows(client)
        # q = x - y_i now (the next client overwrites y_i), / (steps lr) in _finish_client
        if rows is not None:
            q = self.deferred.compact.difference(self.global_weights, weights, rows)
        else:
            q = torch.sub(self.global_weights, weights, out=self._vector())
        self._run(self._finish_client, client, q, correction, old, local.steps * self.lr, owned)
        return deferred

    def _recycled_views(self, views: Callable[[torch.Tensor], list]) -> Callable[[torch.Tensor], list]:
        """``views``, remembered for the few correction buffers that rows mode recycles (a model's
        ~100 views cost ~0.7 ms per client to make)."""
        def cached(vector: torch.Tensor) -> list:
            key = (vector.data_ptr(), vector.numel())
            if key not in self._views:
                if len(self._views) >= 4:  # the spare pool holds 2-3: an unexpected one replaces the oldest
                    self._views.pop(next(iter(self._views)))
                self._views[key] = views(vector)
            return self._views[key]
        return cached

    def _deferred(self, client: int, old: torch.Tensor | None, steps: int) -> Deferred | None:
        return self.deferred.client(client, old, steps * self.lr) if self.deferred is not None else None

    def _add(self, client: int, new: torch.Tensor, old: torch.Tensor | None) -> None:
        """accum += w_i (c_i+ - c_i), in float64 (``old`` None: c_i = 0; x - 0 = x): packed vectors
        on their rows, dense ones chunk by chunk."""
        alpha = self.average_weight(self.sizes[client]) / self.total
        if not self._is_dense(new) and not self._is_dense(old):
            for variate in (new, old):
                if variate is not None:
                    self.row_sum.open(self.deferred.compact.parts(variate)[0])
            self.deferred.compact.add64(self.accum, new, old, alpha, self._cast)
            return
        if self.deferred is not None:
            self.row_sum.whole()
        new = new if self._is_dense(new) else self._dense(new, self.q)
        old = old if old is None or self._is_dense(old) else self._dense(old, self.old)
        size = self.c.numel()
        for start in range(0, size, self.chunk):
            stop = min(start + self.chunk, size)
            cast = self._cast[:stop - start].copy_(new[start:stop])
            if old is not None:
                cast.sub_(old[start:stop])
            self.accum[start:stop].add_(cast, alpha=alpha)

    @torch.no_grad()
    def finish_round(self) -> dict[str, float]:
        """``c <- c + sum_i w_i (c_i+ - c_i)`` over the round's clients, in client order."""
        self._drain()
        if self.deferred is not None:  # with the round's c, before it changes
            self.strategy.add_term(lambda accum, direction: self.deferred.finish(accum, direction, self._worker))
        if self.world > 1:
            if self.deferred is not None:
                self.row_sum.begin()
            else:
                self.accum.copy_(self.c)
            for client in self.clients:  # ascending: the order of one process
                # this round's c_i+ and the version before it (never trained: None, 0)
                self._add(client, self._get(client, version=self.round), self._get(client))
        if self.deferred is not None:
            changed = self.row_sum.end()
        else:
            self.c.copy_(self.accum)
        self.store.commit_round(self.clients, self.round)
        if self.deferred is not None:  # ||c||^2 by rows: the next round's row norms (where c changed), and the rest
            return {"control_variate_norm": math.sqrt(self.deferred.measure(changed))}
        return {"control_variate_norm": float(torch.linalg.vector_norm(self.c))}

    def state_dict(self) -> dict:
        self._drain()
        self.store.flush()  # the files this state names are on disk before it is saved
        return {"c": self.c, "versions": torch.from_numpy(self.store.versions.copy())}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint's state is on the CPU: copy_ moves c to the device; versions stay a host array
        if set(state) != {"c", "versions"} or state["c"].shape != self.c.shape \
                or state["versions"].shape != self.store.versions.shape:
            raise ValueError("SCAFFOLD state does not match this model and number of clients")
        self._drain()
        self.store.forget()
        self.c.copy_(state["c"])
        if self.deferred is not None:
            self.deferred.stale()
        self.store.versions[:] = state["versions"].numpy()

    def commit(self, saved: bool) -> None:
        if saved:
            self.store.delete_superseded()

    def close(self, keep: bool) -> None:
        self._drain()
        self.store.close()
        self._worker, self.pipelined = None, False  # the shared worker stays for others
        if not keep and self.store.writer and self.store.folder.is_dir():
            for entry in self.store.folder.iterdir():
                if self.store.NAME.match(entry.name) or entry.name.endswith(".tmp"):
                    entry.unlink(missing_ok=True)
            try:
                self.store.folder.rmdir()
            except OSError:
                pass
