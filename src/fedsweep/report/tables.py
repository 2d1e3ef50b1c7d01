"""The report's tables, each a function of a :class:`~fedsweep.report.sweep.Sweep` returning the
DataFrame written as ``{tables_dir}/{name}.csv`` (registered in ``fedsweep.report.TABLE_REGISTRY``,
captioned by ``workflow/report/table_{name}.rst``). The analysis computes them together
(:func:`~fedsweep.report.analysis.analyse`, :func:`~fedsweep.report.analysis.grid_status`) when
the sweep is loaded."""

from __future__ import annotations

import pandas as pd

from .clients import client_accuracy_table
from .sweep import Sweep


def accuracy_at_budget(sweep: Sweep) -> pd.DataFrame:
    """Per seed and seed mean: test accuracy at the budget, its spread and the ratio to K=1."""
    return sweep.accuracy


def rounds_to_target(sweep: Sweep) -> pd.DataFrame:
    """Per seed and seed mean: the first round reaching the target fraction of K=1's accuracy."""
    return sweep.rounds


def seeds(sweep: Sweep) -> pd.DataFrame:
    """Per cell of the grid: its status and the statistics over its seeds."""
    return sweep.seeds


def missing_cells(sweep: Sweep) -> pd.DataFrame:
    """Per (cell, seed) of the grid without metrics."""
    return sweep.missing


def client_accuracy(sweep: Sweep) -> pd.DataFrame:
    """Per seed and seed mean, at the round used: the global model on each client's label distribution."""
    return client_accuracy_table(sweep)
