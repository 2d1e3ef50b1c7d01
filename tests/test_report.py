"""The report: tables (accuracy at the budget, rounds to target) and figures from synthetic metrics."""

from __future__ import annotations

import json
import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from fedsweep import FedsweepError
from fedsweep.cli import main
from fedsweep.report import FIGURES, TABLES, make_report

CONFIG = """
target_fraction: 0.9
datasets:
  imdb: {budget: 10, second_threshold: 20, max_length: 128}
  ag_news: {budget: 10, second_threshold: 20}
models: [tiny, small]
"""


def cell(dataset, model, clients, seed, rounds, accuracy, eval_every=1, chance=0.5):
    """A metrics frame as train.run writes it; ``accuracy(r)`` on evaluated rounds, NaN elsewhere."""
    rows = []
    for r in range(rounds + 1):
        evaluated = r % eval_every == 0 or r == rounds
        rows.append({
            "dataset": dataset, "model": model, "clients": clients, "seed": seed, "protocol": "standard",
            "num_classes": 2, "chance_accuracy": chance, "round": r,
            "test_accuracy": accuracy(r) if evaluated else math.nan, "test_loss": 0.5,
            "train_loss": math.nan if r == 0 else 0.4, "examples": 0 if r == 0 else 100,
            "train_seconds": 0.1, "aggregate_seconds": 0.01, "eval_seconds": 0.02,
            "client_update_norm": 1.0, "mean_update_norm": 1.0,
        })
    return pd.DataFrame(rows)


def linear(start, slope, cap=1.0):
    return lambda r: min(start + slope * r, cap)


CELLS = [
    # imdb/tiny, two seeds. Seed 0: K=1 is 0.9 at the budget -> target 0.81; K=2 reaches it at 16; K=8 never.
    cell("imdb", "tiny", 1, 0, 20, linear(0.5, 0.04, 0.9)),
    cell("imdb", "tiny", 2, 0, 20, linear(0.5, 0.02)),
    cell("imdb", "tiny", 8, 0, 20, linear(0.5, 0.001)),
    cell("imdb", "tiny", 1, 1, 20, linear(0.5, 0.03, 0.8)),
    cell("imdb", "tiny", 2, 1, 20, linear(0.5, 0.02)),
    cell("imdb", "tiny", 8, 1, 20, linear(0.5, 0.001)),
    # imdb/small: K=2 missing, evaluated every 5 rounds (NaN rows between).
    cell("imdb", "small", 1, 0, 20, linear(0.6, 0.03, 0.9), eval_every=5),
    cell("imdb", "small", 4, 0, 20, linear(0.6, 0.02), eval_every=5),
    # ag_news/tiny: K=4 stopped at round 6 (partial); chance 0.25 (4 classes).
    cell("ag_news", "tiny", 1, 0, 20, linear(0.25, 0.05, 0.85), chance=0.25),
    cell("ag_news", "tiny", 4, 0, 6, linear(0.25, 0.04), chance=0.25),
    # ag_news/small: no K=1 cell, so no baseline.
    cell("ag_news", "small", 2, 0, 20, linear(0.25, 0.03), chance=0.25),
]


def write_tree(root, cells):
    for frame in cells:
        first = frame.iloc[0]
        out = root / first["dataset"] / first["model"] / str(first.get("algorithm", "")) / f"K{first['clients']}" \
            / f"seed{first['seed']}"
        out.mkdir(parents=True)
        frame.to_parquet(out / "metrics.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    results = write_tree(tmp / "results", CELLS)
    for k in (1, 8):  # layer drift (the layer_drift figure) beside two cells
        pd.DataFrame([("imdb", "tiny", k, 0, r, g, "relative_drift", 0.0 if k == 1 else 0.01 * r)
                      for r in range(1, 21) for g in ("embeddings", "block 0", "head")],
                     columns=["dataset", "model", "clients", "seed", "round", "group", "metric", "value"]
                     ).to_parquet(results / "imdb" / "tiny" / f"K{k}" / "seed0" / "layers.parquet")
    (tmp / "config.yaml").write_text(CONFIG)
    outputs = make_report([str(results)], str(tmp / "config.yaml"), str(tmp / "tables"), str(tmp / "figures"))
    return {"outputs": outputs, "tmp": tmp,
            "accuracy": pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str}),
            "rounds": pd.read_csv(outputs["rounds_to_target"], dtype={"seed": str})}


def row(table, dataset, model, clients, seed):
    hit = table[(table["dataset"] == dataset) & (table["model"] == model) & (table["clients"] == clients)
                & (table["seed"] == str(seed))]
    assert len(hit) == 1, (dataset, model, clients, seed)
    return hit.iloc[0]


def test_accuracy_at_budget_table(report):
    table = report["accuracy"]
    assert list(table.columns) == ["model", "algorithm", "partition", "kind", "dataset", "clients", "seed", "budget",
                                   "round_used", "accuracy", "accuracy_std", "ci95_low", "ci95_high", "ci95",
                                   "binomial_se", "test_rows", "baseline_accuracy", "ratio", "baseline_algorithm",
                                   "baseline_partition", "chance_accuracy", "seeds", "diverged_round"]
    assert set(table["partition"]) == {"iid"} and set(table["kind"]) == {"fixed_total"}  # files before partitions
    assert set(table["algorithm"]) == {"fedavg"}  # metrics without the column are FedAvg's
    # 11 seed rows + one "mean" row per (model, dataset, K): 8 cells.
    assert len(table) == 11 + 8
    assert table["accuracy"].between(0, 1).all()
    assert list(table["dataset"].unique()) == ["imdb", "ag_news"]  # config order
    for _, r in table[table["clients"] == 1].iterrows():
        assert r["ratio"] == pytest.approx(1.0)
    k2 = row(table, "imdb", "tiny", 2, 0)
    assert (k2["round_used"], k2["accuracy"], k2["baseline_accuracy"]) == (10, pytest.approx(0.7), pytest.approx(0.9))
    assert k2["ratio"] == pytest.approx(0.7 / 0.9)
    # Seed 1 is compared with its own K=1 seed (0.8), the mean row with the K=1 mean curve (0.85).
    assert row(table, "imdb", "tiny", 2, 1)["ratio"] == pytest.approx(0.7 / 0.8)
    mean = row(table, "imdb", "tiny", 2, "mean")
    assert (mean["seeds"], mean["baseline_accuracy"], mean["ratio"]) == (2, pytest.approx(0.85), pytest.approx(0.7 / 0.85))
    # A run that stopped before the budget says so.
    partial = row(table, "ag_news", "tiny", 4, 0)
    assert partial["round_used"] == 6 < partial["budget"] == 10
    assert partial["accuracy"] == pytest.approx(0.25 + 0.04 * 6)
    assert partial["chance_accuracy"] == 0.25
    # No K=1 cell: NaN baseline and ratio, not an error.
    orphan = row(table, "ag_news", "small", 2, 0)
    assert math.isnan(orphan["baseline_accuracy"]) and math.isnan(orphan["ratio"])
    assert row(table, "imdb", "small", 4, 0)["accuracy"] == pytest.approx(0.8)


def test_rounds_to_target_table(report):
    table = report["rounds"]
    assert list(table.columns) == ["model", "algorithm", "partition", "kind", "dataset", "clients", "seed",
                                   "target_accuracy", "rounds", "reached", "searched_until", "status", "seeds",
                                   "seeds_reached", "rounds_min", "rounds_max"]
    # Hand-computed: target 0.9 * 0.9 = 0.81; K=2 is 0.5 + 0.02 r >= 0.81 first at r = 16, K=1 at r = 8.
    k2 = row(table, "imdb", "tiny", 2, 0)
    assert k2["target_accuracy"] == pytest.approx(0.81)
    assert (k2["rounds"], bool(k2["reached"]), k2["status"]) == (16, True, "reached at round 16")
    assert row(table, "imdb", "tiny", 1, 0)["rounds"] == 8
    # Evaluated only every 5 rounds: the first evaluated round at or above 0.81 (0.6 + 0.03 r) is 10, not 7.
    assert row(table, "imdb", "small", 1, 0)["rounds"] == 10
    # The failure: K=8 never reaches the target within the second threshold.
    fail = row(table, "imdb", "tiny", 8, 0)
    assert not fail["reached"] and pd.isna(fail["rounds"]) and fail["searched_until"] == 20
    assert fail["status"] == "not reached by round 20"
    # A partial run is searched only as far as it ran, and the status says why.
    partial = row(table, "ag_news", "tiny", 4, 0)
    assert partial["searched_until"] == 6 and not partial["reached"]
    assert partial["status"] == "not reached by round 6 (run ended before round 20)"
    assert row(table, "ag_news", "small", 2, 0)["status"] == "no K=1 baseline"
    assert (table.loc[table["reached"], "rounds"] >= 1).all()
    assert (table["searched_until"] <= 20).all()


def test_figures_written_and_readable(report):
    outputs = report["outputs"]
    assert set(outputs) == {*TABLES, "datasets"} | {
        f"{name}_{ext}" for name in FIGURES for ext in ("png", "pdf")}
    for name in FIGURES:
        pdf = outputs[f"{name}_pdf"]
        assert pdf.read_bytes()[:5] == b"%PDF-"
        image = matplotlib.image.imread(outputs[f"{name}_png"])
        height, width = image.shape[:2]
        assert width == pytest.approx(7 * 200, abs=2) and 600 < height < 2400
        assert image[..., :3].std() > 0.05  # not a blank canvas
    leftovers = [p.name for p in (report["tmp"] / "figures").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_cli_report_subset(tmp_path, capsys):
    """One data set, one model, K=1 and K=4 only; metrics given as files; via the CLI."""
    cells = [c for c in CELLS if c["dataset"].iloc[0] == "ag_news" and c["model"].iloc[0] == "tiny"]
    results = write_tree(tmp_path / "results", cells)
    (tmp_path / "config.yaml").write_text(CONFIG)
    files = sorted(str(p) for p in results.rglob("metrics.parquet"))
    argv = ["report", "--metrics", *files, "--config", str(tmp_path / "config.yaml"),
            "--tables-dir", str(tmp_path / "tables"), "--figures-dir", str(tmp_path / "figures")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rounds_to_target_png"].endswith("rounds_to_target.png")
    table = pd.read_csv(tmp_path / "tables" / "accuracy_at_budget.csv", dtype={"seed": str})
    assert sorted(table["clients"].unique()) == [1, 4] and set(table["dataset"]) == {"ag_news"}
    assert all((tmp_path / "figures" / f"{name}.png").stat().st_size > 0 for name in FIGURES)


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(CONFIG)
    config = str(tmp_path / "config.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedsweepError, match="no metrics.parquet under.*empty"):
        make_report([str(empty)], config, str(tmp_path / "t"), str(tmp_path / "f"))
    assert main(["report", "--metrics", str(empty), "--config", config, "--tables-dir", str(tmp_path / "t"),
                 "--figures-dir", str(tmp_path / "f")]) == 2
    assert "no metrics.parquet under" in capsys.readouterr().err

    broken = tmp_path / "broken" / "metrics.parquet"
    broken.parent.mkdir()
    CELLS[0].drop(columns=["test_accuracy"]).to_parquet(broken)
    with pytest.raises(FedsweepError, match="lacks column 'test_accuracy'"):
        make_report([str(broken)], config, str(tmp_path / "t"), str(tmp_path / "f"))

    good = write_tree(tmp_path / "good", CELLS[:1])
    (tmp_path / "nobudget.yaml").write_text("datasets:\n  imdb: {second_threshold: 20}\n")
    with pytest.raises(FedsweepError, match=r"datasets\.imdb\.budget=None"):
        make_report([str(good)], str(tmp_path / "nobudget.yaml"), str(tmp_path / "t"), str(tmp_path / "f"))
    (tmp_path / "other.yaml").write_text("datasets:\n  yelp_review_full: {budget: 5, second_threshold: 10}\n")
    with pytest.raises(FedsweepError, match="no datasets.imdb"):
        make_report([str(good)], str(tmp_path / "other.yaml"), str(tmp_path / "t"), str(tmp_path / "f"))
    with pytest.raises(FedsweepError, match="does not exist"):
        make_report([str(tmp_path / "missing")], config, str(tmp_path / "t"), str(tmp_path / "f"))
    assert not (tmp_path / "t").exists()  # nothing written on bad input


def test_duplicate_cell_rejected(tmp_path):
    (tmp_path / "config.yaml").write_text(CONFIG)
    write_tree(tmp_path / "a", CELLS[:1])
    write_tree(tmp_path / "b", CELLS[:1])
    with pytest.raises(FedsweepError, match="more than once"):
        make_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "config.yaml"),
                    str(tmp_path / "t"), str(tmp_path / "f"))
    # The same file named twice (directly and through its folder) is not a duplicate.
    file = next((tmp_path / "a").rglob("metrics.parquet"))
    outputs = make_report([str(tmp_path / "a"), str(file)], str(tmp_path / "config.yaml"),
                          str(tmp_path / "t"), str(tmp_path / "f"))
    table = pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str})
    assert list(table["seed"]) == ["0", "mean"] and np.allclose(table["ratio"], 1.0)


def test_datasets_sidecar_names_the_classes_from_run_json(tmp_path):
    """tables/datasets.json: each data set's label mapping, from the run.json beside its metrics."""
    import json

    from fedsweep.report.load import dataset_labels

    run = tmp_path / "runs" / "news" / "tiny" / "K1_seed0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"class_names": ["World", "Sports"], "data_sha256": {"train": "ab"}}))
    frame = pd.DataFrame({"dataset": ["news", "other"], "source": [str(run / "metrics.parquet"),
                                                                   str(tmp_path / "x" / "metrics.parquet")]})
    assert dataset_labels(frame) == {"news": {"class_names": ["World", "Sports"], "data_sha256": {"train": "ab"}}}


def test_algorithms_are_a_dimension_of_tables_and_figures(tmp_path):
    """Cells of several algorithms: a row per (model, algorithm, data set, K, seed); each algorithm is
    compared with its own K=1 cell, or with FedAvg's where it has none; files without the column are
    FedAvg's; the same cell under two algorithms is not a duplicate; the figures facet by model."""

    def algorithm(frame, name):
        return frame.assign(algorithm=name)

    cells = [
        cell("imdb", "tiny", 1, 0, 20, linear(0.5, 0.04, 0.9)),  # no algorithm column: fedavg
        cell("imdb", "tiny", 4, 0, 20, linear(0.5, 0.01)),
        algorithm(cell("imdb", "tiny", 1, 0, 20, linear(0.5, 0.03, 0.8)), "fedadam"),
        algorithm(cell("imdb", "tiny", 4, 0, 20, linear(0.5, 0.02)), "fedadam"),
        algorithm(cell("imdb", "tiny", 4, 0, 20, linear(0.5, 0.03)), "scaffold"),  # no K=1 of its own
        algorithm(cell("imdb", "small", 1, 0, 20, linear(0.6, 0.03, 0.9)), "fedavg"),
        algorithm(cell("imdb", "small", 4, 0, 20, linear(0.6, 0.02)), "scaffold"),
    ]
    write_tree(tmp_path / "results", cells)
    (tmp_path / "config.yaml").write_text(CONFIG)
    outputs = make_report([str(tmp_path / "results")], str(tmp_path / "config.yaml"), str(tmp_path / "tables"),
                          str(tmp_path / "figures"))
    table = pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str})
    seeds = table[table["seed"] != "mean"]
    assert list(zip(seeds["model"], seeds["algorithm"], seeds["clients"])) == [
        ("small", "fedavg", 1), ("small", "scaffold", 4),
        ("tiny", "fedavg", 1), ("tiny", "fedavg", 4), ("tiny", "fedadam", 1), ("tiny", "fedadam", 4),
        ("tiny", "scaffold", 4)]  # FedAvg first, the others by name

    def one(model, name, clients):
        hit = seeds[(seeds["model"] == model) & (seeds["algorithm"] == name) & (seeds["clients"] == clients)]
        assert len(hit) == 1
        return hit.iloc[0]

    adam = one("tiny", "fedadam", 4)  # its own K=1: 0.8 at the budget
    assert (adam["baseline_algorithm"], adam["baseline_accuracy"]) == ("fedadam", pytest.approx(0.8))
    assert adam["ratio"] == pytest.approx(0.7 / 0.8)
    scaffold = one("tiny", "scaffold", 4)  # no K=1 of its own: FedAvg's, 0.9
    assert (scaffold["baseline_algorithm"], scaffold["baseline_accuracy"]) == ("fedavg", pytest.approx(0.9))
    assert scaffold["ratio"] == pytest.approx(0.8 / 0.9)
    assert one("small", "scaffold", 4)["ratio"] == pytest.approx(0.8 / 0.9)
    rounds = pd.read_csv(outputs["rounds_to_target"], dtype={"seed": str})
    assert set(rounds["algorithm"]) == {"fedavg", "fedadam", "scaffold"}
    target = rounds[(rounds["algorithm"] == "fedadam") & (rounds["clients"] == 4) & (rounds["seed"] == "0")].iloc[0]
    assert target["target_accuracy"] == pytest.approx(0.72) and target["rounds"] == 11  # 0.5 + 0.02 r >= 0.72
    for name in FIGURES:
        image = matplotlib.image.imread(outputs[f"{name}_png"])
        assert image.shape[1] == pytest.approx(7 * 200, abs=2) and image[..., :3].std() > 0.05
    # two models in rows, one data set in columns: taller than the one-algorithm figure of one data set
    assert matplotlib.image.imread(outputs["accuracy_vs_clients_png"]).shape[0] > 2.5 * 2 * 200


# ----------------------------------------------------------------------------- seeds, partitions, partial grids


def write_cells(root, cells, run_json=None):
    """Like write_tree, with the partition as a path level and an optional run.json beside each file."""
    for frame in cells:
        first = frame.iloc[0]
        out = root / first["dataset"] / first["model"] / str(first.get("partition", "iid")) \
            / str(first.get("algorithm", "fedavg")) / f"K{first['clients']}_seed{first['seed']}"
        out.mkdir(parents=True)
        frame.to_parquet(out / "metrics.parquet", index=False)
        if run_json is not None:
            (out / "run.json").write_text(json.dumps(run_json(first)))
    return root


def constant(value):
    return lambda r: value if r >= 1 else 0.5


def test_seed_summary_matches_hand_computation():
    from fedsweep.report.analysis import binomial_se, seed_summary

    summary = seed_summary([0.80, 0.84, 0.82])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) x s / sqrt(n)
    assert summary["mean"] == pytest.approx(0.82) and summary["std"] == pytest.approx(0.02)
    assert summary["ci95_half_width"] == pytest.approx(half, rel=1e-9)
    assert (summary["ci95_low"], summary["ci95_high"]) == (pytest.approx(0.82 - half), pytest.approx(0.82 + half))
    assert summary["ci95"] == ""
    one = seed_summary([0.8])
    assert one["ci95"] == "1 seed" and one["mean"] == 0.8 and math.isnan(one["ci95_low"]) and math.isnan(one["std"])
    assert seed_summary([])["ci95"] == "no seeds"
    # two seeds far apart: t = 12.7, the interval clipped to an accuracy's range, and said so
    wide = seed_summary([0.3, 0.7], (0.0, 1.0))
    assert (wide["ci95_low"], wide["ci95_high"]) == (0.0, 1.0) and wide["ci95"] == "clipped to [0, 1] (2 seeds)"
    assert wide["ci95_half_width"] == pytest.approx(12.706204736174707 * math.sqrt(0.08) / math.sqrt(2))
    assert binomial_se(0.82, 1000) == pytest.approx(math.sqrt(0.82 * 0.18 / 1000))
    assert math.isnan(binomial_se(0.82, math.nan))


def test_tables_give_the_t_interval_and_binomial_error_over_seeds(tmp_path):
    """Three seeds at 0.80, 0.84, 0.82: the mean row and tables/seeds.csv carry the hand-computed
    interval; test_rows from metrics.parquet (or run.json) gives each accuracy's binomial error."""
    cells = [cell("imdb", "tiny", 1, seed, 20, constant(0.9)).assign(test_rows=500) for seed in range(3)]
    cells += [cell("imdb", "tiny", 4, seed, 20, constant(acc)).assign(test_rows=500)
              for seed, acc in enumerate([0.80, 0.84, 0.82])]
    write_cells(tmp_path / "results", cells)
    (tmp_path / "config.yaml").write_text(CONFIG.replace("models: [tiny, small]", "models: [tiny]\nseeds: [0, 1, 2]"))
    outputs = make_report([str(tmp_path / "results")], str(tmp_path / "config.yaml"), str(tmp_path / "tables"),
                          str(tmp_path / "figures"))
    table = pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str}, keep_default_na=False, na_values=[""])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    mean = row(table, "imdb", "tiny", 4, "mean")
    assert mean["accuracy"] == pytest.approx(0.82) and mean["accuracy_std"] == pytest.approx(0.02)
    assert (mean["ci95_low"], mean["ci95_high"]) == (pytest.approx(0.82 - half), pytest.approx(0.82 + half))
    assert pd.isna(mean["ci95"]) and mean["seeds"] == 3
    seed1 = row(table, "imdb", "tiny", 4, 1)
    assert seed1["binomial_se"] == pytest.approx(math.sqrt(0.84 * 0.16 / 500)) and seed1["test_rows"] == 500
    assert pd.isna(seed1["ci95_low"])  # intervals are over seeds: on mean rows only
    seeds = pd.read_csv(outputs["seeds"])
    k4 = seeds[seeds["clients"] == 4].iloc[0]
    assert (k4["status"], k4["seeds"], k4["seeds_expected"], k4["seed_list"]) == ("complete", 3, 3, "0 1 2")
    assert k4["ci95_half_width"] == pytest.approx(half) and k4["ratio_mean"] == pytest.approx(0.82 / 0.9)
    assert k4["binomial_se"] == pytest.approx(math.sqrt(0.82 * 0.18 / 500))
    assert k4["rounds_min"] == 1 and k4["seeds_reached"] == 2  # 0.80 < 0.81 = 0.9 x 0.9: seed 0 never reaches
    missing = pd.read_csv(outputs["missing_cells"])  # the config's other data set has no runs
    assert set(missing["dataset"]) == {"ag_news"} and len(missing) == 2 * 3  # K=1, K=4 x 3 seeds


def test_one_seed_table_says_so(tmp_path):
    write_cells(tmp_path / "results", [cell("imdb", "tiny", 1, 0, 20, constant(0.9)),
                                       cell("imdb", "tiny", 2, 0, 20, constant(0.8))])
    (tmp_path / "config.yaml").write_text(CONFIG)
    outputs = make_report([str(tmp_path / "results")], str(tmp_path / "config.yaml"), str(tmp_path / "tables"),
                          str(tmp_path / "figures"))
    table = pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str})
    means = table[table["seed"] == "mean"]
    assert (means["ci95"] == "1 seed").all() and means[["ci95_low", "ci95_high", "accuracy_std"]].isna().all().all()
    seeds = pd.read_csv(outputs["seeds"])
    ran = seeds[seeds["status"] == "complete"]
    assert list(ran["clients"]) == [1, 2] and (ran["ci95"] == "1 seed").all() and seeds["ci95_low"].isna().all()
    assert set(seeds.loc[seeds["status"] == "missing", "ci95"]) == {"no seeds"}  # the config's other cells
    assert seeds["binomial_se"].isna().all()  # no test_rows recorded (no run.json): NaN, not a guess


def test_partial_grid_renders_and_marks_missing(tmp_path):
    """The config's grid (models, clients, seeds, partitions, algorithms); the metrics hold part of
    it: the tables list what is missing and the figures still render."""
    config = CONFIG.replace("models: [tiny, small]", "models: [tiny, small]\nclients: [1, 2, 4]\nseeds: [0, 1]\n"
                            "partitions: {iid: {scheme: iid}, weak: {scheme: iid, per_client: 50}}\n"
                            "algorithms: [fedavg]")
    (tmp_path / "config.yaml").write_text(config)
    cells = [cell("imdb", "tiny", k, s, 20, linear(0.5, 0.04 / k, 0.9)) for k in (1, 2, 4) for s in (0, 1)]
    cells = [c for c in cells if not (c["clients"].iloc[0] == 4 and c["seed"].iloc[0] == 1)]  # one seed lost
    cells.append(cell("imdb", "tiny", 1, 0, 20, linear(0.5, 0.03, 0.8)).assign(partition="weak"))
    write_cells(tmp_path / "results", cells,
                run_json=lambda first: {"partition": {"kind": "per_client" if first.get("partition") == "weak"
                                                      else "fixed_total"}})
    outputs = make_report([str(tmp_path / "results")], str(tmp_path / "config.yaml"), str(tmp_path / "tables"),
                          str(tmp_path / "figures"))
    seeds = pd.read_csv(outputs["seeds"])
    # 2 data sets x 2 models x 2 partitions x 1 algorithm x 3 K: every cell of the grid has a row.
    assert len(seeds) == 24
    status = {(r.dataset, r.model, r.partition, r.clients): r.status for r in seeds.itertuples()}
    assert status[("imdb", "tiny", "iid", 1)] == "complete"
    assert status[("imdb", "tiny", "iid", 4)] == "partial: 1 of 2 seeds (missing seed 1)"
    assert status[("imdb", "tiny", "weak", 1)] == "partial: 1 of 2 seeds (missing seed 1)"
    assert status[("ag_news", "small", "weak", 2)] == "missing"
    assert dict(zip(seeds["partition"], seeds["kind"])) == {"iid": "fixed_total", "weak": "per_client"}
    missing = pd.read_csv(outputs["missing_cells"])
    assert len(missing) == 24 * 2 - 6  # 6 (cell, seed) pairs ran
    assert set(missing["status"]) == {"missing"}
    assert ((missing["model"] == "tiny") & (missing["partition"] == "iid") & (missing["clients"] == 4)
            & (missing["dataset"] == "imdb")).sum() == 1
    table = pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str})
    weak = table[(table["partition"] == "weak") & (table["seed"] == "0")].iloc[0]
    assert (weak["kind"], weak["baseline_partition"]) == ("per_client", "weak")  # never iid's fixed-total K=1
    for name in FIGURES:
        image = matplotlib.image.imread(outputs[f"{name}_png"])
        assert image.shape[1] == pytest.approx(7 * 200, abs=2) and image[..., :3].std() > 0.05


def test_partitions_and_drift(tmp_path):
    """Cells of several partitions: each compared with its own K=1 cell, else iid's of the same kind;
    the kind and the test-set size come from run.json; the drift figure draws the recorded norms."""
    def drift(frame, partition):
        r = frame["round"].astype(float)
        return frame.assign(partition=partition, pseudo_gradient_norm=(1 + r) ** -0.5 * frame["clients"],
                            client_drift_rms=0.1 * frame["clients"], client_drift_max=0.2, update_cosine=0.5)

    cells = [drift(cell("imdb", "tiny", 1, 0, 20, linear(0.5, 0.04, 0.9)), "iid"),
             drift(cell("imdb", "tiny", 4, 0, 20, linear(0.5, 0.02)), "iid"),
             drift(cell("imdb", "tiny", 4, 0, 20, linear(0.5, 0.01)), "shards-2"),  # no K=1: iid's
             drift(cell("imdb", "tiny", 1, 0, 20, linear(0.5, 0.03, 0.8)), "weak"),
             drift(cell("imdb", "tiny", 4, 0, 20, linear(0.5, 0.03)), "weak")]
    write_cells(tmp_path / "results", cells, run_json=lambda first: {
        "test_rows": 200, "partition": {"kind": "per_client" if first["partition"] == "weak" else "fixed_total"}})
    (tmp_path / "config.yaml").write_text(CONFIG)
    outputs = make_report([str(tmp_path / "results")], str(tmp_path / "config.yaml"), str(tmp_path / "tables"),
                          str(tmp_path / "figures"))
    table = pd.read_csv(outputs["accuracy_at_budget"], dtype={"seed": str})
    seeds = table[table["seed"] == "0"].set_index(["partition", "clients"])
    assert seeds.loc[("shards-2", 4), "baseline_partition"] == "iid"
    assert seeds.loc[("shards-2", 4), "ratio"] == pytest.approx(0.6 / 0.9)
    assert seeds.loc[("weak", 4), "baseline_partition"] == "weak"
    assert seeds.loc[("weak", 4), "ratio"] == pytest.approx(0.8 / 0.8)
    assert seeds.loc[("weak", 4), "kind"] == "per_client" and seeds.loc[("iid", 4), "kind"] == "fixed_total"
    assert seeds.loc[("iid", 4), "binomial_se"] == pytest.approx(math.sqrt(0.7 * 0.3 / 200))
    assert list(dict.fromkeys(table["partition"])) == ["iid", "shards-2", "weak"]  # iid first
    for name in ("drift", "accuracy_vs_clients_by_partition"):
        image = matplotlib.image.imread(outputs[f"{name}_png"])
        assert image.shape[1] == pytest.approx(7 * 200, abs=2) and image[..., :3].std() > 0.05


def test_a_partition_of_two_kinds_is_an_error(tmp_path):
    write_cells(tmp_path / "a", [cell("imdb", "tiny", 1, 0, 5, constant(0.9))],
                run_json=lambda first: {"partition": {"kind": "per_client"}})
    write_cells(tmp_path / "b", [cell("imdb", "tiny", 2, 0, 5, constant(0.9))])
    (tmp_path / "config.yaml").write_text(CONFIG)
    with pytest.raises(FedsweepError, match="partition 'iid' has cells of kinds"):
        make_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "config.yaml"),
                    str(tmp_path / "t"), str(tmp_path / "f"))


def test_grid_from_the_configs_cell_list(tmp_path):
    """The workflow's report config lists its cells (a grid with restricted entries): exactly those
    are expected, and a partition's kind may be given in the config."""
    config = CONFIG + ("partitions: {iid: {kind: fixed_total}, weak: {kind: per_client, per_client: 50}}\n"
                       "cells:\n  - [imdb, tiny, fedavg, iid, 1, 0]\n  - [imdb, tiny, fedavg, iid, 2, 0]\n"
                       "  - [imdb, tiny, fedavg, iid, 2, 1]\n  - [imdb, tiny, fedavg, weak, 2, 0]\n")
    (tmp_path / "config.yaml").write_text(config)
    write_cells(tmp_path / "results", [cell("imdb", "tiny", 1, 0, 20, constant(0.9)),
                                       cell("imdb", "tiny", 2, 0, 20, constant(0.8))])
    outputs = make_report([str(tmp_path / "results")], str(tmp_path / "config.yaml"), str(tmp_path / "tables"),
                          str(tmp_path / "figures"))
    seeds = pd.read_csv(outputs["seeds"])
    assert list(zip(seeds["partition"], seeds["clients"], seeds["status"], seeds["kind"])) == [
        ("iid", 1, "complete", "fixed_total"), ("iid", 2, "partial: 1 of 2 seeds (missing seed 1)", "fixed_total"),
        ("weak", 2, "missing", "per_client")]
    missing = pd.read_csv(outputs["missing_cells"])
    assert list(zip(missing["partition"], missing["clients"], missing["seed"])) == [("iid", 2, 1), ("weak", 2, 0)]


def test_communicated_bytes_accumulate_over_rounds_even_when_rounds_are_skipped():
    from fedsweep.report.analysis import communicated_bytes

    # one cell evaluated every 2 rounds (rows 0, 2, 4), 100 bytes up and 100 down per round;
    # one from before fedsweep counted bytes (no curve)
    frame = pd.DataFrame({
        "dataset": "d", "model": "m", "clients": 2, "seed": 0, "round": [0, 2, 4, 0, 1],
        "test_accuracy": [0.25, 0.5, 0.75, 0.25, 0.5], "upload_bytes": [0, 100, 100, None, None],
        "download_bytes": [0, 100, 100, None, None], "source": ["a", "a", "a", "old", "old"]})
    curves = communicated_bytes(frame)
    assert curves["bytes"].tolist() == [0, 400, 800] and curves["test_accuracy"].tolist() == [0.25, 0.5, 0.75]


def test_import_names_the_outputs_without_heavy_modules():
    """The Snakemake head node imports fedsweep.report for the output names: nothing heavy comes with it."""
    import subprocess
    import sys

    heavy = ("pandas", "matplotlib", "seaborn", "scipy", "numpy", "torch", "pyarrow")
    code = ("import sys, fedsweep.report as r; "
            "assert r.TABLES and r.FIGURES and r.output_paths('t', 'f'); "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_registries_resolve_and_have_captions():
    """Every registered table and figure is a function of tables.py / figures.py with a caption
    file, and every caption file is registered."""
    from pathlib import Path

    from fedsweep import report
    from fedsweep.report import figures, tables

    captions = Path(__file__).resolve().parents[1] / "workflow" / "report"
    # the paper's three results are among them (the registry is the one list of names)
    assert {"accuracy_vs_clients", "rounds_to_target", "accuracy_per_round"} <= set(report.FIGURES)
    assert {"accuracy_at_budget", "rounds_to_target"} <= set(report.TABLES)
    for kind, names, module, function in (("table", report.TABLES, tables, report.table_function),
                                          ("figure", report.FIGURES, figures, report.figure_function)):
        for name in names:
            assert callable(function(name)) and function(name).__module__ == module.__name__, (kind, name)
            assert (captions / f"{kind}_{name}.rst").is_file(), (kind, name)
        captioned = {path.name[len(kind) + 1:-len(".rst")] for path in captions.glob(f"{kind}_*.rst")}
        assert captioned == set(names), kind


def test_output_paths_are_what_make_report_writes(report):
    from fedsweep.report import output_paths

    tmp = report["tmp"]
    expected = output_paths(tmp / "tables", tmp / "figures")
    assert list(report["outputs"].items()) == list(expected.items())
    assert all(path.is_file() for path in expected.values())
