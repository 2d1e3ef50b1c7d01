"""Each setting is declared once (fedsweep.settings, .algorithm, .adapters, .schemes): the config
schema, the command-line flags and the torch modules' registries agree with the declarations."""

from __future__ import annotations

import pytest
import yaml

from fedsweep import adapters, algorithm, schemes, settings
from fedsweep.config import SCHEMA_PATH
from fedsweep.settings import Setting

SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
DEFINITIONS = SCHEMA["definitions"]
RESTRICTIONS = {"models", "datasets", "clients"}


def _without_descriptions(fragment: dict) -> dict:
    return {k: v for k, v in fragment.items() if k not in ("description", "default")}


@pytest.mark.parametrize("definition, declared, extra", [
    ("train", settings.TRAIN, set()),
    ("algorithm", algorithm.SETTINGS, RESTRICTIONS | {"partitions"}),
    ("peft", adapters.SETTINGS, set()),
    ("partition", schemes.SETTINGS, RESTRICTIONS),
])
def test_schema_properties_are_the_declarations(definition, declared, extra):
    properties = DEFINITIONS[definition]["properties"]
    assert set(properties) == set(declared) | extra
    for name, setting in declared.items():
        assert _without_descriptions(properties[name]) == setting.schema(), name


def test_schema_defaults_are_the_declared_defaults():
    train_defaults = {k: v["default"] for k, v in SCHEMA["properties"]["train"]["properties"].items()}
    assert train_defaults == settings.defaults(settings.TRAIN)
    assert DEFINITIONS["partition"]["properties"]["scheme"]["default"] == schemes.DEFAULTS["scheme"]


def test_torch_registries_hold_the_declared_names():
    from fedsweep import clients, engine, strategies

    assert set(strategies.STRATEGIES) == set(algorithm.STRATEGY_SETTINGS)
    assert set(clients.CLIENT_UPDATES) == set(algorithm.CLIENT_SETTINGS)
    assert set(engine.PROTOCOLS) == set(settings.PROTOCOLS)


def test_train_flags_derive_from_the_declarations():
    from fedsweep.cli import build_parser
    from fedsweep.trainconfig import DECLARED

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {opt for action in train._actions for opt in action.option_strings}
    assert {s.flag_name for s in DECLARED.values() if s.flag} <= flags
    assert "--max-length" not in flags  # the tokens' setting


@pytest.mark.parametrize("setting, value, message", [
    (Setting("n", 1, "integer", low=1), 0, "must be a positive integer"),
    (Setting("n", 1, "integer", low=1), 2.5, "must be a positive integer"),
    (Setting("n", 1, "integer", low=1), True, "must be a positive integer"),
    (Setting("x", 0.0, "number", low=0, high=1, high_open=True), 1, "must be a number in [0, 1)"),
    (Setting("x", 1.0, "number", low=0, low_open=True), float("nan"), "must be a positive number"),
    (Setting("c", "a", "string", choices=("a", "b")), "z", "is not one of a, b"),
    (Setting("m", None, "names", nullable=True), [], "must be a name or a non-empty list of names"),
])
def test_a_bad_value_is_one_line_naming_the_field(setting, value, message):
    assert setting.problem(value) == message
    with pytest.raises(Exception) as err:
        settings.check({setting.name: setting}, {setting.name: value}, settings.field_name("train"))
    assert str(err.value) == f"train.{setting.name}={value!r} {message}"


def test_values_take_their_declared_type():
    lr, epochs = settings.TRAIN["lr"], settings.TRAIN["epochs"]
    assert settings.check({"lr": lr, "epochs": epochs}, {"lr": 1, "epochs": 2.0}, str) == {"lr": 1.0, "epochs": 2}
    assert type(settings.check({"lr": lr}, {"lr": 1}, str)["lr"]) is float
