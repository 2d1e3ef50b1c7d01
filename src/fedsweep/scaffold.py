"""SCAFFOLD (Karimireddy et al. 2020): the client update that keeps control variates.

:class:`Scaffold` keeps the server control variate ``c`` (one model-sized fp32 vector on the
device) and one control variate ``c_i`` per client, on disk (:class:`ControlVariateStore`; the
latest ones also in host memory up to ``DEFAULT_MEMORY_MIB``, files written by a background
thread), updated with the paper's option II. Its local optimiser
(:class:`fedsweep.client_update.LocalOptimizer`) adds ``c - c_i`` to every step's gradient. A run
gets it by name from ``CLIENT_UPDATES`` (:mod:`fedsweep.clients`).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import FedsweepError
from .client_update import ClientSettings, ClientUpdate, LocalOptimizer
from .background import free_core, single_thread_pool
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

    Device memory: ``c``, a correction buffer ``c - c_i`` (G of them for a group), two fp32
    scratch vectors and one fp64 accumulator: 6 x 4 bytes x parameters, flat in K. Per client and
    round: one file read and one written (several ranks: 2 more reads per client of the round,
    on every rank, after it; page cache: the files were just written).

    One process on the CPU with a core its training threads leave free (``background``, the
    default; :func:`fedsweep.background.free_core`) moves the per-client work off the training thread, onto one background thread that runs the same torch ops in the same order
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
    row_sparse = False  # the correction c - c_i moves every row

    def __init__(self, settings: ClientSettings, global_weights: torch.Tensor, store: ControlVariateStore,
                 world: int = 1, background: bool = True):
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
        self.total = 0  # the sum of every client's average_weight: c's update divides by it
        self.clients: list[int] = []
        self.uniform = settings.scaffold_weighting == "uniform"
        # the pipeline (one process on the CPU, with a core its training threads leave free): a
        # background thread for the per-client work. Without a free core it would compete with
        # the training threads for theirs (measured: slower than inline on a loaded machine).
        self.pipelined = background and world == 1 and device.type == "cpu" and free_core()
        self._worker = single_thread_pool("fedsweep-scaffold") if self.pipelined else None
        self._jobs: deque[Future] = deque()
        self._spare: list[torch.Tensor] = []  # free model-sized fp32 vectors
        self._next: tuple[int, torch.Tensor, Future] | None = None  # (client, its c - c_i buffer, c_i's future)
        self._training: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # client -> (c - c_i, c_i)

    @classmethod
    def build(cls, settings: ClientSettings, global_weights: torch.Tensor, *, out_dir: Path, num_clients: int,
              device: torch.device, world: int, writer: bool) -> "Scaffold":
        """With its control variates in ``out_dir/scaffold``, beside the checkpoint that names their versions.
        Several ranks write synchronously: every rank reads the round's files after it."""
        memory_mib = getattr(settings, "scaffold_memory_mib", DEFAULT_MEMORY_MIB)
        store = ControlVariateStore(Path(out_dir) / "scaffold", num_clients, global_weights.numel(), device,
                                    writer=writer, memory_mib=memory_mib, background=world == 1)
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
                                     "bytes": store.disk_bytes(), "memory_budget_bytes": store.budget}}

    def begin_round(self, round_: int, lr: float, clients: Sequence[int], sizes: Sequence[int]) -> None:
        self._drain()
        super().begin_round(round_, lr, clients, sizes)
        self.clients = sorted(clients)
        self.sizes = list(sizes)
        self.total = sum(self.average_weight(n) for n in sizes)
        self.accum.copy_(self.c)
        self.old_client = -1
        if self.pipelined and self.clients:
            self._prefetch(self.clients[0])

    # --- the pipeline (one process on the CPU) ---------------------------------------------------

    def _vector(self) -> torch.Tensor:
        return self._spare.pop() if self._spare else torch.empty_like(self.c)

    def _prefetch(self, client: int) -> None:
        """On the background thread: ``c_i`` of ``client`` and ``c - c_i`` into a free vector."""
        out = self._vector()

        def job() -> torch.Tensor | None:
            old = self.store.get(client)
            if old is None:  # c - 0 = c, to the bit
                out.copy_(self.c)
            else:
                torch.sub(self.c, old, out=out)
            return old

        self._next = (client, out, self._worker.submit(job))

    def _take(self, client: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``c - c_i``, ``c_i``) of ``client``: prefetched, or computed here."""
        nxt, self._next = self._next, None
        if nxt is not None:
            if nxt[0] == client:
                return nxt[1], nxt[2].result()
            nxt[2].result()  # a wrong guess (client groups): its vector is free again
            self._spare.append(nxt[1])
        out = self._vector()
        old = self.store.get(client)
        if old is None:
            out.copy_(self.c)
        else:
            torch.sub(self.c, old, out=out)
        return out, old

    def _drain(self) -> None:
        """Wait for the background work (and raise its errors)."""
        if self._next is not None:
            client, out, future = self._next
            self._next = None
            future.result()
            self._spare.append(out)
        while self._jobs:
            self._jobs.popleft().result()

    def _finish_client(self, client: int, q: torch.Tensor, new: torch.Tensor, old: torch.Tensor | None,
                       steps_lr: float, owned: bool) -> None:
        """On the background thread: ``c_i+`` into ``new`` (holding ``c - c_i``), to the store and the sum."""
        q.div_(steps_lr)
        torch.sub(q, new, out=new)  # c_i+ = q - (c - c_i), rounded to fp32 as it is stored
        self.store.put(client, self.round, new, owned=owned)
        self._add(client, new, old)
        self._spare.append(q)

    def average_weight(self, num_examples: int) -> int:
        return 1 if self.uniform else num_examples

    @torch.no_grad()
    def optimizer(self, params, weights, views, clients):
        g = len(clients)
        if self.pipelined and g == 1 and weights.dim() == 1:
            client = clients[0]
            correction, old = self._take(client)
            self._training[client] = (correction, old)
            later = [k for k in self.clients if k > client]
            if later:
                self._prefetch(later[0])
            return LocalOptimizer(params, weights, views, lr=self.lr, settings=self.settings, correction=correction)
        self._drain()  # a group's buffer is reused: the background thread must be done with it
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
        if self.pipelined:
            q = self._vector()
            # q = x - y_i now (the next client overwrites y_i), / (steps lr) on the background thread
            torch.sub(self.global_weights, weights, out=q)
            if client in self._training:
                new, old = self._training.pop(client)
                owned = True
            else:  # a row of a group: c_i again (the version before this round)
                new, old, owned = local.correction[row], self.store.get(client), False
            while len(self._jobs) >= 2:  # bounded: the training thread is rarely this far ahead
                self._jobs.popleft().result()
            self._jobs.append(self._worker.submit(self._finish_client, client, q, new, old,
                                                  local.steps * self.lr, owned))
            return
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

    def _add(self, client: int, new: torch.Tensor, old: torch.Tensor | None) -> None:
        """accum += w_i (c_i+ - c_i), chunk by chunk in float64 (``old`` None: c_i = 0; x - 0 = x)."""
        alpha = self.average_weight(self.sizes[client]) / self.total
        for start in range(0, self.c.numel(), self.chunk):
            stop = min(start + self.chunk, self.c.numel())
            cast = self._cast[:stop - start].copy_(new[start:stop])
            if old is not None:
                cast.sub_(old[start:stop])
            self.accum[start:stop].add_(cast, alpha=alpha)

    @torch.no_grad()
    def finish_round(self) -> dict[str, float]:
        """``c <- c + sum_i w_i (c_i+ - c_i)`` over the round's clients, in client order."""
        self._drain()
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
        self.store.versions[:] = state["versions"].numpy()

    def commit(self, saved: bool) -> None:
        if saved:
            self.store.delete_superseded()

    def close(self, keep: bool) -> None:
        self._drain()
        self.store.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
            self.pipelined = False
        if not keep and self.store.writer and self.store.folder.is_dir():
            for entry in self.store.folder.iterdir():
                if self.store.NAME.match(entry.name) or entry.name.endswith(".tmp"):
                    entry.unlink(missing_ok=True)
            try:
                self.store.folder.rmdir()
            except OSError:
                pass
