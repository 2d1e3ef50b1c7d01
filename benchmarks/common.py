"""Shared set-up for the benchmarks: a tokenised data set at length 128, offline.

Real text (../shared/data/ag_news, news articles of ~40 tokens) when present, else the
synthetic set; tokenised once into benchmarks/out/ and reused.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
SHARED = ROOT.parent.parent / "shared" / "data"


def tokens_dir(tokenizer: str = "minilm", max_length: int = 128, dataset: str = "auto") -> Path:
    from fedsweep.data import prepare
    from fedsweep.tokens import tokenize

    if dataset == "auto":
        dataset = "ag_news" if (SHARED / "ag_news" / "train.parquet").exists() else "synthetic"
    data = OUT / "data" / dataset
    if not (data / "meta.json").exists():
        if dataset == "synthetic":
            spec = {"source": "synthetic", "num_classes": 4, "train_size": 5000, "test_size": 1000,
                    "min_words": 20, "max_words": 90}
        else:
            spec = {"source": "local", "train": str(SHARED / dataset / "train.parquet"),
                    "test": str(SHARED / dataset / "test.parquet")}
        prepare(dataset, spec, data)
    tok = OUT / "tokens" / dataset / f"{tokenizer}_L{max_length}"
    if not (tok / "meta.json").exists():
        tokenize(data, tokenizer, max_length, tok)
    return tok


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
