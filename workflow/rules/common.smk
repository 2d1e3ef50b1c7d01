import glob
import hashlib
import json
import os
import re

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

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
        field = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if "propertyNames" in err.schema_path:
            config_error(
                f"{field}: name {err.instance!r} is not a filesystem-safe slug "
                "(letters, digits, '.', '_', '-'; starting with a letter or digit)"
            )
        if isinstance(err.instance, dict):  # e.g. an unknown key: the message names it
            config_error(f"{field}: {err.message}")
        config_error(f"{field}={err.instance!r}: {err.message}")


def _as_list(value):
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def check_config(cfg):
    """Cross-field checks the schema cannot express."""
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
    part = cfg["partition"]
    if part["scheme"] == "dirichlet" and "alpha" not in part:
        config_error("partition.alpha is required with partition.scheme=dirichlet")
    if part["scheme"] == "iid" and "alpha" in part:
        config_error(
            f"partition.alpha={part['alpha']!r} is only used with partition.scheme=dirichlet"
        )
    for i, entry in enumerate(cfg["overrides"]):
        for key, field in (
            ("model", "models"),
            ("dataset", "datasets"),
            ("clients", "clients"),
            ("seed", "seeds"),
        ):
            for value in _as_list(entry.get(key)) or []:
                if value not in cfg[field]:
                    config_error(
                        f"overrides[{i}].{key}={value!r} is not in the config's {field} "
                        f"({', '.join(map(str, cfg[field]))})"
                    )


validate_config(config)
check_config(config)

RESULTS = os.path.normpath(config["results_dir"])
# Absolute, so that jobs on compute nodes (other working directories) find the same cache.
HF_HOME = os.path.abspath(config["hf_home"])
# Head-node (local) rules may download into the cache; every other job must not touch the network.
ONLINE_ENV = f"export HF_HOME='{HF_HOME}';"
OFFLINE_ENV = (
    f"export HF_HOME='{HF_HOME}' HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
    " TRANSFORMERS_OFFLINE=1;"
)
DATASETS = list(config["datasets"])
MODELS = list(config["models"])
CLIENTS = list(config["clients"])
SEEDS = list(config["seeds"])
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


def _matches(entry, dataset, model, clients, seed):
    for key, value in (
        ("dataset", dataset),
        ("model", model),
        ("clients", clients),
        ("seed", seed),
    ):
        allowed = _as_list(entry.get(key))
        if allowed is not None and value not in allowed:
            return False
    return True


def cell_train(dataset, model, clients, seed):
    """train < datasets.NAME.train < models.NAME.train < matching overrides (later win)."""
    clients, seed = int(clients), int(seed)
    merged = dict(config["train"])
    merged.update(config["datasets"][dataset].get("train", {}))
    merged.update(config["models"][model].get("train", {}))
    for entry in config["overrides"]:
        if _matches(entry, dataset, model, clients, seed):
            merged.update(entry["set"])
    return merged


CELLS = [
    dict(dataset=d, model=m, clients=k, seed=s)
    for d in DATASETS
    for m in MODELS
    for k in CLIENTS
    for s in SEEDS
]


def cell_resources(dataset, model):
    """resources < datasets.NAME.resources < models.NAME.resources."""
    merged = dict(config["resources"])
    merged.update(config["datasets"][dataset].get("resources", {}))
    merged.update(config["models"][model].get("resources", {}))
    return merged


# Rows of the hub presets (train, test), for runtime estimates before the data is prepared.
PRESET_ROWS = {
    "imdb": (25_000, 25_000),
    "yelp_review_full": (650_000, 50_000),
    "ag_news": (120_000, 7_600),
}


def dataset_rows(dataset):
    """(train, test) rows: from the prepared data when it exists, else the spec or preset."""
    meta = f"{RESULTS}/data/{dataset}/meta.json"
    if os.path.exists(meta):
        with open(meta) as f:
            rows = json.load(f)["rows"]
        return rows["train"], rows["test"]
    spec = config["datasets"][dataset].get("spec", {})
    train, test = PRESET_ROWS.get(dataset, (100_000, 10_000))
    train = spec.get("max_train") or spec.get("train_size") or train
    test = spec.get("max_test") or spec.get("test_size") or test
    return train, test


def train_runtime(wildcards, attempt):
    """Minutes for a training job: given, or estimated from the cell's work and doubled per retry."""
    res = cell_resources(wildcards.dataset, wildcards.model)
    if res["runtime"] != "auto":
        return res["runtime"] * attempt
    train = cell_train(
        wildcards.dataset, wildcards.model, wildcards.clients, wildcards.seed
    )
    rows_train, rows_test = dataset_rows(wildcards.dataset)
    rounds = config["datasets"][wildcards.dataset]["second_threshold"]
    examples = rounds * (rows_train * train["epochs"] + rows_test / train["eval_every"])
    gpus = max(res["gpus"], 1)
    minutes = 10 + 1.5 * examples / (res["throughput"] * gpus) / 60
    return int(minutes * attempt) + 1


def train_launcher(wildcards):
    """One process per GPU: torchrun when a cell has several GPUs, else plain python."""
    gpus = cell_resources(wildcards.dataset, wildcards.model)["gpus"]
    if gpus > 1:
        return f"python -m torch.distributed.run --standalone --nproc-per-node {gpus} -m fedsweep"
    return "fedsweep"


def _check_cells():
    # A shard smaller than a batch is rejected by `fedsweep train`; catch what we can now.
    for cell in CELLS:
        train = cell_train(**cell)
        spec = config["datasets"][cell["dataset"]].get("spec", {})
        rows = spec.get("max_train") or spec.get("train_size")
        if isinstance(rows, int) and rows // cell["clients"] < train["batch_size"]:
            config_error(
                f"clients={cell['clients']} splits the {rows} training rows of "
                f"datasets.{cell['dataset']} into shards smaller than "
                f"batch_size={train['batch_size']} (model {cell['model']})"
            )


_check_cells()


##### paths #####

PARTITION = config["partition"]
SCHEME = "iid" if PARTITION["scheme"] == "iid" else f"dirichlet-a{PARTITION['alpha']:g}"


def _choice(values):
    return "|".join(re.escape(str(v)) for v in values)


wildcard_constraints:
    dataset=_choice(DATASETS),
    model=_choice(MODELS),
    tokenizer=_choice(TOKENIZERS),
    spec_slug=_choice(FETCH),
    scheme=re.escape(SCHEME),
    clients=r"[1-9][0-9]*",
    seed=r"[0-9]+",
    max_length=r"[1-9][0-9]*",


def tokens_dir(dataset, model, clients, seed):
    length = cell_train(dataset, model, clients, seed)["max_length"]
    return f"{RESULTS}/tokens/{dataset}/{model_tokenizer(model)}_L{length}"


def shards_file(dataset, clients, seed):
    return f"{RESULTS}/shards/{dataset}/{SCHEME}_K{clients}_seed{seed}.parquet"


def run_dir(dataset, model, clients, seed):
    return f"{RESULTS}/runs/{dataset}/{model}/K{clients}_seed{seed}"


##### input functions #####


def train_inputs(wildcards):
    cell = (wildcards.dataset, wildcards.model, wildcards.clients, wildcards.seed)
    return {
        "tokens": f"{tokens_dir(*cell)}/meta.json",
        "shards": shards_file(wildcards.dataset, wildcards.clients, wildcards.seed),
        "model": f"{RESULTS}/models/{tokenizer_slug(model_spec(wildcards.model))}.json",
    }


def train_args(wildcards):
    """The settings of a cell as `fedsweep train` options (part of params: a change reruns it)."""
    cell = cell_train(
        wildcards.dataset, wildcards.model, wildcards.clients, wildcards.seed
    )
    args = [
        f"--{key.replace('_', '-')} {cell[key]}"
        for key in TRAIN_KEYS
        if key != "max_length"
    ]
    return " ".join(args)


def all_metrics():
    return [f"{run_dir(**cell)}/metrics.parquet" for cell in CELLS]


def cached_metrics(wildcards):
    """The metrics of every finished cell found on disk now (for `snakemake figures`)."""
    found = sorted(glob.glob(f"{RESULTS}/runs/*/*/K*_seed*/metrics.parquet"))
    if not found:
        raise WorkflowError(
            f"figures: no {RESULTS}/runs/*/*/K*_seed*/metrics.parquet yet; run the grid first"
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
    the schema's defaults): budgets, second thresholds, the target fraction and the grid.
    """
    return yaml.safe_dump(
        {
            "target_fraction": config["target_fraction"],
            "datasets": {
                name: {
                    "budget": ds["budget"],
                    "second_threshold": ds["second_threshold"],
                }
                for name, ds in config["datasets"].items()
            },
            "models": MODELS,
            "clients": CLIENTS,
            "seeds": SEEDS,
        },
        sort_keys=False,
    )


REPORT_TABLES = [
    f"{RESULTS}/tables/accuracy_at_budget.csv",
    f"{RESULTS}/tables/rounds_to_target.csv",
]
FIGURES = ["accuracy_vs_clients", "rounds_to_target", "accuracy_per_round"]


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
        for name in ("accuracy_at_budget", "rounds_to_target")
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
    return {**tables, **figures}
