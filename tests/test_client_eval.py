"""How each client fares: the per-client accuracies and losses from one pass over the test set
equal K explicit per-client evaluations; i.i.d. shards give about the global accuracy; the run
records the summary per evaluated round; the report's table and figure read it."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedsweep import client_eval
from fedsweep.engine import PROTOCOLS, batches_on_device, eval_batches, evaluate, evaluate_classes
from fedsweep.models import build_model
from fedsweep.partition import iid_shards, label_sorted_shards, write_shards
from fedsweep.tokens import load_split

PROTOCOL = PROTOCOLS["standard"]


def _explicit(model, test, batches, lengths, distribution):
    """Client k's accuracy and loss the direct way: every test example of the batches weighted by
    p_k(label) / n_label (n over the evaluated examples), a weighted average."""
    with torch.inference_mode():
        losses, hits, labels = [], [], []
        for ids, mask, y in batches_on_device(test, lengths, batches, PROTOCOL):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            losses.append(F.cross_entropy(logits, y, reduction="none").double())
            hits.append((logits.argmax(-1) == y).double())
            labels.append(y)
    loss, hit, y = torch.cat(losses).numpy(), torch.cat(hits).numpy(), torch.cat(labels).numpy()
    n = np.bincount(y, minlength=len(distribution)).astype(np.float64)
    weight = distribution[y] / n[y]
    return float((weight * hit).sum() / weight.sum()), float((weight * loss).sum() / weight.sum())


@pytest.fixture(scope="module")
def tiny(synth_tokens):
    model = build_model("tiny-bert", 4, seed=3)
    train, test = load_split(synth_tokens / "tokens", "train"), load_split(synth_tokens / "tokens", "test")
    return model, train.labels.numpy(), test


@pytest.mark.parametrize("drop_class", [None, 3])
def test_one_pass_equals_explicit_per_client_evaluation(tiny, drop_class):
    model, train_labels, test = tiny
    lengths = test.lengths.numpy()
    rows = np.arange(len(test)) if drop_class is None else np.flatnonzero(test.labels.numpy() != drop_class)
    batches = [rows[b] for b in eval_batches(lengths[rows], 16)]  # a class absent: the weights renormalise
    shards = label_sorted_shards(train_labels, 4, seed=0) + iid_shards(256, 2, 1)  # skewed and i.i.d. clients
    distributions = client_eval.label_distributions(train_labels, shards, 4)
    sums = evaluate_classes(model, test, batches, lengths, PROTOCOL, False, num_classes=4)
    accuracy, loss = client_eval.per_client(distributions, sums.correct_c.numpy(), sums.loss_c.numpy(),
                                            sums.count_c.numpy())
    for k, p in enumerate(distributions):
        want_accuracy, want_loss = _explicit(model, test, batches, lengths, p)
        assert accuracy[k] == pytest.approx(want_accuracy, abs=1e-12)
        assert loss[k] == pytest.approx(want_loss, abs=1e-12)
    # The per-class sums add up to the global ones, and evaluate's total loss is unchanged.
    correct, loss_sum = evaluate(model, test, batches, lengths, PROTOCOL, False)
    assert int(sums.correct_c.sum()) == correct and int(sums.count_c.sum()) == len(rows)
    # the total sums each batch's losses in fp32 (as before), the per-class sums per example in fp64
    assert float(sums.loss_c.sum()) == pytest.approx(loss_sum, rel=1e-6)
    if drop_class is not None:
        assert int(sums.count_c[drop_class]) == 0
        assert np.isfinite(accuracy).all()  # the label-sorted clients holding class 3 still get a number


def test_a_client_with_no_class_in_the_test_set_gets_nan():
    accuracy, loss = client_eval.per_client(np.array([[0.0, 1.0], [0.5, 0.5]]), np.array([3, 0]),
                                            np.array([1.5, 0.0]), np.array([4, 0]))
    assert math.isnan(accuracy[0]) and math.isnan(loss[0])
    assert accuracy[1] == 0.75 and loss[1] == 0.375
    assert client_eval.summary(accuracy, loss)["client_accuracy_min"] == 0.75  # NaN clients left out


def test_iid_clients_get_about_the_global_accuracy():
    rng = np.random.default_rng(0)
    train_labels = rng.integers(0, 5, 50_000)
    test_count = np.bincount(rng.integers(0, 5, 10_000), minlength=5)
    correct = np.round(test_count * np.array([0.9, 0.2, 0.6, 0.75, 0.4])).astype(np.int64)  # unequal classes
    distributions = client_eval.label_distributions(train_labels, iid_shards(50_000, 8, 0), 5)
    accuracy, _ = client_eval.per_client(distributions, correct, np.zeros(5), test_count)
    assert np.abs(accuracy - correct.sum() / test_count.sum()).max() < 0.01
    skewed = client_eval.label_distributions(train_labels, label_sorted_shards(train_labels, 8, 0), 5)
    accuracy, _ = client_eval.per_client(skewed, correct, np.zeros(5), test_count)
    assert accuracy.min() < 0.45  # a client of the hard classes: the global accuracy hides it


def test_summary_matches_numpy():
    accuracy, loss = np.array([0.9, 0.5, 0.7, 0.8]), np.array([0.3, 1.2, 0.6, 0.5])
    got = client_eval.summary(accuracy, loss)
    assert got == {"client_accuracy_mean": pytest.approx(0.725), "client_accuracy_std": pytest.approx(accuracy.std()),
                   "client_accuracy_min": 0.5, "client_accuracy_p10": pytest.approx(0.56),
                   "client_loss_mean": pytest.approx(0.65)}


def test_run_records_the_client_columns_on_evaluated_rounds(synth_tokens, tmp_path):
    from fedsweep.train import TrainConfig, run

    labels = load_split(synth_tokens / "tokens", "train").labels.numpy()
    shards = str(tmp_path / "sorted.parquet")
    write_shards(shards, label_sorted_shards(labels, 4, 0), {"scheme": "label_sorted", "seed": 0, "train_rows": 256})
    m = run(TrainConfig(tokens_dir=str(synth_tokens / "tokens"), shards=shards, model="tiny-bert",
                        out_dir=str(tmp_path / "out"), rounds=3, eval_every=2, epochs=1, batch_size=16, lr=0.05,
                        progress="none", dataset="synth"))
    evaluated = m["test_accuracy"].notna()
    assert m["round"][evaluated].tolist() == [0, 2, 3]
    for column in client_eval.CLIENT_COLUMNS:
        assert m.loc[evaluated, column].notna().all() and m.loc[~evaluated, column].isna().all(), column
    rows = m[evaluated]
    assert (rows["client_accuracy_min"] <= rows["client_accuracy_p10"]).all()
    assert (rows["client_accuracy_p10"] <= rows["client_accuracy_mean"] + 1e-12).all()
    assert (rows["client_accuracy_std"] > 0).all()  # clients of 1-2 classes each fare differently


def test_report_table_and_figure(tmp_path):
    from test_report import CONFIG, CELLS, write_tree

    from fedsweep.report import figure_function, table_function
    from fedsweep.report.sweep import Sweep

    cells = []
    for i, frame in enumerate(CELLS):
        frame = frame.copy()
        evaluated = frame["test_accuracy"].notna()
        frame["partition"] = "dirichlet" if i % 2 else "iid"
        frame["client_accuracy_mean"] = frame["test_accuracy"] - 0.01
        frame["client_accuracy_min"] = frame["test_accuracy"] - 0.1 * frame["clients"] ** 0.5
        frame["client_accuracy_p10"] = frame["client_accuracy_min"] + 0.02
        frame["client_accuracy_std"] = np.where(evaluated, 0.05, math.nan)
        frame["client_loss_mean"] = np.where(evaluated, 0.6 + frame["round"] / 100, math.nan)
        if i % 2:  # the dirichlet cells held out a slice of each shard (client_holdout)
            for column in client_eval.HOLDOUT_COLUMNS:
                frame[column] = np.where(evaluated, frame["test_accuracy"] - 0.03 if "accuracy" in column else 0.7,
                                         math.nan)
        cells.append(frame)
    (tmp_path / "config.yaml").write_text(CONFIG)
    sweep = Sweep.load([str(write_tree(tmp_path / "results", cells))], str(tmp_path / "config.yaml"))
    table = table_function("client_accuracy")(sweep)
    assert len(table) == len(sweep.accuracy)
    frame = sweep.frame
    for _, row in table[table["seed"] != "mean"].iterrows():
        at = frame[(frame["dataset"] == row["dataset"]) & (frame["model"] == row["model"])
                   & (frame["partition"] == row["partition"]) & (frame["clients"] == row["clients"])
                   & (frame["seed"] == row["seed"]) & (frame["round"] == row["round_used"])]
        assert len(at) == 1
        assert row["client_accuracy_min"] == pytest.approx(at["client_accuracy_min"].iloc[0])
        assert row["worst_client_gap"] == pytest.approx(row["test_accuracy"] - at["client_accuracy_min"].iloc[0])
        held = at["client_holdout_accuracy_mean"].iloc[0]
        if row["partition"] == "dirichlet":
            assert row["client_holdout_accuracy_mean"] == pytest.approx(held) and not math.isnan(held)
        else:
            assert math.isnan(row["client_holdout_accuracy_mean"])
    keys = ["dataset", "model", "algorithm", "partition", "clients"]
    seed_rows = table[table["seed"] != "mean"]
    for _, row in table[table["seed"] == "mean"].iterrows():
        mine = seed_rows[(seed_rows[keys] == row[keys]).all(axis=1)]
        if (mine["round_used"] == row["round_used"]).all():  # the seeds' round is the mean's
            assert row["client_loss_mean"] == pytest.approx(mine["client_loss_mean"].mean())
    fig = figure_function("client_accuracy")(sweep)
    assert fig.axes and any(ax.lines for ax in fig.axes)
    assert any(line.get_linestyle() == ":" for ax in fig.axes for line in ax.lines)  # the held-out means
    # Metrics without the columns (before fedsweep recorded them): an empty column, no error.
    old = Sweep.load([str(write_tree(tmp_path / "old", CELLS))], str(tmp_path / "config.yaml"))
    old_table = table_function("client_accuracy")(old)
    assert old_table["client_accuracy_mean"].isna().all() and old_table["client_holdout_accuracy_mean"].isna().all()
    figure_function("client_accuracy")(old)


# ----------------------------------------------------------------------------- held-out slices (client_holdout)

def test_holdout_split_is_deterministic_disjoint_and_keeps_the_order():
    from fedsweep.engine import derive_seed
    from fedsweep.shard_sizes import holdout_rows

    shards = iid_shards(1000, 5, 0) + [np.arange(17)]
    for fraction in (0.01, 0.2, 0.49):
        for k, shard in enumerate(shards):
            kept, held = client_eval.split_holdout(shard, fraction, derive_seed(7, "holdout", k))
            again_kept, again_held = client_eval.split_holdout(shard, fraction, derive_seed(7, "holdout", k))
            assert np.array_equal(kept, again_kept) and np.array_equal(held, again_held)  # a pure function
            assert len(held) == holdout_rows(len(shard), fraction) >= 1
            assert not np.intersect1d(kept, held).size and np.array_equal(np.sort(np.concatenate([kept, held])),
                                                                          np.sort(shard))
            position = {row: i for i, row in enumerate(shard)}  # both parts in the shard's order
            assert all(np.diff([position[r] for r in part]).min(initial=1) > 0 for part in (kept, held))
            other = client_eval.split_holdout(shard, fraction, derive_seed(8, "holdout", k))[1]
            assert len(held) == 1 or not np.array_equal(held, other)  # another seed, another slice
    assert holdout_rows(16, 0.1) == 2 and holdout_rows(5, 0.01) == 1 and holdout_rows(10, 0.25) == 3
    kept, held = client_eval.split_holdout(shards[0], 0.0, 1)
    assert kept is shards[0] and len(held) == 0  # off: the shard as is


@pytest.mark.parametrize("batch_size", [16, 1000])
def test_holdout_one_pass_equals_explicit_per_client_evaluation(synth_tokens, batch_size):
    """The union pass summed per client = each client's held-out rows evaluated on their own with
    evaluate_classes. A float64 model: other batch compositions round fp32 matmuls differently,
    which is no disagreement about what is computed (this compares the bookkeeping)."""
    from fedsweep.engine import derive_seed
    from fedsweep.engine import evaluate_holdout

    train = load_split(synth_tokens / "tokens", "train")
    labels, lengths = train.labels.numpy(), train.lengths.numpy()
    model = build_model("tiny-bert", 4, seed=3).double()
    shards = label_sorted_shards(labels, 4, seed=0) + iid_shards(256, 3, 1)  # skewed and i.i.d. clients
    held = [client_eval.split_holdout(s, 0.3, derive_seed(0, "holdout", k))[1] for k, s in enumerate(shards)]
    rows = np.concatenate(held)
    owner = np.repeat(np.arange(len(held)), [len(h) for h in held])
    correct_k, loss_k, count_k = evaluate_holdout(model, train, lengths, rows, owner,
                                                  eval_batches(lengths[rows], batch_size), len(held), PROTOCOL, False)
    accuracy, loss = client_eval.holdout_per_client(correct_k, loss_k, count_k)
    for k, h in enumerate(held):
        sums = evaluate_classes(model, train, [h[b] for b in eval_batches(lengths[h], 5)], lengths, PROTOCOL, False,
                                num_classes=4)
        n = int(sums.count_c.sum())
        assert count_k[k] == n == len(h) and correct_k[k] == int(sums.correct_c.sum())
        assert accuracy[k] == pytest.approx(int(sums.correct_c.sum()) / n, abs=1e-12)
        assert loss[k] == pytest.approx(float(sums.loss_c.sum()) / n, abs=1e-12)
    summary = client_eval.summary(accuracy, loss, client_eval.HOLDOUT_COLUMNS)
    assert list(summary) == list(client_eval.HOLDOUT_COLUMNS)
    assert summary["client_holdout_accuracy_min"] == accuracy.min()
    # ranks splitting the batches: their sums add up to the one pass's
    batches = eval_batches(lengths[rows], 16)
    parts = [evaluate_holdout(model, train, lengths, rows, owner, batches[r::3], len(held), PROTOCOL, False)
             for r in range(3)]
    assert np.array_equal(sum(p[0] for p in parts), correct_k) and np.array_equal(sum(p[2] for p in parts), count_k)
    assert np.allclose(sum(p[1] for p in parts), loss_k, rtol=0, atol=1e-9)


def _holdout_run(synth_tokens, tmp_path, name, shards, **kw):
    from fedsweep.train import TrainConfig, run

    settings = dict(rounds=1, epochs=1, batch_size=16, lr=0.05, progress="none", dataset="synth")
    return run(TrainConfig(tokens_dir=str(synth_tokens / "tokens"), shards=shards, model="tiny-bert",
                           out_dir=str(tmp_path / name), **{**settings, **kw}))


def test_holdout_run_trains_on_the_rest_and_records_the_columns(synth_tokens, tmp_path):
    """With client_holdout, a run trains exactly as a plain run on the shards' training parts
    (bitwise), and records the held-out columns on its evaluated rounds."""
    from fedsweep.engine import derive_seed

    timing = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]
    labels = load_split(synth_tokens / "tokens", "train").labels.numpy()
    shards = label_sorted_shards(labels, 2, 0)
    info = {"scheme": "label_sorted", "seed": 0, "train_rows": 256}
    write_shards(tmp_path / "full.parquet", shards, info)
    kept = [client_eval.split_holdout(s, 0.25, derive_seed(0, "holdout", k))[0] for k, s in enumerate(shards)]
    write_shards(tmp_path / "kept.parquet", kept, info)
    held = _holdout_run(synth_tokens, tmp_path, "held", str(tmp_path / "full.parquet"), client_holdout=0.25)
    plain = _holdout_run(synth_tokens, tmp_path, "plain", str(tmp_path / "kept.parquet"))
    same = [c for c in held.columns if c not in timing and c not in client_eval.HOLDOUT_COLUMNS]
    pd.testing.assert_frame_equal(held[same], plain[same], check_exact=True)
    assert plain[list(client_eval.HOLDOUT_COLUMNS)].isna().all().all()  # off: NaN
    assert held[list(client_eval.HOLDOUT_COLUMNS)].notna().all().all()  # every round evaluated here
    assert (held["client_holdout_accuracy_min"] <= held["client_holdout_accuracy_mean"]).all()
    assert held["examples"].iloc[1] == sum(len(k) for k in kept)  # the clients trained on the rest only
    run_json = json.loads((tmp_path / "held" / "run.json").read_text())
    assert run_json["config"]["client_holdout"] == 0.25


def test_holdout_zero_changes_nothing(synth_tokens, tmp_path):
    """client_holdout=0 (the default) is the run as before it existed: the same metrics, bitwise,
    NaN held-out columns, and the same config hash (its checkpoints resume)."""
    from fedsweep.train import TrainConfig, _hashed_config, _read_inputs

    timing = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]
    write_shards(tmp_path / "iid.parquet", iid_shards(256, 2, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    default = _holdout_run(synth_tokens, tmp_path, "default", str(tmp_path / "iid.parquet"))
    zero = _holdout_run(synth_tokens, tmp_path, "zero", str(tmp_path / "iid.parquet"), client_holdout=0.0)
    keep = [c for c in default.columns if c not in timing]
    pd.testing.assert_frame_equal(default[keep], zero[keep], check_exact=True)
    assert default[list(client_eval.HOLDOUT_COLUMNS)].isna().all().all()
    cfg = TrainConfig(tokens_dir=str(synth_tokens / "tokens"), shards=str(tmp_path / "iid.parquet"), model="tiny-bert",
                      out_dir=str(tmp_path / "x"), rounds=2)
    cfg.validate()
    assert "client_holdout" not in _hashed_config(cfg, _read_inputs(cfg))
    cfg.client_holdout = 0.1
    assert _hashed_config(cfg, _read_inputs(cfg))["client_holdout"] == 0.1  # on: hashed


def test_holdout_errors_are_one_line_before_any_compute(synth_tokens, tmp_path):
    from fedsweep import FedsweepError
    from fedsweep.config import load
    from helpers import small_config

    write_shards(tmp_path / "iid.parquet", iid_shards(256, 8, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    with pytest.raises(FedsweepError) as err:  # shards of 32: 10 held out, 22 left
        _holdout_run(synth_tokens, tmp_path, "e", str(tmp_path / "iid.parquet"), client_holdout=0.3, batch_size=24)
    assert str(err.value) == ("train: client_holdout=0.3 leaves client 0 with 22 of its 32 rows to train on, no full "
                              "batch of batch_size=24")
    assert not (tmp_path / "e" / "checkpoint.pt").exists() and not (tmp_path / "e" / "metrics.parquet").exists()
    config = small_config()
    config["clients"] = [1, 8]  # 128 synthetic rows: K=8 makes shards of 16, a batch exactly
    config["train"]["client_holdout"] = 0.1
    with pytest.raises(FedsweepError) as err:
        load(config, tmp_path)
    assert str(err.value) == ("config: client_holdout=0.1 leaves client 0 with 14 of its 16 rows to train on, no full "
                              "batch of batch_size=16 (model tiny-bert, datasets.synthetic, partition iid, K=8, "
                              "seed=0); lower client_holdout or clients")
    config["clients"] = [1, 4]  # shards of 32: 29 rows train, 3 held out
    load(config, tmp_path)
