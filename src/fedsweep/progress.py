"""The progress sidecar of a run: ``progress.json``, written beside ``checkpoint.pt`` at every save.

The checkpoint is a torch file of the model's size; ``fedsweep status`` runs on the head node,
without torch, over thousands of run folders, so what it needs of a checkpoint is repeated here
in a few hundred bytes (written atomically after the checkpoint, so it never claims a round the
checkpoint does not hold):

- ``round``, ``rounds``: the round the checkpoint holds and the rounds the run trains to;
- ``written``: when (seconds since the epoch; a copied folder keeps it whatever its mtimes);
- ``train_seconds``, ``examples``, ``examples_per_second``: the clients' SGD time and the
  examples trained in all rounds so far (earlier jobs' included), as run.json counts them;
- ``seconds``: the rounds' time so far (training, aggregation and evaluation).

Torch-free and pandas-free: the writer (:mod:`fedsweep.checkpoint`) passes the metric rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

PROGRESS_NAME = "progress.json"
ROUND_TIME_COLUMNS = ("train_seconds", "aggregate_seconds", "eval_seconds")


def _number(value: Any) -> float:
    """A metric value as a finite float (older checkpoints' rows lack newer columns; NaN: not measured)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def summary(round_: int, rounds: int, rows: Iterable[dict[str, Any]], written: float) -> dict[str, Any]:
    """The sidecar of a checkpoint holding round ``round_`` of ``rounds``, from its metric rows."""
    rows = [row for row in rows if int(row["round"]) <= round_]
    trained = [row for row in rows if int(row["round"]) > 0]  # round 0 evaluates only
    train_seconds = sum(_number(row.get("train_seconds")) for row in trained)
    examples = int(sum(_number(row.get("examples")) for row in trained))
    return {"round": int(round_), "rounds": int(rounds), "written": float(written),
            "train_seconds": train_seconds, "examples": examples,
            "examples_per_second": examples / train_seconds if train_seconds > 0 else None,
            "seconds": sum(_number(row.get(column)) for row in rows for column in ROUND_TIME_COLUMNS)}


def read(folder: str | Path) -> dict[str, Any] | None:
    """The sidecar in run folder ``folder``; None if there is none or it is unreadable."""
    try:
        found = json.loads((Path(folder) / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("round"), int) else None
