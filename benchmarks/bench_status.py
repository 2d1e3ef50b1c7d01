"""How long `fedsweep status` takes on a large grid, from generated run folders.

Writes the run folders of a grid, by default issue #11's (3 models x 3 data sets x 6 K x 4
partitions x 3 algorithms x 3 seeds = 1,944 cells of 100 rounds), in a temporary folder, as a
sweep under way leaves them: about half finished (metrics.parquet, a full-sized run.json,
progress.json, checkpoint.pt, train.log and its hard link under logs/train/; some diverged),
15% running, 10% failed (a `fedsweep: error` line, SIGTERM, a traceback, or killed without a
word) and the rest not started. Then times the command, `python -m fedsweep status` (process
start-up and imports included: what a user waits for), and the `fedsweep.status.status` call in
this process, several times each, and prints the best and the median (the target: under 5 s).

    python benchmarks/bench_status.py                 # the 1,944-cell grid
    python benchmarks/bench_status.py --seeds 1 --keep /tmp/grid   # a smaller grid, kept
    python benchmarks/bench_status.py --profile 25    # and the 25 slowest functions (cProfile)
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import itertools
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("bert-base-cased", "albert-base-v2", "distilbert-base-cased")
DATASETS = ("imdb", "yelp_review_full", "ag_news")
CLIENTS = (1, 2, 4, 8, 16, 32)
PARTITIONS = {"iid": {"scheme": "iid"}, "dirichlet-0.1": {"scheme": "dirichlet", "alpha": 0.1},
              "shards-2": {"scheme": "shards", "classes_per_client": 2},
              "iid-n500": {"scheme": "iid", "per_client": 500}}
ALGORITHMS = {"fedavg": {}, "fedprox": {"client": "fedprox", "mu": 0.01},
              "fedadam": {"strategy": "fedadam", "server_lr": 0.01}}
STATES = {"finished": 0.5, "running": 0.15, "failed": 0.1, "not started": 0.25}
FAILURES = ("fedsweep: error: train: loss is not finite at round {r} (client 3); stopped",
            "[{label}] SIGTERM: saved round {r} to checkpoint.pt; rerun to resume",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            None)  # None: killed without a word (its last write hours ago)


def write_config(path: Path, rounds: int, seeds: list[int]) -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "seeds": seeds, "clients": list(CLIENTS),
        "models": {m: {} for m in MODELS},
        "datasets": {d: {"budget": rounds // 2, "second_threshold": rounds} for d in DATASETS},
        "partitions": PARTITIONS, "algorithms": ALGORITHMS,
    }, sort_keys=False))


def run_json(cell: dict, rounds: int, rng: np.random.Generator, diverged: bool) -> dict:
    """A run.json of the size a real one has (its config, shard sizes, provenance, communication)."""
    k = cell["clients"]
    config = {f"setting_{i}": i * 0.5 for i in range(40)} | {"rounds": rounds, "model": cell["model"]}
    return {
        "config": config, "config_hash": "0123456789abcdef", "diverged": {"round": 7, "train_loss": 812.0,
                                                                         "initial_loss": 1.6, "factor": 100.0}
        if diverged else None,
        "train_examples_per_second": float(rng.normal(700 if "distil" not in cell["model"] else 1400, 30)),
        "wall_seconds_this_run": float(rounds * 60), "shard_sizes": [25_000 // k] * k, "clients": k,
        "thread_history": [{"from_round": 1, "threads": 8}], "class_names": ["neg", "pos"],
        "data": {"dataset": cell["dataset"], "tokens_sha256": "ab" * 32, "shards": {"scheme": cell["partition"]}},
        "communication": {"upload_bytes_per_client_per_round": {"float32": 438_000_000}},
        "device": "NVIDIA H100 80GB HBM3", "fedsweep": "0.1.0", "torch": "2.13.0", "slurm_job_id": "123456",
    }


def progress_lines(label: str, upto: int, rounds: int) -> list[str]:
    return [f"[{label}] round {r}/{rounds} acc 0.8{r % 10}00 train_loss 0.3{r % 7}00 train 55.2s eval 9.1s "
            f"712 ex/s" for r in range(1, upto + 1)]


def write_log(run: Path, lines: list[str], mtime: float, rule_log: Path) -> None:
    log = run / "train.log"
    log.write_text("\n".join(["==== 2026-12-01 10:00:00 fedsweep train to round 100: attempt 1, SLURM job 123456"
                              " on gpu017 ===="] + lines) + "\n")
    os.utime(log, (mtime, mtime))
    rule_log.parent.mkdir(parents=True, exist_ok=True)
    os.link(log, rule_log)  # as the train rule does


def write_cell(results: Path, cell: dict, state: str, rounds: int, rng: np.random.Generator, now: float) -> None:
    from fedsweep import grid

    if state == "not started":
        return
    name = grid.cell_name(cell)
    run = results / "runs" / name
    run.mkdir(parents=True)
    label = f"{cell['dataset']}/{cell['model']}/K{cell['clients']}"
    upto = rounds if state == "finished" else int(rng.integers(1, rounds))
    written = now - (float(rng.uniform(0, 600)) if state == "running" else float(rng.uniform(3, 48)) * 3600)
    (run / "checkpoint.pt").write_bytes(b"\0" * 1024)
    (run / "progress.json").write_text(json.dumps({
        "round": upto, "rounds": rounds, "written": written, "train_seconds": 55.2 * upto,
        "examples": 39_300 * upto, "examples_per_second": 712.0, "seconds": 64.5 * upto}))
    lines = progress_lines(label, upto, rounds)
    if state == "finished":
        (run / "metrics.parquet").write_bytes(b"PAR1" + b"\0" * 4096)
        (run / "run.json").write_text(json.dumps(run_json(cell, rounds, rng, diverged=rng.random() < 0.05), indent=2))
        lines.append(f"trained {cell['model']} K={cell['clients']}: round {rounds} test accuracy 0.8912 -> {run}")
    elif state == "failed":
        failure = FAILURES[int(rng.integers(len(FAILURES)))]
        if failure is not None:
            lines.append(failure.format(r=upto, label=label))
    write_log(run, lines, written, results / "logs" / "train" / f"{name}.log")


def generate(root: Path, seeds: int, rounds: int, now: float) -> collections.Counter:
    """The config and the run folders; returns how many cells of each state were written."""
    rng = np.random.default_rng(0)
    write_config(root / "config.yaml", rounds, list(range(seeds)))
    states = rng.choice(list(STATES), size=len(DATASETS) * len(MODELS) * len(ALGORITHMS) * len(PARTITIONS)
                        * len(CLIENTS) * seeds, p=list(STATES.values()))
    cells = itertools.product(DATASETS, MODELS, ALGORITHMS, PARTITIONS, CLIENTS, range(seeds))
    for (d, m, a, p, k, s), state in zip(cells, states):
        cell = dict(dataset=d, model=m, algorithm=a, partition=p, clients=k, seed=s)
        write_cell(root / "results", cell, state, rounds, rng, now)
    return collections.Counter(states)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> str:
    return f"best {min(times):.2f} s, median {statistics.median(times):.2f} s ({len(times)} runs)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", help="write the grid here instead of a temporary folder")
    p.add_argument("--profile", type=int, default=0, help="print this many slowest functions (cProfile)")
    a = p.parse_args()

    from fedsweep.status import status

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(a.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        written = generate(root, a.seeds, a.rounds, time.time())
        print(f"generated {sum(written.values())} cells ({', '.join(f'{n} {s}' for s, n in written.items())}) "
              f"in {time.perf_counter() - t0:.1f} s")
        args = ["--configfile", str(root / "config.yaml"), "--base-dir", str(root)]
        found = json.loads(status([str(root / "config.yaml")], str(root), as_json_output=True))["total"]
        print("fedsweep status says:", {k: found[k] for k in ("finished", "running", "failed", "not_started",
                                                               "diverged")})
        command = timed(lambda: subprocess.run([sys.executable, "-m", "fedsweep", "status", *args], check=True,
                                               capture_output=True), a.repeats)
        in_process = timed(lambda: status([str(root / "config.yaml")], str(root)), a.repeats)
        print(f"`fedsweep status` (the command, start-up included): {summary(command)}")
        print(f"fedsweep.status.status() in this process: {summary(in_process)}")
        if a.profile:
            profiler = cProfile.Profile()
            profiler.runcall(status, [str(root / "config.yaml")], str(root))
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(a.profile)


if __name__ == "__main__":
    main()
