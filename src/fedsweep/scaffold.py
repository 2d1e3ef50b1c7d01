"""SCAFFOLD (Karimireddy et al. 2020): the client update that keeps control variates.

:class:`Scaffold` keeps the server control variate ``c`` (one model-sized fp32 vector on the
device) and one control variate ``c_i`` per client, on disk (:class:`ControlVariateStore`),
updated with the paper's option II. Its local optimiser
(:class:`fedsweep.client_update.LocalOptimizer`) adds ``c - c_i`` to every step's gradient. A run
gets it by name from ``CLIENT_UPDATES`` (:mod:`fedsweep.clients`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import FedsweepError
from .client_update import ClientSettings, ClientUpdate, LocalOptimizer
from .io import atomic_path


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
        self.total = 0  # the sum of every client's average_weight: c's update divides by it
        self.clients: list[int] = []
        self.uniform = settings.scaffold_weighting == "uniform"

    @classmethod
    def build(cls, settings: ClientSettings, global_weights: torch.Tensor, *, out_dir: Path, num_clients: int,
              device: torch.device, world: int, writer: bool) -> "Scaffold":
        """With its control variates in ``out_dir/scaffold``, beside the checkpoint that names their versions."""
        store = ControlVariateStore(Path(out_dir) / "scaffold", num_clients, global_weights.numel(), device,
                                    writer=writer)
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
                                     "bytes": store.disk_bytes()}}

    def begin_round(self, round_: int, lr: float, clients: Sequence[int], sizes: Sequence[int]) -> None:
        super().begin_round(round_, lr, clients, sizes)
        self.clients = sorted(clients)
        self.sizes = list(sizes)
        self.total = sum(self.average_weight(n) for n in sizes)
        self.accum.copy_(self.c)
        self.old_client = -1

    def average_weight(self, num_examples: int) -> int:
        return 1 if self.uniform else num_examples

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
        """accum += w_i (c_i+ - c_i), chunk by chunk in float64."""
        alpha = self.average_weight(self.sizes[client]) / self.total
        for start in range(0, self.c.numel(), self.chunk):
            stop = min(start + self.chunk, self.c.numel())
            cast = self._cast[:stop - start]
            self.accum[start:stop].add_(cast.copy_(new[start:stop]).sub_(old[start:stop]), alpha=alpha)

    @torch.no_grad()
    def finish_round(self) -> dict[str, float]:
        """``c <- c + sum_i w_i (c_i+ - c_i)`` over the round's clients, in client order."""
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
        # a checkpoint's state is on the CPU: copy_ moves c to the device; versions stay a host array
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
