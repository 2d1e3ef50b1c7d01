import json
import os
import re
import sys

from snakemake.exceptions import WorkflowError

# The package holds every check and table; the workflow only wires. fedsweep is the installed
# package, else this repository's copy (a Snakemake outside fedsweep's environment).
try:
    import fedsweep
except ImportError:
    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from fedsweep import FedsweepError, failures, grid
from fedsweep import config as sweep_config
from fedsweep import report as sweep_report

# pip in envs/fedsweep.yaml installs this repository (editable) from here: Snakemake copies the
# env file into .snakemake/conda/, so a relative path there would point to the wrong folder.
os.environ.setdefault("FEDSWEEP_ROOT", workflow.basedir)


class ConfigError(WorkflowError):
    """A bad config value or input, reported as one line naming the field and the value."""


##### the config: validated (defaults filled in) and checked by fedsweep.config, before any job #####

# Inside a cluster job (the Snakemake that runs one job or group on a compute node) the inputs
# were checked on the head node before any job, and are not checked again there. Relative paths
# of local files resolve against the working directory (where snakemake runs).
try:
    SWEEP = sweep_config.load(
        config,
        os.getcwd(),
        in_job=workflow.remote_exec,
        row_cache=".snakemake/fedsweep/row_counts.json",
        files=workflow.configfiles,
    )
except FedsweepError as exc:
    raise ConfigError(str(exc)) from None

IN_JOB = workflow.remote_exec
RESULTS = os.path.normpath(config["results_dir"])
CELLS = SWEEP.cells
DATASETS = list(config["datasets"])
MODELS = list(config["models"])
ALGORITHMS = list(grid.algorithms(config))
PARTITIONS = list(grid.partitions(config))
CLIENTS = list(config["clients"])
SEEDS = sorted({c["seed"] for c in CELLS})
TOKENIZERS = sweep_config.tokenizers(config)  # slug -> tokenizer spec
FETCH = sweep_config.fetched(config)  # slug -> spec of every model and tokenizer
ENV = "../../envs/fedsweep.yaml"

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


def show_failures(snakemake_logs):
    """The `onerror` handler: one line per failed job, the last line of its logs (fedsweep.failures)."""
    for line in failures.causes(snakemake_logs):
        print(line, file=sys.stderr)


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


CELL_PATH = (
    grid.CELL_PATH
)  # a cell's folder below runs/, logs/train/ and benchmarks/train/


def model_spec(model):
    return sweep_config.model_spec(config, model)


def tokens_dir(cell):
    slug = sweep_config.spec_slug(sweep_config.tokenizer_spec(config, cell["model"]))
    length = SWEEP.cell_train(cell)["max_length"]
    return f"{RESULTS}/tokens/{cell['dataset']}/{slug}_L{length}"


def shards_file(cell):
    return (
        f"{RESULTS}/shards/{cell['dataset']}/"
        f"{cell['partition']}_K{cell['clients']}_seed{cell['seed']}.parquet"
    )


def run_dir(cell):
    return f"{RESULTS}/runs/{CELL_PATH.format(**cell)}"


def max_length_of_spec(spec):
    """The longest max_length any cell asks of a model spec (checked by `fedsweep fetch`)."""
    lengths = [
        SWEEP.cell_train(c)["max_length"]
        for c in CELLS
        if model_spec(c["model"]) == spec
    ]
    return max(lengths, default=0)


##### a training job's cell: inputs, settings and resources #####


def cell_of(wildcards):
    """The cell of a training job's wildcards (the keys of fedsweep.grid.cells)."""
    return dict(
        dataset=wildcards.dataset,
        model=wildcards.model,
        algorithm=wildcards.algorithm,
        partition=wildcards.partition,
        clients=int(wildcards.clients),
        seed=int(wildcards.seed),
    )


def cell_plan(wildcards):
    """Memory, minutes and jobs (round targets) of the cell (fedsweep.estimate.plan_cell)."""
    try:
        return SWEEP.plan(**cell_of(wildcards))
    except FedsweepError as exc:
        raise ConfigError(str(exc)) from None


def job_inputs(wildcards, target=None):
    """Tokens, shards and model of a cell's job; for the second and later jobs of a chain, the
    marker of the job before (in a job's own Snakemake the order is already settled)."""
    cell = cell_of(wildcards)
    inputs = {
        "tokens": f"{tokens_dir(cell)}/meta.json",
        "shards": shards_file(cell),
        "model": f"{RESULTS}/models/{sweep_config.spec_slug(model_spec(cell['model']))}.json",
    }
    if target is None:  # the cell's last (or only) job
        target = config["datasets"][cell["dataset"]]["second_threshold"]
    earlier = [] if IN_JOB else [t for t in cell_plan(wildcards).targets if t < target]
    if earlier:
        inputs["segment"] = f"{run_dir(cell)}/segments/r{earlier[-1]}.done"
    return inputs


def segment_inputs(wildcards):
    return job_inputs(wildcards, int(wildcards.rounds))


def cell_settings(wildcards):
    """The cell's training, algorithm and adapter settings as one JSON value (fedsweep train
    --settings): a param, so a changed setting reruns exactly the cells it applies to.
    """
    settings = grid.cell_settings(config, cell_of(wildcards))
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def train_launcher(wildcards):
    """One process per GPU: torchrun when a cell has several GPUs, else plain python."""
    gpus = cell_plan(wildcards).gpus
    if gpus > 1:
        return f"python -m torch.distributed.run --standalone --nproc-per-node {gpus} -m fedsweep"
    return "fedsweep"


def tokenize_runtime(wildcards):
    """Minutes (SLURM -t) of a tokenisation: generous for ~1000 texts/s. Summed with the others
    when the profile groups the cheap jobs into one SLURM job."""
    return 5 + -(-sum(SWEEP.estimate_rows(wildcards.dataset)) // 60000)


##### the report #####


def all_metrics():
    return [f"{run_dir(cell)}/metrics.parquet" for cell in CELLS]


def cached_metrics(wildcards):
    """The metrics of every finished cell found on disk now (for `snakemake figures`)."""
    found = sweep_report.cached_metrics(RESULTS)
    if not found:
        raise WorkflowError(
            f"figures: no metrics.parquet under {RESULTS}/runs yet; run the grid first"
        )
    return found


def report_outputs():
    """The report's tables and figures (names: fedsweep.report), with their captions."""
    tables = {
        name: report(
            f"{RESULTS}/tables/{name}.csv",
            caption=f"../report/table_{name}.rst",
            category="Tables",
        )
        for name in sweep_report.TABLES
    }
    figures = {
        f"{name}_{ext}": report(
            f"{RESULTS}/figures/{name}.{ext}",
            caption=f"../report/figure_{name}.rst",
            category="Figures",
            subcategory=ext.upper(),
        )
        for name in sweep_report.FIGURES
        for ext in sweep_report.FIGURE_FORMATS
    }
    # What each data set's class ids mean (from the cells' run.json): read the tables without
    # the data folder.
    datasets = {"datasets": f"{RESULTS}/tables/{sweep_report.DATASETS_JSON}"}
    return {**tables, **figures, **datasets}


def final_outputs():
    return all_metrics() + [str(path) for path in report_outputs().values()]
