"""A cell spread over 2 processes (torchrun, gloo on CPU) equals the single-process run."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fedsweep.partition import iid_shards, write_shards
from helpers import TORCHRUN, run_side_by_side

TIMING = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]  # differ run to run


def _assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame, rtol: float, name: str = "metrics") -> None:
    """Equal to ``rtol``; the update cosine to 1e-7: its direction sum is fp32 (one buffer of 4
    bytes per parameter, not 8), added in another order on 2 ranks (~1e-9 apart here)."""
    cosine = "update_cosine"
    pd.testing.assert_frame_equal(a.drop(columns=cosine), b.drop(columns=cosine), check_exact=False, rtol=rtol, atol=0,
                                  obj=name)
    pd.testing.assert_series_equal(a[cosine], b[cosine], check_exact=False, rtol=max(rtol, 1e-7), atol=0, obj=name)


@pytest.mark.slow
def test_two_ranks_equal_one_process(synth_tokens, tmp_path):
    shards = tmp_path / "k4.parquet"
    write_shards(shards, iid_shards(256, 4, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    args = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", str(shards), "--model", "tiny-bert",
            "--rounds", "3", "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--progress", "lines"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_side_by_side([sys.executable, "-m", "fedsweep", *args, "--out-dir", str(tmp_path / "one")],
              [*TORCHRUN, "-m", "fedsweep", *args, "--out-dir", str(tmp_path / "two")], env, tmp_path)
    a = pd.read_parquet(tmp_path / "one" / "metrics.parquet").drop(columns=TIMING)
    b = pd.read_parquet(tmp_path / "two" / "metrics.parquet").drop(columns=TIMING)
    # The global weights and accuracy are bitwise equal; sums over clients or test batches
    # (losses, drift norms) are added in another order, so equal to float64 rounding.
    _assert_same_metrics(a, b, 1e-12)
    assert a["test_accuracy"].equals(b["test_accuracy"])
    wa = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["weights"]
    wb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["weights"]
    assert torch.equal(wa, wb)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


DRIVER = """
import json, os, sys
import torch
from fedsweep.train import TrainConfig, run

torch.set_num_threads(1)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process group for every cell: run() leaves it open
    torch.distributed.init_process_group("gloo")
for config in json.loads(sys.argv[1]):
    run(TrainConfig(**config))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_equal_one_process_for_every_algorithm(micro, tmp_path):
    """Every algorithm of tests/test_algorithms.py (server strategies and their state, FedProx, SCAFFOLD
    with its control-variate files written by both ranks, AdamW clients, schedules, sampling) on 2 gloo
    ranks, one after another in the same two processes, and in one process. K=3 clients of 40, 64 and
    96 examples: rank 0 trains two of them (or of the sampled ones), rank 1 one.

    What is exact and what is not: each rank sums its clients' models in float64 and the all-reduce
    adds the sums, in another order than one process does (and a CPU's fused multiply-add rounds
    a product once where a rank's partial sum rounded it before the all-reduce). The float64
    averages then differ in their last bits, and their rounding to float32 (the new weights, from
    which every strategy's state is computed) practically never differs: FedAvg, every server
    strategy and SCAFFOLD (whose c is summed in client order from the files, exactly) agree to the
    bit here, except in rare elements where a float64 average falls within its last bits of an
    float32 rounding boundary: with server momentum, sampling and SCAFFOLD 1 element of 492,000
    differed in round 3 of one configuration (and later rounds then differ by ~1e-8 relative), and
    with SCAFFOLD's uniform weights (1/3 each) 2 elements in round 1 of another; since the server
    sums the clients' updates (x + sum_k w_k u_k, for adding clients by their embedding rows),
    fedadam's weights and m differ in 1 element of 492,016 by one float32 ulp (6.7e-8 relative);
    with transformers 5.25 (2026-12-07) AdamW clients' mean update norm differed by 1e-11
    relative in round 3. So: bitwise for all but those configurations, which must agree to 1e-5."""
    from algorithm_cases import ALGORITHMS

    def configs(world: str) -> str:
        return json.dumps([
            dict(tokens_dir=str(micro.tokens), shards=micro.k3, model=micro.model, rounds=3, epochs=1,
                 batch_size=16, progress="none", dataset="synth", out_dir=str(tmp_path / world / name),
                 **{"lr": 0.05, **settings, "algorithm": name})
            for name, settings in ALGORITHMS.items()])

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_side_by_side([sys.executable, str(script), configs("one")], [*TORCHRUN, str(script), configs("two")], env, tmp_path)
    near = {"sampled-scaffold-fedavgm", "scaffold-uniform", "fedadam", "adamw"}  # a last-bit flip (see above)
    for name in ALGORITHMS:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        a = pd.read_parquet(one / "metrics.parquet").drop(columns=TIMING)
        b = pd.read_parquet(two / "metrics.parquet").drop(columns=TIMING)
        _assert_same_metrics(a, b, 1e-6 if name in near else 1e-12, name)
        assert a["test_accuracy"].equals(b["test_accuracy"]), name
        ca = torch.load(one / "checkpoint.pt", weights_only=False)
        cb = torch.load(two / "checkpoint.pt", weights_only=False)
        pairs = [("weights", ca["weights"], cb["weights"])]
        for part in ("server_state", "client_state"):
            assert ca[part].keys() == cb[part].keys()
            pairs += [(f"{part}.{k}", ca[part][k], cb[part][k]) for k in ca[part]]
        if (one / "scaffold").exists():
            files = sorted(p.name for p in (one / "scaffold").iterdir())
            assert files and files == sorted(p.name for p in (two / "scaffold").iterdir())
            pairs += [(f, torch.from_numpy(np.fromfile(one / "scaffold" / f, dtype=np.float32)),
                       torch.from_numpy(np.fromfile(two / "scaffold" / f, dtype=np.float32))) for f in files]
        for what, x, y in pairs:
            if name in near:
                scale = float(x.abs().max()) if x.is_floating_point() else 0.0
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * scale, msg=f"{name} {what}")
            else:
                assert torch.equal(x, y), (name, what)
        assert json.loads((two / "run.json").read_text())["world_size"] == 2
