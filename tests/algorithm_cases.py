"""The algorithm settings the algorithm tests run (shared by test_algorithms and test_distributed)."""

# name -> settings: every strategy, every client update, both optimisers, schedules, sampling.
ALGORITHMS = {
    "fedavg": {},
    "fedavgm": {"strategy": "fedavgm", "server_lr": 0.7, "server_momentum": 0.9},
    "fedadam": {"strategy": "fedadam", "server_lr": 0.01, "tau": 1e-3},
    "fedyogi": {"strategy": "fedyogi", "server_lr": 0.01, "beta2": 0.9, "tau": 1e-3},
    "fedadagrad": {"strategy": "fedadagrad", "server_lr": 0.01, "beta1": 0.5, "tau": 1e-2},
    "fedprox": {"client": "fedprox", "mu": 0.5},
    "scaffold": {"client": "scaffold"},
    "adamw": {"client_optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "adam_beta2": 0.99,
              "lr_schedule": "linear", "warmup_rounds": 1},
    "sampled-scaffold-fedavgm": {"clients_per_round": 2, "client": "scaffold", "strategy": "fedavgm",
                                 "server_lr": 1.0, "server_momentum": 0.5, "lr_schedule": "constant",
                                 "warmup_rounds": 2},
    "sampled-prox-adamw-fedadam": {"client_fraction": 0.5, "client": "fedprox", "mu": 0.1,
                                   "client_optimizer": "adamw", "lr": 2e-3, "strategy": "fedadam",
                                   "server_lr": 0.01},
}
