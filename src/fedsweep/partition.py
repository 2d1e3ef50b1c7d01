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
- ``shards`` (McMahan et al. 2017's pathological non-IID split): the rows, shuffled by the seed
  and then stably sorted by label, are cut into ``classes_per_client`` x K contiguous pieces of
  (near-)equal size; each client gets ``classes_per_client`` pieces chosen by the seed. Sizes are
  equal to within ``classes_per_client`` rows; a client sees at most ``classes_per_client``
  classes when each class is a whole number of pieces, at most twice that otherwise (a piece
  can straddle a class boundary).
- ``quantity_skew``: i.i.d. labels, skewed sizes. Client shares of the rows are drawn from
  Dirichlet(alpha) (``size_distribution="dirichlet"``) or a log-normal(0, sigma) normalised to 1
  (``"lognormal"``); every client first gets ``min_rows`` rows, the rest are dealt by the
  shares. Every row is used, so the size-weighted FedAvg average matters.

``per_client=N`` (any scheme): weak scaling. A seeded random N x K rows of the training set are
kept (the first N x K of one permutation that depends on the seed only, so the rows of K are a
subset of those of 2K) and the scheme splits those; with ``iid`` every client gets exactly N rows.
The total data then grows with K, where by default (``kind="fixed_total"``) the whole training
set is split, so each client's share shrinks as K grows (the paper's setting).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import FedsweepError
from .io import atomic_path
from .shard_sizes import positive_int, label_sorted_deal, quantity_skew_draw

SCHEMES = ("iid", "dirichlet", "shards", "quantity_skew")
SIZE_DISTRIBUTIONS = ("dirichlet", "lognormal")
KINDS = ("fixed_total", "per_client")  # the whole training set split K ways / N rows per client
# Metadata keys added with the schemes above, and the value a shards file written before them
# implies: left out of the hash that guards resuming (see hashed_info), so an iid or Dirichlet
# cell of an earlier version still resumes from its checkpoint.
_LATER_INFO_DEFAULTS = {"kind": "fixed_total", "per_client": None}


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


def label_sorted_shards(labels: np.ndarray, clients: int, seed: int, classes_per_client: int = 2
                        ) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into classes_per_client x K pieces,
    deal classes_per_client random pieces to each client."""
    _check(len(labels), clients)
    if not positive_int(classes_per_client):
        raise FedsweepError(f"partition: classes_per_client={classes_per_client!r} must be an integer >= 1")
    rng, shuffled, cut, dealt = label_sorted_deal(len(labels), clients, seed, classes_per_client)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return [rng.permutation(np.concatenate([by_label[cut[i]] for i in dealt[k]])) for k in range(clients)]


def quantity_skew_shards(num_rows: int, clients: int, seed: int, distribution: str = "dirichlet",
                         alpha: float | None = None, sigma: float | None = None, min_rows: int = 1
                         ) -> list[np.ndarray]:
    """i.i.d. labels (a random permutation), sizes from :func:`skewed_sizes`; every row used."""
    _check(num_rows, clients)
    rng, sizes = quantity_skew_draw(num_rows, clients, seed, distribution, alpha=alpha, sigma=sigma,
                                    min_rows=min_rows)
    perm = rng.permutation(num_rows)
    return np.split(perm, np.cumsum(sizes)[:-1])


def per_client_rows(num_rows: int, clients: int, per_client: int, seed: int) -> np.ndarray:
    """The K x N training rows a ``per_client=N`` partition uses, in a seeded random order.

    One permutation per seed (not per K): the rows of K clients are the first K x N of it, so
    they are a subset of those of 2K clients and a larger K only adds data.
    """
    if not positive_int(per_client):
        raise FedsweepError(f"partition: per_client={per_client!r} must be an integer >= 1")
    _check(num_rows, clients)
    needed = per_client * clients
    if needed > num_rows:
        raise FedsweepError(f"partition: per_client={per_client} x K={clients} needs {needed} rows; "
                            f"the data set has {num_rows}")
    return np.random.default_rng([seed, 4]).permutation(num_rows)[:needed]


def _check(num_rows: int, clients: int) -> None:
    if not isinstance(clients, (int, np.integer)) or clients < 1:
        raise FedsweepError(f"partition: clients={clients!r} must be an integer >= 1")
    if num_rows < clients:
        raise FedsweepError(f"partition: clients={clients} exceeds the {num_rows} training rows")


def partition(labels: np.ndarray, clients: int, seed: int, scheme: str = "iid",
              alpha: float | None = None, min_size: int = 1, *, classes_per_client: int = 2,
              size_distribution: str = "dirichlet", sigma: float | None = None, min_rows: int = 1,
              per_client: int | None = None) -> list[np.ndarray]:
    """The K shards (training-row indices) of ``scheme``; see the module docstring.

    ``min_size`` is a check (an error if a shard is smaller); ``min_rows`` is what quantity_skew
    guarantees every client.
    """
    labels = np.asarray(labels)
    if scheme not in SCHEMES:
        raise FedsweepError(f"partition: scheme={scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "dirichlet" and alpha is None:
        raise FedsweepError("partition: scheme=dirichlet needs alpha")
    if per_client is not None:
        # Split a seeded K x N subset, then map the shard positions back to training rows.
        used = per_client_rows(len(labels), clients, per_client, seed)
        shards = partition(labels[used], clients, seed, scheme, alpha, min_size, classes_per_client=classes_per_client,
                           size_distribution=size_distribution, sigma=sigma, min_rows=min_rows)
        return [used[s] for s in shards]
    if scheme == "iid":
        shards = iid_shards(len(labels), clients, seed)
    elif scheme == "dirichlet":
        shards = dirichlet_shards(labels, clients, alpha, seed, min_size=min_size)
    elif scheme == "shards":
        shards = label_sorted_shards(labels, clients, seed, classes_per_client)
    else:
        shards = quantity_skew_shards(len(labels), clients, seed, size_distribution, alpha=alpha, sigma=sigma,
                                      min_rows=min_rows)
    smallest = min(len(s) for s in shards)
    if smallest < min_size:
        raise FedsweepError(
            f"partition: clients={clients} leaves {smallest} examples per shard, fewer than {min_size}"
        )
    return shards


def scheme_info(scheme: str, alpha: float | None = None, *, classes_per_client: int = 2,
                size_distribution: str = "dirichlet", sigma: float | None = None, min_rows: int = 1,
                per_client: int | None = None) -> dict[str, Any]:
    """What a shards file's metadata records about its split: the scheme, the parameters it uses
    (only those), ``per_client`` and the ``kind`` (fixed_total: the whole training set split K
    ways; per_client: N rows per client, so the total grows with K)."""
    info: dict[str, Any] = {"scheme": scheme, "alpha": alpha}
    if scheme == "shards":
        info["classes_per_client"] = classes_per_client
    if scheme == "quantity_skew":
        info.update(size_distribution=size_distribution, min_rows=min_rows)
        if size_distribution == "lognormal":
            info["sigma"] = sigma
    info.update(per_client=per_client, kind="per_client" if per_client is not None else "fixed_total")
    return info


def hashed_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` without the keys a shards file of an earlier version lacked, where they hold the
    value it implied: what train.py hashes, so its checkpoints still resume."""
    return {k: v for k, v in info.items() if not (k in _LATER_INFO_DEFAULTS and v == _LATER_INFO_DEFAULTS[k])}


def partition_record(info: dict[str, Any]) -> dict[str, Any]:
    """The split's description for run.json (older files: iid-or-Dirichlet, fixed total)."""
    keys = ("scheme", "kind", "per_client", "alpha", "classes_per_client", "size_distribution", "sigma", "min_rows",
            "seed", "clients", "sizes", "dropped")
    record = {**_LATER_INFO_DEFAULTS, **{k: info[k] for k in keys if k in info}}
    return {k: record[k] for k in keys if k in record}


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
