"""Client batching (several clients trained at once by vmap) is the sequential loop's mathematics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import without_dropout
from fedsweep import FedsweepError
from fedsweep.engine import PROTOCOLS, FlatParameters
from fedsweep.rounds import train_round
from fedsweep.strategies import FedAvg
from fedsweep.grouped import ClientGroups
from fedsweep.models import build_model
from fedsweep.partition import iid_shards, write_shards
from fedsweep.tokens import load_split
from fedsweep.train import TrainConfig, run

# Expected on a CPU: vmap has no batching rule for its flash-attention kernel and loops instead.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _model(family: str, dropout: bool):
    model = build_model(family, 4, seed=2)
    return model if dropout else without_dropout(model)


def _fedavg(data, shards, *, family="tiny-bert", group=1, protocol="standard", dropout=False, rounds=2):
    """Weights, and per-round (loss sum, drift sum), of a FedAvg run with the engine's round loop."""
    model = _model(family, dropout)
    flat = FlatParameters(model)
    strategy = FedAvg(flat.data.clone())
    groups = ClientGroups(model, flat, group) if group > 1 else None
    history = []
    for r in range(1, rounds + 1):
        strategy.begin_round(sum(len(s) for s in shards))
        stats = train_round(model, flat, strategy, data, data.lengths.numpy(), shards, range(len(shards)),
                            epochs=2, batch_size=16, lr=0.05, protocol=PROTOCOLS[protocol], seed=0, round_=r,
                            bf16=False, groups=groups)
        strategy.finish_round(scratch=flat.data)
        history.append((stats.loss_sum, stats.drift_sum, stats.examples))
    return strategy.weights.clone(), history


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-albert", "tiny-distilbert"])
# the paper protocol's cases in the full run only (the quick loop keeps the standard ones)
@pytest.mark.parametrize("protocol", ["standard", pytest.param("paper", marks=pytest.mark.slow)])
def test_grouped_clients_train_what_sequential_clients_train(synth_tokens, family, protocol):
    """Groups of 3 and 1 (K=4, group 3) give the one-after-another weights, to fp32 rounding.

    The paper protocol attends to padding, so it also checks that no client's padding-token
    embedding trains (vmap's embedding backward keeps that row at zero for the first client only).
    """
    data = load_split(synth_tokens / "tokens", "train", width=32 if protocol == "paper" else None)
    shards = iid_shards(len(data), 4, seed=0)  # 64 rows each: 4 batches of 16 per epoch
    seq, seq_hist = _fedavg(data, shards, family=family, protocol=protocol)
    grp, grp_hist = _fedavg(data, shards, family=family, protocol=protocol, group=3)
    # Weights move by ~1e-1 over 2 rounds x 2 epochs x 4 steps; rounding differences stay ~1e-7.
    start = FlatParameters(_model(family, False)).data
    assert (seq - start).abs().max() > 1e-3  # the clients did train
    torch.testing.assert_close(grp, seq, rtol=0, atol=2e-6)
    for (l_seq, d_seq, n_seq), (l_grp, d_grp, n_grp) in zip(seq_hist, grp_hist):
        assert n_grp == n_seq == 4 * 2 * 64  # K x E x shard (64 = 4 full batches)
        assert l_grp == pytest.approx(l_seq, rel=1e-5)
        assert d_grp == pytest.approx(d_seq, rel=1e-4)


def test_grouped_dropout_is_reproducible_and_learns_the_same_amount(synth_tokens):
    data = load_split(synth_tokens / "tokens", "train")
    shards = iid_shards(len(data), 4, seed=0)
    a, hist_a = _fedavg(data, shards, group=4, dropout=True)
    b, _ = _fedavg(data, shards, group=4, dropout=True)
    seq, hist_seq = _fedavg(data, shards, group=1, dropout=True)
    assert torch.equal(a, b)  # the group's masks are seeded by (seed, round, members)
    assert not torch.equal(a, seq)  # ... and are another draw than each client's own
    # Another draw of the same dropout: the training loss stays within a few percent.
    assert hist_a[-1][0] == pytest.approx(hist_seq[-1][0], rel=0.05)


def test_groups_hold_equal_shards_only():
    model = build_model("tiny-bert", 2, seed=0)
    groups = ClientGroups(model, FlatParameters(model), 3)
    assert groups.plan(range(7), [64] * 7) == [[0, 1, 2], [3, 4, 5], [6]]
    assert groups.plan([0, 2, 4, 6], [64] * 4) == [[0, 2, 4], [6]]  # a rank's clients
    assert groups.plan(range(6), [10, 10, 12, 12, 12, 10]) == [[0, 1], [2, 3, 4], [5]]


def test_run_with_client_group_resumes_and_rejects_bad_values(synth_tokens, tmp_path):
    shards = tmp_path / "shards.parquet"
    write_shards(shards, iid_shards(256, 4, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    base = dict(tokens_dir=str(synth_tokens / "tokens"), shards=str(shards), model="tiny-bert", epochs=1,
                batch_size=16, lr=0.05, progress="none", client_group=2)
    straight = run(TrainConfig(out_dir=str(tmp_path / "a"), rounds=3, **base))
    run(TrainConfig(out_dir=str(tmp_path / "b"), rounds=2, **base))
    resumed = run(TrainConfig(out_dir=str(tmp_path / "b"), rounds=3, **base))  # extends round 2 to 3
    timing = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]  # differ run to run
    pd.testing.assert_frame_equal(straight.drop(columns=timing), resumed.drop(columns=timing))
    assert straight["test_accuracy"].notna().all() and np.isfinite(straight["train_loss"].iloc[1:]).all()
    # A checkpoint made with another group size is another configuration: refused, not mixed.
    with pytest.raises(FedsweepError, match=r"from a different config \(client_group: 2 != 4\)"):
        run(TrainConfig(out_dir=str(tmp_path / "b"), rounds=4, **{**base, "client_group": 4}))
    with pytest.raises(FedsweepError, match=r"client_group=0 must be a positive integer"):
        run(TrainConfig(out_dir=str(tmp_path / "c"), rounds=1, **{**base, "client_group": 0}))


def test_client_group_without_transformers_mask_api_fails_before_training(synth_tokens, tmp_path, monkeypatch):
    import fedsweep.grouped as grouped

    monkeypatch.setattr(grouped, "_bidirectional_mask", lambda: None)  # as on an older transformers
    shards = tmp_path / "shards.parquet"
    write_shards(shards, iid_shards(256, 4, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    with pytest.raises(FedsweepError, match="client_group > 1 needs transformers.masking_utils"):
        run(TrainConfig(tokens_dir=str(synth_tokens / "tokens"), shards=str(shards), model="tiny-bert",
                        out_dir=str(tmp_path / "run"), rounds=1, client_group=2, progress="none"))
    assert not (tmp_path / "run").exists()  # nothing written: the check comes before any output
