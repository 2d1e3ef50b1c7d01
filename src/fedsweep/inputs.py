"""The checks of a sweep's inputs that can be made before any job: each data set's spec, local
files and row counts, shards smaller than a batch (or than a batch and a held-out row, with
``client_holdout``), local model folders, positions vs max_length,
client batching on a decoder, LoRA without peft installed, and model names one letter off a
known one. Called by :func:`fedsweep.config.load` on the head node; each raises one line
``config: ...`` naming the field and the value. Imports no torch, transformers or pandas.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any

from . import FedsweepError, dataspec, grid, modelspec
from .shard_sizes import holdout_problem, shard_sizes

if TYPE_CHECKING:
    from .config import Sweep


def error(message: str) -> FedsweepError:
    return FedsweepError(f"config: {message}")


def model_spec(config: dict[str, Any], model: str) -> str:
    return config["models"][model].get("spec", model)


def _strip_prefix(message: str, name: str) -> str:
    return message.removeprefix(f"dataset {name!r}: ").removeprefix(f"model {name!r}: ")


def check_data(sweep: Sweep) -> None:
    """Each data set's spec as ``fedsweep prepare`` checks it, its local files, their row counts
    and digests."""
    row_cache = sweep.file_cache
    for name, ds in sweep.config["datasets"].items():
        spec = ds.get("spec", {})
        try:
            sweep.rows[name] = dataspec.dataset_rows(name, spec, sweep.base_dir, row_cache)
            resolved = dataspec.resolve_spec(name, spec)
            sweep.data_files[name] = (dataspec.local_files(resolved, sweep.base_dir)
                                      if resolved["source"] == "local" else [])
            if row_cache is not None:
                sweep.data_digests[name] = [row_cache.digest(f) for f in sweep.data_files[name]]
        except FedsweepError as exc:
            raise error(f"datasets.{name}.spec: {_strip_prefix(str(exc), name)}") from None


def check_shards(sweep: Sweep) -> None:
    """More clients than rows, and shards smaller than a batch, before any job runs: exactly for
    the schemes whose sizes do not depend on the labels (:mod:`fedsweep.shard_sizes`); a
    Dirichlet split is redrawn by its partition job until every shard holds a batch."""
    config = sweep.config
    for cell in sweep.cells:
        rows = sweep.rows.get(cell["dataset"])
        if rows is None:
            continue
        batch_size = sweep.cell_train(cell)["batch_size"]
        k, where = cell["clients"], f"datasets.{cell['dataset']}"
        settings = grid.partition_settings(config, cell["partition"])
        per_client, scheme = settings.get("per_client"), settings.get("scheme", "iid")
        field_ = grid.partition_field(config, cell["partition"])
        if k > rows[0]:
            raise error(f"clients={k} exceeds the {rows[0]} training rows of {where}")
        if per_client is not None and per_client * k > rows[0]:
            raise error(f"{field_}.per_client={per_client} x clients={k} needs {per_client * k} training rows; "
                        f"{where} has {rows[0]}")
        try:
            sizes = _shard_sizes(tuple(sorted(settings.items())), rows[0], k, cell["seed"])
        except FedsweepError as exc:
            raise error(f"{field_}: {str(exc).removeprefix('partition: ')} ({where})") from None
        if sizes is None or min(sizes) >= batch_size:
            # A held-out slice (train.client_holdout) must leave every client a batch and hold out a row.
            problem = None if sizes is None else holdout_problem(
                sizes, sweep.cell_train(cell).get("client_holdout", 0), batch_size)
            if problem:
                raise error(f"{problem} (model {cell['model']}, {where}, partition {cell['partition']}, K={k}, "
                            f"seed={cell['seed']}); lower client_holdout or clients")
            continue
        if scheme == "iid":
            raise error(f"clients={k} splits the {rows[0]} training rows of {where} into shards smaller than "
                        f"batch_size={batch_size} (model {cell['model']})" if per_client is None else
                        f"{field_}.per_client={per_client} is smaller than batch_size={batch_size} "
                        f"(model {cell['model']}, {where})")
        hint = "raise min_rows or lower clients" if scheme == "quantity_skew" else "lower clients"
        raise error(f"{field_}: scheme={scheme} with clients={k}, seed={cell['seed']} makes a shard of {min(sizes)} "
                    f"of the {rows[0]} training rows of {where}, smaller than batch_size={batch_size} "
                    f"(model {cell['model']}); {hint}")


@functools.cache
def _shard_sizes(settings_items: Any, rows: int, clients: int, seed: int) -> tuple[int, ...] | None:
    sizes = shard_sizes(dict(settings_items), rows, clients, seed)
    return None if sizes is None else tuple(sizes)


def check_models(sweep: Sweep) -> None:
    """Local model folders (their files are inputs: an edited model reruns its cells) and each
    model's longest max_length against its positions."""
    config = sweep.config
    for model in config["models"]:
        for key, spec in (("spec", model_spec(config, model)), ("tokenizer", config["models"][model].get("tokenizer"))):
            if spec is None:
                continue
            try:
                files = sweep.model_files[modelspec.spec_slug(spec)] = modelspec.model_files(spec)
                if sweep.file_cache is not None:
                    sweep.model_digests[modelspec.spec_slug(spec)] = [sweep.file_cache.digest(f) for f in files]
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


def check_model_kinds(sweep: Sweep) -> None:
    """What a model's kind rules out, and a model name one letter off a known one (a typo that
    would otherwise be a failed download on the head node)."""
    config = sweep.config
    lora = [m for m, entry in config["models"].items() if (entry.get("peft") or {}).get("method", "none") != "none"]
    if lora and importlib.util.find_spec("peft") is None:
        raise error(f"models.{lora[0]}.peft: LoRA needs the peft package, which is not installed here "
                    f"(pip install peft, or pip install -e '.[lora]')")
    for model in config["models"]:
        spec = model_spec(config, model)
        close = modelspec.near_miss(spec)
        if close is not None:
            where = f"models.{model}.spec={spec!r}" if "spec" in config["models"][model] else f"models.{model}"
            raise error(f"{where}: {spec!r} is no model fedsweep knows, no local folder and not in the Hugging Face "
                        f"cache; did you mean {close!r}?")
    for model in lora:
        targets = (config["models"][model]["peft"] or {}).get("target_modules")
        missing = modelspec.missing_lora_targets(model_spec(config, model), [targets] if isinstance(targets, str)
                                                 else targets) if targets else None
        if missing is not None:
            names, model_type, known = missing
            raise error(f"models.{model}.peft.target_modules: {names[0]!r} is no module of this {model_type} model "
                        f"(LoRA can adapt: {', '.join(known)})")
    for cell in sweep.cells:
        group = sweep.cell_train(cell)["client_group"]
        if group > 1 and modelspec.is_decoder(model_spec(config, cell["model"])):
            raise error(f"models.{cell['model']}: client_group={group} (client batching) does not support decoder "
                        f"models; use client_group: 1 for it (dataset {cell['dataset']}, K={cell['clients']})")
