"""Shared fixtures: small offline data sets built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub is unreachable here, and must not be needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A real-text data set beside the project; tests that need it skip where it is absent."""
    path = SHARED_DATA / name
    if not (path / "train.parquet").exists():
        pytest.skip(f"{path} not present")
    return path


def without_dropout(model):
    """The model with every dropout at 0: its modules' and the config's (SDPA reads the latter)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_probs_dropout_prob", "attention_dropout", "hidden_dropout_prob", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    return model


@pytest.fixture(scope="session")
def synth_tokens(tmp_path_factory) -> Path:
    """A 4-class synthetic set (256 train / 96 test), tokenised with MiniLM's tokenizer at L=32."""
    from fedsweep.data import prepare
    from fedsweep.tokens import tokenize

    root = tmp_path_factory.mktemp("synth")
    prepare("synth", {"source": "synthetic", "num_classes": 4, "train_size": 256, "test_size": 96,
                      "difficulty": 0.3, "seed": 1}, root / "data")
    tokenize(root / "data", "tiny-bert", 32, root / "tokens")
    return root
