"""Costs of the federated algorithms (issue #10): the server step of each strategy, the client
updates' extra work, and cross-device rounds with client sampling.

    python benchmarks/bench_algorithms.py server          # MiniLM: aggregation per strategy, K = 1 8 32
    python benchmarks/bench_algorithms.py clients         # MiniLM: per-step / per-client cost of FedProx, SCAFFOLD, AdamW
    python benchmarks/bench_algorithms.py cross-device    # tiny-bert, 1,000 and 10,000 clients, 10 per round

``server``: for each strategy, K client models (the global weights plus noise) are added to the
strategy (the fp64 weighted sum, drift norms and the reload of each client's buffer) and the server
step is applied (``finish_round``): the aggregation time of one round, the best of --repeats,
against FedAvg's at the same K. The share of a round uses a MiniLM training step (B=32, length
128, AG News) measured in the same process and the paper's smallest round (IMDB: 25,000 examples x
E=2 / B=32 = 1,563 steps, whatever K).

``clients``: the extra work of each client update over plain SGD: FedProx's ``mu (w - w_global)``
per step, SCAFFOLD's correction per step and its per-client control-variate work (file write, the
server's read-back and fp64 sum), AdamW's step vs SGD's; against the same MiniLM training step.

``cross-device`` (LEAF-style short texts): clients of 16-64 examples (uniform), 10 sampled per
round, tiny-bert at length 32, B=16, E=1. Per round: fedsweep (``rounds.Federation``: sampling,
loading the global weights into each client, training, the fp64 sum, the server step) against
centralised training of the same examples in the same batches (one model, torch.optim.SGD), the
best of --rounds rounds, alternating; peak RSS of the process at 1,000 and 10,000 clients (each
in its own process; the token pool is the same 40,000 rows for both, so only the clients differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STRATEGY_SETTINGS = {
    "fedavg": {},
    "fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
    "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.01, "beta1": 0.9, "tau": 1e-3},
}
IMDB_STEPS = 25_000 * 2 // 32  # the paper's smallest round: IMDB, E=2, B=32


def _minilm_step_seconds(model, flat, repeats: int = 3) -> float:
    """Seconds of one MiniLM SGD step at B=32 (AG News rows, dynamic padding up to 128)."""
    import torch
    import torch.nn.functional as F

    from common import tokens_dir
    from fedsweep.engine import PROTOCOLS, batches_on_device
    from fedsweep.tokens import load_split

    data = load_split(tokens_dir(), "train")
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data), 32, replace=False) for _ in range(repeats + 1)]
    times = []
    model.train()
    for ids, mask, labels in batches_on_device(data, data.lengths.numpy(), batches, PROTOCOLS["standard"]):
        t0 = time.perf_counter()
        F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        flat.sgd_step(1e-9)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def server(args) -> None:
    import torch

    from fedsweep.engine import FlatParameters
    from fedsweep.models import build_model
    from fedsweep.strategies import build_strategy

    torch.set_num_threads(args.threads)
    model = build_model(args.model, 4, seed=0)
    flat = FlatParameters(model)
    step = _minilm_step_seconds(model, flat)
    gen = torch.Generator().manual_seed(0)
    base = flat.data.clone()
    noisy = [base + 1e-3 * torch.randn(len(flat), generator=gen) for _ in range(2)]
    print(f"{args.model}: {flat.num_parameters / 1e6:.1f}M parameters, training step (B=32) {step * 1000:.0f} ms, "
          f"threads {args.threads}, best of {args.repeats}")
    print(f"{'strategy':<12}{'K':>4}{'adds ms':>10}{'finish ms':>11}{'aggregation ms':>16}{'vs fedavg':>11}"
          f"{'share IMDB round':>18}")
    for k in args.clients:
        reference = None
        for name, settings in STRATEGY_SETTINGS.items():
            strategy = build_strategy(name, base.clone(), **{"server_lr": 1.0, "server_momentum": 0.0, "beta1": 0.9,
                                                              "beta2": 0.99, "tau": 1e-3, **settings})
            best = (float("inf"), 0.0, 0.0)
            for _ in range(args.repeats + 1):  # the first is a warm-up
                strategy.weights.copy_(base)
                strategy.begin_round(k * 100)
                adds = 0.0
                for c in range(k):
                    flat.data.copy_(noisy[c % 2])  # the client's model (not timed)
                    t0 = time.perf_counter()
                    strategy.add(flat.data, 100)
                    adds += time.perf_counter() - t0
                t0 = time.perf_counter()
                strategy.finish_round(scratch=flat.data)
                finish = time.perf_counter() - t0
                if adds + finish < best[0]:
                    best = (adds + finish, adds, finish)
            total, adds, finish = best
            reference = reference or total
            print(f"{name:<12}{k:>4}{adds * 1000:>10.1f}{finish * 1000:>11.1f}{total * 1000:>16.1f}"
                  f"{total / reference:>10.3f}x{100 * total / (IMDB_STEPS * step):>17.3f}%", flush=True)


def clients(args) -> None:
    import torch
    import torch.nn.functional as F

    from common import tokens_dir
    from fedsweep.clients import ClientSettings, ControlVariateStore, FedProx, Scaffold, ClientUpdate
    from fedsweep.engine import PROTOCOLS, FlatParameters, batches_on_device
    from fedsweep.models import build_model
    from fedsweep.tokens import load_split

    torch.set_num_threads(args.threads)
    model = build_model(args.model, 4, seed=0)
    flat = FlatParameters(model)
    global_weights = flat.data.clone()
    data = load_split(tokens_dir(), "train")
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data), 32, replace=False) for _ in range(args.steps)]
    model.train()

    def steps(update: ClientUpdate) -> tuple[float, float]:
        """(seconds per step with this client update, of which the optimiser's step incl. corrections)."""
        update.begin_round(1, 1e-6, [0], [100])
        flat.data.copy_(global_weights)
        local = update.optimizer(flat.params, flat.data, flat.views, [0])
        total, stepping = [], []
        for ids, mask, labels in batches_on_device(data, data.lengths.numpy(), batches, PROTOCOLS["standard"]):
            t0 = time.perf_counter()
            F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
            t1 = time.perf_counter()
            local.step()
            t2 = time.perf_counter()
            total.append(t2 - t0)
            stepping.append(t2 - t1)
        return statistics.median(total[1:]), statistics.median(stepping[1:])

    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "sgd": ClientUpdate(ClientSettings(), global_weights),
            "fedprox": FedProx(ClientSettings(client="fedprox", mu=0.01), global_weights),
            "scaffold": Scaffold(ClientSettings(client="scaffold"), global_weights,
                                 ControlVariateStore(Path(tmp) / "cv", 4, len(flat), flat.data.device)),
            "adamw": ClientUpdate(ClientSettings(client_optimizer="adamw"), global_weights),
        }
        print(f"{args.model}: {flat.num_parameters / 1e6:.1f}M parameters, B=32, threads {args.threads}, "
              f"median of {args.steps - 1} steps")
        print(f"{'client':<10}{'step ms':>9}{'optimiser ms':>14}{'extra vs sgd':>14}")
        sgd_total = None
        for name, update in variants.items():
            total, stepping = steps(update)
            sgd_total = sgd_total or total
            print(f"{name:<10}{total * 1000:>9.1f}{stepping * 1000:>14.2f}{100 * (total / sgd_total - 1):>13.1f}%",
                  flush=True)
        # SCAFFOLD's per-client work: c_i+ and its file (after_client), and the server's c update per client
        scaffold = variants["scaffold"]
        times_after, times_finish = [], []
        for r in range(1, 4):
            scaffold.begin_round(r, 1e-6, [0, 1, 2, 3], [100] * 4)
            t_after = 0.0
            for c in range(4):
                local = scaffold.optimizer(flat.params, flat.data, flat.views, [c])
                local.steps = 8
                t0 = time.perf_counter()
                scaffold.after_client(local, 0, c, flat.data, 100)
                t_after += time.perf_counter() - t0
            t0 = time.perf_counter()
            scaffold.finish_round()
            times_finish.append((time.perf_counter() - t0) / 4)
            times_after.append(t_after / 4)
            scaffold.commit(True)
        print(f"scaffold per client: c_i+ and its file {1000 * min(times_after):.1f} ms, server's c update "
              f"{1000 * min(times_finish):.1f} ms ({len(flat) * 4 / 2 ** 20:.0f} MiB per control variate)")


def _cross_device_one(num_clients: int, rounds: int, per_round: int, threads: int, algorithm: str) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from fedsweep.clients import ClientSettings, ClientUpdate, ControlVariateStore, Scaffold
    from fedsweep.engine import PROTOCOLS, FlatParameters, batches_on_device, client_batches
    from fedsweep.models import build_model
    from fedsweep.rounds import Federation
    from fedsweep.strategies import build_strategy
    from fedsweep.tokens import TokenTensors

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    pool = 40_000  # LEAF-style short texts: 8-32 tokens
    lengths = rng.integers(8, 33, pool)
    ids = torch.from_numpy(rng.integers(1000, 30000, (pool, 32)))
    ids[torch.arange(32)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    data = TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, 4, pool)), 0)
    sizes = rng.integers(16, 65, num_clients)
    if sizes.sum() <= pool:  # disjoint shards where the pool allows, else random subsets of it
        perm, starts = rng.permutation(pool), np.concatenate([[0], np.cumsum(sizes)])
        shards = [perm[starts[k]:starts[k + 1]] for k in range(num_clients)]
    else:
        shards = [rng.choice(pool, n, replace=False) for n in sizes]
    model = build_model("tiny-bert", 4, seed=0)
    flat = FlatParameters(model)
    protocol = PROTOCOLS["standard"]
    tmp = tempfile.TemporaryDirectory()
    name, _, server = algorithm.partition("+")
    strategy = build_strategy(server or "fedavg", flat.data.clone(), server_lr=0.01, server_momentum=0.9,
                              beta1=0.9, beta2=0.99, tau=1e-3)
    if name == "scaffold":
        update = Scaffold(ClientSettings(client="scaffold"), strategy.weights,
                          ControlVariateStore(tmp.name, num_clients, len(flat), flat.data.device))
    else:
        update = ClientUpdate(ClientSettings(), strategy.weights)
    fed = Federation(model, flat, strategy, update, data, lengths, shards, epochs=1, batch_size=16,
                     protocol=protocol, seed=0, lr=0.05, rounds=rounds, per_round=per_round)
    central_model = build_model("tiny-bert", 4, seed=0)

    def federated(r: int) -> float:
        t0 = time.perf_counter()
        fed.finish(fed.train(r))
        return time.perf_counter() - t0

    def centralised(r: int) -> float:
        batches = [b for k in fed.round_clients(r) for b in client_batches(shards[k], 16, protocol, 0, r, k, 0)]
        opt = torch.optim.SGD(central_model.parameters(), lr=0.05)
        central_model.train()
        t0 = time.perf_counter()
        for x, mask, y in batches_on_device(data, lengths, batches, protocol):
            F.cross_entropy(central_model(input_ids=x, attention_mask=mask).logits, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    federated(1), centralised(1)  # warm-up
    pairs = []
    for r in range(2, rounds + 2):
        if r % 2:
            pairs.append((centralised(r), federated(r)))
        else:
            f = federated(r)
            pairs.append((centralised(r), f))
    examples = statistics.mean(sum(len(shards[k]) for k in fed.round_clients(r)) for r in range(2, rounds + 2))
    tmp.cleanup()
    return {"clients": num_clients, "algorithm": algorithm, "per_round": per_round, "examples": examples,
            "central_s": min(c for c, _ in pairs), "fed_s": min(f for _, f in pairs),
            "ratio_median": statistics.median(f / c for c, f in pairs),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cross_device(args) -> None:
    print(f"tiny-bert, length <= 32, B=16, E=1, {args.per_round} clients per round of 16-64 examples, "
          f"threads {args.threads}, best of {args.rounds} alternating rounds")
    print(f"{'clients':>8}  {'algorithm':<18}{'examples':>9}{'central s':>11}{'fedsweep s':>12}{'ratio best':>12}"
          f"{'ratio median':>14}{'peak MiB':>10}")
    for algorithm in args.algorithms:
        for k in args.clients:
            out = subprocess.run([sys.executable, __file__, "cross-device", "--one", str(k), "--algorithms", algorithm,
                                  "--rounds", str(args.rounds), "--per-round", str(args.per_round),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{k:>8}  {algorithm:<18}{r['examples']:>9.0f}{r['central_s']:>11.3f}{r['fed_s']:>12.3f}"
                  f"{r['fed_s'] / r['central_s']:>12.3f}{r['ratio_median']:>14.3f}{r['peak_rss_mib']:>10.0f}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["server", "clients", "cross-device"])
    p.add_argument("--model", default="minilm")
    p.add_argument("--clients", nargs="+", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="clients: training steps per variant")
    p.add_argument("--rounds", type=int, default=8, help="cross-device: timed rounds")
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--algorithms", nargs="+", default=["fedavg", "scaffold", "plain+fedadam"],
                   help="cross-device: CLIENT[+STRATEGY], e.g. fedavg, scaffold, plain+fedadam")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.what == "server":
        a.clients = a.clients or [1, 8, 32]
        server(a)
    elif a.what == "clients":
        clients(a)
    elif a.one:
        print(json.dumps(_cross_device_one(a.one, a.rounds, a.per_round, a.threads, a.algorithms[0])))
    else:
        a.clients = a.clients or [1000, 10000]
        cross_device(a)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
