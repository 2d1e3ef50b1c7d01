"""GPU-hours of a grid (default config/config.yaml, the paper's; any config: --config), to size a
SLURM allocation.

The cells are the workflow's (fedsweep.grid: data set x model x algorithm x partition x K x
seed, less restricted entries). Per cell: training examples = rounds (the data set's
second_threshold) x epochs x the rows trained per round (floor(N/K) x K rows; K x per_client
for a per_client partition; times the sampled fraction of clients for an algorithm that samples
clients); evaluation = the test set,
forward only (a third of the training FLOPs per example), at round 0 and every eval_every
rounds. K does not change the work: each of the K clients trains E epochs on its 1/K shard, so
a round processes the whole training set whatever K is, and every K costs the same (fedsweep's
per-client overhead aside: see bench_overhead.py). Epochs and eval_every are merged per cell as
the workflow does (train < datasets.NAME.train < models.NAME.train < overrides).
SCAFFOLD, FedProx and the server strategies add little compute (bench_algorithms.py) and are
costed like FedAvg.

Training examples/s per model, first found of:
  --throughput MODEL=EX_PER_S     measured (e.g. with bench_gpu.py) or known;
  --runs DIR                      the median train_examples_per_second of run.json files under DIR;
  an estimate: MFU x peak / FLOPs per example, with FLOPs per token = 6 x non-embedding
  parameters + 12 x layers x hidden x width (width 128: every example padded to the maximum
  length, an upper bound; AG News with dynamic padding is cheaper: --width ag_news=90).

    python benchmarks/bench_projection.py                           # 40% MFU of an H100 (bf16)
    python benchmarks/bench_projection.py --throughput bert-base-cased=1800 --mfu 0.3
    python benchmarks/bench_projection.py --config config/future_work.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from fedsweep import grid

ROOT = Path(__file__).resolve().parent.parent
# Training / test rows of the paper's data sets (the hub's splits).
SIZES = {"imdb": (25_000, 25_000), "yelp_review_full": (650_000, 50_000), "ag_news": (120_000, 7_600)}
# Compute shape: (non-embedding parameters as computed per token, layers run, hidden size).
# ALBERT-base stores 12M parameters but runs its one shared layer 12 times: BERT-base's compute.
SHAPES = {
    "bert-base-cased": (85e6, 12, 768),
    "albert-base-v1": (85e6, 12, 768),
    "distilbert-base-cased": (43e6, 6, 768),
}


def pairs(items: list[str], kind=float) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = kind(value)
    return out


def flops_per_example(model: str, width: int) -> float:
    non_embedding, layers, hidden = SHAPES[model]
    return width * (6 * non_embedding + 12 * layers * hidden * width)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    p.add_argument("--throughput", nargs="*", default=[], metavar="MODEL=EX_PER_S")
    p.add_argument("--runs", type=Path, help="a results folder: use the run.json throughputs found there")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation for estimates")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's peak (H100 SXM bf16 dense: 989)")
    p.add_argument("--width", nargs="*", default=[], metavar="DATASET=TOKENS", help="mean padded width (128)")
    p.add_argument("--sizes", nargs="*", default=[], metavar="DATASET=TRAIN,TEST", help="other data sets")
    a = p.parse_args()

    cfg = yaml.safe_load(a.config.read_text())
    max_length = int(cfg.get("train", {}).get("max_length", 128))
    widths = pairs(a.width, int)
    sizes = dict(SIZES, **{k: tuple(int(x) for x in v.split(",")) for k, v in pairs(a.sizes, str).items()})
    throughput = pairs(a.throughput)
    if a.runs:
        found: dict[str, list[float]] = {}
        for path in a.runs.rglob("run.json"):
            run = json.loads(path.read_text())
            found.setdefault(run["config"]["model"], []).append(run["train_examples_per_second"])
        for model, values in found.items():
            throughput.setdefault(model, statistics.median(values))

    cfg.setdefault("train", {})
    cells = grid.cells(cfg)
    print(f"grid: {len(cells)} cells: {len(cfg['models'])} models x {len(cfg['datasets'])} data sets x "
          f"{len(grid.algorithms(cfg))} algorithms x {len(grid.partitions(cfg))} partitions x K in {cfg['clients']} "
          f"x seeds (less restricted entries)")
    print(f"estimates assume {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s; eval = forward only (1/3 of a training "
          "example), over the test set at round 0 and every eval_every rounds")
    print(f"{'model':<23}{'data set':<18}{'rounds':>7}{'E':>3}{'train ex/s':>11}{'source':>10}"
          f"{'h/cell':>8}{'cells':>6}{'GPU-h':>9}")
    total = 0.0
    for model in cfg["models"]:
        spec = (cfg["models"][model] or {}).get("spec", model)
        for dataset, ds in cfg["datasets"].items():
            mine = [c for c in cells if c["model"] == model and c["dataset"] == dataset]
            if not mine:
                continue
            if dataset not in sizes:
                raise SystemExit(f"data set {dataset!r}: size unknown, give --sizes {dataset}=TRAIN,TEST")
            n_train, n_test = sizes[dataset]
            rounds = int(ds["second_threshold"])
            if model in throughput:
                rate, source = throughput[model], "given" if model in pairs(a.throughput) else "runs"
            elif spec in SHAPES:
                rate = a.mfu * a.peak_tflops * 1e12 / flops_per_example(spec, widths.get(dataset, max_length))
                source = "MFU"
            else:
                raise SystemExit(f"model {model!r}: shape unknown, give --throughput {model}=EX_PER_S")
            hours = []
            for cell in mine:
                k = cell["clients"]
                t = grid.cell_train(cfg, **cell)
                epochs, eval_every = int(t.get("epochs", 2)), int(t.get("eval_every", 1))
                rows = grid.train_rows(cfg, cell["partition"], k, (n_train // k) * k)
                settings = grid.algorithm_settings(cfg, cell["algorithm"])
                sampled = settings.get("clients_per_round") or 0
                fraction = min(sampled, k) / k if sampled else float(settings.get("client_fraction", 1.0))
                trained = rounds * epochs * rows * fraction
                evaluated = (1 + rounds // eval_every + (rounds % eval_every != 0)) * n_test / 3
                hours.append((trained + evaluated) / rate / 3600)
            total += sum(hours)
            h = statistics.mean(hours)
            print(f"{model:<23}{dataset:<18}{rounds:>7}{epochs:>3}{rate:>11.0f}{source:>10}{h:>8.1f}"
                  f"{len(hours):>6}{sum(hours):>9.0f}")
    print(f"total: {total:,.0f} GPU-hours ({len(cells)} cells; with a fixed total, every K costs the same, since "
          "each round trains on the whole training set; per_client partitions grow with K)")

if __name__ == "__main__":
    main()
