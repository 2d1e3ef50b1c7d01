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
from fedsweep.report import make_report

CONFIG = """
target_fraction: 0.9
datasets:
  imdb: {budget: 10, second_threshold: 20, max_length: 128}
  ag_news: {budget: 10, second_threshold: 20}
models: [tiny, small]
"""
FIGURES = ("accuracy_vs_clients", "rounds_to_target", "accuracy_per_round")


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
    assert list(table.columns) == ["model", "algorithm", "dataset", "clients", "seed", "budget", "round_used",
                                   "accuracy", "baseline_accuracy", "ratio", "baseline_algorithm", "chance_accuracy",
                                   "seeds"]
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
    assert list(table.columns) == ["model", "algorithm", "dataset", "clients", "seed", "target_accuracy", "rounds",
                                   "reached", "searched_until", "status", "seeds"]
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
    assert set(outputs) == {"accuracy_at_budget", "rounds_to_target", "datasets"} | {
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

    from fedsweep.report import dataset_labels

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
