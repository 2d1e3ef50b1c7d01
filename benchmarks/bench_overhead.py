"""FedAvg overhead: a FedAvg cell vs centralised training over the same examples.

For each model, trains over the same N examples (B=32, length 128, E=1, one round):
  - centralised: one model, torch.optim.SGD, a plain loop (the nanoGPT way);
  - fedsweep FedAvg at K = 1, 8, 32 (N/K examples per client), aggregation included, eval excluded.
Each measurement runs in its own process so peak memory (max RSS) is per configuration.
Prints examples/s, the overhead ratio (FedAvg time / centralised time; target <= 1.05, and
<= 1.03 for issue #5) and peak memory vs K (target: flat).

    python benchmarks/bench_overhead.py --models tiny-bert minilm --examples 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def measure(model_spec: str, mode: str, examples: int, threads: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from common import peak_rss_mib, tokens_dir
    from fedsweep.engine import PROTOCOLS, FedAvg, FlatParameters, train_client, _batches_on_device, client_batches
    from fedsweep.models import build_model
    from fedsweep.partition import iid_shards
    from fedsweep.tokens import load_split

    torch.set_num_threads(threads)
    data = load_split(tokens_dir(), "train")
    lengths = data.lengths.numpy()
    rows = np.arange(examples)
    model = build_model(model_spec, 4, seed=0)
    protocol = PROTOCOLS["standard"]
    times = []
    for rep in range(repeats + 1):  # the first pass warms up allocators and caches
        if mode == "central":
            opt = torch.optim.SGD(model.parameters(), lr=2e-5)
            model.train()
            batches = client_batches(rows, 32, protocol, 0, rep, 0, 0)
            t0 = time.perf_counter()
            for ids, mask, labels in _batches_on_device(data, lengths, batches, protocol):
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            float(loss)
            times.append(time.perf_counter() - t0)
        else:
            k = int(mode)
            if rep == 0:
                flat = FlatParameters(model)
                strategy = FedAvg(flat.data.clone())
            shards = iid_shards(examples, k, seed=rep)
            t0 = time.perf_counter()
            strategy.begin_round(examples)
            for c, shard in enumerate(shards):
                flat.data.copy_(strategy.weights)
                loss_sum, _ = train_client(model, flat, data, lengths, shard, epochs=1, batch_size=32, lr=2e-5,
                                           protocol=protocol, seed=0, round_=rep, client=c, bf16=False)
                float(loss_sum)
                strategy.add(flat.data, len(shard))
                torch.linalg.vector_norm(flat.data.sub_(strategy.weights))
            strategy.finish_round(scratch=flat.data)
            times.append(time.perf_counter() - t0)
    best = min(times[1:])
    return {"model": model_spec, "mode": mode, "examples": examples, "seconds": best,
            "examples_per_s": examples / best, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-bert", "minilm"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--examples", type=int, default=1024, help="a multiple of 32 x max(clients)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed passes after one warm-up (best is kept)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.examples, a.threads, a.repeats)))
        return
    from common import tokens_dir

    tokens_dir()  # tokenise once, outside the timed processes
    print(f"{'model':<12}{'mode':>9}{'ex/s':>10}{'overhead':>10}{'peak MiB':>10}")
    for model in a.models:
        results = {}
        for mode in ["central", *map(str, a.clients)]:
            out = subprocess.run([sys.executable, __file__, "--one", model, mode, "--examples", str(a.examples),
                                  "--threads", str(a.threads), "--repeats", str(a.repeats)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode] = r
            ratio = r["seconds"] / results["central"]["seconds"]
            label = "central" if mode == "central" else f"K={mode}"
            print(f"{model:<12}{label:>9}{r['examples_per_s']:>10.1f}{ratio:>10.3f}{r['peak_rss_mib']:>10.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
