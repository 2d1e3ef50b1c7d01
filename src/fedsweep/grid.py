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

import json
import math
from types import SimpleNamespace
from typing import Any

from . import FedsweepError

# Keys of an algorithm or partition entry that choose cells rather than settings.
RESTRICTIONS = ("models", "datasets")
DEFAULT_ALGORITHM = "fedavg"

# The scheme -> the partition settings it reads (beside per_client, which any scheme takes).
PARTITION_SETTINGS = {
    "iid": (),
    "dirichlet": ("alpha",),
    "shards": ("classes_per_client",),
    "quantity_skew": ("size_distribution", "alpha", "sigma", "min_rows"),
}
PARTITION_KEYS = ("scheme", "per_client") + tuple(
    dict.fromkeys(k for keys in PARTITION_SETTINGS.values() for k in keys)
)


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in RESTRICTIONS}


def _applies(entry: dict[str, Any], dataset: str, model: str) -> bool:
    models, datasets = _as_list(entry.get("models")), _as_list(entry.get("datasets"))
    return (models is None or model in models) and (datasets is None or dataset in datasets)


# ------------------------------------------------------------------------------ algorithms


def algorithms(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Slug -> entry (settings and restrictions)."""
    return config.get("algorithms") or {DEFAULT_ALGORITHM: {}}


def algorithm_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The settings of algorithm ``name`` (keys of :data:`fedsweep.algorithm.DEFAULTS`)."""
    return _settings(algorithms(config)[name])


def algorithm_spec(config: dict[str, Any], name: str) -> str:
    """``fedsweep train --algorithm-spec``: the settings as one JSON mapping (sorted keys)."""
    return json.dumps(algorithm_settings(config, name), sort_keys=True, separators=(",", ":"))


def check_algorithms(config: dict[str, Any]) -> None:
    """Each algorithm's settings, checked as `fedsweep train` would: one line naming the field."""
    # Imported here: fedsweep.algorithm imports torch, and every Snakemake start (one per job on a
    # cluster) imports this module; only the head node's checks need it.
    from . import algorithm as algo

    for name, entry in algorithms(config).items():
        settings = _settings(entry)
        unknown = [k for k in settings if k not in algo.DEFAULTS or k == "algorithm"]
        if unknown:
            raise FedsweepError(f"algorithms.{name}: unknown setting {unknown[0]!r} "
                                f"(known: {', '.join(k for k in algo.DEFAULTS if k != 'algorithm')})")
        cfg = SimpleNamespace(**{**algo.DEFAULTS, **settings, "algorithm": name})
        try:
            algo.validate(cfg)
        except FedsweepError as exc:
            raise FedsweepError(str(exc).replace("train: ", f"algorithms.{name}.", 1)) from None


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
        raise FedsweepError("partition and partitions are both set; give one (partition is a single "
                            "entry of partitions)")
    for name, entry in partitions(config).items():
        where = partition_field(config, name)
        settings = _settings(entry)
        scheme = settings.get("scheme", "iid")
        if scheme not in PARTITION_SETTINGS:
            raise FedsweepError(f"{where}.scheme={scheme!r} is not one of {', '.join(PARTITION_SETTINGS)}")
        used = set(PARTITION_SETTINGS[scheme]) | {"scheme", "per_client"}
        if scheme == "quantity_skew":
            distribution = settings.get("size_distribution", "dirichlet")
            used = {"scheme", "per_client", "size_distribution", "min_rows",
                    "alpha" if distribution == "dirichlet" else "sigma"}
            if distribution == "lognormal" and "sigma" not in settings:
                raise FedsweepError(f"{where}.sigma is required with {where}.size_distribution=lognormal")
        for key in settings:
            if key not in used:
                if scheme == "quantity_skew" and key in ("alpha", "sigma"):
                    raise FedsweepError(f"{where}.{key}={settings[key]!r} is only used with {where}.size_distribution="
                                        f"{'dirichlet' if key == 'alpha' else 'lognormal'}")
                raise FedsweepError(f"{where}.{key}={settings[key]!r} is only used with "
                                    f"{where}.scheme={_scheme_using(key)}")
        if scheme == "dirichlet" and "alpha" not in settings:
            raise FedsweepError(f"{where}.alpha is required with {where}.scheme=dirichlet")
        if scheme == "quantity_skew" and settings.get("size_distribution", "dirichlet") == "dirichlet" \
                and "alpha" not in settings:
            raise FedsweepError(f"{where}.alpha is required with {where}.scheme=quantity_skew "
                                f"(size_distribution dirichlet)")


def _scheme_using(key: str) -> str:
    users = [s for s, keys in PARTITION_SETTINGS.items() if key in keys]
    return " / ".join(users) or "none"


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
        for a, a_entry in algos.items() if _applies(a_entry, d, m)
        for p, p_entry in parts.items() if _applies(p_entry, d, m)
        for k in config["clients"]
        for s in model_seeds(config, m)
    ]


def cell_name(cell: dict[str, Any]) -> str:
    """``dataset/model/algorithm/partition_K..._seed...``: the run folder below runs/."""
    return (f"{cell['dataset']}/{cell['model']}/{cell.get('algorithm', DEFAULT_ALGORITHM)}/"
            f"{cell.get('partition', 'iid')}_K{cell['clients']}_seed{cell['seed']}")


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


def check_references(config: dict[str, Any]) -> None:
    """Names used by restrictions, per-model seeds and overrides exist in the config."""
    fields = {"models": list(config["models"]), "datasets": list(config["datasets"])}
    for section, entries in (("algorithms", algorithms(config)), ("partitions", partitions(config))):
        if section == "partitions" and not config.get("partitions"):
            continue
        for name, entry in entries.items():
            for key in RESTRICTIONS:
                for value in _as_list(entry.get(key)) or []:
                    if value not in fields[key]:
                        raise FedsweepError(f"{section}.{name}.{key}: {value!r} is not in the config's {key} "
                                            f"({', '.join(fields[key])})")
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
