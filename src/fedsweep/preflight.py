"""Checks the workflow runs when it builds its DAG, before any job starts.

Every function here is cheap (file footers, line counts cached by mtime, a model's
``config.json``) and raises :class:`fedsweep.FedsweepError` with one line naming the field and
value, which the workflow reports as ``config: ...``. What cannot be known before a download (a
hub model's positions when it is not yet in the cache) is checked by ``fedsweep fetch`` on the
head node, before any data job needs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import FedsweepError

# Rows of the hub presets (train, test): for runtime estimates and shard checks before download.
PRESET_ROWS = {
    "imdb": (25_000, 25_000),
    "yelp_review_full": (650_000, 50_000),
    "ag_news": (120_000, 7_600),
}
# Config keys that bound a model's sequence length, by architecture family.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_TINY_POSITIONS = 512  # fedsweep.models.tiny_config


def _synthetic_rows(spec: dict[str, Any]) -> tuple[int, int]:
    import inspect

    from .synthetic import generate

    defaults = {k: p.default for k, p in inspect.signature(generate).parameters.items()}
    return int(spec.get("train_size", defaults["train_size"])), int(spec.get("test_size", defaults["test_size"]))


def _capped(rows: tuple[int, int], spec: dict[str, Any]) -> tuple[int, int]:
    train, test = rows
    if spec.get("max_train"):
        train = min(train, int(spec["max_train"]))
    if spec.get("max_test"):
        test = min(test, int(spec["max_test"]))
    return train, test


class RowCountCache:
    """Row counts of local data files, keyed by (path, size, mtime): a large CSV is counted once,
    and again only after it changed."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, Any] = {}
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is only a cache: count again
        self.dirty = False

    @staticmethod
    def key(files: list[str], spec: dict[str, Any]) -> str:
        stamps = []
        for f in files:
            st = os.stat(f)
            stamps.append((f, st.st_size, st.st_mtime_ns))
        caps = {k: spec.get(k) for k in ("max_train", "max_test", "header", "lines", "encoding")}
        return json.dumps([stamps, caps], sort_keys=True)

    def get(self, key: str) -> tuple[int, int] | None:
        hit = self.entries.get(key)
        return tuple(hit) if hit else None

    def put(self, key: str, rows: tuple[int, int]) -> None:
        self.entries[key] = list(rows)
        self.dirty = True

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        from .io import write_json

        try:
            write_json(self.path, self.entries)
        except OSError:
            pass  # a read-only work dir: counting again next time is fine


def dataset_rows(name: str, spec: dict[str, Any] | None, base_dir: str | os.PathLike,
                 cache: RowCountCache | None = None) -> tuple[int, int] | None:
    """(train, test) rows a data set will have after ``fedsweep prepare``, checked cheaply.

    Validates the spec as ``fedsweep prepare`` does (unknown keys, missing files), counts local
    files without loading them, and returns None only for a hub data set that is no preset.
    """
    from .data import count_local_rows, local_files, resolve_spec

    resolved = resolve_spec(name, spec)
    source = resolved["source"]
    if source == "synthetic":
        return _capped(_synthetic_rows(resolved), resolved)
    if source == "hub":
        rows = PRESET_ROWS.get(name) if resolved.get("hub_id") == _preset_hub_id(name) else None
        return _capped(rows, resolved) if rows else None
    files = local_files(resolved, base_dir)
    for split, f in zip(("train", "test"), files):
        if os.path.isfile(f) and not os.access(f, os.R_OK):
            raise FedsweepError(f"{f}: {split} file is not readable")
    # Only files that exist are cached; a missing one is reported by count_local_rows.
    key = RowCountCache.key(files, resolved) if cache and all(map(os.path.isfile, files)) else None
    if key and (hit := cache.get(key)):
        return hit
    counted = count_local_rows(resolved, base_dir)
    rows = (int(counted["train"]), int(counted["test"]))
    if key:
        cache.put(key, rows)
    return rows


def _preset_hub_id(name: str) -> str | None:
    from .data import HUB_PRESETS

    return HUB_PRESETS.get(name, {}).get("hub_id")


def model_files(spec: str) -> list[str]:
    """The files of a local model directory (config, weights, tokenizer), absolute; else []."""
    from .models import looks_like_local_path, resolve

    if not looks_like_local_path(spec):
        return []
    path = Path(resolve(spec)).resolve()  # says which of folder and config.json is missing
    unreadable = [p for p in path.iterdir() if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable:
        raise FedsweepError(f"model {spec!r}: file {str(unreadable[0])!r} is not readable")
    return sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _positions_of(config: dict[str, Any]) -> int | None:
    for key in _POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _config_json(spec: str) -> dict[str, Any] | None:
    """The model's config.json, from a local folder, the bundled MiniLM or the hub cache; None
    when it is not on this machine yet (a hub model not downloaded)."""
    from .cluster import config_json_path
    from .models import MINILM_ALIASES, minilm_path

    # MiniLM through models.minilm_path, which says how to install its package when it is missing
    path = Path(minilm_path()) / "config.json" if spec in MINILM_ALIASES else config_json_path(spec)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedsweepError(f"model {spec!r}: cannot read {str(path)!r} ({exc})") from None


def max_positions(spec: str) -> int | None:
    """How many tokens the model's position embeddings allow; None when unknown here."""
    from .models import TINY_FAMILIES

    if spec in TINY_FAMILIES:
        return _TINY_POSITIONS
    config = _config_json(spec)
    return _positions_of(config) if config else None


def check_max_length(spec: str, max_length: int, where: str) -> None:
    limit = max_positions(spec)
    if limit is not None and max_length > limit:
        raise FedsweepError(f"{where}max_length={max_length} exceeds model {spec!r}'s {limit} positions")
