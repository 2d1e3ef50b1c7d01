"""Reading sweep config files: YAML mappings merged as Snakemake merges several ``--configfile``,
read strictly, so that what YAML would silently change is an error with file and line.

- a key given twice in one mapping (YAML keeps the last, silently);
- a key that is not text: YAML reads unquoted ``on``/``off``/``yes``/``no`` as booleans and
  ``2021`` as a number, so a partition named ``on`` would be ``True``;
- a file that is missing, empty, not a mapping, or not YAML.

The workflow's own config (Snakemake loads ``--configfile`` itself) is checked by reading the same
files again with :func:`read_files` (``fedsweep.config.load(..., files=...)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import FedsweepError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate and non-text keys, naming the file's line."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise FedsweepError(f"line {line}: the key {key_node.value!r} is read as {key!r} ({type(key).__name__}), "
                                f"not as a name (YAML reads unquoted on/off/yes/no as booleans and digits as numbers): "
                                f"quote it, '{key_node.value}'")
        if key in seen:
            raise FedsweepError(f"line {line}: the key {key!r} is given twice in one mapping (first at line "
                                f"{seen[key]}); YAML would silently keep the last")
        seen[key] = line
    return {loader.construct_object(k, deep=deep): loader.construct_object(v, deep=deep) for k, v in node.value}


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """One config file, strictly: a mapping, or one line ``--configfile 'x.yaml': ...``."""
    where = f"--configfile {str(path)!r}"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise FedsweepError(f"{where}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise FedsweepError(f"{where}: not UTF-8 text ({exc.reason})") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except FedsweepError as exc:
        raise FedsweepError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FedsweepError(f"{where}: invalid YAML{at}: {problem}") from None
    if loaded is None:
        raise FedsweepError(f"{where}: the file is empty; a config is a mapping (models:, datasets:, ...)")
    if not isinstance(loaded, dict):
        raise FedsweepError(f"{where}: the config must be a mapping (key: value), got a {type(loaded).__name__}")
    return loaded


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge as Snakemake merges several --configfile: mappings recursively, the rest replaced."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def read_files(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The config files merged in order (later ones win), each read strictly."""
    config: dict[str, Any] = {}
    for path in paths:
        deep_update(config, read_file(path))
    return config
