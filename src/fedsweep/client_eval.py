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
"""

from __future__ import annotations

import math

import numpy as np

CLIENT_COLUMNS = ("client_accuracy_mean", "client_accuracy_std", "client_accuracy_min", "client_accuracy_p10",
                  "client_loss_mean")


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


def summary(accuracy: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """A round's :data:`CLIENT_COLUMNS` from the per-client accuracies and losses."""
    accuracy, loss = accuracy[np.isfinite(accuracy)], loss[np.isfinite(loss)]
    if not len(accuracy):
        return not_evaluated()
    return {"client_accuracy_mean": float(accuracy.mean()), "client_accuracy_std": float(accuracy.std()),
            "client_accuracy_min": float(accuracy.min()),
            "client_accuracy_p10": float(np.percentile(accuracy, 10)),
            "client_loss_mean": float(loss.mean()) if len(loss) else math.nan}


def not_evaluated() -> dict[str, float]:
    """The columns of a round without an evaluation."""
    return dict.fromkeys(CLIENT_COLUMNS, math.nan)
