"""The config layer: one entry point from config files to a checked sweep, or one error line.

:func:`load` validates a workflow config against the schema (filling in its defaults), runs the
cross-field checks, the grid checks (:mod:`fedsweep.grid`) and the checks of the inputs that can
be made before any job (local data files and their row counts, local model folders, positions vs
max_length, shards smaller than a batch, the runtime plan of every cell), and returns a
:class:`Sweep`. Every problem is a :class:`fedsweep.FedsweepError` whose message is one line
starting ``config: `` and naming the field and the value.

Three callers, one verdict: the workflow (``workflow/rules/common.smk``), ``fedsweep check`` and
``fedsweep cluster-check``. This module imports no torch, transformers or pandas.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import FedsweepError, dataspec, estimate, grid, modelspec

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "config.schema.yaml"
GUESSED_ROWS = (100_000, 10_000)  # a hub data set with no preset, before its download
SLUG_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"


def error(message: str) -> FedsweepError:
    return FedsweepError(f"config: {message}")


# ----------------------------------------------------------------------------- files


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge as Snakemake merges several --configfile: mappings recursively, the rest replaced."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def read_files(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The config files merged in order (later ones win), each a YAML mapping."""
    import yaml

    config: dict[str, Any] = {}
    for f in paths:
        try:
            loaded = yaml.safe_load(Path(f).read_text())
        except OSError as exc:
            raise FedsweepError(f"--configfile {str(f)!r}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise FedsweepError(f"--configfile {str(f)!r}: invalid YAML{at}: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise FedsweepError(f"--configfile {str(f)!r}: the config must be a mapping (key: value), got "
                                f"{type(loaded).__name__}")
        _deep_update(config, loaded)
    return config


# ----------------------------------------------------------------------------- the schema


@functools.cache
def _validator():
    import jsonschema
    import yaml
    from jsonschema import validators

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # the jsonschema FAQ's recipe, as Snakemake
        for name, sub in properties.items():
            if "default" in sub and isinstance(instance, dict):
                instance.setdefault(name, sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})(schema)


def _field(path: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def validate_schema(config: dict[str, Any]) -> None:
    """The config against the schema, its defaults filled in (in place); one line naming the
    offending field and value."""
    err = next(iter(_validator().iter_errors(config)), None)
    if err is None:
        return
    field_ = _field(err.absolute_path)
    if "propertyNames" in err.schema_path:
        raise error(f"{field_}: name {err.instance!r} is not a filesystem-safe slug (letters, digits, '.', '_', "
                    f"'-'; starting with a letter or digit)")
    if err.validator == "pattern" and err.validator_value == "\\S":
        raise error(f"{field_}={err.instance!r} must not be empty")
    if isinstance(err.instance, dict):  # e.g. an unknown key: the message names it
        raise error(f"{field_}: {err.message}")
    raise error(f"{field_}={err.instance!r}: {err.message}")


# ----------------------------------------------------------------------------- cross-field checks


def _non_finite(value: Any, where: str) -> tuple[str, Any] | None:
    """The first NaN or infinity anywhere in the config (JSON Schema's bounds let NaN through)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None


def _check_folder(config: dict[str, Any], key: str, base_dir: str | os.PathLike) -> None:
    path = config[key]
    if not path.strip():
        raise error(f"{key}={path!r} must name a folder")
    where = Path(base_dir, path)
    if where.exists() and not where.is_dir():
        raise error(f"{key}={path!r} exists and is not a folder")


def _distinct(values: list[Any], where: str) -> None:
    if len(set(values)) != len(values):
        raise error(f"{where}={values}: values must be distinct")


def check_values(config: dict[str, Any], base_dir: str | os.PathLike = ".") -> None:
    """The cross-field checks the schema cannot express, then the grid's (one line)."""
    bad = _non_finite(config, "")
    if bad:
        raise error(f"{bad[0]}={bad[1]!r} must be a finite number")
    for key in ("results_dir", "hf_home"):
        if config.get(key) is not None:
            _check_folder(config, key, base_dir)
    for k in config["clients"]:
        if k < 1:
            raise error(f"clients={config['clients']}: every K must be an integer >= 1 (got {k})")
    _distinct(config["clients"], "clients")
    _distinct(config["seeds"], "seeds")
    for name, ds in config["datasets"].items():
        if ds["budget"] > ds["second_threshold"]:
            raise error(f"datasets.{name}.budget={ds['budget']} exceeds "
                        f"datasets.{name}.second_threshold={ds['second_threshold']}")
    for name, model in config["models"].items():
        _distinct(model.get("seeds", []), f"models.{name}.seeds")
    try:
        grid.check(config)
    except FedsweepError as exc:
        raise error(str(exc)) from None
    tokenizers(config)


# ----------------------------------------------------------------------------- models and tokenizers


def model_spec(config: dict[str, Any], model: str) -> str:
    return config["models"][model].get("spec", model)


def tokenizer_spec(config: dict[str, Any], model: str) -> str:
    return config["models"][model].get("tokenizer", model_spec(config, model))


def spec_slug(spec: str) -> str:
    """A filesystem-safe key for a model or tokenizer spec (hub ids contain '/', paths more)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "tokenizer"


def tokenizers(config: dict[str, Any]) -> dict[str, str]:
    """Slug -> tokenizer spec of the grid's models (models with one spec share one tokenisation)."""
    slugs: dict[str, str] = {}
    for model in config["models"]:
        spec = tokenizer_spec(config, model)
        slug = spec_slug(spec)
        if slugs.setdefault(slug, spec) != spec:
            raise error(f"models.{model}.tokenizer={spec!r} and {slugs[slug]!r} map to the same folder name "
                        f"{slug!r}; rename one")
    return slugs


def fetched(config: dict[str, Any]) -> dict[str, str]:
    """Slug -> spec of every model and tokenizer whose files the jobs need (fetched on the head node)."""
    return {spec_slug(model_spec(config, m)): model_spec(config, m) for m in config["models"]} | tokenizers(config)


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """A checked config: its cells, and what the workflow needs of its inputs."""

    config: dict[str, Any]
    cells: list[dict[str, Any]]
    base_dir: str
    rows: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # known before any download
    data_files: dict[str, list[str]] = field(default_factory=dict)  # local files of each data set
    model_files: dict[str, list[str]] = field(default_factory=dict)  # slug -> files of local model folders
    in_job: bool = False

    def cell_train(self, cell: dict[str, Any]) -> dict[str, Any]:
        return grid.cell_train(self.config, **cell)

    def split_rows(self, dataset: str) -> tuple[int, int]:
        """Rows the number of a cell's jobs is planned from: known before any download."""
        return self.rows.get(dataset) or GUESSED_ROWS

    def estimate_rows(self, dataset: str) -> tuple[int, int]:
        """Rows for the estimates: the prepared data set's, else those known before download."""
        meta = Path(self.base_dir) / self.config["results_dir"] / "data" / dataset / "meta.json"
        if meta.exists():
            try:
                rows = json.loads(meta.read_text())["rows"]
                return int(rows["train"]), int(rows["test"])
            except (OSError, ValueError, KeyError):
                pass
        return self.split_rows(dataset)

    @functools.cache
    def plan(self, dataset: str, model: str, algorithm: str, partition: str, clients: int, seed: int
             ) -> estimate.CellPlan:
        """Memory, minutes and jobs (round targets) of a cell. Inside a job nothing depends on the
        chain (its inputs and round are settled): no chain is planned there."""
        try:
            return estimate.plan_cell(
                self.config, dataset, model, int(clients), int(seed), algorithm, partition,
                rows=self.estimate_rows(dataset), split_rows=self.split_rows(dataset),
                threads=self.config["threads"]["train"], shape=_shape(model_spec(self.config, model)),
                split=not self.in_job)
        except FedsweepError as exc:
            raise error(f"resources.max_runtime: {exc}") from None

    def __hash__(self) -> int:  # for functools.cache of plan(): one sweep, one identity
        return id(self)


@functools.cache
def _shape(spec: str) -> modelspec.ModelShape:
    return modelspec.model_shape(spec)


def _strip_prefix(message: str, name: str) -> str:
    return message.removeprefix(f"dataset {name!r}: ").removeprefix(f"model {name!r}: ")


def check_data(sweep: Sweep, row_cache: dataspec.RowCountCache | None = None) -> None:
    """Each data set's spec as ``fedsweep prepare`` checks it, its local files and row counts."""
    for name, ds in sweep.config["datasets"].items():
        spec = ds.get("spec", {})
        try:
            sweep.rows[name] = dataspec.dataset_rows(name, spec, sweep.base_dir, row_cache)
            resolved = dataspec.resolve_spec(name, spec)
            sweep.data_files[name] = (dataspec.local_files(resolved, sweep.base_dir)
                                      if resolved["source"] == "local" else [])
        except FedsweepError as exc:
            raise error(f"datasets.{name}.spec: {_strip_prefix(str(exc), name)}") from None
    if row_cache is not None:
        row_cache.save()


def check_shards(sweep: Sweep) -> None:
    """Shards smaller than a batch, or more clients than rows, before any job runs."""
    config = sweep.config
    for cell in sweep.cells:
        rows = sweep.rows.get(cell["dataset"])
        if rows is None:
            continue
        batch_size = sweep.cell_train(cell)["batch_size"]
        k, where = cell["clients"], f"datasets.{cell['dataset']}"
        per_client = grid.partition_settings(config, cell["partition"]).get("per_client")
        scheme = grid.partition_settings(config, cell["partition"]).get("scheme", "iid")
        field_ = grid.partition_field(config, cell["partition"])
        if k > rows[0]:
            raise error(f"clients={k} exceeds the {rows[0]} training rows of {where}")
        if per_client is not None and per_client * k > rows[0]:
            raise error(f"{field_}.per_client={per_client} x clients={k} needs {per_client * k} training rows; "
                        f"{where} has {rows[0]}")
        shard = per_client if per_client is not None else rows[0] // k
        if scheme == "iid" and shard < batch_size:
            raise error(f"clients={k} splits the {rows[0]} training rows of {where} into shards smaller than "
                        f"batch_size={batch_size} (model {cell['model']})" if per_client is None else
                        f"{field_}.per_client={per_client} is smaller than batch_size={batch_size} "
                        f"(model {cell['model']}, {where})")


def check_models(sweep: Sweep) -> None:
    """Local model folders (their files are inputs: an edited model reruns its cells) and each
    model's longest max_length against its positions."""
    config = sweep.config
    for model in config["models"]:
        for key, spec in (("spec", model_spec(config, model)), ("tokenizer", config["models"][model].get("tokenizer"))):
            if spec is None:
                continue
            try:
                sweep.model_files[spec_slug(spec)] = modelspec.model_files(spec)
            except FedsweepError as exc:
                raise error(f"models.{model}.{key}={spec!r}: {_strip_prefix(str(exc), spec)}") from None
        cells = [c for c in sweep.cells if c["model"] == model]
        if not cells:
            continue
        longest = max(cells, key=lambda c: sweep.cell_train(c)["max_length"])
        try:
            modelspec.check_max_length(model_spec(config, model), sweep.cell_train(longest)["max_length"], "")
        except FedsweepError as exc:
            raise error(f"models.{model}: {exc} (dataset {longest['dataset']}, K={longest['clients']})") from None


def load(config: dict[str, Any] | Sequence[str | os.PathLike], base_dir: str | os.PathLike = ".", *,
         inputs: bool = True, in_job: bool = False, row_cache: str | os.PathLike | None = None) -> Sweep:
    """The checked sweep of ``config`` (a mapping, validated in place, or config files).

    ``inputs``: also check the inputs (data files, model folders, shard sizes) and plan every
    cell; inside a cluster job (``in_job``) these were checked on the head node before any job,
    and are not repeated. ``row_cache``: a file that keeps the row counts of local data files
    (by path, size and mtime), so a large CSV is counted once."""
    if not isinstance(config, dict):
        config = read_files(config)
    validate_schema(config)
    check_values(config, base_dir)
    sweep = Sweep(config, grid.cells(config), str(base_dir), in_job=in_job)
    if in_job or not inputs:
        sweep.rows = {name: None for name in config["datasets"]}
        return sweep
    check_data(sweep, dataspec.RowCountCache(row_cache) if row_cache else None)
    check_shards(sweep)
    check_models(sweep)
    for cell in sweep.cells:
        sweep.plan(**cell)
    return sweep


def summary(sweep: Sweep) -> list[str]:
    """What ``fedsweep check`` prints: the grid's size in cells, jobs and estimated GPU-hours."""
    config, cells = sweep.config, sweep.cells
    plans = [sweep.plan(**cell) for cell in cells]
    train_jobs = sum(len(p.targets) for p in plans)
    tokens = {(c["dataset"], spec_slug(tokenizer_spec(config, c["model"])), sweep.cell_train(c)["max_length"])
              for c in cells}
    shards = {(c["dataset"], c["partition"], c["clients"], c["seed"]) for c in cells}
    gpu_hours = sum(p.minutes(p.rounds) * p.gpus for p in plans) / 60
    cpu_hours = sum(p.minutes(p.rounds) for p in plans if p.gpus == 0) / 60
    axes = {"data sets": len(config["datasets"]), "models": len(config["models"]),
            "algorithms": len(grid.algorithms(config)), "partitions": len(grid.partitions(config)),
            "K values": len(config["clients"]), "seeds": len({c["seed"] for c in cells})}
    lines = [f"{len(cells)} training cells ({', '.join(f'{n} {k}' for k, n in axes.items())})",
             f"jobs: {train_jobs} train, {len(shards)} partition, {len(tokens)} tokenize, "
             f"{len(config['datasets'])} prepare_data, {len(fetched(config))} fetch_model, 1 report",
             f"requested job time (runtime auto: the estimate x1.5 + start-up, before retries): {gpu_hours:.1f} GPU-hours"
             + (f" and {cpu_hours:.1f} CPU-job hours" if cpu_hours else "")]
    longest = max(plans, key=lambda p: p.minutes(p.rounds), default=None)
    if longest is not None:
        lines.append(f"longest cell: {longest.minutes(longest.rounds)} min in {len(longest.targets)} job(s), "
                     f"{longest.mem_mb} MB")
    return lines


def report_settings(config: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``fedsweep report`` reads of the effective config (after --config overrides and the
    schema's defaults): budgets, second thresholds, the target fraction and the grid, down to its
    cells (so that the report can say which are missing)."""
    partitions = {}
    for name in grid.partitions(config):
        settings = grid.partition_settings(config, name)
        partitions[name] = {"kind": "per_client" if "per_client" in settings else "fixed_total", **settings}
    return {
        "target_fraction": config["target_fraction"],
        "datasets": {name: {"budget": ds["budget"], "second_threshold": ds["second_threshold"]}
                     for name, ds in config["datasets"].items()},
        "models": list(config["models"]),
        "algorithms": list(grid.algorithms(config)),
        "partitions": partitions,
        "clients": list(config["clients"]),
        "seeds": sorted({s for m in config["models"] for s in grid.model_seeds(config, m)}),
        "cells": [[c["dataset"], c["model"], c["algorithm"], c["partition"], c["clients"], c["seed"]] for c in cells],
    }
