"""``TrainConfig``: the settings of one ``fedsweep train`` run, built from the declarations.

Its fields are :data:`fedsweep.settings.RUN` (inputs, outputs, labels),
:data:`fedsweep.settings.JOB_TRAIN`, :data:`fedsweep.algorithm.SETTINGS` and ``peft`` (a mapping,
:mod:`fedsweep.adapters`), with the declared defaults: a new setting is declared once and is a
field here, a flag of ``fedsweep train`` and a key of ``--settings`` from then on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import FedsweepError, adapters, algorithm
from .settings import JOB_TRAIN, RUN, RUN_REQUIRED, SLUG, SLUG_FIELDS, check, check_train_rules, field_name

# Every declared setting of a run, peft aside (a mapping, checked by fedsweep.adapters).
DECLARED = {**RUN, **JOB_TRAIN, **algorithm.SETTINGS}
# The keys of a cell's ``--settings`` mapping: what the workflow hands a training job.
CELL_KEYS = (*JOB_TRAIN, *algorithm.SETTINGS, "peft")


def _fields() -> list[tuple[str, Any, Any]]:
    required = [(name, Any) for name in RUN_REQUIRED]
    optional = [(name, Any, dataclasses.field(default=s.default))
                for name, s in DECLARED.items() if name not in RUN_REQUIRED]
    return required + optional + [("peft", Any, dataclasses.field(default=None))]


class _Methods:
    def validate(self) -> None:
        """Every setting's type and bounds, the algorithm's rules and the adapters' (one line)."""
        where = field_name("train:")
        values = {name: getattr(self, name) for name in DECLARED}
        for name in RUN_REQUIRED:
            if values[name] is None:
                raise FedsweepError(f"train: {name} is required")
        coerced = check(DECLARED, values, where)
        for name in SLUG_FIELDS:
            if not SLUG.match(coerced[name]):
                raise FedsweepError(f"train: {name}={coerced[name]!r} must be a slug: letters, digits, '_', '.', "
                                    f"'+', '-' (not first), at most 64")
        for name, value in coerced.items():
            setattr(self, name, value)
        check_train_rules(coerced, where)
        algorithm.check_rules(self, where)
        adapters.parse(self.peft, "train: peft")

    def cell_settings(self) -> dict[str, Any]:
        """The cell's settings (a ``--settings`` mapping)."""
        return {name: getattr(self, name) for name in CELL_KEYS}


TrainConfig = dataclasses.make_dataclass("TrainConfig", _fields(), bases=(_Methods,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = __doc__.split("\n\n", 1)[0]
