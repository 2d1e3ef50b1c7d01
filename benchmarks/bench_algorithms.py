"""Costs of the federated algorithms (issue #10): the server step of each strategy, the client
updates' extra work, and cross-device rounds with client sampling.

    python benchmarks/bench_algorithms.py server          # MiniLM: aggregation per strategy, K = 1 8 32
    python benchmarks/bench_algorithms.py clients         # MiniLM: per-step / per-client cost of FedProx, SCAFFOLD, AdamW
    python benchmarks/bench_algorithms.py cross-device    # tiny-bert, 1,000 and 10,000 clients, 10 per round
    python benchmarks/bench_algorithms.py cross-device --threads 1 --flower 1000   # ... and Flower's simulation
    python benchmarks/bench_algorithms.py device --device cuda   # a GPU: every algorithm vs the CPU, server step times

``server``: for each strategy, K client models (the global weights plus noise) are added to the
strategy (the fp64 weighted sum, drift norms and the reload of each client's buffer) and the server
step is applied (``finish_round``): the aggregation time of one round, the best of --repeats
(strategies interleaved), against FedAvg's at the same K. The share of a round uses a training step
at IMDB's shape (B=32, every row full to 128 tokens) measured in the same process and the paper's
smallest round (IMDB: 25,000 examples x E=2 / B=32 = 1,562 steps, whatever K).

``clients``: per step (B=32, length 128, the variants interleaved step by step, best of --steps - 1):
the optimiser's time with FedProx's ``mu (w - w_global)``, SCAFFOLD's ``c - c_i`` and AdamW vs plain
SGD's; per client: ``optimizer()`` (SCAFFOLD reads ``c_i`` from its file, AdamW resets its state),
``after_client()`` (SCAFFOLD's ``c_i+``, its file write and the fp64 sum) and the client's share of
``finish_round()``, against one client's training at K=32 on IMDB (50 steps).

``cross-device`` (LEAF-style short texts): clients of 16-64 examples (uniform), 10 sampled per
round, tiny-bert at length 32, B=16, E=1. Per round: fedsweep (``rounds.Federation``: sampling,
loading the global weights into each client, training, the fp64 sum, the server step) against
centralised training of the same examples in the same batches (one model, torch.optim.SGD, the
batch plan timed too), each of --rounds rounds run --repeats times alternating, the best per round;
peak RSS of the process at 1,000 and 10,000 clients (each in its own process; the token pool is the
same 40,000 rows for both, so only the clients differ). fedsweep's clients step the input embedding
by the rows they index (``engine.sgd_step``; the same bits), which torch.optim.SGD does not:
``--central-rows`` gives the centralised loop that step too, so that the ratio is the federated
round's own overhead. ``--flower 1000`` also runs Flower's
simulation on the same clients and batches (peers/flower_cross_device.py, in benchmarks/.venv-peers)
and compares its seconds per round with fedsweep's FedAvg round by round.
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


def _full_length_step_seconds(model, flat, length: int = 128, repeats: int = 3) -> float:
    """Seconds of one SGD step at B=32 with every row full to ``length`` tokens: IMDB's shape (its
    reviews are longer than 128 tokens, so truncation fills every row)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    times = []
    model.train()
    for _ in range(repeats + 1):
        ids = torch.randint(1000, 30000, (32, length), generator=gen)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 4, (32,), generator=gen)
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
    base = flat.data.clone()
    ag_step = _minilm_step_seconds(model, flat)
    step = _full_length_step_seconds(model, flat)  # the paper's shape: the round's share uses this one
    flat.data.copy_(base)
    gen = torch.Generator().manual_seed(0)
    noisy = [base + 1e-3 * torch.randn(len(flat), generator=gen) for _ in range(2)]
    print(f"{args.model}: {flat.num_parameters / 1e6:.1f}M parameters, training step (B=32) {step * 1000:.0f} ms at "
          f"length 128 ({ag_step * 1000:.0f} ms on AG News rows, dynamic padding), threads {args.threads}, "
          f"best of {args.repeats} interleaved; IMDB round = {IMDB_STEPS} steps = {IMDB_STEPS * step:.0f} s")
    print(f"{'strategy':<12}{'K':>4}{'adds ms':>10}{'finish ms':>11}{'aggregation ms':>16}{'vs fedavg':>11}"
          f"{'share IMDB round':>18}")
    for k in args.clients:
        strategies = {name: build_strategy(name, base.clone(), **{"server_lr": 1.0, "server_momentum": 0.0,
                                                                    "beta1": 0.9, "beta2": 0.99, "tau": 1e-3,
                                                                    **settings})
                      for name, settings in STRATEGY_SETTINGS.items()}
        best = {name: (float("inf"), 0.0, 0.0) for name in strategies}
        for _ in range(args.repeats + 1):  # interleaved, so a busy moment hits every strategy alike
            for name, strategy in strategies.items():
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
                if adds + finish < best[name][0]:
                    best[name] = (adds + finish, adds, finish)
        reference = best["fedavg"][0]
        for name, (total, adds, finish) in best.items():
            print(f"{name:<12}{k:>4}{adds * 1000:>10.1f}{finish * 1000:>11.1f}{total * 1000:>16.1f}"
                  f"{total / reference:>10.3f}x{100 * total / (IMDB_STEPS * step):>17.3f}%", flush=True)


def clients(args) -> None:
    import torch
    import torch.nn.functional as F

    from fedsweep.clients import ClientSettings, FedProx, ClientUpdate
    from fedsweep.engine import FlatParameters
    from fedsweep.models import build_model
    from fedsweep.scaffold import ControlVariateStore, Scaffold

    torch.set_num_threads(args.threads)
    model = build_model(args.model, 4, seed=0)
    flat = FlatParameters(model)
    global_weights = flat.data.clone()
    gen = torch.Generator().manual_seed(0)
    # IMDB's shape: B=32 rows full to 128 tokens (token values do not change the time)
    batches = [(torch.randint(1000, 30000, (32, 128), generator=gen), torch.ones(32, 128, dtype=torch.long),
                torch.randint(0, 4, (32,), generator=gen)) for _ in range(args.steps)]
    model.train()
    client_steps = 2 * -(-(25_000 // 32) // 32)  # one client's local steps in an IMDB round at K=32, E=2

    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "sgd": ClientUpdate(ClientSettings(), global_weights),
            "fedprox": FedProx(ClientSettings(client="fedprox", mu=0.01), global_weights),
            "scaffold": Scaffold(ClientSettings(client="scaffold"), global_weights,
                                 ControlVariateStore(Path(tmp) / "cv", 4)),
            "adamw": ClientUpdate(ClientSettings(client_optimizer="adamw"), global_weights),
        }
        # Per step, interleaved: each variant takes the same batch in turn (the first batch is a warm-up),
        # from the global weights, so a busy moment on the machine hits every variant alike.
        total = {name: [] for name in variants}
        stepping = {name: [] for name in variants}
        for update in variants.values():
            update.begin_round(1, 1e-6, [0], [100] * 4)
        for ids, mask, labels in batches:
            for name, update in variants.items():
                flat.data.copy_(global_weights)
                local = update.optimizer(flat.params, flat.data, flat.views, [0])
                t0 = time.perf_counter()
                F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
                t1 = time.perf_counter()
                local.step()
                t2 = time.perf_counter()
                total[name].append(t2 - t0)
                stepping[name].append(t2 - t1)
        # Per client: what a client costs beyond its steps (optimizer(): SCAFFOLD's read of c_i and
        # c - c_i, AdamW's state reset; after_client(): SCAFFOLD's c_i+ and its file write and fp64
        # add; the client's share of finish_round()), 4 clients x 3 rounds, best round.
        per_client = {name: [] for name in variants}
        for name, update in variants.items():
            for r in range(1, 4):
                update.begin_round(r, 1e-6, [0, 1, 2, 3], [100] * 4)
                t_client = 0.0
                for c in range(4):
                    flat.data.copy_(global_weights)
                    t0 = time.perf_counter()
                    local = update.optimizer(flat.params, flat.data, flat.views, [c])
                    t_client += time.perf_counter() - t0
                    local.steps = 8
                    flat.data.add_(1e-6)  # the client's model (not timed)
                    t0 = time.perf_counter()
                    update.after_client(local, 0, c, flat.data, 100)
                    t_client += time.perf_counter() - t0
                t0 = time.perf_counter()
                update.finish_round()
                t_client += time.perf_counter() - t0
                update.commit(True)
                per_client[name].append(t_client / 4)
        sgd_step_s = min(total["sgd"][1:])
        sgd_opt_s = min(stepping["sgd"][1:])
        print(f"{args.model}: {flat.num_parameters / 1e6:.1f}M parameters, B=32, length 128, threads {args.threads}, "
              f"best of {args.steps - 1} interleaved steps; a client at K=32 on IMDB (E=2) takes {client_steps} steps")
        print(f"{'client':<10}{'step ms':>9}{'vs sgd':>8}{'optimiser ms':>14}{'extra ms':>10}{'extra/step':>12}"
              f"{'per-client ms':>15}{'per-client/client':>19}")
        for name in variants:
            step_s, opt_s, client_s = min(total[name][1:]), min(stepping[name][1:]), min(per_client[name])
            extra = opt_s - sgd_opt_s
            print(f"{name:<10}{step_s * 1000:>9.1f}{step_s / sgd_step_s:>7.3f}x{opt_s * 1000:>14.2f}{extra * 1000:>10.2f}"
                  f"{100 * extra / sgd_step_s:>11.2f}%{client_s * 1000:>15.2f}"
                  f"{100 * client_s / (client_steps * sgd_step_s):>18.3f}%", flush=True)
        print(f"extra/step: (optimiser ms - sgd's) / sgd's step; per-client/client: per-client ms / "
              f"({client_steps} x sgd's step); {len(flat) * 4 / 2 ** 20:.0f} MiB per control variate file")


def cross_device_data(num_clients: int, pool: int = 40_000, seed: int = 0):
    """(TokenTensors, lengths, shards): a pool of LEAF-style short texts (8-32 tokens, random ids,
    4 labels) and ``num_clients`` shards of 16-64 of its rows (disjoint where the pool allows, else
    random subsets). Also used by peers/flower_cross_device.py: the same clients in both."""
    import torch

    from fedsweep.tokens import TokenTensors

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 33, pool)
    ids = torch.from_numpy(rng.integers(1000, 30000, (pool, 32)))
    ids[torch.arange(32)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    data = TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, 4, pool)), 0)
    sizes = rng.integers(16, 65, num_clients)
    if sizes.sum() <= pool:
        perm, starts = rng.permutation(pool), np.concatenate([[0], np.cumsum(sizes)])
        shards = [perm[starts[k]:starts[k + 1]] for k in range(num_clients)]
    else:
        shards = [rng.choice(pool, n, replace=False) for n in sizes]
    return data, lengths, shards


def _cross_device_one(num_clients: int, rounds: int, per_round: int, threads: int, algorithm: str,
                      repeats: int = 2, central_rows: bool = False) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from fedsweep.clients import ClientSettings, ClientUpdate
    from fedsweep.engine import PROTOCOLS, FlatParameters, batches_on_device, client_batches, sgd_step
    from fedsweep.models import build_model
    from fedsweep.rounds import Federation
    from fedsweep.scaffold import ControlVariateStore, Scaffold
    from fedsweep.strategies import build_strategy

    torch.set_num_threads(threads)
    data, lengths, shards = cross_device_data(num_clients)
    model = build_model("tiny-bert", 4, seed=0)
    flat = FlatParameters(model)
    protocol = PROTOCOLS["standard"]
    tmp = tempfile.TemporaryDirectory()
    name, _, server = algorithm.partition("+")
    strategy = build_strategy(server or "fedavg", flat.data.clone(), server_lr=0.01, server_momentum=0.9,
                              beta1=0.9, beta2=0.99, tau=1e-3)
    if name == "scaffold":
        update = Scaffold(ClientSettings(client="scaffold"), strategy.weights,
                          ControlVariateStore(tmp.name, num_clients))
    else:
        update = ClientUpdate(ClientSettings(), strategy.weights)
    fed = Federation(model, flat, strategy, update, data, lengths, shards, epochs=1, batch_size=16,
                     protocol=protocol, seed=0, lr=0.05, rounds=rounds, per_round=per_round)
    central_model = build_model("tiny-bert", 4, seed=0)
    central_params = list(central_model.parameters())
    central_embedding = next(i for i, p in enumerate(central_params) if p is central_model.get_input_embeddings().weight)

    def federated(r: int) -> float:
        t0 = time.perf_counter()
        fed.finish(fed.train(r))
        return time.perf_counter() - t0

    def centralised(r: int) -> float:
        central_model.train()
        t0 = time.perf_counter()  # the batch plan is timed, as it is inside fedsweep's round
        batches = [b for k in fed.round_clients(r) for b in client_batches(shards[k], 16, protocol, 0, r, k, 0)]
        opt = torch.optim.SGD(central_model.parameters(), lr=0.05)
        for x, mask, y in batches_on_device(data, lengths, batches, protocol):
            F.cross_entropy(central_model(input_ids=x, attention_mask=mask).logits, y).backward()
            if central_rows:  # the input embedding by the batch's rows, as fedsweep's clients step it
                sgd_step(central_params, 0.05, (central_embedding, torch.unique(x)))
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    federated(1), centralised(1)  # warm-up
    # Each round's clients (hence examples) differ, so compare round by round: every timed round
    # r is run `repeats` times by each, alternating which goes first; the best of each per round.
    fed_best, central_best = {}, {}
    for r in range(2, rounds + 2):
        for i in range(repeats):
            order = (federated, centralised) if (r + i) % 2 else (centralised, federated)
            for fn in order:
                seconds = fn(r)
                best = fed_best if fn is federated else central_best
                best[r] = min(seconds, best.get(r, float("inf")))
    examples = statistics.mean(sum(len(shards[k]) for k in fed.round_clients(r)) for r in fed_best)
    tmp.cleanup()
    return {"clients": num_clients, "algorithm": algorithm, "per_round": per_round, "examples": examples,
            "central_s": statistics.mean(central_best.values()), "fed_s": statistics.mean(fed_best.values()),
            "ratio_median": statistics.median(fed_best[r] / central_best[r] for r in fed_best),
            "fed_rounds": fed_best, "central_rounds": central_best,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_cross_device(k: int, algorithm: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "cross-device", "--one", str(k), "--algorithms", algorithm,
                          "--rounds", str(args.rounds), "--per-round", str(args.per_round), "--threads",
                          str(args.threads), "--repeats", str(args.repeats), *(["--no-worker"] if args.no_worker else []),
                          *(["--central-rows"] if args.central_rows else [])],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["fed_rounds"] = {int(i): v for i, v in r["fed_rounds"].items()}
    r["central_rounds"] = {int(i): v for i, v in r["central_rounds"].items()}
    return r


FLOWER_PYTHON = Path(__file__).resolve().parent / ".venv-peers" / "bin" / "python"


def cross_device(args) -> None:
    print(f"tiny-bert, length <= 32, B=16, E=1, {args.per_round} clients per round of 16-64 examples, "
          f"threads {args.threads}, {args.rounds} timed rounds (after 1 warm-up), each the best of {args.repeats} "
          f"alternating runs")
    print(f"{'clients':>8}  {'algorithm':<16}{'ex/round':>9}{'central s':>11}{'fedsweep s':>12}{'ratio':>8}"
          f"{'ratio median':>14}{'peak MiB':>10}")
    fedavg = {}
    for algorithm in args.algorithms:
        for k in args.clients:
            r = _run_cross_device(k, algorithm, args)
            if algorithm == "fedavg":
                fedavg[k] = r
            print(f"{k:>8}  {algorithm:<16}{r['examples']:>9.0f}{r['central_s']:>11.3f}{r['fed_s']:>12.3f}"
                  f"{r['fed_s'] / r['central_s']:>8.3f}{r['ratio_median']:>14.3f}{r['peak_rss_mib']:>10.0f}",
                  flush=True)
    print("central s, fedsweep s: mean over the timed rounds of each round's best; ratio = fedsweep / central "
          "(same examples, same batches); ratio median: of the per-round ratios; peak MiB: ru_maxrss")
    if not args.flower:
        return
    if not FLOWER_PYTHON.exists():
        print(f"flower: skipped, {FLOWER_PYTHON} is missing (see benchmarks/requirements-peers.txt)")
        return
    for k in args.flower:
        ref = fedavg.get(k) or _run_cross_device(k, "fedavg", args)
        for variant in args.flower_variants:
            settings = {"clients": k, "per_round": args.per_round, "rounds": args.rounds + 1, "threads": args.threads,
                        "reuse_model": variant == "reuse"}
            out = subprocess.run([str(FLOWER_PYTHON), str(Path(__file__).resolve().parent / "peers" /
                                                          "flower_cross_device.py"), json.dumps(settings)],
                                 capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                print(f"flower {variant} at {k} clients failed (exit {out.returncode}):\n"
                      + "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:]))
                continue
            f = json.loads(lines[-1])
            flower = {int(i): v for i, v in f["rounds_s"].items()}
            timed = sorted(ref["fed_rounds"])
            fl = statistics.mean(flower[i] for i in timed)
            fs = statistics.mean(ref["fed_rounds"][i] for i in timed)
            ce = statistics.mean(ref["central_rounds"][i] for i in timed)
            ratios = [flower[i] / ref["fed_rounds"][i] for i in timed]
            print(f"flower ({variant}) {k} clients: round 1 (actors' start) {flower[1]:.2f} s; rounds "
                  f"{timed[0]}-{timed[-1]}: flower {fl:.3f} s/round, fedsweep {fs:.3f}, central {ce:.3f}; "
                  f"flower / fedsweep {fl / fs:.1f}x (per-round median {statistics.median(ratios):.1f}x, "
                  f"min {min(ratios):.1f}x); wall {f['wall_s']:.1f} s; peak RSS (process tree) "
                  f"{f['peak_rss_mib']:.0f} MiB", flush=True)
            print("  per round (flower s / fedsweep s): " + ", ".join(
                f"{i}: {flower[i]:.2f}/{ref['fed_rounds'][i]:.3f}" for i in timed), flush=True)


def _config_model(name: str, seed: int = 0):
    """A random-initialised BERT of MiniLM-L6's shape (22.7M parameters) or a micro one: no files needed."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    shape = {"minilm-shape": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
             "micro": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)}[name]
    return BertForSequenceClassification(BertConfig(vocab_size=30522, max_position_embeddings=128, num_labels=4,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                    **shape))


def device(args) -> None:
    """Every algorithm for 3 rounds on the device and on the CPU (fp32, random data, a micro BERT):
    the weights agree to fp32 rounding; then the server step of each strategy on the device for a
    MiniLM-shaped model, against FedAvg's."""
    import torch

    from fedsweep.clients import ClientSettings, ClientUpdate, FedProx
    from fedsweep.engine import PROTOCOLS, FlatParameters
    from fedsweep.grouped import ClientGroups
    from fedsweep.rounds import Federation
    from fedsweep.scaffold import ControlVariateStore, Scaffold
    from fedsweep.strategies import build_strategy
    from fedsweep.tokens import TokenTensors
    from fedsweep.train import precision_settings

    dev = torch.device(args.device)
    precision_settings("fp32", dev)
    rng = np.random.default_rng(0)
    n = 256
    lengths = rng.integers(8, 33, n)
    ids = torch.from_numpy(rng.integers(1000, 30000, (n, 32)))
    ids[torch.arange(32)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    cpu_data = TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, 4, n)), 0)
    shards = [np.arange(0, 64), np.arange(64, 128), np.arange(128, 192), np.arange(192, 256)]
    algorithms = {
        "fedavg": ("fedavg", ClientSettings(), {}),
        "fedavgm": ("fedavgm", ClientSettings(), {"server_lr": 1.0, "server_momentum": 0.9}),
        "fedadam": ("fedadam", ClientSettings(), {"server_lr": 0.01}),
        "fedyogi": ("fedyogi", ClientSettings(), {"server_lr": 0.01}),
        "fedadagrad": ("fedadagrad", ClientSettings(), {"server_lr": 0.01}),
        "fedprox+adamw": ("fedavg", ClientSettings(client="fedprox", mu=0.1, client_optimizer="adamw"), {}),
        "scaffold": ("fedavg", ClientSettings(client="scaffold"), {}),
    }
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (strategy_name, settings, server_settings) in algorithms.items():
            for group in (1, 2):
                result = {}
                for where in (torch.device("cpu"), dev):
                    model = _config_model("micro").to(where)
                    flat = FlatParameters(model)
                    strategy = build_strategy(strategy_name, flat.data.clone(), **{
                        "server_lr": 1.0, "server_momentum": 0.0, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3,
                        **server_settings})
                    if settings.client == "scaffold":
                        update = Scaffold(settings, strategy.weights, ControlVariateStore(
                            Path(tmp) / f"{name}-{group}-{where.type}", 4))
                    else:
                        update = (FedProx if settings.client == "fedprox" else ClientUpdate)(settings, strategy.weights)
                    lr = 2e-3 if settings.client_optimizer == "adamw" else 0.05
                    fed = Federation(model, flat, strategy, update, cpu_data.to(where), lengths, shards, epochs=1,
                                     batch_size=16, protocol=PROTOCOLS["standard"], seed=0, lr=lr, rounds=3,
                                     groups=ClientGroups(model, flat, group) if group > 1 else None)
                    for r in range(1, 4):
                        fed.finish(fed.train(r))
                    result[where.type] = strategy.weights.cpu()
                diff = float((result["cpu"] - result[dev.type]).abs().max())
                moved = float((result["cpu"] - FlatParameters(_config_model("micro")).data).abs().max())
                print(f"{name:<15} client_group {group}: max |cpu - {dev.type}| {diff:.2e} (weights moved {moved:.2e})",
                      flush=True)
    if dev.type != "cuda":
        return
    model = _config_model("minilm-shape").to(dev)
    flat = FlatParameters(model)
    base = flat.data.clone()
    noisy = [base + 1e-3 * torch.randn_like(base) for _ in range(2)]
    for k in args.clients or [1, 32]:
        best = {}
        for _ in range(args.repeats + 1):
            for name, settings in STRATEGY_SETTINGS.items():
                strategy = best.get(name, (None,))[0] or build_strategy(name, base.clone(), **{
                    "server_lr": 1.0, "server_momentum": 0.0, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, **settings})
                strategy.weights.copy_(base)
                strategy.begin_round(k * 100)
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for c in range(k):
                    flat.data.copy_(noisy[c % 2])
                    strategy.add(flat.data, 100)
                strategy.finish_round(scratch=flat.data)
                torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - t0
                best[name] = (strategy, min(seconds, best.get(name, (None, float("inf")))[1]))
        for name, (_, seconds) in best.items():
            print(f"{name:<12} K={k:<3} aggregation {seconds * 1000:7.2f} ms  {seconds / best['fedavg'][1]:.3f}x fedavg "
                  f"(adds include reloading each client's buffer)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["server", "clients", "cross-device", "device"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="minilm")
    p.add_argument("--clients", nargs="+", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="clients: training steps per variant")
    p.add_argument("--rounds", type=int, default=8, help="cross-device: timed rounds")
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--algorithms", nargs="+", default=["fedavg", "scaffold", "plain+fedadam"],
                   help="cross-device: CLIENT[+STRATEGY], e.g. fedavg, scaffold, plain+fedadam")
    p.add_argument("--flower", nargs="*", type=int, default=[],
                   help="cross-device: also run Flower's simulation at these numbers of clients (e.g. 1000)")
    p.add_argument("--flower-variants", nargs="+", choices=["quickstart", "reuse"], default=["quickstart", "reuse"],
                   help="quickstart: a model per message; reuse: one model per Ray actor")
    p.add_argument("--no-worker", action="store_true",
                   help="cross-device: no background thread (Strategy.submit, the server step, SCAFFOLD's work)")
    p.add_argument("--central-rows", action="store_true",
                   help="cross-device: the centralised loop steps the input embedding by each batch's rows, as "
                        "fedsweep's clients do (default: torch.optim.SGD, dense): the ratio is then the "
                        "federated round's own overhead")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.what == "server":
        a.clients = a.clients or [1, 8, 32]
        server(a)
    elif a.what == "clients":
        clients(a)
    elif a.what == "device":
        device(a)
    elif a.one:
        if a.no_worker:  # every client's sums, SCAFFOLD's work and the server step on the training thread
            import fedsweep.average
            import fedsweep.scaffold
            fedsweep.average.free_core = fedsweep.scaffold.free_core = lambda: False
        print(json.dumps(_cross_device_one(a.one, a.rounds, a.per_round, a.threads, a.algorithms[0], a.repeats,
                                           a.central_rows)))
    else:
        a.clients = a.clients or [1000, 10000]
        cross_device(a)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
