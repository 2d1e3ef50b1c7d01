"""The partition settings (how a data set's training rows are split over K clients), declared
once, and the rules between them: which scheme reads which setting.

One rule set serves the config (``partitions.NAME.alpha``, checked by :mod:`fedsweep.grid` on the
head node) and ``fedsweep partition``'s flags (``--alpha``): :func:`check` takes how to name a
field. The splitting itself is :mod:`fedsweep.partition` (numpy); this module imports neither
numpy nor torch.
"""

from __future__ import annotations

from typing import Any, Callable

from . import FedsweepError
from .settings import Setting, check as check_values, table

# Scheme -> the settings it reads (beside per_client, which any scheme takes).
SCHEME_SETTINGS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha",),
    "shards": ("classes_per_client",),
    "quantity_skew": ("size_distribution", "alpha", "sigma", "min_rows"),
}
SCHEMES = tuple(SCHEME_SETTINGS)
SIZE_DISTRIBUTIONS = ("dirichlet", "lognormal")

SETTINGS = table([
    Setting("scheme", "iid", "string", "iid (the paper), dirichlet (label skew), shards (sort by label, "
            "classes_per_client pieces per client) or quantity_skew (i.i.d. labels, skewed sizes)", choices=SCHEMES),
    Setting("alpha", None, "number", "Dirichlet concentration (dirichlet; quantity_skew with size_distribution "
            "dirichlet); small = strong skew", low=0, low_open=True, nullable=True),
    Setting("classes_per_client", 2, "integer", "shards: label-sorted pieces per client", low=1),
    Setting("size_distribution", "dirichlet", "string", "quantity_skew: client shares from dirichlet (alpha) or "
            "lognormal (sigma)", choices=SIZE_DISTRIBUTIONS),
    Setting("sigma", None, "number", "quantity_skew, lognormal: standard deviation of the log shares", low=0,
            low_open=True, nullable=True),
    Setting("min_rows", 1, "integer", "quantity_skew: rows every client gets at least", low=1),
    Setting("per_client", None, "integer", "N rows per client (a seeded K x N subset; the total grows with K: "
            "weak scaling); absent: the whole training set is split", low=1, nullable=True),
])
DEFAULTS = {name: s.default for name, s in SETTINGS.items()}


def reads(settings: dict[str, Any]) -> set[str]:
    """The settings a partition reads, by its scheme (and size distribution)."""
    scheme = settings.get("scheme", "iid")
    used = {"scheme", "per_client", *SCHEME_SETTINGS[scheme]}
    if scheme == "quantity_skew":
        unused = "sigma" if settings.get("size_distribution", "dirichlet") == "dirichlet" else "alpha"
        used.discard(unused)
    return used


def check(settings: dict[str, Any], name: Callable[[str], str], value_of: Callable[[str, Any], str]
          ) -> dict[str, Any]:
    """The partition ``settings`` (only those given), checked: each value, then which scheme
    reads what and what it requires. One line; ``name(key)`` names a field (``partitions.p.alpha``,
    ``--alpha``), ``value_of(key, value)`` a field with its value (``partitions.p.alpha=0.5``,
    ``--alpha 0.5``). Returns the settings coerced to their types."""
    values = check_values(SETTINGS, settings, name, value_of)
    scheme = values.get("scheme", "iid")
    distribution = values.get("size_distribution", "dirichlet")
    used = reads(values)
    for key, value in values.items():
        value = settings[key]  # as written, in the messages
        if key not in used and value is not None:
            if scheme == "quantity_skew" and key in ("alpha", "sigma"):
                wanted = "dirichlet" if key == "alpha" else "lognormal"
                raise FedsweepError(f"{value_of(key, value)} is only used with "
                                    f"{value_of('size_distribution', wanted)}")
            users = " / ".join(s for s, keys in SCHEME_SETTINGS.items() if key in keys) or "none"
            raise FedsweepError(f"{value_of(key, value)} is only used with {value_of('scheme', users)}")
    if "alpha" in used and values.get("alpha") is None:
        detail = f" (size_distribution {distribution})" if scheme == "quantity_skew" else ""
        raise FedsweepError(f"{name('alpha')} is required with {value_of('scheme', scheme)}{detail}")
    if "sigma" in used and values.get("sigma") is None:
        raise FedsweepError(f"{name('sigma')} is required with {value_of('size_distribution', distribution)}")
    return values
