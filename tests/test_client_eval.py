"""How each client fares: the per-client accuracies and losses from one pass over the test set
equal K explicit per-client evaluations; i.i.d. shards give about the global accuracy; the run
records the summary per evaluated round; the report's table and figure read it."""

from __future__ import annotations

import math

import numpy as np
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
    keys = ["dataset", "model", "algorithm", "partition", "clients"]
    seed_rows = table[table["seed"] != "mean"]
    for _, row in table[table["seed"] == "mean"].iterrows():
        mine = seed_rows[(seed_rows[keys] == row[keys]).all(axis=1)]
        if (mine["round_used"] == row["round_used"]).all():  # the seeds' round is the mean's
            assert row["client_loss_mean"] == pytest.approx(mine["client_loss_mean"].mean())
    fig = figure_function("client_accuracy")(sweep)
    assert fig.axes and any(ax.lines for ax in fig.axes)
    # Metrics without the columns (before fedsweep recorded them): an empty column, no error.
    old = Sweep.load([str(write_tree(tmp_path / "old", CELLS))], str(tmp_path / "config.yaml"))
    assert table_function("client_accuracy")(old)["client_accuracy_mean"].isna().all()
    figure_function("client_accuracy")(old)
