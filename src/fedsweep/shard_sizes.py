"""Shard sizes that the head node can know before any job: the schemes whose sizes depend on the
number of rows, K and the seed, never on the labels (``iid``, ``shards``, ``quantity_skew``, each
also with ``per_client``). ``dirichlet`` sizes follow the labels and are checked by the partition
job itself (the workflow gives it the smallest batch size as ``--min-size``).

The random draws that fix the sizes live here and :mod:`fedsweep.partition` uses the same ones,
so the sizes checked before the jobs are those the jobs then make. numpy only: no pandas or
pyarrow (:mod:`fedsweep.partition` reads and writes Parquet), so the head node can import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import FedsweepError


def positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def skewed_sizes(num_rows: int, clients: int, rng: np.random.Generator, distribution: str,
                 alpha: float | None = None, sigma: float | None = None, min_rows: int = 1) -> np.ndarray:
    """K sizes summing to ``num_rows``, each >= ``min_rows``: min_rows each, the rest dealt by
    shares drawn from Dirichlet(alpha) or a normalised log-normal(0, sigma)."""
    if distribution == "dirichlet":
        if alpha is None or not alpha > 0:
            raise FedsweepError(f"partition: quantity_skew with size_distribution=dirichlet needs alpha > 0 "
                                f"(got alpha={alpha!r})")
        shares = rng.dirichlet(np.full(clients, float(alpha)))
    elif distribution == "lognormal":
        if sigma is None or not sigma > 0:
            raise FedsweepError(f"partition: quantity_skew with size_distribution=lognormal needs sigma > 0 "
                                f"(got sigma={sigma!r})")
        weights = rng.lognormal(0.0, float(sigma), clients)
        shares = weights / weights.sum()
    else:
        raise FedsweepError(f"partition: size_distribution={distribution!r} is not one of dirichlet, lognormal")
    if not positive_int(min_rows):
        raise FedsweepError(f"partition: min_rows={min_rows!r} must be an integer >= 1")
    rest = num_rows - clients * min_rows
    if rest < 0:
        raise FedsweepError(f"partition: min_rows={min_rows} x clients={clients} needs {clients * min_rows} rows; "
                            f"the data set has {num_rows}")
    exact = shares * rest
    sizes = np.floor(exact).astype(np.int64)
    # Largest remainders get the rows flooring left over, so the sizes sum to num_rows exactly.
    short = rest - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:short]] += 1
    return sizes + min_rows


def quantity_skew_draw(num_rows: int, clients: int, seed: int, distribution: str = "dirichlet",
                       alpha: float | None = None, sigma: float | None = None, min_rows: int = 1
                       ) -> tuple[np.random.Generator, np.ndarray]:
    """The generator of a quantity_skew split after its sizes are drawn, and the sizes."""
    rng = np.random.default_rng([seed, clients, 3])
    return rng, skewed_sizes(num_rows, clients, rng, distribution, alpha=alpha, sigma=sigma, min_rows=min_rows)


def label_sorted_deal(num_rows: int, clients: int, seed: int, classes_per_client: int
                      ) -> tuple[np.random.Generator, np.ndarray, list[np.ndarray], np.ndarray]:
    """A ``shards`` split's draws: the generator after them, the row shuffle, the position
    ranges of the classes_per_client x K pieces, and the pieces dealt to each client (K x cpc)."""
    pieces = classes_per_client * clients
    if pieces > num_rows:
        raise FedsweepError(f"partition: classes_per_client={classes_per_client} x clients={clients} needs "
                            f"{pieces} pieces, more than the {num_rows} training rows")
    rng = np.random.default_rng([seed, clients, 2, classes_per_client])
    # Shuffle first so the order within a class (and which rows share a piece) is seeded, not file order.
    shuffled = rng.permutation(num_rows)
    cut = np.array_split(np.arange(num_rows), pieces)
    dealt = rng.permutation(pieces).reshape(clients, classes_per_client)
    return rng, shuffled, cut, dealt


def shard_sizes(settings: dict[str, Any], num_rows: int, clients: int, seed: int) -> list[int] | None:
    """The K shard sizes a partition with ``settings`` (scheme, per_client, ...) makes of
    ``num_rows`` training rows; None where they depend on the labels (dirichlet)."""
    scheme, per_client = settings.get("scheme", "iid"), settings.get("per_client")
    rows = per_client * clients if per_client is not None else num_rows
    if scheme == "iid":
        return [rows // clients] * clients
    if scheme == "shards":
        _, _, cut, dealt = label_sorted_deal(rows, clients, seed, settings.get("classes_per_client", 2))
        return [sum(len(cut[i]) for i in row) for row in dealt]
    if scheme == "quantity_skew":
        _, sizes = quantity_skew_draw(rows, clients, seed, settings.get("size_distribution", "dirichlet"),
                                      alpha=settings.get("alpha"), sigma=settings.get("sigma"),
                                      min_rows=settings.get("min_rows", 1))
        return [int(s) for s in sizes]
    return None


def holdout_rows(size: int, fraction: float) -> int:
    """How many of a shard's ``size`` rows ``client_holdout=fraction`` holds out of training:
    round(fraction x size) (halves up), at least one, at most the shard; 0 when off (fraction 0)."""
    if not fraction > 0:
        return 0
    return min(int(size), max(1, int(np.floor(fraction * size + 0.5))))


def rows_for_a_batch(batch_size: int, fraction: float) -> int:
    """The fewest rows a shard needs to keep a full training batch after ``client_holdout=fraction``
    (a Dirichlet partition job's ``--min-size``)."""
    size = int(batch_size)
    while size - holdout_rows(size, fraction) < batch_size:  # ends: fraction < 0.5 holds out < half
        size += 1
    return size


def holdout_problem(sizes: list[int] | tuple[int, ...], fraction: float, batch_size: int) -> str | None:
    """Why ``client_holdout=fraction`` does not fit shards of ``sizes`` (None: it does): a client
    left without a full training batch or without a held-out row. The first such client, in words."""
    if not fraction > 0:
        return None
    for client, size in enumerate(sizes):
        held = holdout_rows(size, fraction)
        if held < 1:
            return f"client_holdout={fraction:g} holds out no row of client {client}'s {size}"
        if size - held < batch_size:
            return (f"client_holdout={fraction:g} leaves client {client} with {size - held} of its {size} rows to "
                    f"train on, no full batch of batch_size={batch_size}")
    return None
