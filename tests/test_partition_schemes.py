"""Partition schemes (issue #11): shards, quantity_skew and per_client; disjoint, seeded, with the
documented class and size statistics; the CLI's flags and errors; the label in metrics and run.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedsweep import FedsweepError
from fedsweep.cli import main
from fedsweep.partition import Shards, hashed_info, label_histogram, partition, read_shards, scheme_info
from fedsweep.shard_sizes import skewed_sizes

LABELS = np.repeat(np.arange(4), 500)  # 4 balanced classes of 500 rows
SCHEME_ARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "shards": {"classes_per_client": 2},
    "quantity_skew": {"alpha": 0.5},
    "quantity_skew_lognormal": {"size_distribution": "lognormal", "sigma": 1.0},
}


def split(name, clients=8, seed=0, labels=LABELS, **extra):
    scheme = "quantity_skew" if name.startswith("quantity_skew") else name
    return partition(labels, clients, seed, scheme, **{**SCHEME_ARGS[name], **extra})


def class_counts(shards, labels=LABELS):
    return label_histogram(Shards(shards, {}), labels, int(labels.max()) + 1)


@pytest.mark.parametrize("per_client", [None, 40])
@pytest.mark.parametrize("name", list(SCHEME_ARGS))
def test_disjoint_and_seeded(name, per_client):
    shards = split(name, per_client=per_client)
    union = np.concatenate(shards)
    assert len(shards) == 8 and len(np.unique(union)) == len(union)  # no row twice
    assert union.min() >= 0 and union.max() < len(LABELS)
    again, other = split(name, per_client=per_client), split(name, seed=1, per_client=per_client)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))
    if per_client is None and name != "iid":  # these schemes use every row
        assert len(union) == len(LABELS)
    if per_client is not None:
        assert len(union) == 8 * per_client


def test_shards_scheme_classes_and_sizes():
    # 16 pieces of 125 rows; each class is exactly 4 pieces, so a client sees at most 2 classes.
    shards = split("shards")
    assert [len(s) for s in shards] == [250] * 8
    assert ((class_counts(shards) > 0).sum(1) <= 2).all()
    # Pieces of 2000 / 15 rows straddle class boundaries: at most 2 x classes_per_client classes,
    # sizes equal to within classes_per_client rows.
    three = partition(LABELS, 5, 0, "shards", classes_per_client=3)
    sizes = [len(s) for s in three]
    assert max(sizes) - min(sizes) <= 3 and sum(sizes) == 2000
    assert ((class_counts(three) > 0).sum(1) <= 6).all()
    # One piece per client, one piece per class: a client per class.
    one = partition(LABELS, 4, 0, "shards", classes_per_client=1)
    assert sorted(np.flatnonzero(class_counts(one)[k])[0] for k in range(4)) == [0, 1, 2, 3]
    assert ((class_counts(one) > 0).sum(1) == 1).all()
    # Far more skewed than iid: the dominant class holds at least half of every client's rows.
    share = class_counts(shards) / 250
    assert share.max(1).min() >= 0.5


@pytest.mark.parametrize("name", ["quantity_skew", "quantity_skew_lognormal"])
def test_quantity_skew_sizes_skewed_labels_iid(name):
    shards = split(name, clients=8)
    sizes = np.array([len(s) for s in shards])
    assert sizes.sum() == len(LABELS) and (sizes >= 1).all()
    assert sizes.max() > 3 * sizes.min()  # skewed sizes: the size weighting matters
    # i.i.d. labels: on the large shards every class is near its 1/4 share.
    counts = class_counts(shards)
    big = sizes >= 200
    assert big.any()
    assert np.abs(counts[big] / sizes[big, None] - 0.25).max() < 0.12
    # min_rows is a floor every client gets.
    floor = split(name, clients=8, min_rows=100)
    assert min(len(s) for s in floor) >= 100 and sum(len(s) for s in floor) == len(LABELS)


def test_quantity_skew_size_statistics():
    """Over many draws, Dirichlet(alpha) shares have mean 1/K and variance (1/K)(1 - 1/K)/(K alpha + 1);
    log-normal shares are all positive with the spread growing with sigma."""
    clients, alpha, rows = 4, 0.5, 100_000
    shares = np.array([skewed_sizes(rows, clients, np.random.default_rng(seed), "dirichlet", alpha=alpha, min_rows=1)
                       for seed in range(3000)]) / rows
    assert shares.mean() == pytest.approx(1 / clients, abs=1e-9)  # the sizes sum to the rows exactly
    expected_var = (1 / clients) * (1 - 1 / clients) / (clients * alpha + 1)
    assert shares[:, 0].var() == pytest.approx(expected_var, rel=0.1)
    narrow, wide = (np.array([skewed_sizes(rows, clients, np.random.default_rng(s), "lognormal", sigma=sigma)
                              for s in range(500)]).std() for sigma in (0.2, 1.5))
    assert wide > 2 * narrow


def test_per_client_gives_k_times_n_rows_and_grows_with_k():
    one, four = split("iid", clients=1, per_client=100), split("iid", clients=4, per_client=100)
    assert [len(s) for s in four] == [100] * 4 and len(one[0]) == 100
    # Weak scaling: the K=1 rows are a subset of the K=4 rows (one permutation per seed).
    assert set(one[0]) <= set(np.concatenate(four))
    # Any scheme: K x N rows in all.
    for name in ("dirichlet", "shards", "quantity_skew"):
        assert sum(len(s) for s in split(name, clients=4, per_client=100)) == 400
    assert [len(s) for s in split("shards", clients=4, per_client=100)] == [100] * 4


def test_per_client_too_large_is_a_one_line_error():
    with pytest.raises(FedsweepError) as err:
        split("iid", clients=8, per_client=300)
    assert str(err.value) == "partition: per_client=300 x K=8 needs 2400 rows; the data set has 2000"


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "shards", "classes_per_client": 0}, "classes_per_client=0"),
    ({"scheme": "shards", "classes_per_client": 300}, "needs 2400 pieces"),
    ({"scheme": "quantity_skew", "alpha": None}, "needs alpha > 0"),
    ({"scheme": "quantity_skew", "size_distribution": "lognormal"}, "needs sigma > 0"),
    ({"scheme": "quantity_skew", "size_distribution": "zipf", "alpha": 1.0}, "size_distribution='zipf'"),
    ({"scheme": "quantity_skew", "alpha": 1.0, "min_rows": 300}, "min_rows=300 x clients=8 needs 2400"),
    ({"scheme": "iid", "per_client": 0}, "per_client=0"),
])
def test_scheme_errors(kwargs, message):
    with pytest.raises(FedsweepError, match=message):
        partition(LABELS, 8, 0, **kwargs)


def test_metadata_kind_and_old_hash():
    assert scheme_info("iid") == {"scheme": "iid", "alpha": None, "per_client": None, "kind": "fixed_total"}
    assert scheme_info("shards", classes_per_client=3, per_client=50) == {
        "scheme": "shards", "alpha": None, "classes_per_client": 3, "per_client": 50, "kind": "per_client"}
    assert scheme_info("quantity_skew", size_distribution="lognormal", sigma=0.5, min_rows=2) == {
        "scheme": "quantity_skew", "alpha": None, "size_distribution": "lognormal", "min_rows": 2, "sigma": 0.5,
        "per_client": None, "kind": "fixed_total"}
    # What train.py hashes for an iid/Dirichlet file is what a file of an earlier version held.
    old = {"scheme": "dirichlet", "seed": 0, "alpha": 0.5, "train_rows": 10, "dropped": 0}
    assert hashed_info({**old, **scheme_info("dirichlet", 0.5)}) == old
    assert hashed_info({**old, **scheme_info("dirichlet", 0.5, per_client=5)})["kind"] == "per_client"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from fedsweep.data import prepare

    root = tmp_path_factory.mktemp("partition_cli")
    prepare("synth", {"source": "synthetic", "num_classes": 4, "train_size": 200, "test_size": 40,
                      "difficulty": 0.3, "seed": 1}, root / "data")
    return root / "data"


@pytest.mark.parametrize("flags, info", [
    (["--scheme", "shards", "--classes-per-client", "1"], {"scheme": "shards", "classes_per_client": 1}),
    (["--scheme", "quantity_skew", "--size-distribution", "lognormal", "--sigma", "0.8", "--min-rows", "5"],
     {"scheme": "quantity_skew", "size_distribution": "lognormal", "sigma": 0.8, "min_rows": 5}),
    (["--scheme", "iid", "--per-client", "20"], {"kind": "per_client", "per_client": 20, "sizes": [20] * 4}),
])
def test_cli_writes_scheme_metadata(data_dir, tmp_path, capsys, flags, info):
    out = tmp_path / "shards.parquet"
    assert main(["partition", "--data-dir", str(data_dir), "--clients", "4", "--seed", "3", *flags,
                 "--out", str(out)]) == 0
    written = read_shards(out).info
    assert {k: written[k] for k in info} == info and written["seed"] == 3
    assert written["kind"] == ("per_client" if "--per-client" in flags else "fixed_total")
    assert f"({written['kind']};" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--scheme", "zipf"], "partition: --scheme zipf is not one of iid, dirichlet, shards, quantity_skew"),
    (["--scheme", "dirichlet"], "partition: --alpha is required with --scheme dirichlet"),
    (["--scheme", "dirichlet", "--alpha", "-1"], "partition: --alpha -1.0 must be a positive number"),
    (["--scheme", "iid", "--alpha", "0.5"], "partition: --alpha 0.5 is only used with --scheme dirichlet / quantity_skew"),
    (["--scheme", "shards", "--classes-per-client", "0"], "partition: --classes-per-client 0 must be a positive integer"),
    (["--scheme", "iid", "--classes-per-client", "2"], "partition: --classes-per-client 2 is only used with --scheme shards"),
    (["--scheme", "quantity_skew", "--size-distribution", "lognormal"],
     "partition: --sigma is required with --size-distribution lognormal"),
    (["--scheme", "quantity_skew", "--size-distribution", "pareto"], "partition: --size-distribution pareto is not"),
    (["--scheme", "iid", "--size-distribution", "lognormal"],
     "partition: --size-distribution lognormal is only used with --scheme quantity_skew"),
    (["--per-client", "0"], "partition: --per-client 0 must be a positive integer"),
    (["--per-client", "60"], "partition: per_client=60 x K=4 needs 240 rows; the data set has 200"),
])
def test_cli_bad_flags_are_one_line(data_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "shards.parquet"
    assert main(["partition", "--data-dir", str(data_dir), "--clients", "4", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedsweep: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_partition_label_in_metrics_and_run_json(synth_tokens, tmp_path):
    """`fedsweep train --partition NAME`: a metrics column and run.json's "partition" (with the
    shards file's scheme and kind); not hashed, so a relabelled cell resumes its checkpoint."""
    shards = tmp_path / "shards.parquet"
    assert main(["partition", "--data-dir", str(synth_tokens / "data"), "--clients", "2", "--scheme", "iid",
                 "--per-client", "64", "--out", str(shards)]) == 0
    base = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", str(shards), "--model", "tiny-bert",
            "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--progress", "none", "--dataset", "synth"]
    assert main([*base, "--out-dir", str(tmp_path / "run"), "--rounds", "1", "--partition", "weak64"]) == 0
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert (metrics["partition"] == "weak64").all() and (metrics["test_rows"] == 96).all()
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["partition"]["name"] == "weak64" and summary["test_rows"] == 96
    assert {k: summary["partition"][k] for k in ("scheme", "kind", "per_client", "sizes")} == {
        "scheme": "iid", "kind": "per_client", "per_client": 64, "sizes": [64, 64]}
    # Another label, one more round: resumes (the label is not part of the config hash).
    assert main([*base, "--out-dir", str(tmp_path / "run"), "--rounds", "2", "--partition", "renamed"]) == 0
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["resumed_from_round"] == 1 and summary["partition"]["name"] == "renamed"
    assert main([*base, "--out-dir", str(tmp_path / "bad"), "--rounds", "1", "--partition", "a b"]) == 2


@pytest.mark.parametrize("name", ["iid", "shards", "quantity_skew", "quantity_skew_lognormal"])
@pytest.mark.parametrize("per_client", [None, 60])
def test_sizes_known_before_the_jobs_are_those_the_jobs_make(name, per_client):
    """The head node checks shards against the batch size from shard_sizes (no labels, no
    pandas); the partition job must then make exactly those sizes, for any seed and K."""
    from fedsweep.shard_sizes import shard_sizes

    scheme = "quantity_skew" if name.startswith("quantity_skew") else name
    for clients in (1, 3, 8, 32):
        for seed in (0, 1, 7):
            shards = split(name, clients=clients, seed=seed, per_client=per_client)
            settings = {"scheme": scheme, "per_client": per_client, **SCHEME_ARGS[name]}
            assert shard_sizes(settings, len(LABELS), clients, seed) == [len(s) for s in shards]
    assert shard_sizes({"scheme": "dirichlet", "alpha": 0.3}, len(LABELS), 4, 0) is None  # follows the labels


def test_a_dirichlet_job_redraws_until_every_shard_holds_a_batch():
    """The workflow passes a Dirichlet partition job, as --min-size, the rows every cell using the
    file needs for a full training batch (the other schemes' sizes are checked before any job)."""
    from fedsweep.config import load
    from helpers import small_config

    config = small_config()
    config["clients"] = [1, 4]
    config["partitions"] = {"iid": {"scheme": "iid"}, "d": {"scheme": "dirichlet", "alpha": 0.3}}
    config["overrides"] = [{"model": "tiny-bert", "clients": 4, "set": {"batch_size": 8}}]
    sweep = load(config, inputs=False)
    assert sweep.partition_args("synthetic", "d", "4", "0").endswith("--min-size 8")
    assert "--min-size" not in sweep.partition_args("synthetic", "iid", "4", "0")
    # a held-out slice needs more: 10 rows keep a batch of 8 after holding out round(0.2 x 10) = 2
    config["overrides"].append({"clients": 4, "set": {"client_holdout": 0.2}})
    assert load(config, inputs=False).partition_args("synthetic", "d", "4", "0").endswith("--min-size 10")
    skewed = partition(LABELS, 16, 0, "dirichlet", 0.2, min_size=1)
    assert min(len(s) for s in skewed) < 32  # the first draw of this seed
    redrawn = partition(LABELS, 16, 0, "dirichlet", 0.2, min_size=32)
    assert min(len(s) for s in redrawn) >= 32
    with pytest.raises(FedsweepError, match=r"left a shard below 32 examples in 100 draws; raise alpha"):
        partition(LABELS, 16, 0, "dirichlet", 0.1, min_size=32)  # what the job's one line says
