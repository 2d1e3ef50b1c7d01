"""bench_algorithms.py cross-device on Flower's simulation engine (Ray): 1,000 (or more) supernodes,
10 sampled per round, Flower's FedAvg aggregating. Run with the venv of requirements-peers.txt:

    benchmarks/.venv-peers/bin/python benchmarks/peers/flower_cross_device.py '{"clients": 1000}'

As Flower's PyTorch quickstart: a ClientApp whose client_fn builds a NumPyClient (and a tiny-bert)
per message (``reuse_model``: one model per actor instead), weights as numpy arrays from the
state_dict, Flower's ``FedAvg`` in a ServerApp. Sampling: FedAvg's own (``fraction_fit`` =
per_round / clients through the client manager); its ``configure_fit`` is extended only to tell
each of the sampled nodes WHICH shard to train: the clients ``fedsweep.rounds.sample_clients``
draws for that round, so Flower and fedsweep train the same examples in the same batches
(``fedsweep.engine.client_batches``), with the same dropout seeds, lr and B.
Prints one JSON line: per-round seconds (configure_fit of round r to the end of its aggregation,
marked by a server-side evaluate_fn that does nothing), wall time, peak RSS of the process tree.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import OrderedDict

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, FitIns, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from cell import PeakRSS, now, per_process  # noqa: E402  (puts benchmarks/ on sys.path)
from bench_algorithms import cross_device_data  # noqa: E402
from fedsweep.engine import PROTOCOLS, batches_on_device, client_batches, derive_seed  # noqa: E402
from fedsweep.models import build_model  # noqa: E402
from fedsweep.rounds import sample_clients  # noqa: E402

PROTOCOL = PROTOCOLS["standard"]
SETTINGS = {"clients": 1000, "per_round": 10, "rounds": 9, "threads": 2, "lr": 0.05, "batch_size": 16, "seed": 0,
            "reuse_model": False}


def get_weights(model):
    return [v.cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights):
    model.load_state_dict(OrderedDict((k, torch.tensor(v)) for k, v in zip(model.state_dict().keys(), weights)),
                          strict=True)


class Client(NumPyClient):
    def __init__(self, s: dict):
        torch.set_num_threads(s["threads"])
        self.s = s
        self.data = per_process(("cross-device", s["clients"]), lambda: cross_device_data(s["clients"]))
        if s["reuse_model"]:
            self.model = per_process(("model",), lambda: build_model("tiny-bert", 4, seed=s["seed"]))
        else:
            self.model = build_model("tiny-bert", 4, seed=s["seed"])

    def fit(self, parameters, config):
        s, model = self.s, self.model
        data, lengths, shards = self.data
        round_, k = int(config["server_round"]), int(config["client"])
        set_weights(model, parameters)
        opt = torch.optim.SGD(model.parameters(), lr=s["lr"])
        model.train()
        torch.manual_seed(derive_seed(s["seed"], "dropout", round_, k))
        batches = client_batches(shards[k], s["batch_size"], PROTOCOL, s["seed"], round_, k, 0)
        for ids, mask, labels in batches_on_device(data, lengths, batches, PROTOCOL):
            loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return get_weights(model), len(shards[k]), {}


def main() -> None:
    s = {**SETTINGS, **json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")}
    torch.set_num_threads(s["threads"])
    n, per_round = s["clients"], s["per_round"]
    _, _, shards = cross_device_data(n)
    marks: dict[int, float] = {}
    ends: dict[int, float] = {}
    examples: dict[int, int] = {}

    class SampledFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            marks[server_round] = now()
            pairs = super().configure_fit(server_round, parameters, client_manager)  # FedAvg samples the nodes
            chosen = sample_clients(n, per_round, s["seed"], server_round)  # ... and we name their shards
            examples[server_round] = int(sum(len(shards[k]) for k in chosen))
            return [(proxy, FitIns(ins.parameters, {"server_round": server_round, "client": k}))
                    for (proxy, ins), k in zip(pairs, chosen, strict=True)]

    def evaluate_fn(server_round, parameters, config):
        ends[server_round] = now()  # called right after the round's aggregation
        return None

    def client_fn(context: Context):
        return Client(s).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        init = ndarrays_to_parameters(get_weights(build_model("tiny-bert", 4, seed=s["seed"])))
        strategy = SampledFedAvg(fraction_fit=per_round / n, fraction_evaluate=0.0, min_fit_clients=per_round,
                                 min_evaluate_clients=0, min_available_clients=n, initial_parameters=init,
                                 evaluate_fn=evaluate_fn)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=s["rounds"]))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    mem = PeakRSS()
    t0 = now()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": s["threads"], "num_gpus": 0.0},
                                   "init_args": {"num_cpus": s["threads"], "logging_level": logging.ERROR,
                                                 "log_to_driver": False}})
    wall = now() - t0
    peak = mem.stop_mib()
    mem.reap()
    rounds = {r: ends[r] - marks[r] for r in marks if r in ends}
    if len(rounds) < s["rounds"]:
        raise SystemExit(f"flower: only {len(rounds)} of {s['rounds']} rounds finished")
    print(json.dumps({**s, "wall_s": wall, "rounds_s": rounds, "examples": examples, "peak_rss_mib": peak}),
          flush=True)


if __name__ == "__main__":
    main()
