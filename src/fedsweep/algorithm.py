"""A cell's federated algorithm: its settings, declared once, and the rules between them.

What the settings build lives with the torch code: the server strategy (:mod:`fedsweep.strategies`,
``STRATEGIES``), the client update (:mod:`fedsweep.clients`, ``CLIENT_UPDATES``) and the client
sampling (:mod:`fedsweep.rounds`). Which settings each strategy and client update reads is
declared here (:data:`STRATEGY_SETTINGS`, :data:`CLIENT_SETTINGS`), so that a config is checked
on the head node without torch; ``tests/test_settings.py`` asserts that the registries of the
torch modules hold exactly these names.

The defaults are FedAvg as fedsweep always ran it: every client every round, plain local SGD at a
constant lr, the size-weighted average. Settings at their default are left out of the config hash,
so checkpoints of earlier versions resume; every other setting is in it.

Adding a server strategy with one new setting: its class in server_steps.py (registered in
strategies.STRATEGIES), its name and settings in :data:`STRATEGY_SETTINGS` (and the new
:class:`Setting` in :data:`SETTINGS`), the schema's enum and property, a test.
"""

from __future__ import annotations

from typing import Any, Callable

from . import FedsweepError
from .settings import Setting, table

# Server strategy -> the settings it reads (Reddi et al. 2021; README "Algorithms").
STRATEGY_SETTINGS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("server_lr", "server_momentum"),
    "fedadam": ("server_lr", "beta1", "beta2", "tau", "adaptive_convention"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau", "adaptive_convention"),
    "fedadagrad": ("server_lr", "beta1", "tau", "adaptive_convention"),  # no second-moment decay: v sums delta^2
}
# Every setting some strategy reads, in declaration order below.
SERVER_SETTINGS = tuple(dict.fromkeys(name for names in STRATEGY_SETTINGS.values() for name in names))
# The strategies with a learning rate that has no sensible default (Reddi et al. tune it per task).
NEEDS_SERVER_LR = ("fedadam", "fedyogi", "fedadagrad")
# Client update -> the settings it reads (beyond the local optimiser's).
CLIENT_SETTINGS: dict[str, tuple[str, ...]] = {"plain": (), "fedprox": ("mu",), "scaffold": ("scaffold_weighting",)}
CLIENT_TITLES = {"plain": "plain SGD", "fedprox": "FedProx", "scaffold": "SCAFFOLD"}  # in messages
# Every setting some client update reads.
CLIENT_ONLY = tuple(dict.fromkeys(name for names in CLIENT_SETTINGS.values() for name in names))
CLIENT_OPTIMIZERS = ("sgd", "adamw")
ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps", "weight_decay")
LR_SCHEDULES = ("constant", "linear")
ADAPTIVE_CONVENTIONS = ("reddi", "flower")
SCAFFOLD_WEIGHTINGS = ("size", "uniform")

_UNIT = dict(low=0, high=1, high_open=True)  # [0, 1)
SETTINGS = table([
    Setting("strategy", "fedavg", "string", "the server step on the pseudo-gradient",
            choices=tuple(STRATEGY_SETTINGS)),
    Setting("server_lr", None, "number", "server learning rate (fedavgm: default 1; fedadam/fedyogi/fedadagrad: "
            "required)", low=0, low_open=True, nullable=True),
    Setting("server_momentum", 0.0, "number", "fedavgm: server momentum", **_UNIT),
    Setting("beta1", 0.9, "number", "fedadam/fedyogi/fedadagrad: first-moment decay", **_UNIT),
    Setting("beta2", 0.99, "number", "fedadam/fedyogi: second-moment decay", **_UNIT),
    Setting("tau", 1e-3, "number", "fedadam/fedyogi/fedadagrad: adaptivity; v starts at tau^2", low=0,
            low_open=True),
    Setting("adaptive_convention", "reddi", "string", "fedadam/fedyogi/fedadagrad: reddi = Reddi et al. 2021 (v "
            "starts at tau^2, no bias correction); flower = Flower 1.x (m and v start at 0, fedadam's server lr "
            "bias-corrected)", choices=ADAPTIVE_CONVENTIONS),
    Setting("client", "plain", "string", "the client update (scaffold keeps K control variates on disk)",
            choices=tuple(CLIENT_SETTINGS)),
    Setting("mu", 0.0, "number", "fedprox: the proximal term's weight", low=0),
    Setting("scaffold_weighting", "size", "string", "scaffold: the clients' weights in the model average and in "
            "c's update: size = n_i/N (FedAvg's), uniform = 1/|S| and 1/K (Karimireddy et al. 2020, Alg. 1)",
            choices=SCAFFOLD_WEIGHTINGS),
    Setting("client_optimizer", "sgd", "string", "the clients' local optimiser (adamw: state reset every "
            "round)", choices=CLIENT_OPTIMIZERS),
    Setting("adam_beta1", 0.9, "number", "adamw: first-moment decay", **_UNIT),
    Setting("adam_beta2", 0.999, "number", "adamw: second-moment decay", **_UNIT),
    Setting("adam_eps", 1e-8, "number", "adamw: epsilon", low=0, low_open=True),
    Setting("weight_decay", 0.0, "number", "adamw: decoupled weight decay", low=0),
    Setting("lr_schedule", "constant", "string", "the client lr over the R rounds: constant, or linear decay "
            "after the warmup (round W+1 at lr, the last at lr / (R - W))", choices=LR_SCHEDULES),
    Setting("warmup_rounds", 0, "integer", "linear warmup of the client lr over this many rounds (either "
            "schedule; shorter than the cell)", low=0),
    Setting("clients_per_round", 0, "integer", "clients sampled per round (uniform without replacement, "
            "seeded); 0 = all", low=0),
    Setting("client_fraction", 1.0, "number", "or the fraction of the clients sampled per round", low=0,
            high=1, low_open=True),
])
# Setting -> default, with the slug first (a name, recorded and used as a path level).
DEFAULTS: dict[str, Any] = {"algorithm": "fedavg", **{name: s.default for name, s in SETTINGS.items()}}


def check_rules(cfg: Any, where: Callable[[str], str]) -> None:
    """The rules between the algorithm settings of ``cfg`` (each value already checked on its own):
    a setting the chosen strategy or client does not read is refused unless it is at its default
    (a typo'd strategy, a forgotten client), and pairs that exclude each other. One line naming
    the field; ``where(name)`` names it (``train: mu``, ``algorithms.prox.mu``)."""

    def bad(name: str, why: str) -> FedsweepError:
        return FedsweepError(f"{where(name)}={getattr(cfg, name)!r} {why}")

    reads = STRATEGY_SETTINGS[cfg.strategy]
    for name in SERVER_SETTINGS:
        if name not in reads and getattr(cfg, name) != DEFAULTS[name]:
            if name == "server_lr" and cfg.server_lr == 1:
                continue  # fedavg is the server step with lr 1
            users = [s for s, names in STRATEGY_SETTINGS.items() if name in names]
            raise bad(name, f"is a setting of strategy {' / '.join(users)}, not of strategy={cfg.strategy!r}")
    if cfg.strategy in NEEDS_SERVER_LR and cfg.server_lr is None:
        raise bad("server_lr", f"must be set for strategy={cfg.strategy!r} (a positive number; Reddi et al. "
                               f"tune it per task, e.g. 1e-3 to 1e-1)")
    if cfg.strategy == "fedadagrad" and cfg.adaptive_convention == "flower" and cfg.beta1 != 0:
        # fedadagrad.py of flwr 1.x hands its FedOpt base beta_1=0.0: m is the last delta
        raise bad("beta1", "must be 0 with strategy='fedadagrad' and adaptive_convention='flower' (Flower's "
                           "FedAdagrad has no first moment)")
    for name in CLIENT_ONLY:
        if name not in CLIENT_SETTINGS[cfg.client] and getattr(cfg, name) != DEFAULTS[name]:
            user = next(c for c, names in CLIENT_SETTINGS.items() if name in names)
            raise bad(name, f"is {CLIENT_TITLES[user]}'s setting, not of client={cfg.client!r} (use client={user})")
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


def strategy_settings(cfg: Any) -> dict[str, Any]:
    """The settings :func:`fedsweep.strategies.build_strategy` passes on to ``cfg.strategy``."""
    return {name: server_lr(cfg) if name == "server_lr" else getattr(cfg, name)
            for name in STRATEGY_SETTINGS[cfg.strategy]}


def client_settings(cfg: Any):
    """The client side of the algorithm (:class:`fedsweep.clients.ClientSettings`)."""
    from .clients import ClientSettings  # torch: only a training process gets here

    return ClientSettings(client=cfg.client, client_optimizer=cfg.client_optimizer, mu=float(cfg.mu),
                          scaffold_weighting=cfg.scaffold_weighting,
                          adam_beta1=float(cfg.adam_beta1), adam_beta2=float(cfg.adam_beta2),
                          adam_eps=float(cfg.adam_eps), weight_decay=float(cfg.weight_decay))
