"""Tokenise a prepared data set once per (data set, tokenizer, max length).

Output: ``train.parquet`` / ``test.parquet`` with ``input_ids`` (list<int32>, truncated to the
max length, NOT padded: padding is decided per batch at training time) and ``label``, plus
``meta.json`` naming the tokenizer, a hash of its vocabulary and the max length. Models that
share a tokenizer (bert-base-cased and distilbert-base-cased) share these files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import FedsweepError, __version__
from .data import read_meta
from .io import atomic_path, read_json, sha256_file, write_json
from .models import load_tokenizer

BATCH = 2048  # texts per call of the fast (Rust) tokenizer: large batches use its threads


def vocab_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def tokenize(data_dir: str | os.PathLike, tokenizer_spec: str, max_length: int,
             out_dir: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(max_length, int) or max_length < 2:
        raise FedsweepError(f"max_length={max_length!r} must be an integer >= 2")
    data_meta = read_meta(data_dir)
    tok = load_tokenizer(tokenizer_spec)
    limit = getattr(tok, "model_max_length", None)
    if limit is not None and limit < 1_000_000 and max_length > limit:
        raise FedsweepError(f"max_length={max_length} exceeds tokenizer {tokenizer_spec!r}'s limit {limit}")
    out = Path(out_dir)
    meta: dict[str, Any] = {
        "dataset": data_meta["name"], "num_classes": data_meta["num_classes"],
        "class_names": data_meta["class_names"], "chance_accuracy": data_meta["chance_accuracy"],
        "tokenizer": tokenizer_spec, "tokenizer_class": type(tok).__name__,
        "vocab_hash": vocab_hash(tok), "vocab_size": len(tok), "max_length": max_length,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
        "source_sha256": data_meta["sha256"], "fedsweep_version": __version__,
        "rows": {}, "truncated_share": {}, "mean_length": {}, "sha256": {},
    }
    for split in ("train", "test"):
        df = pd.read_parquet(Path(data_dir) / f"{split}.parquet")
        texts = df["text"].astype(str).tolist()
        ids: list[list[int]] = []
        for start in range(0, len(texts), BATCH):
            enc = tok(texts[start:start + BATCH], truncation=True, max_length=max_length,
                      padding=False, return_attention_mask=False, return_token_type_ids=False)
            ids.extend(enc["input_ids"])
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        table = pa.table({
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "label": pa.array(df["label"].to_numpy(dtype=np.int64)),
        })
        path = out / f"{split}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        meta["rows"][split] = len(ids)
        meta["truncated_share"][split] = float(np.mean(lengths >= max_length)) if len(ids) else 0.0
        meta["mean_length"][split] = float(lengths.mean()) if len(ids) else 0.0
        meta["sha256"][split] = sha256_file(path)
    write_json(out / "meta.json", meta)
    return meta


@dataclass
class TokenTensors:
    """A tokenised split as dense tensors: right-padded ids [N, L], true lengths [N], labels [N].

    Held as tensors so the training loop does no per-example Python work: a batch is one gather
    of rows, sliced to the batch's longest sequence (dynamic padding) or kept at L (paper).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> "TokenTensors":
        pin = device.type == "cuda"
        move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=True)
        return TokenTensors(move(self.ids), move(self.lengths), move(self.labels), self.pad_token_id)


def load_split(tokens_dir: str | os.PathLike, split: str, width: int | None = None) -> TokenTensors:
    """Load a split as padded tensors, ``width`` columns wide (default: its longest sequence)."""
    meta = read_tokens_meta(tokens_dir)
    table = pq.read_table(Path(tokens_dir) / f"{split}.parquet")
    col = table.column("input_ids").combine_chunks()
    offsets = col.offsets.to_numpy()
    flat = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    n = len(lengths)
    width = max(int(lengths.max()) if n else 1, width or 1)
    ids = np.full((n, width), meta["pad_token_id"], dtype=np.int64)
    # Scatter the ragged rows into the padded matrix without a Python loop per row.
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    ids[rows, cols] = flat
    labels = np.array(table.column("label").to_numpy(), dtype=np.int64)  # a writable copy
    return TokenTensors(torch.from_numpy(ids), torch.from_numpy(lengths.astype(np.int64)),
                        torch.from_numpy(labels), meta["pad_token_id"])


def read_tokens_meta(tokens_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(tokens_dir) / "meta.json"
    if not path.exists():
        raise FedsweepError(f"tokens_dir {str(tokens_dir)!r} has no meta.json (run `fedsweep tokenize` first)")
    return read_json(path)
