"""SCAFFOLD's per-client control variates: :class:`ControlVariateStore`.

One fp32 vector per client (the model's size, or shorter: the rows of
:class:`fedsweep.scaffold_rows.CompactVectors`), in a file per (client, round) in the run folder, the
latest also in host memory up to ``memory_mib`` (least recently used dropped first; beyond it
they are read back from their files: memory flat in the number of clients). Files are written
by a background thread (at most ``MAX_PENDING_WRITES`` in flight); :meth:`~ControlVariateStore.flush`
waits for them, and a checkpoint names only files that are on disk. :mod:`fedsweep.scaffold`
uses it.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .background import single_thread_pool
from .io import atomic_path


DEFAULT_MEMORY_MIB = 256  # host memory for control variates kept beside their files (the LRU cache)
MAX_PENDING_WRITES = 4  # background file writes in flight; a fifth waits for the oldest


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
    round and its checkpoint, the previous files of that round's clients).

    Host memory: the files are written by a background thread (``background``; at most
    :data:`MAX_PENDING_WRITES` in flight, their buffers held until written), and :meth:`flush`
    waits for them: the client update calls it before a checkpoint naming the files is saved, so a
    kill at any point leaves the files a checkpoint names on disk. The variates written are also
    kept in host memory, least recently used dropped first, up to ``memory_mib`` MiB (at most
    ``memory_mib / (4 x parameters)`` clients, whatever the number of clients; 0: none), and are
    read from there; a variate not held is read from its file. Held values are the files' bits.
    """

    NAME = re.compile(r"^c(\d+)\.r(\d+)\.f32$")

    def __init__(self, folder: str | os.PathLike, num_clients: int, writer: bool = True,
                 memory_mib: float = DEFAULT_MEMORY_MIB, background: bool = True):
        self.folder = Path(folder)
        self.writer = writer  # the rank that deletes files (every rank writes its own clients')
        self.versions = np.zeros(num_clients, dtype=np.int64)
        self.superseded: list[tuple[int, int]] = []  # (client, round) files to delete after the next save
        self.budget = max(0, int(memory_mib * 2 ** 20))
        self._held: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()  # (client, round) -> host fp32
        self._held_bytes = 0
        self._pending: dict[tuple[int, int], tuple[torch.Tensor, object]] = {}  # written in the background
        self._writes: deque[Future] = deque()
        self._lock = threading.Lock()
        self._io = single_thread_pool("fedsweep-cv-write") if background else None

    def path(self, client: int, round_: int) -> Path:
        return self.folder / f"c{client}.r{round_}.f32"

    def held_bytes(self) -> int:
        return self._held_bytes

    def get(self, client: int, version: int | None = None) -> torch.Tensor | None:
        """``c_i`` of ``client`` (the current one, or that of round ``version``) as a host fp32 vector
        that the caller must not modify; None: never trained (``c_i = 0``)."""
        version = int(self.versions[client]) if version is None else version
        if version == 0:
            return None
        key = (client, version)
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                return pending[0]
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                return held
        return self._read_file(key)

    def _read_file(self, key: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
        """The file's vector, into ``out`` (which it must fill) or a new host vector of its length
        (a vector of SCAFFOLD's rows, :class:`fedsweep.scaffold_rows.CompactVectors`, is shorter
        than the model)."""
        path = self.path(*key)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if out is None:
                out = torch.empty(size // 4, dtype=torch.float32)
            read = f.readinto(memoryview(out.numpy()).cast("B"))
        if read != out.numel() * 4 or size != read:
            raise RuntimeError(f"{path}: {size} bytes, expected {out.numel() * 4}")
        return out

    def read(self, client: int, out: torch.Tensor, version: int | None = None) -> None:
        """``c_i`` of ``client`` into ``out`` (a device vector of its length): the current one, or that of
        round ``version``."""
        value = self.get(client, version)
        if value is None:
            out.zero_()
        else:
            out.copy_(value)

    def write(self, client: int, round_: int, value: torch.Tensor) -> None:
        """The new ``c_i`` of ``client`` after round ``round_`` (current once the round commits)."""
        self.put(client, round_, value, owned=False)

    def put(self, client: int, round_: int, value: torch.Tensor, owned: bool = False) -> None:
        """:meth:`write`; ``owned``: ``value`` (a host vector) is handed over, not copied: the caller
        neither modifies nor reuses it."""
        if owned and value.device.type == "cpu" and value.is_contiguous():
            host = value
        else:
            host = torch.empty(value.numel(), dtype=torch.float32)
            host.copy_(value)
        key = (client, round_)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._io is None:
            self._write_file(key, host)
        else:
            while len(self._writes) >= MAX_PENDING_WRITES:
                self._writes.popleft().result()
            token = object()
            with self._lock:
                self._pending[key] = (host, token)
            self._writes.append(self._io.submit(self._write_file, key, host, token))
        if self.budget >= host.numel() * 4:
            with self._lock:
                self._drop(key)
                self._held[key] = host
                self._held_bytes += host.numel() * 4
                while self._held_bytes > self.budget:
                    self._drop(next(iter(self._held)))

    def _drop(self, key: tuple[int, int]) -> None:
        """Stop holding ``key``'s variate (the lock held)."""
        dropped = self._held.pop(key, None)
        if dropped is not None:
            self._held_bytes -= dropped.numel() * 4

    def _write_file(self, key: tuple[int, int], host: torch.Tensor, token: object = None) -> None:
        try:
            with atomic_path(self.path(*key)) as tmp:
                with open(tmp, "wb") as f:
                    f.write(memoryview(host.numpy()).cast("B"))
        finally:
            if token is not None:
                with self._lock:
                    if key in self._pending and self._pending[key][1] is token:
                        del self._pending[key]

    def flush(self) -> None:
        """Wait until every file written so far is on disk (an error of a background write is raised here)."""
        while self._writes:
            self._writes.popleft().result()

    def commit_round(self, clients: Sequence[int], round_: int) -> None:
        """Every client in ``clients`` (all ranks) has its file for ``round_``: make them current."""
        for client in clients:
            old = int(self.versions[client])
            if old not in (0, round_):
                self.superseded.append((client, old))
                with self._lock:
                    self._drop((client, old))
            self.versions[client] = round_

    def forget(self) -> None:
        """Drop the variates held in memory (the versions were replaced: read them from the files)."""
        self.flush()
        with self._lock:
            self._held.clear()
            self._held_bytes = 0

    def close(self) -> None:
        self.flush()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

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
        self.flush()
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
        self.flush()
        return [self.path(k, int(v)) for k, v in enumerate(self.versions) if v > 0 and not self.path(k, int(v)).exists()]

    def disk_bytes(self) -> int:
        self.flush()
        return sum(self.path(k, int(v)).stat().st_size for k, v in enumerate(self.versions) if v > 0)
