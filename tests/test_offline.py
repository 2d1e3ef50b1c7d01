"""The hub code paths, tested offline: a model in a Hugging Face cache laid out as the hub
client lays it out, loaded with HF_HUB_OFFLINE=1 and every non-loopback socket refused; and the
hub data-set path with a stubbed ``datasets.load_dataset``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO

NETBLOCK = REPO / "tests" / "netblock"


def _fake_hub_cache(cache: Path, repo_id: str) -> None:
    """A hub cache entry for repo_id, as snapshot_download leaves it: refs/main -> snapshot."""
    from fedsweep.models import build_model, load_tokenizer

    revision = "0" * 40
    snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision
    build_model("tiny-bert", 2, seed=0).save_pretrained(snap)
    load_tokenizer("tiny-bert").save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir(parents=True, exist_ok=True)
    (snap.parents[1] / "refs" / "main").write_text(revision)


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(NETBLOCK) + os.pathsep + env.get("PYTHONPATH", ""),
               FEDSWEEP_NETLOG=str(tmp_path / "net.log"))
    return env


@pytest.mark.slow
def test_hub_model_from_cache_with_network_blocked(synth_tokens, tmp_path):
    _fake_hub_cache(tmp_path / "cache", "fedsweep-test/tiny-bert")
    env = _offline_env(tmp_path)

    def fedsweep(*args):
        out = subprocess.run([sys.executable, "-m", "fedsweep", *args], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    fedsweep("fetch", "--model", "fedsweep-test/tiny-bert", "--out", str(tmp_path / "fetched.json"))
    record = json.loads((tmp_path / "fetched.json").read_text())
    assert record["kind"] == "hub" and "model.safetensors" in record["files"]
    fedsweep("tokenize", "--data-dir", str(synth_tokens / "data"), "--tokenizer", "fedsweep-test/tiny-bert",
             "--max-length", "32", "--out-dir", str(tmp_path / "tokens"))
    fedsweep("partition", "--data-dir", str(synth_tokens / "data"), "--clients", "2", "--out",
             str(tmp_path / "shards.parquet"))
    fedsweep("train", "--tokens-dir", str(tmp_path / "tokens"), "--shards", str(tmp_path / "shards.parquet"),
             "--model", "fedsweep-test/tiny-bert", "--rounds", "1", "--epochs", "1", "--batch-size", "16",
             "--out-dir", str(tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.parquet").exists()
    log = tmp_path / "net.log"
    assert not log.exists() or log.read_text() == "", log.read_text()


def test_netblock_really_blocks(tmp_path):
    code = "import urllib.request; urllib.request.urlopen('http://example.org', timeout=5)"
    out = subprocess.run([sys.executable, "-c", code], env=_offline_env(tmp_path), capture_output=True, text=True)
    assert out.returncode != 0 and "network blocked" in out.stderr
    assert "example.org" in (tmp_path / "net.log").read_text()


def test_missing_model_offline_is_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedsweep", "fetch", "--model", "nobody/nothing"],
                         env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "model 'nobody/nothing': download failed" in out.stderr


def test_hub_dataset_path_with_class_names(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})
        rows = {"text": ["a b", "c d", "e f", "g h"], "label": [0, 1, 2, 3]}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from fedsweep.data import prepare

    meta = prepare("ag_news", None, tmp_path / "d")  # the preset: fancyzhx/ag_news
    assert calls == [("fancyzhx/ag_news", None, "train"), ("fancyzhx/ag_news", None, "test")]
    assert meta["class_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert pd.read_parquet(tmp_path / "d" / "train.parquet")["label"].tolist() == [0, 1, 2, 3]
