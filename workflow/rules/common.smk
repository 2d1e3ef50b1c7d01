import functools
import glob
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The DAG-time input checks (workflow/rules/common.smk's preflight) use fedsweep: the installed
# package, else this repository's copy (a Snakemake outside fedsweep's environment).
try:
    import fedsweep
except ImportError:
    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from fedsweep import FedsweepError, cluster, grid, preflight

# pip in envs/fedsweep.yaml installs this repository (editable) from here: Snakemake copies the
# env file into .snakemake/conda/, so a relative path there would point to the wrong folder.
os.environ.setdefault("FEDSWEEP_ROOT", workflow.basedir)

TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "max_length",
    "protocol",
    "precision",
    "eval_every",
    "eval_batch_size",
    "checkpoint_every",
    "client_group",
)


class ConfigError(WorkflowError):
    """A bad config value, reported as one line naming the field and the value."""


def config_error(message):
    raise ConfigError(f"config: {message}")


##### validate the config against the schema (which also fills in the defaults) #####


def validate_config(cfg):
    try:
        validate(cfg, schema="../schemas/config.schema.yaml")
    except WorkflowError as exc:
        # Report jsonschema's verdict as one line: the offending field and its value.
        err = exc.__context__  # the jsonschema.ValidationError it was raised from
        if not hasattr(err, "absolute_path"):
            raise
        field = "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path
        ).lstrip(".")
        field = field or "(top level)"
        if "propertyNames" in err.schema_path:
            config_error(
                f"{field}: name {err.instance!r} is not a filesystem-safe slug "
                "(letters, digits, '.', '_', '-'; starting with a letter or digit)"
            )
        if err.validator == "pattern" and err.validator_value == "\\S":
            config_error(f"{field}={err.instance!r} must not be empty")
        if isinstance(err.instance, dict):  # e.g. an unknown key: the message names it
            config_error(f"{field}: {err.message}")
        config_error(f"{field}={err.instance!r}: {err.message}")


def _as_list(value):
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def _non_finite(value, field):
    """The first NaN or infinity anywhere in the config (JSON Schema's bounds let NaN through)."""
    if isinstance(value, float) and not math.isfinite(value):
        return field, value
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value) if isinstance(value, list) else ()
    )
    for key, item in items:
        sub = (
            f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}".lstrip(".")
        )
        found = _non_finite(item, sub)
        if found:
            return found
    return None


def _check_folder(cfg, key):
    path = cfg[key]
    if not path.strip():
        config_error(f"{key}={path!r} must name a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        config_error(f"{key}={path!r} exists and is not a folder")


def check_config(cfg):
    """Cross-field checks the schema cannot express."""
    bad = _non_finite(cfg, "")
    if bad:
        config_error(f"{bad[0]}={bad[1]!r} must be a finite number")
    for key in ("results_dir", "hf_home"):
        if cfg.get(key) is not None:
            _check_folder(cfg, key)
    for k in cfg["clients"]:
        if k < 1:
            config_error(
                f"clients={cfg['clients']}: every K must be an integer >= 1 (got {k})"
            )
    if len(set(cfg["clients"])) != len(cfg["clients"]):
        config_error(f"clients={cfg['clients']}: values must be distinct")
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        config_error(f"seeds={cfg['seeds']}: values must be distinct")
    for name, ds in cfg["datasets"].items():
        if ds["budget"] > ds["second_threshold"]:
            config_error(
                f"datasets.{name}.budget={ds['budget']} exceeds "
                f"datasets.{name}.second_threshold={ds['second_threshold']}"
            )
    for name, model in cfg["models"].items():
        seeds = model.get("seeds", [])
        if len(set(seeds)) != len(seeds):
            config_error(f"models.{name}.seeds={seeds}: values must be distinct")
    # algorithms, partitions, overrides: fedsweep.grid (shared with `fedsweep cluster-check`)
    try:
        grid.check(cfg)
    except FedsweepError as exc:
        config_error(str(exc))


validate_config(config)
check_config(config)

RESULTS = os.path.normpath(config["results_dir"])
# Inside a cluster job (the Snakemake that runs one job or group on a compute node): the checks
# of the inputs were made on the head node before any job, and are not repeated there.
IN_JOB = workflow.remote_exec
# The Hugging Face cache: the config's hf_home, else the caller's $HF_HOME, else the project's
# cache/huggingface. Absolute, so that jobs on compute nodes (other working directories) find it.
HF_HOME = os.path.abspath(
    config.get("hf_home") or os.environ.get("HF_HOME") or "cache/huggingface"
)
# Head-node (local) rules download into the cache: online even when the submitting shell has
# exported the offline variables. Every other job must not touch the network.
ONLINE_ENV = (
    "unset HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE;"
    f" export HF_HOME='{HF_HOME}';"
)
OFFLINE_ENV = (
    f"export HF_HOME='{HF_HOME}' HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
    " TRANSFORMERS_OFFLINE=1;"
)


def show_cause(command):
    """A job's command, which writes into {log}; on failure the log's last line (fedsweep's
    one-line `fedsweep: error: ...`) goes to the console too, not only the log's path.
    """
    return (
        command
        + ' || {{ status=$?; echo "error (log: {log}): $(tail -n 1 {log})" >&2; exit $status; }}'
    )


DATASETS = list(config["datasets"])
MODELS = list(config["models"])
ALGORITHMS = list(grid.algorithms(config))
PARTITIONS = list(grid.partitions(config))
CLIENTS = list(config["clients"])
SEEDS = sorted({s for m in MODELS for s in grid.model_seeds(config, m)})
ENV = "../../envs/fedsweep.yaml"


##### models and tokenizers #####


def model_spec(model):
    return config["models"][model].get("spec", model)


def tokenizer_slug(spec):
    """A filesystem-safe key for a tokenizer spec (hub ids contain '/', paths more)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.")
    return slug or "tokenizer"


def _tokenizers():
    slugs = {}
    for model in MODELS:
        spec = config["models"][model].get("tokenizer", model_spec(model))
        slug = tokenizer_slug(spec)
        if slugs.setdefault(slug, spec) != spec:
            config_error(
                f"models.{model}.tokenizer={spec!r} and {slugs[slug]!r} map to the same "
                f"folder name {slug!r}; rename one"
            )
    return slugs


TOKENIZERS = _tokenizers()


def model_tokenizer(model):
    return tokenizer_slug(config["models"][model].get("tokenizer", model_spec(model)))


# Every spec whose files a job needs (models and tokenizers), by slug: fetched on the head node.
FETCH = {tokenizer_slug(model_spec(m)): model_spec(m) for m in MODELS} | TOKENIZERS


##### the cells of the grid and their training settings #####


def cell_train(dataset, model, clients, seed, algorithm=None, partition=None):
    """train < datasets.NAME.train < models.NAME.train < matching overrides (later win)."""
    return grid.cell_train(config, dataset, model, clients, seed, algorithm, partition)


# data set x model x algorithm x partition x K x seed, less what entries restrict (fedsweep.grid)
CELLS = grid.cells(config)


def cell_resources(dataset, model):
    """resources < datasets.NAME.resources < models.NAME.resources."""
    return cluster.cell_resources(config, dataset, model)


##### inputs checked before any job: data files, row counts, model folders #####

# Relative paths of local data files resolve against the working directory (where snakemake
# runs: the repository root); errors show the absolute path.
ROW_COUNTS = preflight.RowCountCache(".snakemake/fedsweep/row_counts.json")


def _strip_prefix(message, name):
    return message.removeprefix(f"dataset {name!r}: ").removeprefix(f"model {name!r}: ")


def _dataset_inputs():
    """(train, test) rows (None: unknown before download) and the local files of each data set."""
    from fedsweep.data import local_files, resolve_spec

    rows, files = {}, {}
    # Checked on the head node; prepare_data (a local rule) never runs in a job.
    if IN_JOB:
        return {name: None for name in config["datasets"]}, files
    for name, ds in config["datasets"].items():
        spec = ds.get("spec", {})
        try:
            rows[name] = preflight.dataset_rows(name, spec, os.getcwd(), ROW_COUNTS)
            resolved = resolve_spec(name, spec)
            files[name] = (
                local_files(resolved, os.getcwd())
                if resolved["source"] == "local"
                else []
            )
        except FedsweepError as exc:
            config_error(f"datasets.{name}.spec: {_strip_prefix(str(exc), name)}")
    ROW_COUNTS.save()
    return rows, files


DATASET_ROWS, DATA_FILES = _dataset_inputs()


GUESSED_ROWS = (100_000, 10_000)  # a hub data set with no preset, before its download


def dataset_rows(dataset):
    """(train, test) rows for the estimates: prepared, counted, from the preset, or a guess."""
    meta = f"{RESULTS}/data/{dataset}/meta.json"
    if os.path.exists(meta):
        with open(meta) as f:
            rows = json.load(f)["rows"]
        return rows["train"], rows["test"]
    return DATASET_ROWS[dataset] or GUESSED_ROWS


@functools.cache
def model_shape(spec):
    return cluster.model_shape(spec)


@functools.cache
def _cell_plan(dataset, model, algorithm, partition, clients, seed):
    """Memory, minutes and jobs (round targets) of a cell (fedsweep.cluster.plan_cell). The
    number of jobs comes from rows known before any download (exact for presets, local and
    synthetic data), so it does not change once a data set is prepared. Inside a job nothing
    depends on it (its inputs and round are settled): no chain is planned there."""
    try:
        return cluster.plan_cell(
            config,
            dataset,
            model,
            int(clients),
            int(seed),
            algorithm,
            partition,
            rows=dataset_rows(dataset),
            split_rows=DATASET_ROWS[dataset] or GUESSED_ROWS,
            threads=config["threads"]["train"],
            shape=model_shape(model_spec(model)),
            split=not IN_JOB,
        )
    except FedsweepError as exc:
        config_error(f"resources.max_runtime: {exc}")


def _cell(wildcards):
    """The cell of a training job's wildcards, as a dict (the keys of fedsweep.grid.cells)."""
    return dict(
        dataset=wildcards.dataset,
        model=wildcards.model,
        algorithm=wildcards.algorithm,
        partition=wildcards.partition,
        clients=int(wildcards.clients),
        seed=int(wildcards.seed),
    )


def cell_plan(wildcards):
    return _cell_plan(**_cell(wildcards))


def train_runtime(wildcards, attempt):
    """Minutes of a cell's last (or only) job: given or estimated, doubled per retry (a retry
    resumes from the checkpoint), at most resources.max_runtime."""
    plan = cell_plan(wildcards)
    return plan.minutes(plan.rounds, attempt)


def segment_runtime(wildcards, attempt):
    """Minutes of the job of a chain that trains up to round wildcards.rounds."""
    return cell_plan(wildcards).minutes(int(wildcards.rounds), attempt)


def train_mem_mb(wildcards):
    return cell_plan(wildcards).mem_mb


def tokenize_runtime(wildcards):
    """Minutes (SLURM -t) of a tokenisation: generous for ~1000 texts/s. Summed with the others
    when the profile groups the cheap jobs into one SLURM job."""
    return 5 + math.ceil(sum(dataset_rows(wildcards.dataset)) / 60000)


def train_launcher(wildcards):
    """One process per GPU: torchrun when a cell has several GPUs, else plain python."""
    gpus = cell_resources(wildcards.dataset, wildcards.model)["gpus"]
    if gpus > 1:
        return f"python -m torch.distributed.run --standalone --nproc-per-node {gpus} -m fedsweep"
    return "fedsweep"


def _check_cells():
    """Shards smaller than a batch, or more clients than rows, before any job runs."""
    for cell in CELLS:
        train = cell_train(**cell)
        rows = DATASET_ROWS[cell["dataset"]]
        if rows is None:
            continue
        k, where = cell["clients"], f"datasets.{cell['dataset']}"
        part = grid.partition_settings(config, cell["partition"])
        field = grid.partition_field(config, cell["partition"])
        if k > rows[0]:
            config_error(f"clients={k} exceeds the {rows[0]} training rows of {where}")
        per_client = part.get("per_client")
        if per_client is not None and per_client * k > rows[0]:
            config_error(
                f"{field}.per_client={per_client} x clients={k} needs {per_client * k} "
                f"training rows; {where} has {rows[0]}"
            )
        shard = per_client if per_client is not None else rows[0] // k
        if part.get("scheme", "iid") == "iid" and shard < train["batch_size"]:
            config_error(
                f"clients={k} splits the {rows[0]} training rows of {where} into shards "
                f"smaller than batch_size={train['batch_size']} (model {cell['model']})"
                if per_client is None
                else f"{field}.per_client={per_client} is smaller than "
                f"batch_size={train['batch_size']} (model {cell['model']}, {where})"
            )


def _model_inputs():
    """The files of local model folders (declared inputs of fetch_model, so an edited model
    reruns its cells), and each model's longest max_length against its positions."""
    files = {}
    # Checked on the head node; fetch_model (a local rule) never runs in a job.
    if IN_JOB:
        return files
    for model in MODELS:
        for key, spec in (
            ("spec", model_spec(model)),
            ("tokenizer", config["models"][model].get("tokenizer")),
        ):
            if spec is None:
                continue
            try:
                files[tokenizer_slug(spec)] = preflight.model_files(spec)
            except FedsweepError as exc:
                config_error(
                    f"models.{model}.{key}={spec!r}: {_strip_prefix(str(exc), spec)}"
                )
        cell = max(
            (c for c in CELLS if c["model"] == model),
            key=lambda c: cell_train(**c)["max_length"],
        )
        length = cell_train(**cell)["max_length"]
        try:
            preflight.check_max_length(model_spec(model), length, "")
        except FedsweepError as exc:
            config_error(
                f"models.{model}: {exc} (dataset {cell['dataset']}, K={cell['clients']})"
            )
    return files


MODEL_FILES = _model_inputs()


def max_length_of_spec(spec):
    """The longest max_length any cell asks of a model spec (checked by `fedsweep fetch`)."""
    lengths = [
        cell_train(**c)["max_length"] for c in CELLS if model_spec(c["model"]) == spec
    ]
    return max(lengths, default=0)


if not IN_JOB:
    _check_cells()
    # Every cell's plan (and the max_runtime check), before any job.
    for each_cell in CELLS:
        _cell_plan(**each_cell)


##### paths #####


def _choice(values):
    return "|".join(re.escape(str(v)) for v in values)


wildcard_constraints:
    dataset=_choice(DATASETS),
    model=_choice(MODELS),
    algorithm=_choice(ALGORITHMS),
    partition=_choice(PARTITIONS),
    tokenizer=_choice(TOKENIZERS),
    spec_slug=_choice(FETCH),
    clients=r"[1-9][0-9]*",
    seed=r"[0-9]+",
    max_length=r"[1-9][0-9]*",
    rounds=r"[1-9][0-9]*",


# A cell's folder below runs/ (and logs/train/, benchmarks/train/).
CELL_PATH = "{dataset}/{model}/{algorithm}/{partition}_K{clients}_seed{seed}"


def tokens_dir(dataset, model, clients, seed, algorithm=None, partition=None):
    length = cell_train(dataset, model, clients, seed, algorithm, partition)[
        "max_length"
    ]
    return f"{RESULTS}/tokens/{dataset}/{model_tokenizer(model)}_L{length}"


def shards_file(dataset, partition, clients, seed):
    return f"{RESULTS}/shards/{dataset}/{partition}_K{clients}_seed{seed}.parquet"


def run_dir(dataset, model, algorithm, partition, clients, seed):
    cell = CELL_PATH.format(
        dataset=dataset,
        model=model,
        algorithm=algorithm,
        partition=partition,
        clients=clients,
        seed=seed,
    )
    return f"{RESULTS}/runs/{cell}"


##### input functions #####


def cell_run_dir(wildcards):
    return run_dir(**_cell(wildcards))


def _job_inputs(wildcards, target):
    """Tokens, shards and model of a cell's job; for the second and later jobs of a chain, the
    marker of the job before (in a job's own Snakemake the order is already settled: no plan).
    """
    cell = _cell(wildcards)
    inputs = {
        "tokens": f"{tokens_dir(**cell)}/meta.json",
        "shards": shards_file(
            cell["dataset"], cell["partition"], cell["clients"], cell["seed"]
        ),
        "model": f"{RESULTS}/models/{tokenizer_slug(model_spec(wildcards.model))}.json",
    }
    if not IN_JOB:
        earlier = [t for t in cell_plan(wildcards).targets if t < target]
        if earlier:
            inputs["segment"] = (
                f"{cell_run_dir(wildcards)}/segments/r{earlier[-1]}.done"
            )
    return inputs


def train_inputs(wildcards):
    """Inputs of a cell's last (or only) job."""
    return _job_inputs(
        wildcards, config["datasets"][wildcards.dataset]["second_threshold"]
    )


def segment_inputs(wildcards):
    """Inputs of the job of a chain that trains up to round wildcards.rounds."""
    return _job_inputs(wildcards, int(wildcards.rounds))


def train_shell(rounds, then=""):
    """The shell command of a training job (train or train_segment). Every job of a cell (each
    attempt, requeue and chain link) appends to one log, train.log in the run folder, which
    {log} is a hard link to: Snakemake deletes {log} before each job, the history stays. A
    header line per job says which attempt and SLURM job it is; `fedsweep train` itself says
    from which round it resumes. `then` runs after a successful training."""
    history = "{params.out_dir}/train.log"
    header = (
        "==== $(date '+%F %T') fedsweep train to round ROUNDS: attempt {resources.attempt},"
        " SLURM job ${{SLURM_JOB_ID:-none}}"
        "${{SLURM_RESTART_COUNT:+ (requeued ${{SLURM_RESTART_COUNT}}x)}} on $(hostname) ===="
    ).replace("ROUNDS", rounds)
    train = (
        " OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " {params.launcher} train --tokens-dir {params.tokens_dir} --shards {input.shards}"
        " --model {params.spec:q} --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --algorithm {wildcards.algorithm} --partition {wildcards.partition}"
        " --rounds ROUNDS {params.args} --progress lines --stale-checkpoint restart"
        " --out-dir {params.out_dir} >> {log} 2>&1"
    ).replace("ROUNDS", rounds)
    parts = [
        f"touch {history}; ln -f {history} {{log}} 2>/dev/null || cp {history} {{log}};",
        f' echo "{header}" >> {{log}}; ',
        OFFLINE_ENV,
        train,
        then,
    ]
    return show_cause("".join(parts))


def train_args(wildcards):
    """The settings of a cell as `fedsweep train` options (part of params: a change reruns it)."""
    cell = _cell(wildcards)
    train = cell_train(**cell)
    args = [
        f"--{key.replace('_', '-')} {train[key]}"
        for key in TRAIN_KEYS
        if key != "max_length"
    ]
    # The algorithm's settings (FedAvg's defaults are left out: {}) and the model's adapters.
    spec = grid.algorithm_spec(config, cell["algorithm"])
    if spec != "{}":
        args.append(f"--algorithm-spec {shlex.quote(spec)}")
    peft = config["models"][cell["model"]].get("peft")
    if peft and peft.get("method", "none") != "none":
        args.append(f"--peft {shlex.quote(json.dumps(peft, sort_keys=True))}")
    return " ".join(args)


def all_metrics():
    return [f"{run_dir(**cell)}/metrics.parquet" for cell in CELLS]


def cached_metrics(wildcards):
    """The metrics of every finished cell found on disk now (for `snakemake figures`)."""
    cells = CELL_PATH.format(
        dataset="*", model="*", algorithm="*", partition="*", clients="*", seed="*"
    )
    pattern = f"{RESULTS}/runs/{cells}"
    found = sorted(glob.glob(f"{pattern}/metrics.parquet"))
    if not found:
        raise WorkflowError(
            f"figures: no {pattern}/metrics.parquet yet; run the grid first"
        )
    return found


def cached_metrics_stamp(wildcards):
    """Path, size and mtime of every cached metrics file: as a param, any change reruns `figures`."""
    stamp = [
        (path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
        for path in cached_metrics(wildcards)
    ]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()


def report_config():
    """What `fedsweep report` reads, from the effective config (after --config overrides and
    the schema's defaults): budgets, second thresholds, the target fraction and the grid, down
    to its cells (so that the report can say which are missing).
    """
    partitions = {}
    for name in PARTITIONS:
        settings = grid.partition_settings(config, name)
        kind = "per_client" if "per_client" in settings else "fixed_total"
        partitions[name] = {"kind": kind, **settings}
    return {
        "target_fraction": config["target_fraction"],
        "datasets": {
            name: {
                "budget": ds["budget"],
                "second_threshold": ds["second_threshold"],
            }
            for name, ds in config["datasets"].items()
        },
        "models": MODELS,
        "algorithms": ALGORITHMS,
        "partitions": partitions,
        "clients": CLIENTS,
        "seeds": SEEDS,
        "cells": [
            [
                c["dataset"],
                c["model"],
                c["algorithm"],
                c["partition"],
                c["clients"],
                c["seed"],
            ]
            for c in CELLS
        ],
    }


TABLES = ["accuracy_at_budget", "rounds_to_target", "seeds", "missing_cells"]
REPORT_TABLES = [f"{RESULTS}/tables/{name}.csv" for name in TABLES]
FIGURES = [
    "accuracy_vs_clients",
    "rounds_to_target",
    "accuracy_per_round",
    "drift",
    "accuracy_vs_clients_by_partition",
    "accuracy_vs_bytes",
]


def final_outputs():
    return (
        all_metrics()
        + REPORT_TABLES
        + expand(
            f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"]
        )
    )


def report_outputs():
    tables = {
        name: report(
            f"{RESULTS}/tables/{name}.csv",
            caption=f"../report/table_{name}.rst",
            category="Tables",
        )
        for name in TABLES
    }
    figures = {
        f"{name}_{ext}": report(
            f"{RESULTS}/figures/{name}.{ext}",
            caption=f"../report/figure_{name}.rst",
            category="Figures",
            subcategory=ext.upper(),
        )
        for name in FIGURES
        for ext in ("png", "pdf")
    }
    # What each data set's class ids mean (from the cells' run.json): read the tables without
    # the data folder.
    datasets = {"datasets": f"{RESULTS}/tables/datasets.json"}
    return {**tables, **figures, **datasets}


##### before any job of a SLURM run: does the cluster take the jobs? #####


class ClusterError(WorkflowError):
    """The slurm executor would hang, or SLURM would refuse or never start a job: one line."""


def _origin(rule_name, resource):
    """Where a job's resource value comes from, for the message."""
    if resource in workflow.resource_settings.overwrite_resources.get(rule_name, {}):
        return f"set-resources {rule_name}:{resource}"
    if rule_name in ("train", "train_segment"):
        return f"resources.{resource} of the config"
    return f"{resource} of default-resources"


def check_cluster():
    """Called by onstart (the DAG is built, nothing submitted yet; not in dry runs or jobs).
    With the slurm executor: stop with one line when sacct fails and the profile does not say
    `slurm-status-command: squeue` (the executor would poll sacct forever), or when a job asks
    for more memory, time or GPUs than the nodes of its partition have (sbatch would refuse it,
    or it would pend forever). FEDSWEEP_SKIP_CLUSTER_CHECK=1 skips this."""
    plugin = getattr(workflow, "executor_plugin", None)
    if getattr(plugin, "name", None) != "slurm" or os.environ.get(
        "FEDSWEEP_SKIP_CLUSTER_CHECK"
    ):
        return
    settings = workflow.executor_settings
    try:
        info = cluster.query_cluster()
    except (FedsweepError, OSError, subprocess.SubprocessError) as exc:
        print(f"slurm: warning: cannot check the cluster ({exc})", file=sys.stderr)
        return
    problem = cluster.accounting_problem(
        info,
        getattr(settings, "status_command", None),
        getattr(settings, "init_seconds_before_status_checks", None),
    )
    if problem:
        raise ClusterError(f"slurm: {problem}")
    problems = []
    seen_groups = set()
    for job in workflow.dag.needrun_jobs():
        if job.is_local:
            continue
        group = workflow.dag.get_job_group(job)
        if group is not None:  # one SLURM job for the group: its summed minutes
            if id(group) in seen_groups:
                continue
            seen_groups.add(id(group))
            rules = sorted({j.rule.name for j in group.jobs})
            name = (
                f"group job {group.groupid} ({len(group.jobs)} {'/'.join(rules)} jobs)"
            )
            resources = group.resources
        else:
            wc = job.wildcards_dict
            if job.rule.name in ("train", "train_segment"):
                name = f"training job {grid.cell_name(wc)}"
                if "rounds" in wc:
                    name += f" (to round {wc['rounds']})"
            else:
                name = f"job {job.rule.name} {'/'.join(map(str, wc.values()))}".strip()
            resources = job.resources
        values = {}
        for key in ("mem_mb", "runtime", "gpu"):
            value = resources.get(key)
            values[key] = value if isinstance(value, int) else None
        partition = job.resources.get("slurm_partition")
        request = cluster.JobRequest(
            name=name,
            mem_mb=values["mem_mb"],
            runtime=values["runtime"],
            gpus=values["gpu"] or 0,
            partition=str(partition) if partition else None,
            mem_origin=_origin(job.rule.name, "mem_mb"),
        )
        problems += cluster.request_problems(request, info)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ClusterError(f"slurm: {problems[0]}{more}")
