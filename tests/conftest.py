"""Shared fixtures: small offline data sets built once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# Tests never touch the network: the hub is unreachable here, and must not be needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_cores_among_workers() -> None:
    """Under pytest-xdist (``-n N``), torch's threads (this worker's and its subprocesses') are
    its share of the cores, unless the caller set OMP_NUM_THREADS. Two workers with torch's
    default (one thread per core each) oversubscribe the cores: the suite took 1,013 s with them,
    680-715 s on one process, and 519-555 s with a share each and the long files first (2 cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    import torch

    from fedsweep.background import usable_cores

    threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // workers))))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


_share_cores_among_workers()

# The files of the longest end-to-end tests, scheduled first: while one worker runs the demo, the
# other takes the rest, and the two end together rather than one finishing the demo alone.
FIRST_FILES = ("test_workflow.py", "test_slurm.py", "test_input_changes.py")


def pytest_configure(config):
    """With ``-n`` and no ``--dist`` of the caller's: whole files to a worker (a module's fixtures,
    the demo's run or the SLURM cluster, are set up once), in the order below, not xdist's."""
    args = config.invocation_params.args
    if getattr(config.option, "numprocesses", None) and not any(a.startswith("--dist") or a == "-d" for a in args):
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return FIRST_FILES.index(name) if name in FIRST_FILES else len(FIRST_FILES)

    items.sort(key=rank)  # stable: the order within a file, and among the other files, is kept

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


@pytest.fixture(scope="session")
def micro(synth_tokens, tmp_path_factory):
    """The synthetic tokens, a micro BERT saved without dropout, and shard files."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedsweep.partition import iid_shards, write_shards

    root = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=4, initializer_range=0.1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    perm = np.random.default_rng(7).permutation(256)
    shards = {
        "k1": [perm[:96]],
        "k3": [perm[:40], perm[40:104], perm[104:200]],  # unequal: 40, 64, 96 rows
        "k4": iid_shards(256, 4, 0),
    }
    paths = {}
    for name, parts in shards.items():
        paths[name] = str(root / f"{name}.parquet")
        write_shards(paths[name], parts, {"scheme": "manual", "seed": 0, "train_rows": 256})
    return SimpleNamespace(tokens=synth_tokens / "tokens", model=str(root / "model"), shards=shards, **paths)
