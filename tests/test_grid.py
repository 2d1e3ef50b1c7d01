"""fedsweep.grid: the cells of a config (algorithms, partitions, restrictions, per-model seeds)
and the settings of each, as the workflow and `fedsweep cluster-check` see them."""

from __future__ import annotations

import pytest

from fedsweep import FedsweepError, grid


def config(**extra) -> dict:
    base = {
        "seeds": [0],
        "clients": [1, 4],
        "models": {"big": {}, "small": {"seeds": [0, 1]}},
        "datasets": {"news": {"budget": 1, "second_threshold": 1}, "films": {"budget": 1, "second_threshold": 1}},
        "train": {"lr": 0.1, "max_length": 32},
        "overrides": [],
    }
    base.update(extra)
    return base


def test_default_grid_is_fedavg_on_iid():
    cells = grid.cells(config())
    assert {c["algorithm"] for c in cells} == {"fedavg"} and {c["partition"] for c in cells} == {"iid"}
    # 2 data sets x (big: 1 seed + small: 2 seeds) x 2 K
    assert len(cells) == 2 * 3 * 2
    assert grid.cell_name(cells[0]) == "news/big/fedavg/iid_K1_seed0"


def test_older_partition_block_is_one_entry_named_after_its_scheme():
    assert list(grid.partitions(config(partition={"scheme": "dirichlet", "alpha": 0.5}))) == ["dirichlet-a0.5"]
    assert list(grid.partitions(config(partition={"scheme": "iid"}))) == ["iid"]
    assert grid.partition_args(config(partition={"scheme": "dirichlet", "alpha": 0.5}), "dirichlet-a0.5") == \
        "--scheme dirichlet --alpha 0.5"


def test_restrictions_and_model_seeds_pick_the_cells():
    cfg = config(algorithms={"fedavg": {}, "prox": {"client": "fedprox", "mu": 0.1, "models": "small"}},
                 partitions={"iid": {"scheme": "iid"},
                             "weak": {"scheme": "iid", "per_client": 16, "datasets": ["films"], "models": ["big"]}})
    cells = grid.cells(cfg)
    prox = [c for c in cells if c["algorithm"] == "prox"]
    assert prox and all(c["model"] == "small" for c in prox)
    assert len(prox) == 2 * 1 * 2 * 2  # data sets x partition iid (weak is big's) x K x small's seeds
    weak = [c for c in cells if c["partition"] == "weak"]
    assert {(c["dataset"], c["model"], c["algorithm"]) for c in weak} == {("films", "big", "fedavg")}
    assert grid.train_rows(cfg, "weak", 4, 1000) == 64 and grid.train_rows(cfg, "iid", 4, 1000) == 1000
    assert grid.algorithm_settings(cfg, "prox") == {"client": "fedprox", "mu": 0.1}  # restrictions are not settings
    assert grid.algorithm_settings(cfg, "fedavg") == {}
    assert grid.partition_args(cfg, "weak") == "--scheme iid --per-client 16"


def test_overrides_match_algorithm_and_partition():
    cfg = config(algorithms={"fedavg": {}, "adam": {"strategy": "fedadam", "server_lr": 0.01}},
                 overrides=[{"algorithm": "adam", "set": {"lr": 0.5}},
                            {"algorithm": "adam", "partition": "iid", "clients": 4, "set": {"lr": 0.7}}])
    assert grid.cell_train(cfg, "news", "big", 1, 0, "fedavg", "iid")["lr"] == 0.1
    assert grid.cell_train(cfg, "news", "big", 1, 0, "adam", "iid")["lr"] == 0.5
    assert grid.cell_train(cfg, "news", "big", 4, 0, "adam", "iid")["lr"] == 0.7  # later entries win
    # without the algorithm (a caller that does not know it), only entries that do not name one apply
    assert grid.cell_train(cfg, "news", "big", 4, 0)["lr"] == 0.7


@pytest.mark.parametrize("extra, message", [
    ({"algorithms": {"x": {"strategy": "fedyogi"}}}, "algorithms.x.server_lr=None must be set"),
    ({"algorithms": {"x": {"momentum": 0.9}}}, "algorithms.x.momentum: unknown setting (known: strategy, server_lr"),
    ({"algorithms": {"x": {"server_momentum": 0.9}}},
     "algorithms.x.server_momentum=0.9 is a setting of strategy fedavgm, not of strategy='fedavg'"),
    ({"partitions": {"p": {"scheme": "dirichlet"}}}, "partitions.p.alpha is required with partitions.p.scheme=dirichlet"),
    ({"partitions": {"p": {"scheme": "quantity_skew", "size_distribution": "lognormal", "sigma": 1, "alpha": 1}}},
     "partitions.p.alpha=1 is only used with partitions.p.size_distribution=dirichlet"),
    ({"partitions": {"p": {"scheme": "iid", "classes_per_client": 2}}},
     "partitions.p.classes_per_client=2 is only used with partitions.p.scheme=shards"),
    ({"partitions": {"p": {"scheme": "iid", "models": ["huge"]}}}, "partitions.p.models: 'huge' is not in the config's models"),
    ({"overrides": [{"partition": "dir", "set": {}}]}, "overrides[0].partition='dir' is not in the config's partitions (iid)"),
    ({"overrides": [{"seed": 1, "set": {}}], "models": {"big": {}}}, "overrides[0].seed=1 is not in the config's seeds (0)"),
    ({"algorithms": {"x": {"models": "small"}}, "models": {"big": {}}},
     "algorithms.x.models: 'small' is not in the config's models (big)"),
])
def test_bad_grid_sections_are_one_line_errors(extra, message):
    with pytest.raises(FedsweepError) as err:
        grid.check(config(**extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_grid_without_cells_is_an_error():
    cfg = config(models={"big": {}}, algorithms={"x": {"datasets": "news", "models": "big"}},
                 partitions={"p": {"scheme": "iid", "datasets": "films"}})
    with pytest.raises(FedsweepError, match="the grid has no cells"):
        grid.check(cfg)


def test_algorithms_restricted_to_partitions_and_clients():
    """SCAFFOLD on the skewed partition only, and neither of them at K=1 (the centralised baseline
    is the fedavg/iid cell whatever the partition)."""
    cfg = config(clients=[1, 2, 4], algorithms={"fedavg": {}, "scaffold": {"client": "scaffold",
                                                                        "partitions": "skew", "clients": [2, 4]}},
                 partitions={"iid": {"scheme": "iid"}, "skew": {"scheme": "dirichlet", "alpha": 0.3, "clients": [2, 4]}})
    grid.check(cfg)
    cells = {(c["algorithm"], c["partition"], c["clients"]) for c in grid.cells(cfg)}
    assert cells == {("fedavg", "iid", 1), ("fedavg", "iid", 2), ("fedavg", "iid", 4), ("fedavg", "skew", 2),
                     ("fedavg", "skew", 4), ("scaffold", "skew", 2), ("scaffold", "skew", 4)}
    with pytest.raises(FedsweepError, match=r"algorithms.x.partitions: 'nope' is not in the config's partitions"):
        grid.check(config(algorithms={"x": {"partitions": "nope"}}))
    with pytest.raises(FedsweepError, match=r"partitions.p.clients: 8 is not in the config's clients \(1, 4\)"):
        grid.check(config(partitions={"p": {"scheme": "iid", "clients": 8}}))
