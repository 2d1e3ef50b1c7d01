"""The cells of a sweep config: data set x model x algorithm x partition x K x seed.

The workflow (workflow/rules/common.smk) and ``fedsweep cluster-check`` read the grid through
this module, so that both see the same cells with the same settings.

- ``algorithms:`` maps a slug to the settings of :mod:`fedsweep.algorithm` (absent: one entry,
  ``fedavg``, FedAvg as the paper ran it).
- ``partitions:`` maps a slug to a partition scheme and its parameters (``fedsweep partition``'s
  options). The older single ``partition:`` block is one entry named after its scheme (``iid``,
  ``dirichlet-a0.5``); absent both: ``iid``.
- An algorithm or partition entry may name the ``models`` and ``datasets`` it applies to (absent:
  all), and a model may have its own ``seeds``: a grid need not be a full product (the demo runs
  a second algorithm, partition and seed on its cheapest model only).
- ``overrides`` entries match cells by any of dataset, model, algorithm, partition, clients and
  seed, and set training settings; later entries win.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from . import FedsweepError, schemes
from . import algorithm as algo
from .settings import ABSENT_AT_DEFAULT, JOB_TRAIN, check as check_settings, field_name

# Keys of an algorithm or partition entry that choose cells rather than settings, and the cell
# key each restricts (``partitions``: algorithm entries only, e.g. SCAFFOLD on the label-skewed
# partitions alone; ``clients``: e.g. a non-iid partition without its K=1 cell, which is the
# centralised baseline whatever the partition).
RESTRICTIONS = {"models": "model", "datasets": "dataset", "partitions": "partition", "clients": "clients"}
DEFAULT_ALGORITHM = "fedavg"


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in RESTRICTIONS}


def _applies(entry: dict[str, Any], **cell: str) -> bool:
    """Whether an entry's restrictions (absent: all) admit the cell's dataset, model, partition or K."""
    for key, restriction in RESTRICTIONS.items():
        if restriction not in cell:
            continue
        value = cell[restriction]
        allowed = _as_list(entry.get(key))
        if allowed is not None and value not in allowed:
            return False
    return True


# ------------------------------------------------------------------------------ algorithms


def algorithms(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Slug -> entry (settings and restrictions)."""
    return config.get("algorithms") or {DEFAULT_ALGORITHM: {}}


def algorithm_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The settings of algorithm ``name`` (keys of :data:`fedsweep.algorithm.DEFAULTS`)."""
    return _settings(algorithms(config)[name])


def check_algorithms(config: dict[str, Any]) -> None:
    """Each algorithm's settings (fedsweep.algorithm's declarations and rules): one line naming the field."""
    for name, entry in algorithms(config).items():
        where = field_name(f"algorithms.{name}")
        values = check_settings(algo.SETTINGS, _settings(entry), where)
        algo.check_rules(SimpleNamespace(**{**algo.DEFAULTS, **values, "algorithm": name}), where)


# ------------------------------------------------------------------------------ partitions


def partition_slug(block: dict[str, Any]) -> str:
    """The name of the older single ``partition:`` block: its scheme (and alpha)."""
    scheme = block.get("scheme", "iid")
    if scheme == "dirichlet" and "alpha" in block:
        return f"dirichlet-a{block['alpha']:g}"
    return scheme


def partitions(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Slug -> entry (scheme, its parameters and restrictions)."""
    if config.get("partitions"):
        return config["partitions"]
    block = config.get("partition") or {"scheme": "iid"}
    return {partition_slug(block): block}


def partition_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    return _settings(partitions(config)[name])


def partition_field(config: dict[str, Any], name: str) -> str:
    """How the config names a partition entry in messages."""
    return f"partitions.{name}" if config.get("partitions") else "partition"


def check_partitions(config: dict[str, Any]) -> None:
    if config.get("partitions") and config.get("partition"):
        raise FedsweepError("partition and partitions are both set; give one (partition is a single entry of partitions)")
    for name, entry in partitions(config).items():
        where = partition_field(config, name)
        schemes.check(_settings(entry), lambda key: f"{where}.{key}", lambda key, value: f"{where}.{key}={value}")


def partition_args(config: dict[str, Any], name: str) -> str:
    """``fedsweep partition`` options of partition ``name`` (besides data, K, seed and output)."""
    args = []
    for key, value in partition_settings(config, name).items():
        if isinstance(value, float):
            value = f"{value:g}" if math.isfinite(value) else value
        args.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(args)


def per_client(config: dict[str, Any], partition: str) -> int | None:
    return partition_settings(config, partition).get("per_client")


def train_rows(config: dict[str, Any], partition: str, clients: int, rows: int) -> int:
    """Training rows a cell uses: all of them, or K x per_client (weak scaling)."""
    n = per_client(config, partition)
    return rows if n is None else min(rows, int(clients) * int(n))


# ------------------------------------------------------------------------------ cells


def model_seeds(config: dict[str, Any], model: str) -> list[int]:
    return list(config["models"][model].get("seeds") or config["seeds"])


def cells(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of the grid, in a fixed order."""
    algos, parts = algorithms(config), partitions(config)
    return [
        dict(dataset=d, model=m, algorithm=a, partition=p, clients=k, seed=s)
        for d in config["datasets"]
        for m in config["models"]
        for a, a_entry in algos.items() if _applies(a_entry, dataset=d, model=m)
        for p, p_entry in parts.items() if _applies(p_entry, dataset=d, model=m) and _applies(a_entry, partition=p)
        for k in config["clients"] if _applies(a_entry, clients=k) and _applies(p_entry, clients=k)
        for s in model_seeds(config, m)
    ]


# A cell's folder below runs/ (and logs/train/, benchmarks/train/): also the workflow's wildcards.
CELL_PATH = "{dataset}/{model}/{algorithm}/{partition}_K{clients}_seed{seed}"


def cell_name(cell: dict[str, Any]) -> str:
    """``dataset/model/algorithm/partition_K..._seed...``: the run folder below runs/."""
    return CELL_PATH.format(**{"algorithm": DEFAULT_ALGORITHM, "partition": "iid", **cell})


OVERRIDE_KEYS = ("dataset", "model", "algorithm", "partition", "clients", "seed")


def matches(entry: dict[str, Any], **cell: Any) -> bool:
    """Does an overrides entry match the cell? A key the cell does not give matches any entry."""
    for key in OVERRIDE_KEYS:
        allowed = _as_list(entry.get(key))
        value = cell.get(key)
        if allowed is not None and value is not None and value not in allowed:
            return False
    return True


def cell_train(config: dict[str, Any], dataset: str, model: str, clients: int, seed: int,
               algorithm: str | None = None, partition: str | None = None) -> dict[str, Any]:
    """train < datasets.NAME.train < models.NAME.train < matching overrides (later win)."""
    merged = dict(config["train"])
    merged.update(config["datasets"][dataset].get("train", {}))
    merged.update(config["models"][model].get("train", {}))
    cell = dict(dataset=dataset, model=model, clients=int(clients), seed=int(seed), algorithm=algorithm,
                partition=partition)
    for entry in config.get("overrides", []):
        if matches(entry, **cell):
            merged.update(entry["set"])
    return merged


def cell_settings(config: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    """What a cell's training job is given (``fedsweep train --settings``): its training settings
    (max_length aside: the tokens' own), its algorithm's settings and its model's ``peft``, in
    their declared types. Handed to the job as one value, so any change reruns exactly the cells
    it applies to."""
    train = cell_train(config, **cell)
    values = {key: train[key] for key in JOB_TRAIN}
    values.update(algorithm_settings(config, cell["algorithm"]))
    values = check_settings({**JOB_TRAIN, **algo.SETTINGS}, values, field_name("train"))
    for name in ABSENT_AT_DEFAULT:  # as before they existed: finished cells do not rerun
        if values[name] == JOB_TRAIN[name].default:
            del values[name]
    peft = config["models"][cell["model"]].get("peft")
    if peft and peft.get("method", "none") != "none":
        values["peft"] = peft
    return values


def check_references(config: dict[str, Any]) -> None:
    """Names used by restrictions, per-model seeds and overrides exist in the config."""
    fields = {"models": list(config["models"]), "datasets": list(config["datasets"]),
              "partitions": list(partitions(config)), "clients": list(config["clients"])}
    for section, entries in (("algorithms", algorithms(config)), ("partitions", partitions(config))):
        if section == "partitions" and not config.get("partitions"):
            continue
        for name, entry in entries.items():
            for key in RESTRICTIONS:
                for value in _as_list(entry.get(key)) or []:
                    if value not in fields[key]:
                        raise FedsweepError(f"{section}.{name}.{key}: {value!r} is not in the config's {key} "
                                            f"({', '.join(map(str, fields[key]))})")
    names = {"model": list(config["models"]), "dataset": list(config["datasets"]),
             "algorithm": list(algorithms(config)), "partition": list(partitions(config)),
             "clients": list(config["clients"]),
             "seed": sorted({s for m in config["models"] for s in model_seeds(config, m)})}
    plural = {"model": "models", "dataset": "datasets", "algorithm": "algorithms", "partition": "partitions",
              "clients": "clients", "seed": "seeds"}
    for i, entry in enumerate(config.get("overrides", [])):
        for key in OVERRIDE_KEYS:
            for value in _as_list(entry.get(key)) or []:
                if value not in names[key]:
                    raise FedsweepError(f"overrides[{i}].{key}={value!r} is not in the config's {plural[key]} "
                                        f"({', '.join(map(str, names[key]))})")
    if not cells(config):
        raise FedsweepError("the grid has no cells: every algorithm or partition is restricted to models or "
                            "data sets that are not in the config")


def check(config: dict[str, Any]) -> None:
    """Every cross-field check of the grid sections (one-line FedsweepError naming the field)."""
    check_partitions(config)
    check_algorithms(config)
    check_references(config)
