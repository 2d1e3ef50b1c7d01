"""Every setting of a training cell, declared once: name, default, type, bounds and help.

A :class:`Setting` is the single source of:

- the ``fedsweep train`` (and ``fedsweep partition``) command-line flags (:func:`add_flags`),
- the value checks, with one line naming the field and the value (:func:`check`),
- the values' types (``lr: 1`` in YAML is the float 1.0, ``epochs: 2.0`` the integer 2: the
  config hash and the flags see one spelling of each number; :func:`coerce`),
- the JSON-schema fragment the config schema must hold for it (:meth:`Setting.schema`;
  ``tests/test_settings.py`` asserts ``workflow/schemas/config.schema.yaml`` agrees).

The tables: :data:`TRAIN` (here), :data:`fedsweep.algorithm.SETTINGS`,
:data:`fedsweep.adapters.SETTINGS` (LoRA) and :data:`fedsweep.schemes.SETTINGS` (partitions).
:class:`fedsweep.trainconfig.TrainConfig`, the settings of one ``fedsweep train`` run, is built
from them.

This module imports no torch, transformers or pandas: the Snakemake head node imports it.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from . import FedsweepError

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind``: integer, number, string, boolean, names (a string or a list of
    them) or mapping. Bounds: ``low``/``high``, open (excluded) when ``low_open``/``high_open``.
    ``nullable``: None is a value (absent: the default applies). ``flag``: a command-line flag
    of its own (False: set only through a mapping such as ``--settings``)."""

    name: str
    default: Any
    kind: str
    help: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    flag: bool = True

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def requirement(self) -> str:
        """What a valid value is, in words: ``a positive integer``, ``a number in [0, 1)``."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        noun = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                "names": "a name or a non-empty list of names", "mapping": "a mapping"}[self.kind]
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{low:g}, {high:g}{')' if self.high_open else ']'}"
        if low == 0 and self.low_open:
            return f"a positive {noun.split(' ', 1)[1]}"
        if low == 1 and self.kind == "integer" and not self.low_open:
            return "a positive integer"
        if low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {low:g}"
        if high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {high:g}"
        return noun

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid (None: it is)."""
        if value is None:
            return None if self.nullable else f"must be {self.requirement()}"
        if self.choices:
            return None if value in self.choices else f"is not one of {', '.join(self.choices)}"
        if self.kind in ("integer", "number"):
            if not _is_number(value) or (self.kind == "integer" and not float(value).is_integer()):
                return f"must be {self.requirement()}"
            low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            return f"must be {self.requirement()}" if low_bad or high_bad else None
        ok = {"string": lambda v: isinstance(v, str),
              "boolean": lambda v: isinstance(v, bool),
              "names": _is_names,
              "mapping": lambda v: isinstance(v, dict)}[self.kind](value)
        return None if ok else f"must be {self.requirement()}"

    def coerce(self, value: Any) -> Any:
        """The value in the setting's own type (checked first: a valid value converts exactly)."""
        if value is None:
            return None
        if self.kind == "integer" and not isinstance(value, bool):
            return int(value)
        if self.kind == "number" and not isinstance(value, bool):
            return float(value)
        if self.kind == "names" and isinstance(value, str):
            return [value]
        return value

    def schema(self) -> dict[str, Any]:
        """The JSON-schema fragment of the setting (without its description)."""
        if self.choices:
            out: dict[str, Any] = {"type": "string", "enum": list(self.choices)}
        elif self.kind == "names":
            return {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
        else:
            out = {"type": {"mapping": "object"}.get(self.kind, self.kind)}
        for key, bound, is_open in (("minimum", self.low, self.low_open), ("maximum", self.high, self.high_open)):
            if bound is not None:
                out[("exclusiveM" + key[1:]) if is_open else key] = bound
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def table(settings: Iterable[Setting]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


def defaults(settings: dict[str, Setting]) -> dict[str, Any]:
    return {name: s.default for name, s in settings.items()}


def check(settings: dict[str, Setting], values: dict[str, Any], where: Callable[[str], str],
          shown: Callable[[str, Any], str] | None = None) -> dict[str, Any]:
    """``values`` checked against ``settings`` and coerced to their types; one line naming the
    field and value for the first bad one. ``where(name)`` is how the field is named (e.g.
    ``algorithms.adam.server_lr`` in a config, ``--server-lr`` on the command line), and
    ``shown(name, value)`` the field with its value (default ``name=value!r``)."""
    shown = shown or (lambda name, value: f"{where(name)}={value!r}")
    out = {}
    for name, value in values.items():
        setting = settings.get(name)
        if setting is None:
            raise FedsweepError(f"{where(name)}: unknown setting (known: {', '.join(settings)})")
        problem = setting.problem(value)
        if problem:
            raise FedsweepError(f"{shown(name, value)} {problem}")
        out[name] = setting.coerce(value)
    return out


def field_name(prefix: str) -> Callable[[str], str]:
    """How a config names a field below ``prefix`` (``train: lr``-style for the CLI's ``train:``)."""
    if prefix.endswith(":"):
        return lambda name: f"{prefix} {name}"
    return lambda name: f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- command-line flags

_ARG_TYPES = {"integer": int, "number": float, "string": str}


def add_flags(parser: argparse.ArgumentParser | Any, settings: Iterable[Setting], *,
              required: Sequence[str] = (), defaults_from_setting: bool = False) -> None:
    """One flag per setting (``lr`` -> ``--lr``). Flags default to None (= not given), so that
    the given ones can be told apart and merged over a mapping, unless ``defaults_from_setting``."""
    for s in settings:
        if not s.flag:
            continue
        kwargs: dict[str, Any] = {"help": _flag_help(s), "dest": s.name}
        if s.kind == "boolean":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _ARG_TYPES.get(s.kind, str)
            kwargs["metavar"] = s.name.upper() if not s.choices else "{" + ",".join(s.choices) + "}"
        kwargs["required"] = s.name in required
        kwargs["default"] = s.default if defaults_from_setting else None
        parser.add_argument(s.flag_name, **kwargs)


def _flag_help(s: Setting) -> str:
    default = "" if s.default is None or s.default == "" else f" (default {s.default})"
    return f"{s.help}{default}".replace("%", "%%")


def given_flags(args: argparse.Namespace, settings: Iterable[Setting]) -> dict[str, Any]:
    """The settings given as flags (not None)."""
    return {s.name: getattr(args, s.name) for s in settings
            if s.flag and getattr(args, s.name, None) is not None}


# ----------------------------------------------------------------------------- a cell's training settings

PROTOCOLS = ("standard", "paper")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")

TRAIN = table([
    Setting("epochs", 2, "integer", "local epochs per client per round (E)", low=1),
    Setting("batch_size", 32, "integer", "client mini-batch size", low=1),
    Setting("lr", 2e-5, "number", "the clients' learning rate (the peak of a schedule)", low=0, low_open=True),
    Setting("max_length", 128, "integer", "tokens per example; chosen by the tokens (a path level), so not a "
            "flag of `fedsweep train`", low=2, flag=False),
    Setting("protocol", "standard", "string", "standard = attention mask, dynamic padding, reshuffle every epoch; "
            "paper = the paper's code (pad to max_length, no mask, fixed order, drop_last)", choices=PROTOCOLS),
    Setting("precision", "auto", "string", "auto = bf16 autocast + TF32 on a GPU, strict fp32 on a CPU",
            choices=PRECISIONS),
    Setting("eval_every", 1, "integer", "evaluate the global model every this many rounds (and at the last)",
            low=1),
    Setting("eval_batch_size", 256, "integer", "batch size of the test-set evaluation", low=1),
    Setting("checkpoint_every", 1, "integer", "save checkpoint.pt every this many rounds", low=1),
    Setting("client_group", 1, "integer", "clients trained at once as one vmapped model (GPU); 1 = one after "
            "another", low=1),
    Setting("pad_multiple", 0, "integer", "pad each batch to a multiple of this many tokens (at most the tokens' "
            "width), so that a compiled step sees a few fixed shapes; 0 = to the batch's longest sequence", low=0),
    Setting("compile", False, "boolean", "torch.compile the clients' training step (forward, loss, backward); "
            "the same numbers to float rounding, compiled once per process and batch shape"),
    Setting("client_holdout", 0.0, "number", "fraction of each client's shard held out of training (a seeded "
            "slice, at least one row) on which the global model is evaluated per client; 0 = off", low=0, high=0.5,
            high_open=True),
])
# The settings a training job receives (max_length is the tokens').
JOB_TRAIN = {name: s for name, s in TRAIN.items() if name != "max_length"}
# Settings added after cells had been run: at their default they are left out of a cell's
# settings (the workflow's param: finished cells do not rerun) and, with client_group, of the
# checkpoint's hash (their checkpoints resume). A setting added later joins this list.
ABSENT_AT_DEFAULT = ("pad_multiple", "compile", "client_holdout")
HASH_ABSENT_AT_DEFAULT = ("client_group", *ABSENT_AT_DEFAULT)


def check_train_rules(values: dict[str, Any], where: Callable[[str], str]) -> None:
    """Training settings that exclude each other (each value already checked on its own): one line
    naming the fields; ``where(name)`` names a field (``train: compile``, ``train.compile``)."""
    if values.get("compile") and values.get("client_group", 1) > 1:
        raise FedsweepError(f"{where('compile')}=true with {where('client_group')}={values['client_group']}: the "
                            f"compiled step trains one client at a time (set one of them back)")

# What a `fedsweep train` run is given besides the cell's settings: its inputs, outputs and labels.
RUN = table([
    Setting("tokens_dir", None, "string", "the tokenised data set (fedsweep tokenize)"),
    Setting("shards", None, "string", "the client shards (fedsweep partition)"),
    Setting("model", None, "string", "model spec: hub id, local folder or alias (tiny-bert, minilm, ...)"),
    Setting("out_dir", None, "string", "the run folder"),
    Setting("rounds", None, "integer", "train up to this round (resumes from the checkpoint)", low=1),
    Setting("seed", 0, "integer", "seed of initialisation, client order and shuffles", low=0),
    Setting("device", "auto", "string", "auto, cpu, cuda, cuda:1, ..."),
    Setting("dataset", "", "string", "data set name recorded in the metrics"),
    Setting("partition", "iid", "string", "the partition's name (slug), recorded in metrics and run.json"),
    Setting("algorithm", "fedavg", "string", "the algorithm's name (slug), recorded in metrics and run.json"),
    Setting("keep_checkpoint", True, "boolean", "keep checkpoint.pt after the last round"),
    Setting("progress", "auto", "string", "a bar on a terminal, one line per round otherwise",
            choices=("auto", "bar", "lines", "none")),
    Setting("stale_checkpoint", "error", "string", "a checkpoint made with other settings, data or model: refuse "
            "it (error) or delete it and start over (restart, what the workflow passes)", choices=("error", "restart")),
])
RUN_REQUIRED = ("tokens_dir", "shards", "model", "out_dir", "rounds")
# Labels: they name a run, they do not change its numbers (slugs, path levels of the workflow).
SLUG_FIELDS = ("algorithm", "partition")
