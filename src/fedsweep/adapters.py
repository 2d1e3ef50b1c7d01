"""A cell's ``peft`` setting (parameter-efficient fine-tuning), declared once and checked here.

``peft`` is a mapping such as ``{method: lora, r: 16, alpha: 32, aggregation: exact}``; ``method:
none`` (the default) is full fine-tuning. :func:`parse` turns it into a :class:`PeftSpec` with
one-line errors. What the spec builds (the adapters, their averaging) is :mod:`fedsweep.lora`,
which imports torch; this module does not (the workflow checks configs with it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import FedsweepError
from .settings import Setting, table

METHODS = ("none", "lora")
AGGREGATIONS = ("fedit", "ffa", "exact")
BASE_DTYPES = ("fp32", "bf16")
QUANTISED = ("int8", "int4", "4bit", "8bit")

SETTINGS = table([
    Setting("method", "none", "string", "none = full fine-tuning; lora = LoRA adapters", choices=METHODS),
    Setting("r", 8, "integer", "LoRA rank", low=1),
    Setting("alpha", 16.0, "number", "LoRA alpha (scaling alpha / r)", low=0, low_open=True),
    Setting("dropout", 0.0, "number", "LoRA dropout", low=0, high=1, high_open=True),
    Setting("target_modules", None, "names", "module names that get adapters (e.g. [q_proj, v_proj]); absent = "
            "peft's default for the architecture", nullable=True),
    Setting("aggregation", "fedit", "string", "fedit = average A and B separately; ffa = freeze A, average B "
            "(exact); exact = average the products B A, the residual folded into the frozen base weight",
            choices=AGGREGATIONS),
    Setting("base_dtype", "fp32", "string", "dtype of the frozen base weights", choices=BASE_DTYPES),
])
DEFAULTS: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}


@dataclass(frozen=True)
class PeftSpec:
    method: str = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: peft's default for the architecture
    aggregation: str = "fedit"
    base_dtype: str = "fp32"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def record(self) -> dict[str, Any] | None:
        """What the config hash and run.json hold: None for full fine-tuning (the hash of such a
        cell is then what it was before LoRA existed), else every setting."""
        if not self.enabled:
            return None
        out = asdict(self)
        out["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return out


def parse(value: Any, origin: str = "peft") -> PeftSpec:
    """The spec of a ``peft`` setting (None, ``"none"``, a mapping or a PeftSpec), checked.

    A bad field raises one line naming it and its value: ``{origin}: r=0 must be a positive integer``."""
    if isinstance(value, PeftSpec):
        return value
    if value is None or value == "none":
        return PeftSpec()
    if not isinstance(value, dict):
        raise FedsweepError(f"{origin}: must be a mapping such as {{method: lora, r: 16}}, got {value!r}")
    unknown = [k for k in value if k not in SETTINGS]
    if unknown:
        raise FedsweepError(f"{origin}: unknown key {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    if value.get("base_dtype") in QUANTISED:
        raise FedsweepError(f"{origin}: base_dtype={value['base_dtype']!r} (bitsandbytes quantisation) is not "
                            f"supported by this fedsweep; use fp32 or bf16")
    from .settings import check

    fields = {**DEFAULTS, **check(SETTINGS, value, lambda name: f"{origin}: {name}")}
    if fields["method"] == "none":
        extra = [k for k in value if k != "method" and value[k] != DEFAULTS[k]]
        if extra:
            raise FedsweepError(f"{origin}: {extra[0]}={value[extra[0]]!r} is a LoRA setting, but method=none "
                                f"(use method: lora)")
        return PeftSpec()
    targets = fields["target_modules"]
    return PeftSpec("lora", fields["r"], fields["alpha"], fields["dropout"],
                    tuple(targets) if targets is not None else None, fields["aggregation"], fields["base_dtype"])
