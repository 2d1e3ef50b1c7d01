"""Per-client evaluation (fedsweep.client_eval, issue #19): its cost as a share of a round.

Three parts, each the best of --repeats on this machine's CPU:

- the per-class bookkeeping of the test pass (``engine.evaluate_classes``: a one-hot mask, the
  masked column sums) against the same pass keeping only the totals (correct, loss sum);
- the per-client numbers from the per-class sums (``client_eval.per_client`` + ``summary``) at
  K = 32, 1,000 and 10,000 clients: numpy on (K, C) arrays, no model;
- ``client_holdout``: one pass over the held-out rows (a fraction f of the training rows) with
  ``engine.evaluate_holdout``, against a round's training (E epochs over the remaining rows,
  timed as SGD steps at the same shapes).

    python benchmarks/bench_client_eval.py                      # tiny-bert, AG News-like lengths
    python benchmarks/bench_client_eval.py --model minilm --test-rows 512
"""

from __future__ import annotations

import argparse

import numpy as np
from common import best


def tokens(rows: int, length: int, classes: int, seed: int):
    import torch

    from fedsweep.tokens import TokenTensors

    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 4, length + 1, rows)
    ids = torch.from_numpy(rng.integers(1000, 20000, (rows, length)))
    ids[torch.arange(length)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    return TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, classes, rows)), 0)


def totals_only(model, data, batches, lengths, protocol) -> tuple[float, float]:
    """The test pass without the per-class sums: what evaluation cost before #19."""
    import torch
    import torch.nn.functional as F

    from fedsweep.engine import attention_input, batches_on_device

    correct = torch.zeros((), dtype=torch.int64)
    loss = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for ids, mask, labels in batches_on_device(data, lengths, batches, protocol):
            logits = model(input_ids=ids, attention_mask=attention_input(model, mask)).logits.float()
            loss += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(-1) == labels).sum()
    return float(correct), float(loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--test-rows", type=int, default=1024)
    p.add_argument("--train-rows", type=int, default=512, help="one client's rows, for the held-out share")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch

    from fedsweep import client_eval
    from fedsweep.clients import train_client
    from fedsweep.engine import PROTOCOLS, FlatParameters, eval_batches, evaluate_classes, evaluate_holdout
    from fedsweep.models import build_model

    torch.set_num_threads(a.threads)
    protocol = PROTOCOLS["standard"]
    model = build_model(a.model, a.classes, seed=0)
    flat = FlatParameters(model)
    test = tokens(a.test_rows, a.length, a.classes, 1)
    test_len = test.lengths.numpy()
    batches = eval_batches(test_len, 256)
    with_classes = best(lambda: evaluate_classes(model, test, batches, test_len, protocol, False, a.classes),
                        a.repeats)
    plain = best(lambda: totals_only(model, test, batches, test_len, protocol), a.repeats)
    print(f"{a.model}, {a.test_rows} test rows at <= {a.length} tokens, {a.threads} threads, best of {a.repeats}")
    print(f"test pass: with per-class sums {with_classes * 1000:.1f} ms, totals only {plain * 1000:.1f} ms: "
          f"+{(with_classes - plain) * 1000:.1f} ms ({100 * (with_classes / plain - 1):+.2f}%, noise included)")

    rng = np.random.default_rng(0)
    counts = np.bincount(test.labels.numpy(), minlength=a.classes)
    correct_c, loss_c = (counts * 0.8).astype(np.int64), counts * 0.5
    for k in (32, 1_000, 10_000):
        labels = rng.dirichlet(np.ones(a.classes), k)
        seconds = best(lambda: client_eval.summary(*client_eval.per_client(labels, correct_c, loss_c, counts)),
                       a.repeats)
        print(f"per-client numbers from the per-class sums, K={k}: {seconds * 1000:.3f} ms")

    train = tokens(a.train_rows, a.length, a.classes, 2)
    train_len = train.lengths.numpy()
    held = max(1, round(a.holdout * a.train_rows))
    rows = np.arange(held)
    owner = np.zeros(held, dtype=np.int64)
    holdout = best(lambda: evaluate_holdout(model, train, train_len, rows, owner, eval_batches(train_len[rows], 256),
                                            1, protocol, False), a.repeats)
    shard = np.arange(held, a.train_rows)
    training = best(lambda: train_client(model, flat, train, train_len, shard, epochs=a.epochs, batch_size=32,
                                         lr=1e-5, protocol=protocol, seed=0, round_=1, client=0, bf16=False),
                    max(1, a.repeats // 2))
    print(f"client_holdout={a.holdout:g}: {held} held-out rows evaluated in {holdout * 1000:.1f} ms; the client's "
          f"training on its other {a.train_rows - held} rows (E={a.epochs}, B=32) {training:.2f} s: "
          f"{100 * holdout / training:.2f}% of its round")


if __name__ == "__main__":
    main()
