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

from . import FedsweepError, dataspec, estimate, grid, modelspec, settings, shard_sizes
from . import inputs as inputs_
from .configfile import read_files
from .modelspec import spec_slug

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "config.schema.yaml"
GUESSED_ROWS = (100_000, 10_000)  # a hub data set with no preset, before its download


def error(message: str) -> FedsweepError:
    return FedsweepError(f"config: {message}")


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

    # An integer is an int: JSON Schema's "integer" admits 1.0, which would become a path "K1.0"
    # or a flag "--max-length 16.0" and fail late, far from the config.
    integers = base.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool))
    return validators.extend(base, {"properties": set_defaults}, type_checker=integers)(schema)


def validate_non_text_keys(value: Any, where: str = "") -> None:
    """Every mapping key is text (a config given as a mapping, e.g. through --config, may hold
    the booleans and numbers YAML reads from unquoted on/off/yes/no and digits)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            validate_non_text_keys(item, f"{where}[{i}]")
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if not isinstance(key, str):
            kind = "boolean" if isinstance(key, bool) else "number" if isinstance(key, (int, float)) else "value"
            raise error(f"{where or '(top level)'}: the key {key!r} is a {kind}, not a name (YAML reads unquoted "
                        f"on/off/yes/no as booleans and digits as numbers): quote it")
        validate_non_text_keys(item, f"{where}.{key}".lstrip("."))


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
    if err.validator == "type" and isinstance(err.instance, str) and _YAML11_NUMBER.match(err.instance):
        raise error(f"{field_}={err.instance!r}: {err.message} (YAML reads a number without a '.' before its "
                    f"exponent as text: write {_with_point(err.instance)})")
    raise error(f"{field_}={err.instance!r}: {err.message}")


# A number YAML 1.1 (PyYAML, Snakemake) reads as a string: 1e-5, 2E+3 (1.0e-5 is a float).
_YAML11_NUMBER = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def _with_point(text: str) -> str:
    mantissa, exponent = re.split("[eE]", text, maxsplit=1)
    return f"{mantissa}.0e{exponent}"


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
    for key in ("results_dir", "hf_home"):  # a folder literally named "~" is never what was meant
        if isinstance(config.get(key), str):
            config[key] = os.path.expanduser(config[key])
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
    check_settings_use(config)


def check_settings_use(config: dict[str, Any]) -> None:
    """Settings that would silently do nothing: adapters' settings with ``method: none``, a
    warmup that lasts as long as the cell (its whole run at a fraction of the lr)."""
    from . import adapters

    for name, model in config["models"].items():
        try:
            adapters.parse(model.get("peft"), f"models.{name}.peft")
        except FedsweepError as exc:
            raise error(str(exc)) from None
    for cell in grid.cells(config):
        try:
            settings.check_train_rules(grid.cell_train(config, **cell), settings.field_name("train"))
        except FedsweepError as exc:
            raise error(str(exc)) from None
        warmup = grid.algorithm_settings(config, cell["algorithm"]).get("warmup_rounds", 0)
        rounds = config["datasets"][cell["dataset"]]["second_threshold"]
        if warmup and warmup >= rounds:
            raise error(f"algorithms.{cell['algorithm']}.warmup_rounds={warmup} is not shorter than the "
                        f"{rounds} rounds of datasets.{cell['dataset']} (second_threshold): the whole cell "
                        f"would train at a fraction of the lr")


# ----------------------------------------------------------------------------- models and tokenizers


def model_spec(config: dict[str, Any], model: str) -> str:
    return config["models"][model].get("spec", model)


def tokenizer_spec(config: dict[str, Any], model: str) -> str:
    return config["models"][model].get("tokenizer", model_spec(config, model))


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
    # sha256 of those files (as params, a file replaced by one with an older mtime reruns its jobs)
    data_digests: dict[str, list[str]] = field(default_factory=dict)
    model_digests: dict[str, list[str]] = field(default_factory=dict)
    file_cache: dataspec.RowCountCache | None = None  # row counts and digests by file stamp
    in_job: bool = False
    # The longest job the cluster's partition allows (minutes; SLURM's MaxTime, found by the
    # workflow's check before the first job): a retry, which doubles its time, never asks more.
    time_limit: int | None = None

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

    def partition_args(self, dataset: str, partition: str, clients: int, seed: int) -> str:
        """``fedsweep partition``'s options for one shard file. A Dirichlet split's sizes follow
        the labels, so its job gets ``--min-size``: the fewest rows with which every cell that uses
        the file keeps a full training batch (after its ``client_holdout``), and redraws until every
        shard has them (the other schemes' sizes are checked before any job:
        :func:`fedsweep.inputs.check_shards`)."""
        args = grid.partition_args(self.config, partition)
        if grid.partition_settings(self.config, partition).get("scheme") != "dirichlet":
            return args
        trains = [self.cell_train(cell) for cell in self.cells
                  if (cell["dataset"], cell["partition"], cell["clients"], cell["seed"]) ==
                  (dataset, partition, int(clients), int(seed))]
        needed = [shard_sizes.rows_for_a_batch(t["batch_size"], t.get("client_holdout", 0.0)) for t in trains]
        return f"{args} --min-size {max(needed, default=1)}"

    def job_minutes(self, cell: dict[str, Any], target: int, attempt: int = 1) -> int:
        """SLURM -t of the cell's job that trains up to round ``target``: estimated or given,
        doubled per retry (a retry resumes from the checkpoint), at most max_runtime and the
        partition's MaxTime (a request above it would pend forever)."""
        minutes = self.plan(**cell).minutes(target, attempt)
        return min(minutes, self.time_limit) if self.time_limit else minutes

    def __hash__(self) -> int:  # for functools.cache of plan(): one sweep, one identity
        return id(self)


@functools.cache
def _shape(spec: str) -> modelspec.ModelShape:
    return modelspec.model_shape(spec)


def load(config: dict[str, Any] | Sequence[str | os.PathLike], base_dir: str | os.PathLike = ".", *,
         inputs: bool = True, in_job: bool = False, row_cache: str | os.PathLike | None = None,
         files: Sequence[str | os.PathLike] = ()) -> Sweep:
    """The checked sweep of ``config`` (a mapping, validated in place, or config files).

    ``inputs``: also check the inputs (data files, model folders, shard sizes) and plan every
    cell; inside a cluster job (``in_job``) these were checked on the head node before any job,
    and are not repeated. ``row_cache``: a file that keeps the row counts of local data files
    (by path, size and mtime), so a large CSV is counted once. ``files``: the config files a
    mapping was read from (Snakemake reads them itself), read again strictly (duplicate keys,
    keys YAML turns into booleans or numbers)."""
    if not isinstance(config, dict):
        config = read_files(config)
    elif files:
        read_files(files)
    validate_non_text_keys(config)
    validate_schema(config)
    check_values(config, base_dir)
    sweep = Sweep(config, grid.cells(config), str(base_dir), in_job=in_job)
    if in_job or not inputs:
        sweep.rows = {name: None for name in config["datasets"]}
        return sweep
    sweep.file_cache = dataspec.RowCountCache(row_cache) if row_cache else None
    inputs_.check_data(sweep)
    inputs_.check_shards(sweep)
    inputs_.check_models(sweep)
    inputs_.check_model_kinds(sweep)
    if sweep.file_cache is not None:
        sweep.file_cache.save()
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
        chosen = grid.partition_settings(config, name)
        partitions[name] = {"kind": "per_client" if "per_client" in chosen else "fixed_total", **chosen}
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
