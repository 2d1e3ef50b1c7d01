"""The algorithm settings the algorithm tests run (shared by test_algorithms and test_distributed), and
Flower's server step written out (test_algorithms' reference and test_adaptive_conventions)."""

import math

import torch

# name -> settings: every strategy, every client update, both optimisers, schedules, sampling.
ALGORITHMS = {
    "fedavg": {},
    "fedavgm": {"strategy": "fedavgm", "server_lr": 0.7, "server_momentum": 0.9},
    "fedadam": {"strategy": "fedadam", "server_lr": 0.01, "tau": 1e-3},
    "fedyogi": {"strategy": "fedyogi", "server_lr": 0.01, "beta2": 0.9, "tau": 1e-3},
    "fedadagrad": {"strategy": "fedadagrad", "server_lr": 0.01, "beta1": 0.5, "tau": 1e-2},
    "fedprox": {"client": "fedprox", "mu": 0.5},
    "scaffold": {"client": "scaffold"},
    "scaffold-uniform": {"client": "scaffold", "scaffold_weighting": "uniform"},
    # sampled: the model average's 1/|S| and c's 1/K differ
    "sampled-scaffold-uniform": {"client": "scaffold", "scaffold_weighting": "uniform", "clients_per_round": 2},
    "fedadam-flower": {"strategy": "fedadam", "server_lr": 0.01, "adaptive_convention": "flower"},
    "adamw": {"client_optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "adam_beta2": 0.99,
              "lr_schedule": "linear", "warmup_rounds": 1},
    "sampled-scaffold-fedavgm": {"clients_per_round": 2, "client": "scaffold", "strategy": "fedavgm",
                                 "server_lr": 1.0, "server_momentum": 0.5, "lr_schedule": "constant",
                                 "warmup_rounds": 2},
    "sampled-prox-adamw-fedadam": {"client_fraction": 0.5, "client": "fedprox", "mu": 0.1,
                                   "client_optimizer": "adamw", "lr": 2e-3, "strategy": "fedadam",
                                   "server_lr": 0.01},
}


def flower_step(strategy, server_round, x, average, m, v, *, eta, beta1, beta2, tau):
    """One server step of Flower 1.42's FedAdam / FedYogi / FedAdagrad on float64 tensors, written
    from flwr/server/strategy/fedadam.py, fedyogi.py and fedadagrad.py (``aggregate_fit``) and
    fedopt.py (``m_t = v_t = None``: both start at zeros; fedadagrad.py passes ``beta_1=0.0``).
    Flower's sign: ``delta = average - x`` and ``x + eta m / (sqrt(v) + tau)``. ``average``: FedAvg's
    aggregate (aggregate.py: weighted by num_examples). Returns (x, m, v)."""
    delta = average - x
    m = beta1 * m + (1 - beta1) * delta
    if strategy == "fedadam":
        v = beta2 * v + (1 - beta2) * delta * delta
        # eta_norm, with Flower's exponent server_round + 1.0
        eta = eta * math.sqrt(1 - beta2 ** (server_round + 1.0)) / (1 - beta1 ** (server_round + 1.0))
    elif strategy == "fedyogi":
        v = v - (1.0 - beta2) * delta * delta * torch.sign(v - delta * delta)
    else:
        v = v + delta * delta
    return x + eta * m / (v.sqrt() + tau), m, v
