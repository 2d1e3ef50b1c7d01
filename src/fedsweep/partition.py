"""Split a training set over K clients, written as one small table, not K copies of the data.

The table has one row per kept training example: ``client`` (0..K-1), ``row`` (index into the
training Parquet) and ``position`` (its place in the client's fixed order). Its Parquet metadata
holds the scheme, K, seed and shard sizes.

- ``iid`` (the paper's rule): a seeded random permutation of the N rows; client k takes the
  positions [k*n, (k+1)*n) with n = floor(N/K). The N - K*n leftover rows are dropped, and since
  they are the tail of a random permutation they are a random choice. (The paper's released code
  dropped the last rows in file order instead; the difference is at most K-1 examples.)
- ``dirichlet``: label skew, the paper's stated future work. For each class, its rows are dealt
  to clients in proportions drawn from Dirichlet(alpha); small alpha = strong skew. Shards are
  unequal, which the size-weighted average then accounts for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import FedsweepError
from .io import atomic_path

SCHEMES = ("iid", "dirichlet")


def iid_shards(num_rows: int, clients: int, seed: int) -> list[np.ndarray]:
    _check(num_rows, clients)
    n = num_rows // clients
    perm = np.random.default_rng([seed, clients]).permutation(num_rows)
    return [perm[k * n:(k + 1) * n] for k in range(clients)]


def dirichlet_shards(labels: np.ndarray, clients: int, alpha: float, seed: int,
                     min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    _check(len(labels), clients)
    if not alpha > 0:
        raise FedsweepError(f"partition: alpha={alpha!r} must be > 0")
    rng = np.random.default_rng([seed, clients, 1])
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(rows)).astype(int)
            for k, piece in enumerate(np.split(rows, cuts)):
                parts[k].append(piece)
        shards = [rng.permutation(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise FedsweepError(
        f"partition: Dirichlet(alpha={alpha}) over clients={clients} left a shard below {min_size} "
        f"examples in {max_tries} draws; raise alpha or lower clients"
    )


def _check(num_rows: int, clients: int) -> None:
    if not isinstance(clients, (int, np.integer)) or clients < 1:
        raise FedsweepError(f"partition: clients={clients!r} must be an integer >= 1")
    if num_rows < clients:
        raise FedsweepError(f"partition: clients={clients} exceeds the {num_rows} training rows")


def partition(labels: np.ndarray, clients: int, seed: int, scheme: str = "iid",
              alpha: float | None = None, min_size: int = 1) -> list[np.ndarray]:
    if scheme == "iid":
        shards = iid_shards(len(labels), clients, seed)
    elif scheme == "dirichlet":
        if alpha is None:
            raise FedsweepError("partition: scheme=dirichlet needs alpha")
        shards = dirichlet_shards(labels, clients, alpha, seed, min_size=min_size)
    else:
        raise FedsweepError(f"partition: scheme={scheme!r} is not one of {', '.join(SCHEMES)}")
    smallest = min(len(s) for s in shards)
    if smallest < min_size:
        raise FedsweepError(
            f"partition: clients={clients} leaves {smallest} examples per shard, fewer than {min_size}"
        )
    return shards


def write_shards(path: str | os.PathLike, shards: list[np.ndarray], info: dict[str, Any]) -> None:
    client = np.concatenate([np.full(len(s), k, dtype=np.int32) for k, s in enumerate(shards)])
    position = np.concatenate([np.arange(len(s), dtype=np.int32) for s in shards])
    row = np.concatenate(shards).astype(np.int64)
    info = {**info, "clients": len(shards), "sizes": [int(len(s)) for s in shards]}
    table = pa.table({"client": client, "row": row, "position": position})
    table = table.replace_schema_metadata({"fedsweep": json.dumps(info)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@dataclass
class Shards:
    indices: list[np.ndarray]  # per client, training-row indices in the client's fixed order
    info: dict[str, Any]

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.indices]


def read_shards(path: str | os.PathLike) -> Shards:
    path = Path(path)
    if not path.exists():
        raise FedsweepError(f"shards {str(path)!r} does not exist (run `fedsweep partition` first)")
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[b"fedsweep"])
    df = table.to_pandas().sort_values(["client", "position"], kind="stable")
    groups = {int(k): g["row"].to_numpy() for k, g in df.groupby("client", sort=True)}
    indices = [groups.get(k, np.empty(0, dtype=np.int64)) for k in range(info["clients"])]
    return Shards(indices, info)


def label_histogram(shards: Shards, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, C] counts: how skewed the shards are (used in tests and the partition log)."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards.indices])
