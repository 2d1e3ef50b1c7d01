"""A cell's federated algorithm: its settings (fields of ``TrainConfig``), their checks, and what
they build (the server strategy of :mod:`fedsweep.strategies`, the client update of
:mod:`fedsweep.clients`, the client sampling of :mod:`fedsweep.rounds`).

The defaults are FedAvg as fedsweep always ran it: every client every round, plain local SGD at a
constant lr, the size-weighted average. Settings at their default are left out of the config hash,
so checkpoints of earlier versions resume; every other setting is in it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from . import FedsweepError
from .clients import CLIENT_OPTIMIZERS, CLIENT_UPDATES, LR_SCHEDULES, ClientSettings
from .strategies import STRATEGIES, AdaptiveStrategy

# TrainConfig field -> default. The order is the order of the descriptions.
DEFAULTS: dict[str, Any] = {
    "algorithm": "fedavg",  # the slug: a name, recorded and used as a path level by the workflow
    "strategy": "fedavg",
    "server_lr": None,
    "server_momentum": 0.0,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-3,
    "client": "plain",
    "mu": 0.0,
    "client_optimizer": "sgd",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-8,
    "weight_decay": 0.0,
    "lr_schedule": "constant",
    "warmup_rounds": 0,
    "clients_per_round": 0,
    "client_fraction": 1.0,
}
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
ADAPTIVE = tuple(name for name, cls in STRATEGIES.items() if issubclass(cls, AdaptiveStrategy))
ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps", "weight_decay")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: Any) -> None:
    """Check the algorithm fields of ``cfg`` (a TrainConfig); one-line FedsweepError naming the field."""

    def bad(name: str, why: str) -> FedsweepError:
        return FedsweepError(f"train: {name}={getattr(cfg, name)!r} {why}")

    if not isinstance(cfg.algorithm, str) or not SLUG.match(cfg.algorithm):
        raise bad("algorithm", "must be a slug: letters, digits, '_', '.', '+', '-' (not first), at most 64")
    if cfg.strategy not in STRATEGIES:
        raise bad("strategy", f"is not one of {', '.join(STRATEGIES)}")
    if cfg.client not in CLIENT_UPDATES:
        raise bad("client", f"is not one of {', '.join(CLIENT_UPDATES)}")
    if cfg.client_optimizer not in CLIENT_OPTIMIZERS:
        raise bad("client_optimizer", f"is not one of {', '.join(CLIENT_OPTIMIZERS)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise bad("lr_schedule", f"is not one of {', '.join(LR_SCHEDULES)}")

    checks = {  # field: (valid?, what it must be)
        "server_lr": (cfg.server_lr is None or (_number(cfg.server_lr) and cfg.server_lr > 0), "a positive number"),
        "server_momentum": (_number(cfg.server_momentum) and 0 <= cfg.server_momentum < 1, "a number in [0, 1)"),
        "beta1": (_number(cfg.beta1) and 0 <= cfg.beta1 < 1, "a number in [0, 1)"),
        "beta2": (_number(cfg.beta2) and 0 <= cfg.beta2 < 1, "a number in [0, 1)"),
        "tau": (_number(cfg.tau) and cfg.tau > 0, "a positive number"),
        "mu": (_number(cfg.mu) and cfg.mu >= 0, "a number >= 0"),
        "adam_beta1": (_number(cfg.adam_beta1) and 0 <= cfg.adam_beta1 < 1, "a number in [0, 1)"),
        "adam_beta2": (_number(cfg.adam_beta2) and 0 <= cfg.adam_beta2 < 1, "a number in [0, 1)"),
        "adam_eps": (_number(cfg.adam_eps) and cfg.adam_eps > 0, "a positive number"),
        "weight_decay": (_number(cfg.weight_decay) and cfg.weight_decay >= 0, "a number >= 0"),
        "warmup_rounds": (_integer(cfg.warmup_rounds) and cfg.warmup_rounds >= 0, "an integer >= 0"),
        "clients_per_round": (_integer(cfg.clients_per_round) and cfg.clients_per_round >= 0,
                              "an integer >= 0 (0 = every client)"),
        "client_fraction": (_number(cfg.client_fraction) and 0 < cfg.client_fraction <= 1, "a number in (0, 1]"),
    }
    for name, (ok, what) in checks.items():
        if not ok:
            raise bad(name, f"must be {what}")

    # A setting the chosen algorithm does not read is a mistake (a typo'd strategy, a forgotten
    # client): refused unless it is at its default, which is the same as not setting it.
    strategy_fields = set(STRATEGIES[cfg.strategy].SETTINGS)
    for name in ("server_lr", "server_momentum", "beta1", "beta2", "tau"):
        if name not in strategy_fields and getattr(cfg, name) != DEFAULTS[name]:
            if name == "server_lr" and cfg.server_lr == 1:
                continue  # fedavg is the server step with lr 1
            users = [s for s, cls in STRATEGIES.items() if name in cls.SETTINGS]
            raise bad(name, f"is a setting of strategy {' / '.join(users)}, not of strategy={cfg.strategy!r}")
    if cfg.strategy in ADAPTIVE and cfg.server_lr is None:
        raise bad("server_lr", f"must be set for strategy={cfg.strategy!r} (a positive number; Reddi et al. "
                               f"tune it per task, e.g. 1e-3 to 1e-1)")
    if cfg.client != "fedprox" and cfg.mu != DEFAULTS["mu"]:
        raise bad("mu", f"is FedProx's setting, not of client={cfg.client!r} (use client=fedprox)")
    if cfg.client_optimizer != "adamw":
        for name in ADAM_FIELDS:
            if getattr(cfg, name) != DEFAULTS[name]:
                raise bad(name, f"is a setting of client_optimizer=adamw, not of "
                                f"client_optimizer={cfg.client_optimizer!r}")
    if cfg.client == "scaffold" and cfg.client_optimizer != "sgd":
        raise bad("client_optimizer", "must be sgd with client=scaffold (its control variates assume SGD steps)")
    if cfg.clients_per_round and cfg.client_fraction != 1:
        raise bad("client_fraction", f"and clients_per_round={cfg.clients_per_round} are both set; give one")


def settings(cfg: Any) -> dict[str, Any]:
    """The algorithm fields of ``cfg`` (slug included)."""
    return {name: getattr(cfg, name) for name in DEFAULTS}


def non_default(cfg: Any) -> dict[str, Any]:
    """The algorithm settings that differ from FedAvg's defaults (slug excluded)."""
    return {k: v for k, v in settings(cfg).items() if k != "algorithm" and v != DEFAULTS[k]}


def describe(record: dict[str, Any]) -> str:
    """``'name' (key=value, ...)`` for a record made by :func:`record`."""
    inner = ", ".join(f"{k}={v}" for k, v in record["settings"].items()) or "FedAvg defaults"
    return f"{record['name']!r} ({inner})"


def record(cfg: Any) -> dict[str, Any]:
    """What a checkpoint records of its algorithm (compared on resume)."""
    return {"name": cfg.algorithm, "settings": non_default(cfg)}


FEDAVG_RECORD = {"name": "fedavg", "settings": {}}  # checkpoints of versions before the algorithms


def server_lr(cfg: Any) -> float:
    return 1.0 if cfg.server_lr is None else float(cfg.server_lr)


def strategy_settings(cfg: Any) -> dict[str, float]:
    return {"server_lr": server_lr(cfg), "server_momentum": cfg.server_momentum, "beta1": cfg.beta1,
            "beta2": cfg.beta2, "tau": cfg.tau}


def client_settings(cfg: Any) -> ClientSettings:
    return ClientSettings(client=cfg.client, client_optimizer=cfg.client_optimizer, mu=float(cfg.mu),
                          adam_beta1=float(cfg.adam_beta1), adam_beta2=float(cfg.adam_beta2),
                          adam_eps=float(cfg.adam_eps), weight_decay=float(cfg.weight_decay))
