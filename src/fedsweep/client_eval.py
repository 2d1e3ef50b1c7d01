"""How each client fares: the global model's accuracy and loss on each client's label distribution.

Federated evaluation without taking any training data away: client k's accuracy is the test
accuracy re-weighted to k's label distribution p_k(c) (the class shares of its shard's training
labels), computed from ONE pass over the test set whatever K (the per-class sums of
:func:`fedsweep.engine.evaluate_classes`)::

    accuracy_k = sum_c w_k(c) correct_c / n_c,   loss_k = sum_c w_k(c) loss_c / n_c,
    w_k(c) = p_k(c) / sum_{c': n_c' > 0} p_k(c')   for the classes c with n_c > 0.

So it equals evaluating the model on every test example with weight p_k(label) / n_label (and
normalising the weights). A class the test set lacks has no accuracy to weigh: its share is
spread over the present classes in proportion (the renormalisation above); a client none of
whose classes is in the test set gets NaN. With i.i.d. shards every p_k is about the global
label distribution, so every client gets about the global accuracy; a label-skewed split shows
its cost in the worst clients while the global accuracy (the mean over test examples) hides it.

Each evaluated round records the summary over clients (:data:`CLIENT_COLUMNS`): mean, standard
deviation (population: the clients are all of them, not a sample), the worst client and the 10th
percentile (numpy's linear interpolation), and the mean loss. This module is numpy only: the
report reads the column names from it.

Held-out slices (the training setting ``client_holdout``, off by default): with a fraction f > 0,
each client's shard is split once, by a seeded draw of (run seed, client) (:func:`split_holdout`),
into round(f x n_k) held-out rows (at least one) and the rest, which the client trains on (the
weights of the average and the label distributions above are then those of the rest). Each
evaluated round evaluates the global model on the union of the held-out rows in ONE pass (per
example: correct or not, cross-entropy), and sums them per client (:func:`holdout_sums`, a
bincount):: ``holdout_accuracy_k = correct_k / m_k``, ``holdout_loss_k = loss_k / m_k`` over
client k's m_k held-out rows, summarised as :data:`HOLDOUT_COLUMNS` (NaN when off). Unlike the
re-weighted test accuracy above, this is each client's own data, features and all (not only its
labels), at the cost of rows it no longer trains on.
"""

from __future__ import annotations

import math

import numpy as np

from .shard_sizes import holdout_rows

CLIENT_COLUMNS = ("client_accuracy_mean", "client_accuracy_std", "client_accuracy_min", "client_accuracy_p10",
                  "client_loss_mean")
# The same summary of each client's accuracy and loss on its held-out rows (client_holdout > 0).
HOLDOUT_COLUMNS = ("client_holdout_accuracy_mean", "client_holdout_accuracy_std", "client_holdout_accuracy_min",
                   "client_holdout_accuracy_p10", "client_holdout_loss_mean")


def label_distributions(train_labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(K, C) float64: row k is the class shares of client k's shard (training-row indices)."""
    counts = np.stack([np.bincount(train_labels[np.asarray(s, dtype=np.int64)], minlength=num_classes)[:num_classes]
                       for s in shards]).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def per_client(distributions: np.ndarray, correct_c: np.ndarray, loss_c: np.ndarray, count_c: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, loss) per client, each (K,), from the per-class test sums (see the module doc)."""
    count = np.asarray(count_c, dtype=np.float64)
    present = count > 0
    safe = np.where(present, count, 1.0)
    class_accuracy = np.where(present, np.asarray(correct_c, dtype=np.float64) / safe, 0.0)
    class_loss = np.where(present, np.asarray(loss_c, dtype=np.float64) / safe, 0.0)
    weights = np.where(present, distributions, 0.0)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a client with no present class: NaN
        return (weights @ class_accuracy) / total, (weights @ class_loss) / total


def summary(accuracy: np.ndarray, loss: np.ndarray, columns: tuple[str, ...] = CLIENT_COLUMNS) -> dict[str, float]:
    """A round's :data:`CLIENT_COLUMNS` (or :data:`HOLDOUT_COLUMNS`: the same five, in that order)
    from the per-client accuracies and losses."""
    accuracy, loss = accuracy[np.isfinite(accuracy)], loss[np.isfinite(loss)]
    if not len(accuracy):
        return not_evaluated(columns)
    values = (float(accuracy.mean()), float(accuracy.std()), float(accuracy.min()),
              float(np.percentile(accuracy, 10)), float(loss.mean()) if len(loss) else math.nan)
    return dict(zip(columns, values))


def not_evaluated(columns: tuple[str, ...] = CLIENT_COLUMNS) -> dict[str, float]:
    """The columns of a round without an evaluation."""
    return dict.fromkeys(columns, math.nan)


def split_holdout(shard: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training part, held-out part) of one client's shard (training-row indices): round(fraction
    x n) rows, at least one (:func:`fedsweep.shard_sizes.holdout_rows`), drawn by a generator seeded
    with ``seed`` (the run's :func:`fedsweep.engine.derive_seed` of (seed, "holdout", client)).
    Both parts keep the shard's order (its fixed order is the paper protocol's batch order);
    they are disjoint and together the shard. ``fraction`` 0: (the shard itself, nothing)."""
    shard = np.asarray(shard)
    held = holdout_rows(len(shard), fraction)
    if held == 0:
        return shard, shard[:0]
    chosen = np.zeros(len(shard), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(shard))[:held]] = True
    return shard[~chosen], shard[chosen]


def holdout_sums(client: np.ndarray, correct: np.ndarray, loss: np.ndarray, num_clients: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-client (correct int64, summed loss float64, count int64), each (K,), of held-out examples
    whose client is ``client[i]``, correctness ``correct[i]`` and cross-entropy ``loss[i]``:
    segment sums by bincount (a fixed order: reproducible)."""
    client = np.asarray(client, dtype=np.int64)
    count = np.bincount(client, minlength=num_clients)[:num_clients]
    hits = np.bincount(client, weights=np.asarray(correct, dtype=np.float64), minlength=num_clients)[:num_clients]
    losses = np.bincount(client, weights=np.asarray(loss, dtype=np.float64), minlength=num_clients)[:num_clients]
    return np.rint(hits).astype(np.int64), losses, count.astype(np.int64)


def holdout_per_client(correct_k: np.ndarray, loss_k: np.ndarray, count_k: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, loss) per client from :func:`holdout_sums` (NaN for a client with no held-out row)."""
    count = np.asarray(count_k, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(correct_k, dtype=np.float64) / count, np.asarray(loss_k, dtype=np.float64) / count
