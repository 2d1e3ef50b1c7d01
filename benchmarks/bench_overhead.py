"""FedAvg overhead: a FedAvg round vs centralised training over the very same batches.

For each model and K, one process builds the K i.i.d. client shards of N examples and the
batches every client trains on in one round (E epochs, B=32, length 128, dynamic padding), then
times, alternately and after a warm-up of each:
  - centralised: one model, torch.optim.SGD, a plain loop (the nanoGPT way) over ALL those
    batches in the same order: the same tensors, the same FLOPs;
  - fedsweep FedAvg: engine.train_round (load the global weights into each client, train it,
    add it to the fp64 average with its drift norm) and the server's finish_round.
Eval is excluded from both. The ratio FedAvg time / centralised time is then the cost of the
federated machinery alone (target <= 1.03 at K=32, issue #5). Best of --repeats interleaved
pairs; the median ratio over the pairs is printed too. On a shared machine the time of the
same work varies by 10% or more between passes, so the aggregation (every client's fp64 add
and drift, the server's finish_round) is also timed directly and shown as a share of the
centralised time: the part of the overhead that does not depend on noise. Peak memory is the process's max RSS
(centralised and FedAvg share the process, so it shows whether memory grows with K).

    python benchmarks/bench_overhead.py --models tiny-bert --examples 1024            # worst case: 1 batch per client at K=32
    python benchmarks/bench_overhead.py --models tiny-bert --examples 4096 --epochs 2  # 8 steps per client at K=32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def measure(model_spec: str, clients: int, examples: int, epochs: int, threads: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from common import peak_rss_mib, tokens_dir
    from fedsweep.engine import PROTOCOLS, FlatParameters, _batches_on_device, client_batches
    from fedsweep.rounds import train_round
    from fedsweep.strategies import FedAvg
    from fedsweep.models import build_model
    from fedsweep.partition import iid_shards
    from fedsweep.tokens import load_split

    torch.set_num_threads(threads)
    data = load_split(tokens_dir(), "train")
    lengths = data.lengths.numpy()
    protocol = PROTOCOLS["standard"]
    shards = iid_shards(examples, clients, seed=0)
    model = build_model(model_spec, 4, seed=0)
    flat = FlatParameters(model)
    strategy = FedAvg(flat.data.clone())

    # Round r's batches, client by client: what train_round feeds the model in round r.
    def round_batches(r: int) -> list[np.ndarray]:
        return [b for c, shard in enumerate(shards) for e in range(epochs)
                for b in client_batches(shard, 32, protocol, 0, r, c, e)]

    def central(r: int) -> float:
        # From the global weights (FedAvg leaves scratch values in the model's own buffer).
        flat.data.copy_(strategy.weights)
        opt = torch.optim.SGD(model.parameters(), lr=2e-5)
        model.train()
        t0 = time.perf_counter()
        for ids, mask, labels in _batches_on_device(data, lengths, round_batches(r), protocol):
            loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # nanoGPT's order: gradients freed before the next forward
        float(loss)
        return time.perf_counter() - t0

    def fedavg(r: int) -> tuple[float, float]:
        """(round seconds, of which aggregation: the clients' adds and the server's finish_round)."""
        t0 = time.perf_counter()
        strategy.begin_round(examples)
        stats = train_round(model, flat, strategy, data, lengths, shards, range(clients), epochs=epochs,
                            batch_size=32, lr=2e-5, protocol=protocol, seed=0, round_=r, bf16=False)
        t1 = time.perf_counter()
        strategy.finish_round(scratch=flat.data)
        t2 = time.perf_counter()
        return t2 - t0, stats.aggregate_seconds + (t2 - t1)

    central(0), fedavg(0)  # warm-up: allocator, caches, lazy initialisation
    pairs, aggregation = [], []
    for r in range(1, repeats + 1):  # alternate, so drifting machine load hits both alike
        if r % 2:
            c = central(r)
            f, agg = fedavg(r)
        else:
            f, agg = fedavg(r)
            c = central(r)
        pairs.append((c, f))
        aggregation.append(agg)
    best_central, best_fed = min(p[0] for p in pairs), min(p[1] for p in pairs)
    return {"model": model_spec, "clients": clients, "examples": examples, "epochs": epochs,
            "steps": len(round_batches(0)), "central_s": best_central, "fedavg_s": best_fed,
            "ratio_best": best_fed / best_central, "ratio_median": statistics.median(f / c for c, f in pairs),
            "aggregation_s": min(aggregation), "aggregation_share": min(aggregation) / best_central,
            "fedavg_examples_per_s": examples * epochs / best_fed, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-bert", "minilm"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--examples", type=int, default=1024, help="a multiple of 32 x max(clients)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs (E)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed (centralised, FedAvg) pairs after a warm-up")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "K"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), a.examples, a.epochs, a.threads, a.repeats)))
        return
    from common import tokens_dir

    tokens_dir()  # tokenise once, outside the timed processes
    print(f"examples={a.examples} E={a.epochs} B=32 threads={a.threads} best of {a.repeats} interleaved pairs")
    print(f"{'model':<12}{'K':>4}{'steps':>7}{'central s':>11}{'FedAvg s':>10}{'ex/s':>8}"
          f"{'ratio best':>12}{'ratio median':>14}{'aggregation s':>15}{'share':>8}{'peak MiB':>10}")
    for model in a.models:
        for k in a.clients:
            out = subprocess.run([sys.executable, __file__, "--one", model, str(k), "--examples", str(a.examples),
                                  "--epochs", str(a.epochs), "--threads", str(a.threads), "--repeats", str(a.repeats)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model:<12}{k:>4}{r['steps']:>7}{r['central_s']:>11.3f}{r['fedavg_s']:>10.3f}"
                  f"{r['fedavg_examples_per_s']:>8.1f}{r['ratio_best']:>12.3f}{r['ratio_median']:>14.3f}"
                  f"{r['aggregation_s']:>15.3f}{100 * r['aggregation_share']:>7.1f}%{r['peak_rss_mib']:>10.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
