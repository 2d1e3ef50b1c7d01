"""The report's statistics: learning curves per seed and their seed mean, accuracy at the budget,
rounds to target, the spread over seeds (t-intervals, binomial errors), the grid's status, and the
bytes communicated. See :mod:`fedsweep.report` for the definitions."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import stats

from .load import BYTES_COLUMNS, DEFAULT_ALGORITHM, DEFAULT_KIND, DEFAULT_PARTITION, DatasetSettings, Grid

MEAN_SEED = "mean"
CONFIDENCE = 0.95
# Accuracies are ratios of counts; 0.9 x baseline may land a rounding error above an equal accuracy.
TARGET_TOLERANCE = 1e-9


@dataclass
class Run:
    """One learning curve: a single seed of a cell, or the seed average (seed == MEAN_SEED)."""

    model: str
    dataset: str
    clients: int
    seed: int | str
    seeds: int
    chance_accuracy: float
    last_round: int
    curve: pd.Series  # test accuracy indexed by evaluated round, ascending
    algorithm: str = DEFAULT_ALGORITHM
    partition: str = DEFAULT_PARTITION
    kind: str = DEFAULT_KIND
    test_rows: float = math.nan  # test-set size (NaN: not recorded)
    # The mean run: the lowest and highest seed at every round of ``curve`` (the band of Fig. 3).
    low: pd.Series | None = None
    high: pd.Series | None = None
    diverged_round: int | None = None  # the round its training loss exploded (fedsweep.record.divergence)


# ----------------------------------------------------------------------------- order


def ordered(values, preferred: str | None = None, config: list[str] | None = None) -> list[str]:
    """Names in config order, else the preferred (reference) one first, then by name."""
    values = list(dict.fromkeys(values))
    rank = {name: i for i, name in enumerate(config or [])}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v != preferred, v))


def algorithm_key(name: str) -> tuple[bool, str]:
    """fedavg (the reference) first, then the others by name."""
    return (name != DEFAULT_ALGORITHM, name)


def reference_partition(partitions) -> str:
    """The partition Figs. 1-3 show: iid (the paper's) if present, else the first."""
    partitions = list(partitions)
    return DEFAULT_PARTITION if DEFAULT_PARTITION in partitions else partitions[0]


# ----------------------------------------------------------------------------- statistics


ACCURACY_RANGE = (0.0, 1.0)


def seed_summary(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, Any]:
    """Mean, standard deviation (n - 1) and 95% t-interval of the mean of per-seed values.

    One seed: no spread and no interval (NaN), and the ``ci95`` note says "1 seed", so a table
    never shows a made-up interval; none: "no seeds". The interval is clipped to ``bounds``, the
    metric's range (an accuracy's [0, 1]: over 2 seeds t = 12.7 reaches far beyond it), and the
    note then says so.
    """
    values = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype="float64")
    n = len(values)
    out = {"n": n, "mean": math.nan, "std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan,
           "ci95_half_width": math.nan, "ci95": ""}
    if n == 0:
        return {**out, "ci95": "no seeds"}
    out["mean"] = float(values.mean())
    if n == 1:
        return {**out, "ci95": "1 seed"}
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    low, high = max(out["mean"] - half, bounds[0]), min(out["mean"] + half, bounds[1])
    clipped = low > out["mean"] - half or high < out["mean"] + half
    return {**out, "std": std, "ci95_low": low, "ci95_high": high, "ci95_half_width": half,
            "ci95": f"clipped to [{bounds[0]:g}, {bounds[1]:g}] ({n} seeds)" if clipped else ""}


def binomial_se(accuracy: float, test_rows: float) -> float:
    """The test-set sampling error of an accuracy measured on ``test_rows`` rows: sqrt(p (1 - p) / n)."""
    if not test_rows or pd.isna(test_rows) or pd.isna(accuracy):
        return math.nan
    return math.sqrt(accuracy * (1 - accuracy) / test_rows)


# ----------------------------------------------------------------------------- learning curves


def learning_runs(metrics: pd.DataFrame) -> list[Run]:
    """Per cell: one Run per seed, then the seed-averaged Run."""
    cell_keys = ["model", "algorithm", "partition", "dataset", "clients"]
    per_seed_rows = metrics.groupby(cell_keys + ["seed"], sort=True)
    last_rounds, chances = per_seed_rows["round"].max(), per_seed_rows["chance_accuracy"].mean()
    cells = metrics.groupby(cell_keys, sort=True).agg(kind=("kind", "first"), test_rows=("test_rows", "max"))
    # One sort and numpy slices rather than a pandas group per seed: thousands of cells stay fast.
    evaluated = metrics.loc[metrics["test_accuracy"].notna(), cell_keys + ["seed", "round", "test_accuracy"]]
    evaluated = evaluated.sort_values(cell_keys + ["seed", "round"], kind="stable")
    positions = evaluated.groupby(cell_keys + ["seed"], sort=False).indices
    exploded = metrics[metrics["diverged"].fillna(False).astype(bool)] if "diverged" in metrics else metrics.iloc[:0]
    diverged_at = exploded.groupby(cell_keys + ["seed"], sort=False)["round"].min().to_dict()
    all_rounds, all_accuracy = evaluated["round"].to_numpy(), evaluated["test_accuracy"].to_numpy()
    no_points = np.empty(0, dtype=np.intp)

    runs: list[Run] = []
    for cell, seed_keys in itertools.groupby(last_rounds.index, key=lambda key: key[:-1]):
        model, algorithm, partition, dataset, clients = cell
        kind, test_rows = cells.loc[cell, "kind"], float(cells.loc[cell, "test_rows"])
        per_seed = []
        for key in seed_keys:
            at = positions.get(key, no_points)
            diverged = diverged_at.get(key)
            per_seed.append(Run(
                model, dataset, int(clients), int(key[-1]), 1, float(chances[key]), int(last_rounds[key]),
                pd.Series(all_accuracy[at], index=all_rounds[at]), algorithm, partition, kind, test_rows,
                diverged_round=None if diverged is None else int(diverged),
            ))
        runs += per_seed + [_mean_run(per_seed)]
    return runs


def _mean_run(per_seed: list[Run]) -> Run:
    """The seed average of a cell's runs, on the rounds every seed evaluated (so no point of the
    mean curve mixes seed subsets), with the lowest and highest seed at each."""
    first = per_seed[0]
    common = first.curve.index.to_numpy()
    for run in per_seed[1:]:
        common = np.intersect1d(common, run.curve.index.to_numpy())
    by_seed = np.stack([run.curve.to_numpy()[np.searchsorted(run.curve.index.to_numpy(), common)]
                        for run in per_seed])
    return Run(
        first.model, first.dataset, first.clients, MEAN_SEED, len(per_seed),
        float(np.mean([r.chance_accuracy for r in per_seed])), min(r.last_round for r in per_seed),
        pd.Series(by_seed.mean(axis=0), index=common), first.algorithm, first.partition, first.kind, first.test_rows,
        low=pd.Series(by_seed.min(axis=0), index=common), high=pd.Series(by_seed.max(axis=0), index=common),
        diverged_round=min((r.diverged_round for r in per_seed if r.diverged_round is not None), default=None),
    )


def _accuracy_at(run: Run, budget: int) -> tuple[int | None, float]:
    """(round used, accuracy): the last evaluated round <= budget."""
    points = run.curve[run.curve.index <= budget]
    return (int(points.index[-1]), float(points.iloc[-1])) if len(points) else (None, math.nan)


def _first_round_reaching(run: Run, target: float, until: int) -> int | None:
    points = run.curve[(run.curve.index >= 1) & (run.curve.index <= until)]
    hits = points[points >= target - TARGET_TOLERANCE]
    return int(hits.index[0]) if len(hits) else None


def _cell(run: Run) -> tuple:
    return (run.model, run.algorithm, run.partition, run.dataset, run.clients)


# ----------------------------------------------------------------------------- the two tables


def analyse(runs: list[Run], settings: dict[str, DatasetSettings], target_fraction: float
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables (accuracy at the budget, rounds to target), sorted by data set (config order),
    model, algorithm, partition, K, seed (the mean row last)."""
    at_budget = {id(run): _accuracy_at(run, settings[run.dataset].budget) for run in runs}
    baseline_of = _baseline_finder(runs, at_budget)
    # The seeds' accuracies at the budget, for the spread on the mean rows.
    seed_accuracy: dict[tuple, list[float]] = {}
    seed_rounds: dict[tuple, list[int | None]] = {}
    for run in runs:
        if run.seed != MEAN_SEED:
            seed_accuracy.setdefault(_cell(run), []).append(at_budget[id(run)][1])

    budget_rows, target_rows = [], []
    for run in sorted(runs, key=_sort_key(runs, settings)):
        limits = settings[run.dataset]
        round_used, accuracy = at_budget[id(run)]
        baseline_algorithm, baseline_partition, baseline = baseline_of(run)
        ids = {"model": run.model, "algorithm": run.algorithm, "partition": run.partition, "kind": run.kind,
               "dataset": run.dataset, "clients": run.clients, "seed": run.seed}
        spread = (seed_summary(seed_accuracy[_cell(run)], ACCURACY_RANGE) if run.seed == MEAN_SEED
                  else {"std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "ci95": ""})
        budget_rows.append({
            **ids, "budget": limits.budget, "round_used": round_used, "accuracy": accuracy,
            "accuracy_std": spread["std"], "ci95_low": spread["ci95_low"], "ci95_high": spread["ci95_high"],
            "ci95": spread["ci95"], "binomial_se": binomial_se(accuracy, run.test_rows),
            "test_rows": run.test_rows,
            "baseline_accuracy": baseline, "ratio": accuracy / baseline if baseline > 0 else math.nan,
            "baseline_algorithm": baseline_algorithm, "baseline_partition": baseline_partition,
            "chance_accuracy": run.chance_accuracy, "seeds": run.seeds, "diverged_round": run.diverged_round,
        })
        target_rows.append({**ids, **_target_columns(run, limits, target_fraction * baseline, seed_rounds)})
    accuracy_table = pd.DataFrame(budget_rows).astype({"round_used": "Int64", "seed": object})
    rounds_table = pd.DataFrame(target_rows).astype({"rounds": "Int64", "reached": bool, "seed": object,
                                                     "rounds_min": "Int64", "rounds_max": "Int64"})
    return accuracy_table, rounds_table


def _sort_key(runs: list[Run], settings: dict[str, DatasetSettings]) -> Callable[[Run], tuple]:
    dataset_order = {name: i for i, name in enumerate(settings)}
    partition_order = {name: i for i, name in enumerate(ordered({r.partition for r in runs}, DEFAULT_PARTITION))}

    def sort_key(run: Run):
        return (dataset_order[run.dataset], run.model, algorithm_key(run.algorithm), partition_order[run.partition],
                run.clients, run.seed == MEAN_SEED, run.seed if run.seed != MEAN_SEED else 0)

    return sort_key


def _baseline_finder(runs: list[Run], at_budget: dict[int, tuple[int | None, float]]
                     ) -> Callable[[Run], tuple[str | None, str | None, float]]:
    """run -> (baseline algorithm, baseline partition, K=1 accuracy at the budget)."""
    baselines = {(r.model, r.algorithm, r.partition, r.dataset, r.seed): (at_budget[id(r)][1], r.kind)
                 for r in runs if r.clients == 1}

    def baseline_of(run: Run) -> tuple[str | None, str | None, float]:
        # Same partition first; another's K=1 only where it is iid of the same kind.
        for algorithm in dict.fromkeys((run.algorithm, DEFAULT_ALGORITHM)):
            for partition in dict.fromkeys((run.partition, DEFAULT_PARTITION)):
                found = baselines.get((run.model, algorithm, partition, run.dataset, run.seed))
                if found is not None and found[1] == run.kind:
                    return algorithm, partition, found[0]
        return None, None, math.nan

    return baseline_of


def _target_columns(run: Run, limits: DatasetSettings, target: float, seed_rounds: dict[tuple, list[int | None]]
                    ) -> dict[str, Any]:
    """A row of the rounds-to-target table (less the ids); records a seed's rounds in ``seed_rounds``
    for its cell's mean row, which comes after the cell's seeds."""
    searched_until = min(limits.second_threshold, run.last_round)
    rounds = None if math.isnan(target) else _first_round_reaching(run, target, searched_until)
    if run.diverged_round is not None:
        status = f"diverged at round {run.diverged_round}"
    elif math.isnan(target):
        status = "no K=1 baseline"
    elif rounds is not None:
        status = f"reached at round {rounds}"
    else:
        status = f"not reached by round {searched_until}"
        if searched_until < limits.second_threshold:
            status += f" (run ended before round {limits.second_threshold})"
    if run.seed != MEAN_SEED:
        seed_rounds.setdefault(_cell(run), []).append(rounds)
        reached_rounds = [rounds] if rounds is not None else []
    else:  # seed rows come first in the sort: the cell's seeds are all in by now
        reached_rounds = [r for r in seed_rounds.get(_cell(run), []) if r is not None]
    return {
        "target_accuracy": target, "rounds": rounds, "reached": rounds is not None,
        "searched_until": searched_until, "status": status, "seeds": run.seeds,
        "seeds_reached": len(reached_rounds),
        "rounds_min": min(reached_rounds) if reached_rounds else None,
        "rounds_max": max(reached_rounds) if reached_rounds else None,
    }


# ----------------------------------------------------------------------------- the grid


GRID_KEYS = ["dataset", "model", "algorithm", "partition", "clients"]


def grid_status(frame: pd.DataFrame, grid: Grid, accuracy: pd.DataFrame, rounds: pd.DataFrame
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(seeds table: one row per cell of the grid, then per cell the metrics hold beyond it, with its
    status and the statistics over its seeds; missing table: one row per (cell, seed) of the grid
    without metrics)."""
    found = frame.drop_duplicates(["dataset", "model_spec", "algorithm", "partition", "clients", "seed"])
    kinds = {**dict(zip(found["partition"], found["kind"])), **grid.kinds}
    seed_rows = accuracy[accuracy["seed"] != MEAN_SEED]
    accuracy_of = dict(iter(seed_rows.groupby(GRID_KEYS, sort=False)))
    rounds_of = dict(iter(rounds[rounds["seed"] != MEAN_SEED].groupby(GRID_KEYS, sort=False)))
    expected, seeds_of = _expected_cells(found, grid)
    beyond = sorted((key for key in accuracy_of if key not in seeds_of), key=str)

    cells, missing = [], []
    for key in expected + beyond:
        acc = accuracy_of.get(key)
        got = [] if acc is None else sorted(int(s) for s in acc["seed"])
        wanted = seeds_of[key] if key in seeds_of else got
        absent = [s for s in wanted if s not in got]
        missing += [dict(zip(GRID_KEYS, key), kind=kinds.get(key[3], ""), seed=s, status="missing") for s in absent]
        if not got:
            status = "missing"
        elif absent:
            status = f"partial: {len(got)} of {len(wanted)} seeds (missing seed {', '.join(map(str, absent))})"
        else:
            status = "complete"
        cells.append(_cell_row(key, kinds.get(key[3], ""), status, got, wanted, acc, rounds_of.get(key)))
    columns = ["dataset", "model", "algorithm", "partition", "kind", "clients", "seed", "status"]
    seeds_table = pd.DataFrame(cells).astype({"rounds_min": "Int64", "rounds_max": "Int64"})
    return seeds_table, pd.DataFrame(missing, columns=columns)


def _expected_cells(found: pd.DataFrame, grid: Grid) -> tuple[list[tuple], dict[tuple, list[int]]]:
    """The grid's cells, in order, and the seeds each should have."""
    label_of = dict(zip(found["model_spec"], found["model"]))  # config model name -> the tables' label
    if grid.cells is not None:  # the config's own list: its cells, each with its seeds
        seeds_of: dict[tuple, list[int]] = {}
        for d, m, a, p, k, seed in grid.cells:
            seeds_of.setdefault((d, label_of.get(m, m), a, p, k), []).append(seed)
        return list(seeds_of), seeds_of
    datasets = grid.datasets + [d for d in ordered(found["dataset"]) if d not in grid.datasets]
    models = [label_of.get(m, m) for m in grid.models] if grid.models else ordered(found["model"])
    algorithms = grid.algorithms or ordered(found["algorithm"], DEFAULT_ALGORITHM)
    partitions = grid.partitions or ordered(found["partition"], DEFAULT_PARTITION)
    clients = grid.clients or sorted(found["clients"].unique().tolist())
    seeds = grid.seeds or sorted(found["seed"].unique().tolist())
    expected = list(itertools.product(datasets, models, algorithms, partitions, clients))
    return expected, dict.fromkeys(expected, seeds)


def _cell_row(key: tuple, kind: str, status: str, got: list[int], wanted: list[int], acc: pd.DataFrame | None,
              rounds: pd.DataFrame | None) -> dict[str, Any]:
    """A row of the seeds table: a cell, its status, and its statistics over seeds."""
    accuracy_stats = seed_summary([] if acc is None else acc["accuracy"], ACCURACY_RANGE)
    ratio_stats = seed_summary([] if acc is None else acc["ratio"], (0, math.inf))
    reached = [] if rounds is None else [int(r) for r in rounds["rounds"].dropna()]
    test_rows = math.nan if acc is None or acc["test_rows"].isna().all() else float(acc["test_rows"].max())
    return {
        "dataset": key[0], "model": key[1], "algorithm": key[2], "partition": key[3], "kind": kind,
        "clients": key[4], "status": status, "seeds": len(got), "seeds_expected": len(wanted),
        "seed_list": " ".join(map(str, got)),
        "accuracy_mean": accuracy_stats["mean"], "accuracy_std": accuracy_stats["std"],
        "ci95_low": accuracy_stats["ci95_low"], "ci95_high": accuracy_stats["ci95_high"],
        "ci95_half_width": accuracy_stats["ci95_half_width"], "ci95": accuracy_stats["ci95"],
        "binomial_se": binomial_se(accuracy_stats["mean"], test_rows), "test_rows": test_rows,
        "ratio_mean": ratio_stats["mean"], "ratio_std": ratio_stats["std"],
        "seeds_reached": len(reached), "rounds_min": min(reached) if reached else None,
        "rounds_median": float(np.median(reached)) if reached else math.nan,
        "rounds_max": max(reached) if reached else None,
    }


# ----------------------------------------------------------------------------- communication


def communicated_bytes(frame: pd.DataFrame) -> pd.DataFrame:
    """Per cell and evaluated round: the test accuracy and the bytes sent both ways up to that round.
    A round's bytes are the same every round (the sampled clients are a fixed number), so the
    total after round r is r times a trained round's; this holds with eval_every > 1 too."""
    rows = frame.dropna(subset=list(BYTES_COLUMNS))
    trained = rows[rows["round"] >= 1]
    if trained.empty:
        return pd.DataFrame(columns=["dataset", "model", "clients", "round", "test_accuracy", "bytes"])
    per_round = (trained["upload_bytes"] + trained["download_bytes"]).groupby(trained["source"]).first()
    out = frame[frame["source"].isin(per_round.index)][["dataset", "model", "clients", "seed", "round",
                                                         "test_accuracy", "source"]].copy()
    out["bytes"] = out["round"] * out["source"].map(per_round)
    return out.groupby(["dataset", "model", "clients", "round"], sort=True)[["test_accuracy", "bytes"]].mean() \
        .reset_index()
