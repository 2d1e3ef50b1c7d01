"""What a training cell asks of a cluster: its memory, its minutes, and the chain of jobs it runs as.

Shared by the workflow (``workflow/rules/common.smk``: the ``mem_mb``, ``runtime`` and segment
plan of every training job) and by ``fedsweep cluster-check``, so both compute each request the
same way. Model shapes come from :mod:`fedsweep.modelspec`; nothing here imports torch.

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

import math
from dataclasses import dataclass
from typing import Any

from . import FedsweepError, grid
from .modelspec import KNOWN_CONFIGS, ModelShape, model_shape, shape_of_config

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
    # global fp32 weights, G clients' fp32 weights and gradients, the fp64 sum, the fp32 sum of
    # the clients' unit updates (update_cosine), the checkpoint copy
    state = shape.params * (4 + 8 * group + 8 + 4 + 4)
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
    # the examples the cell processes, evaluations included; `fedsweep status` divides what
    # remains of them by the throughput measured on finished cells
    examples: float | None = None

    @property
    def total(self) -> float:
        return self.fixed + self.work


def estimate_runtime(*, runtime: Any, throughput: float, rounds: int, rows: tuple[int, int], epochs: int,
                     eval_every: int) -> RuntimeEstimate:
    """``runtime`` minutes as given, or (``auto``) from the examples the cell processes."""
    examples = rounds * (rows[0] * epochs + rows[1] / eval_every)
    if runtime != "auto":
        return RuntimeEstimate(0.0, float(runtime), None, examples)
    work = RUNTIME_MARGIN * examples / throughput / 60
    return RuntimeEstimate(float(STARTUP_MINUTES), work, throughput, examples)


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


def cell_resources(config: dict[str, Any], dataset: str, model: str) -> dict[str, Any]:
    """resources < datasets.NAME.resources < models.NAME.resources."""
    merged = dict(config["resources"])
    merged.update(config["datasets"][dataset].get("resources", {}))
    merged.update(config["models"][model].get("resources", {}))
    return merged


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
    train = grid.cell_train(config, dataset, model, clients, seed, algorithm, partition)
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
