"""How long `fedsweep report` takes on a large grid, from generated metrics files.

Writes one synthetic ``metrics.parquet`` (and the ``run.json`` beside it) per cell of a grid,
by default issue #11's: 3 models x 3 data sets x 6 K x 4 partitions x 3 algorithms x 3 seeds =
1,944 cells of 100 rounds, in a temporary folder, then times ``make_report`` on them and prints
the seconds (the target: under a minute on 2 CPU cores).

    python benchmarks/bench_report.py                 # the 1,944-cell grid
    python benchmarks/bench_report.py --seeds 1 --missing 0.05 --keep /tmp/grid   # a partial grid, kept
    python benchmarks/bench_report.py --profile 25    # and the 25 slowest functions (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODELS = ("bert-base-cased", "albert-base-v2", "distilbert-base-cased")
DATASETS = {"imdb": (2, 25_000), "yelp_review_full": (5, 50_000), "ag_news": (4, 7_600)}  # classes, test rows
CLIENTS = (1, 2, 4, 8, 16, 32)
# name -> kind; one per_client (weak scaling) split
PARTITIONS = {"iid": "fixed_total", "dirichlet-0.1": "fixed_total", "shards-2": "fixed_total",
              "iid-n500": "per_client"}
ALGORITHMS = ("fedavg", "fedprox", "fedadam")


def curve(rng: np.random.Generator, rounds: int, chance: float, ceiling: float, speed: float) -> np.ndarray:
    """A saturating learning curve with evaluation noise, from chance at round 0."""
    r = np.arange(rounds + 1)
    clean = chance + (ceiling - chance) * (1 - np.exp(-speed * r))
    return np.clip(clean + rng.normal(0, 0.01, rounds + 1) * (r > 0), 0, 1)


def write_cell(folder: Path, dataset: str, model: str, partition: str, algorithm: str, clients: int, seed: int,
               rounds: int) -> None:
    num_classes, test_rows = DATASETS[dataset]
    rng = np.random.default_rng([hash((dataset, model, partition, algorithm)) % 2**32, clients, seed])
    chance = 1 / num_classes
    # DistilBERT collapses with many clients (the paper); skewed splits cost a little more.
    collapse = 0.5 if model.startswith("distil") and clients >= 16 else 0.0
    skew = 0.0 if partition.startswith("iid") else 0.05
    ceiling = chance + (0.93 - chance) * (1 - collapse) - 0.01 * np.log2(clients) - skew
    accuracy = curve(rng, rounds, chance, ceiling, speed=0.15 / (1 + 0.3 * np.log2(clients)))
    r = np.arange(rounds + 1, dtype="float64")
    drift = np.where(r > 0, (1 + np.log2(clients)) * np.exp(-r / 60) * rng.lognormal(0, 0.1, rounds + 1), np.nan)
    columns = {
        "dataset": [dataset] * (rounds + 1), "model": [model] * (rounds + 1), "algorithm": [algorithm] * (rounds + 1),
        "partition": [partition] * (rounds + 1), "clients": np.full(rounds + 1, clients),
        "seed": np.full(rounds + 1, seed), "protocol": ["standard"] * (rounds + 1),
        "num_classes": np.full(rounds + 1, num_classes), "chance_accuracy": np.full(rounds + 1, chance),
        "test_rows": np.full(rounds + 1, test_rows), "round": np.arange(rounds + 1), "test_accuracy": accuracy,
        "test_loss": 1 - accuracy, "train_loss": np.where(r > 0, 1 - accuracy, np.nan),
        "pseudo_gradient_norm": drift, "client_drift_max": 1.5 * drift, "client_drift_rms": drift,
        "update_cosine": np.where(r > 0, 0.9 / (1 + np.log2(clients)), np.nan),
    }
    folder.mkdir(parents=True)
    pq.write_table(pa.table(columns), folder / "metrics.parquet")
    (folder / "run.json").write_text(json.dumps({
        "test_rows": test_rows, "partition": {"name": partition, "kind": PARTITIONS[partition]}}))


def report_config(path: Path, rounds: int, seeds: list[int]) -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "target_fraction": 0.9,
        "datasets": {name: {"budget": rounds // 2, "second_threshold": rounds} for name in DATASETS},
        "models": list(MODELS), "clients": list(CLIENTS), "seeds": seeds,
        "partitions": {name: ({"per_client": 500} if kind == "per_client" else {})
                       for name, kind in PARTITIONS.items()},
        "algorithms": list(ALGORITHMS),
    }, sort_keys=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--missing", type=float, default=0.0, help="share of cells left out at random (a partial grid)")
    p.add_argument("--keep", help="write the grid, tables and figures here instead of a temporary folder")
    p.add_argument("--profile", type=int, default=0, help="print this many slowest functions (cProfile)")
    a = p.parse_args()

    from fedsweep.report import make_report

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(a.keep or scratch)
        seeds = list(range(a.seeds))
        cells = list(itertools.product(DATASETS, MODELS, PARTITIONS, ALGORITHMS, CLIENTS, seeds))
        keep = np.random.default_rng(0).random(len(cells)) >= a.missing
        t0 = time.perf_counter()
        for (dataset, model, partition, algorithm, clients, seed), kept in zip(cells, keep):
            if kept:
                write_cell(root / "runs" / dataset / model / algorithm / f"{partition}_K{clients}_seed{seed}",
                           dataset, model, partition, algorithm, clients, seed, a.rounds)
        report_config(root / "report_config.yaml", a.rounds, seeds)
        print(f"generated {int(keep.sum())} of {len(cells)} cells x {a.rounds + 1} rows in "
              f"{time.perf_counter() - t0:.1f} s")

        profiler = cProfile.Profile() if a.profile else None
        t0, cpu0 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        make_report([str(root / "runs")], str(root / "report_config.yaml"), str(root / "tables"),
                    str(root / "figures"))
        if profiler:
            profiler.disable()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(a.profile)
        # CPU seconds too: on a shared machine the wall time includes waiting for a core.
        print(f"make_report: {seconds:.1f} s ({cpu_seconds:.1f} s CPU) for {int(keep.sum())} metrics files")


if __name__ == "__main__":
    main()
