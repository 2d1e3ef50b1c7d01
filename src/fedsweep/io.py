"""Atomic file output: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux reports it in /proc/self/status. Elsewhere the only API is ``os.umask``, which sets
    it while reading it: set a restrictive 0o077 and put the old value back at once. That is
    not atomic: a file another thread creates between the two calls would get the restrictive
    mode (never a looser one). fedsweep writes its files from one thread.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The rename is atomic on POSIX file systems, so a crash (or SIGKILL) leaves either the old
    file or the new one, never a truncated file that looks complete. The file gets the mode a
    plain ``open(path, "w")`` would give it (0666 less the umask; ``mkstemp`` makes 0600 files).
    A process killed inside the block leaves its temporary ``.{name}.XXXXXXXX.tmp`` behind:
    :func:`remove_stale_temps` clears those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# mkstemp's names: the prefix, 8 characters from [a-z0-9_], the suffix.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_path` left in ``folder``; return them.

    Only files named ``.{name}.XXXXXXXX.tmp`` directly in ``folder`` (not below it), and, when
    ``names`` is given, only those of these final names. Call it where no other process is
    writing into ``folder`` (a run folder, at the start of its run): a live writer's temporary
    file looks the same.
    """
    folder = Path(folder)
    wanted = None if names is None else set(names)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or (wanted is not None and m.group("name") not in wanted):
            continue
        if entry.is_symlink() or not entry.is_file():
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return sorted(removed)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, compression="zstd")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
