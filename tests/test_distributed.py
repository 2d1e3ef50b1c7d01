"""A cell spread over 2 processes (torchrun, gloo on CPU) equals the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import torch

from fedsweep.partition import iid_shards, write_shards

TIMING = ["train_seconds", "aggregate_seconds", "eval_seconds"]


def test_two_ranks_equal_one_process(synth_tokens, tmp_path):
    shards = tmp_path / "k4.parquet"
    write_shards(shards, iid_shards(256, 4, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    args = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", str(shards), "--model", "tiny-bert",
            "--rounds", "3", "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--progress", "lines"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "fedsweep", *args, "--out-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "fedsweep", *args, "--out-dir", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "one" / "metrics.parquet").drop(columns=TIMING)
    b = pd.read_parquet(tmp_path / "two" / "metrics.parquet").drop(columns=TIMING)
    # The global weights and accuracy are bitwise equal; sums over clients or test batches
    # (losses, drift norms) are added in another order, so equal to float64 rounding.
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12, atol=0)
    assert a["test_accuracy"].equals(b["test_accuracy"])
    wa = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["weights"]
    wb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["weights"]
    assert torch.equal(wa, wb)
    import json

    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
