"""One loaded sweep: its metrics, config, learning curves and analysis tables, and the views the
tables and figures share (the reference partition and algorithm, title notes, the grid's gaps).
Every table and figure is a function of a :class:`Sweep`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pandas as pd

from .analysis import Run, algorithm_key, analyse, grid_status, learning_runs, ordered, reference_partition
from .load import DEFAULT_PARTITION, DatasetSettings, Grid, find_metrics, load_metrics, read_report_grid


@dataclass
class Sweep:
    frame: pd.DataFrame  # every row of the metrics files (load_metrics)
    settings: dict[str, DatasetSettings]  # per data set, in report order
    target_fraction: float
    grid: Grid
    runs: list[Run]  # per cell: its seeds, then their mean
    accuracy: pd.DataFrame  # accuracy at the budget (analyse)
    rounds: pd.DataFrame  # rounds to target (analyse)
    seeds: pd.DataFrame  # one row per cell of the grid (grid_status)
    missing: pd.DataFrame  # one row per (cell, seed) of the grid without metrics (grid_status)

    @classmethod
    def load(cls, metrics: list[str] | str, config: str) -> Sweep:
        """Read the metrics files (or folders) ``metrics`` and the report config, and analyse them."""
        frame = load_metrics(find_metrics(metrics))
        settings, target_fraction, grid = read_report_grid(config, sorted(frame["dataset"].unique()))
        runs = learning_runs(frame)
        accuracy, rounds = analyse(runs, settings, target_fraction)
        seeds, missing = grid_status(frame, grid, accuracy, rounds)
        return cls(frame, settings, target_fraction, grid, runs, accuracy, rounds, seeds, missing)

    # ------------------------------------------------------------------ the reference partition

    @cached_property
    def partitions(self) -> list[str]:
        return ordered(self.frame["partition"], DEFAULT_PARTITION, self.grid.partitions)

    @cached_property
    def shown(self) -> str:
        """The partition Figs. 1-3 show (:func:`~fedsweep.report.analysis.reference_partition`)."""
        return reference_partition(self.partitions)

    @property
    def note(self) -> str:
        """The title note of a figure of the reference partition."""
        return f" (partition {self.shown})" if len(self.partitions) > 1 else ""

    @cached_property
    def ref_accuracy(self) -> pd.DataFrame:
        return self.accuracy[self.accuracy["partition"] == self.shown]

    @cached_property
    def ref_rounds(self) -> pd.DataFrame:
        return self.rounds[self.rounds["partition"] == self.shown]

    @cached_property
    def ref_runs(self) -> list[Run]:
        return [r for r in self.runs if r.partition == self.shown]

    # ------------------------------------------------------------------ the reference algorithm

    @cached_property
    def algorithms(self) -> list[str]:
        return sorted(self.frame["algorithm"].unique(), key=algorithm_key)

    @cached_property
    def drift_algorithm(self) -> str:
        """fedavg where it ran on the reference partition, else the first by name."""
        return sorted(self.frame.loc[self.frame["partition"] == self.shown, "algorithm"].unique(),
                      key=algorithm_key)[0]

    @cached_property
    def drift_frame(self) -> pd.DataFrame:
        """The metrics rows of the reference partition and algorithm (the drift and bytes figures)."""
        return self.frame[(self.frame["partition"] == self.shown) & (self.frame["algorithm"] == self.drift_algorithm)]

    @property
    def drift_note(self) -> str:
        shows = ([f"algorithm {self.drift_algorithm}"] if len(self.algorithms) > 1 else []) + (
            [f"partition {self.shown}"] if len(self.partitions) > 1 else [])
        return f" ({', '.join(shows)})" if shows else ""

    # ------------------------------------------------------------------ the rest

    @cached_property
    def models(self) -> list[str]:
        return sorted(self.frame["model"].unique())

    @property
    def gaps(self) -> tuple[int, int]:
        """(missing, expected) seeds of the grid's cells."""
        return (len(self.missing), int(self.seeds["seeds_expected"].sum()))
