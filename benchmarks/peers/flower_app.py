"""The cell on Flower's simulation engine (Ray), written the way Flower's PyTorch quickstart is:
a ClientApp whose client_fn builds a NumPyClient (and its model) per message, weights sent as
lists of numpy arrays from the state_dict, Flower's own FedAvg strategy in a ServerApp, and a
server-side evaluate_fn on the test rows after the last round. Run with the venv of
benchmarks/requirements-peers.txt:

    benchmarks/.venv-peers/bin/python benchmarks/peers/flower_app.py '{"clients": 8}'
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a warning; no GPU is used

import numpy as np
import torch
import torch.nn.functional as F
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from cell import Cell, Data, PeakRSS, now, per_process, report
from fedsweep.models import build_model


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: list[np.ndarray]) -> None:
    state = OrderedDict((k, torch.tensor(v)) for k, v in zip(model.state_dict().keys(), weights))
    model.load_state_dict(state, strict=True)


class Client(NumPyClient):
    def __init__(self, cell: Cell, client: int):
        torch.set_num_threads(max(1, cell.threads // cell.flower_actors))
        self.cell, self.client = cell, client
        self.data = per_process(("data", cell.to_json()), lambda: Data(cell))  # loaded once per actor
        if cell.flower_reuse_model:
            self.model = per_process(("model", cell.model), lambda: build_model(cell.model, 4, seed=cell.seed))
        else:  # the quickstart's way: a new model per client_fn call
            self.model = build_model(cell.model, 4, seed=cell.seed)

    def get_parameters(self, config):
        return get_weights(self.model)

    def fit(self, parameters, config):
        set_weights(self.model, parameters)
        round_, model, data = int(config["server_round"]), self.model, self.data
        opt = torch.optim.SGD(model.parameters(), lr=self.cell.lr)
        model.train()
        data.seed_dropout(round_, self.client)
        for epoch in range(self.cell.epochs):
            for ids, mask, labels in data.batches(round_, self.client, epoch):
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return get_weights(model), len(data.shards[self.client]), {}


def main() -> None:
    cell = Cell.from_argv()
    torch.set_num_threads(cell.threads)
    data = Data(cell)  # the server's copy, for the final evaluation
    marks: dict[int, float] = {}  # round -> time its configure_fit began; R+1 -> end of the last fit
    result: dict[str, tuple[float, float]] = {}

    def client_fn(context: Context):
        return Client(cell, int(context.node_config["partition-id"])).to_client()

    def fit_config(server_round: int) -> dict:
        marks[server_round] = now()
        return {"server_round": server_round}

    def evaluate_fn(server_round: int, parameters, config):
        if server_round < cell.rounds:  # round 0 (the initial model) and intermediate rounds: skip
            return None
        marks[server_round + 1] = now()
        model = build_model(cell.model, 4, seed=cell.seed)
        set_weights(model, parameters)
        result["test"] = data.evaluate(model)
        return result["test"][1], {"accuracy": result["test"][0]}

    def server_fn(context: Context) -> ServerAppComponents:
        init = ndarrays_to_parameters(get_weights(build_model(cell.model, 4, seed=cell.seed)))
        k = cell.clients
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=k, min_available_clients=k,
                          initial_parameters=init, on_fit_config_fn=fit_config, evaluate_fn=evaluate_fn)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cell.rounds))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    mem = PeakRSS()
    t0 = now()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
        num_supernodes=cell.clients,
        backend_config={"client_resources": {"num_cpus": cell.threads / cell.flower_actors, "num_gpus": 0.0},
                        "init_args": {"num_cpus": cell.threads, "logging_level": logging.ERROR,
                                      "log_to_driver": False}},
    )
    wall = now() - t0
    if "test" not in result:
        mem.reap()
        raise SystemExit("flower: the simulation ended without the final evaluation (see its log above)")
    rounds = [marks[r + 1] - marks[r] for r in range(1, cell.rounds + 1)]
    report(cell, "flower", wall, rounds, result["test"], mem.stop_mib())
    mem.reap()


if __name__ == "__main__":
    main()
