"""Layer-wise drift (fedsweep.layers): its cost on an evaluated round, as a share of the round.

At a BERT-base shape (random init from ``BertConfig()``: 110M parameters, no download) this times,
best of --repeats, the server's per-client :meth:`Strategy.add` and its ``finish_round`` with the
layer groups measured and without, and one client SGD step (batch --batch at length 128; the
paper's B=32 step is scaled from it linearly where --batch is smaller, which CPUs need). A client
of the round trains --steps steps (E x n_k / B), so the share of a measured round is

    (extra add per client + extra finish / K) / (steps x step + add + finish / K).

    python benchmarks/bench_layers.py                          # BERT-base, CPU
    python benchmarks/bench_layers.py --model tiny-bert --batch 32
"""

from __future__ import annotations

import argparse
import json
import time

from common import best


def measure(model_spec: str, batch: int, steps: int, clients: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from fedsweep import layers
    from fedsweep.engine import FlatParameters
    from fedsweep.models import build_model
    from fedsweep.strategies import FedAvg

    torch.set_num_threads(threads)
    if model_spec == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2))
    else:
        model = build_model(model_spec, 2, seed=0)
    flat = FlatParameters(model)
    strategy = FedAvg(flat.data.clone())
    drift = layers.attach(strategy, model, flat)
    client = flat.data + 1e-3 * torch.randn_like(flat.data)
    client[len(flat) - 16:] = 0  # keep the tail's padding zero, as a trained client's is

    def add(active: bool) -> None:
        drift.active = active
        strategy.add(flat.data.copy_(client), 1)

    weights = strategy.weights.clone()

    def finish(active: bool) -> None:
        drift.active = active
        strategy.weights.copy_(weights)
        strategy.finish_round(scratch=flat.data)

    strategy.begin_round(clients)
    # without and with, interleaved (a shared machine's speed drifts between passes); best of each
    timed = [(add, False), (add, True), (finish, False), (finish, True)]
    times: list[list[float]] = [[] for _ in timed]
    for _ in range(repeats + 1):  # the first pass warms up
        for spent, (fn, active) in zip(times, timed):
            t0 = time.perf_counter()
            fn(active)
            spent.append(time.perf_counter() - t0)
    add0, add1, finish0, finish1 = (min(spent[1:]) for spent in times)
    ids = torch.randint(1000, 20000, (batch, 128))
    labels = torch.randint(0, 2, (batch,))

    def step() -> None:
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()
        flat.sgd_step(1e-5)

    step_time = best(step, max(1, repeats // 2)) * 32 / batch  # a B=32 step
    round_client = steps * step_time + add0 + finish0 / clients
    extra = (add1 - add0) + (finish1 - finish0) / clients
    return {"model": model_spec, "parameters": flat.num_parameters, "groups": len(drift.groups),
            "add_s": add0, "add_layers_s": add1, "finish_s": finish0, "finish_layers_s": finish1,
            "step_b32_s": step_time, "steps_per_client": steps, "clients": clients,
            "share_of_round": extra / round_client}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base", help="bert-base (from BertConfig) or a fedsweep model spec")
    p.add_argument("--batch", type=int, default=8, help="the timed step's batch (scaled to 32)")
    p.add_argument("--steps", type=int, default=8, help="SGD steps per client and round (E x n_k / B)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(measure(args.model, args.batch, args.steps, args.clients, args.repeats, args.threads), indent=1))


if __name__ == "__main__":
    main()
