"""Layer-wise drift (fedsweep.layers): the grouping of parameter names, the per-group measures
against a direct computation per named parameter, layers.parquet of a real run, and the figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedsweep import layers
from fedsweep.engine import FlatParameters
from fedsweep.models import build_model
from fedsweep.rounds import RoundStats, drift_metrics
from fedsweep.strategies import FedAvg, FedAvgM

BLOCKS = ["embeddings", "block 0", "block 1", "head"]


@pytest.mark.parametrize("family, groups, examples", [
    ("tiny-bert", BLOCKS, {"bert.encoder.layer.1.output.dense.weight": "block 1",
                           "bert.pooler.dense.bias": "head", "bert.embeddings.LayerNorm.weight": "embeddings"}),
    ("tiny-distilbert", BLOCKS, {"distilbert.transformer.layer.0.ffn.lin1.weight": "block 0",
                                 "pre_classifier.weight": "head"}),
    # ALBERT shares one layer group: one block; its embedding projection is an embedding
    ("tiny-albert", ["embeddings", "block 0", "head"],
     {"albert.encoder.embedding_hidden_mapping_in.weight": "embeddings",
      "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight": "block 0"}),
    ("tiny-llama", BLOCKS, {"model.embed_tokens.weight": "embeddings", "model.layers.1.mlp.up_proj.weight": "block 1",
                            "model.norm.weight": "head", "score.weight": "head"}),
    ("tiny-gpt2", BLOCKS, {"transformer.wte.weight": "embeddings", "transformer.wpe.weight": "embeddings",
                           "transformer.h.0.attn.c_attn.weight": "block 0", "transformer.ln_f.bias": "head"}),
])
def test_groups_of_the_tiny_models(family, groups, examples):
    model = build_model(family, 3, seed=0)
    names = layers.trainable_names(model, FlatParameters(model))
    assert layers.group_order(map(layers.layer_group, names)) == groups
    for name, group in examples.items():
        assert name in names and layers.layer_group(name) == group


def test_lora_adapters_and_sequential_heads():
    assert layers.layer_group("base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.default.weight") \
        == "block 3"
    assert layers.layer_group("base_model.model.classifier.modules_to_save.default.weight") == "head"
    assert layers.layer_group("classifier.0.weight") == "head"  # a Sequential head's index is no block
    assert layers.group_order(["head", "block 10", "block 2", "embeddings"]) == ["embeddings", "block 2", "block 10",
                                                                                 "head"]


def _clients(flat: FlatParameters, count: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global weights and client models moved along a shared direction plus their own, each layer
    by its own scale (the groups differ); the aligned layout's padding stays zero."""
    gen = torch.Generator().manual_seed(seed)
    x = flat.data.clone()
    shared = torch.zeros_like(x)
    for i, view in enumerate(flat.views(shared)):
        view.copy_(0.01 * (1 + i % 3) * torch.randn(view.shape, generator=gen))
    clients = []
    for _ in range(count):
        own = torch.zeros_like(x)
        for i, view in enumerate(flat.views(own)):
            view.copy_(1e-3 * (1 + i % 5) * torch.randn(view.shape, generator=gen))
        clients.append(x + shared + own)
    return x, clients


def _direct(model, flat, x, clients, sizes) -> dict[tuple[str, str], float]:
    """Each group's measures from their definitions, per named parameter with torch.linalg.vector_norm (fp64)."""
    w = [n / sum(sizes) for n in sizes]
    names = layers.trainable_names(model, flat)
    sums: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        xp = flat.views(x)[i].double()
        ups = [flat.views(c)[i].double() - xp for c in clients]
        average = sum(wk * u for wk, u in zip(w, ups))
        spread = sum(wk * torch.linalg.vector_norm(u - average) ** 2 for wk, u in zip(w, ups))
        sq = np.array([torch.linalg.vector_norm(average) ** 2, spread, torch.linalg.vector_norm(xp) ** 2])
        group = layers.layer_group(name)
        sums[group] = sums.get(group, 0) + sq
    out = {}
    for group, (u_sq, spread, x_sq) in sums.items():
        values = (math.sqrt(u_sq), math.sqrt(spread), math.sqrt(x_sq))
        values += (values[0] / values[2], values[1] / values[2])
        out.update(((group, m), v) for m, v in zip(layers.LAYER_METRICS, values))
    return out


def _round(strategy, clients, sizes):
    strategy.begin_round(sum(sizes))
    stats = RoundStats()
    for c, n in zip(clients, sizes):
        stats.add_client(strategy.add(c.clone(), n), n / strategy.total, 0.0, n)
    return drift_metrics(stats, strategy.finish_round(scratch=torch.empty_like(strategy.weights)))


@pytest.mark.parametrize("host_casts", [True, False], ids=["cpu-path", "gpu-path"])
@pytest.mark.parametrize("family, strategy", [("tiny-bert", "fedavg"), ("tiny-gpt2", "fedavgm")])
def test_group_measures_equal_a_direct_computation(monkeypatch, family, strategy, host_casts):
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 1000)  # chunks cut across parameters and groups
    model = build_model(family, 3, seed=1)
    flat = FlatParameters(model)
    x, clients = _clients(flat, 3)
    sizes = [13, 40, 29]
    server = FedAvg(x.clone()) if strategy == "fedavg" else FedAvgM(x.clone(), server_lr=0.7, server_momentum=0.9)
    server.host_casts = host_casts
    drift = layers.attach(server, model, flat)
    drift.active = True
    whole = _round(server, clients, sizes)
    got = {(g, m): v for g, m, v in drift.rows()}
    expected = _direct(model, flat, x, clients, sizes)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-10), key
    # the groups' squares sum to the whole model's (fp64 sums: 1e-12; the pseudo-gradient's is fp32's delta)
    for metric, tolerance in (("client_drift_rms", 1e-10), ("pseudo_gradient_norm", 1e-6)):
        total = sum(got[(g, metric)] ** 2 for g in drift.groups)
        assert math.sqrt(total) == pytest.approx(whole[metric], rel=tolerance), metric


def test_inactive_rounds_change_nothing(monkeypatch):
    """Measuring or not, the strategy's weights and metrics are the same bits."""
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 1000)
    model = build_model("tiny-bert", 3, seed=1)
    flat = FlatParameters(model)
    x, clients = _clients(flat, 2)
    plain, measured = FedAvg(x.clone()), FedAvg(x.clone())
    layers.attach(measured, model, flat).active = True
    assert _round(plain, clients, [5, 9]) == _round(measured, clients, [5, 9])
    assert torch.equal(plain.weights, measured.weights)


def test_a_run_writes_layers_parquet_and_resumes_it(synth_tokens, tmp_path):
    from fedsweep.partition import iid_shards, write_shards
    from fedsweep.train import TrainConfig, run

    shards = tmp_path / "shards.parquet"
    write_shards(shards, iid_shards(256, 2, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})

    def cfg(out, rounds):
        return TrainConfig(tokens_dir=str(synth_tokens / "tokens"), shards=str(shards), model="tiny-bert",
                           out_dir=str(tmp_path / out), rounds=rounds, epochs=1, batch_size=32, lr=0.05,
                           eval_every=2, progress="none", dataset="synth", keep_checkpoint=True)

    run(cfg("straight", 3))
    run(cfg("resumed", 2))
    run(cfg("resumed", 3))  # extends the finished run from its checkpoint
    table = pd.read_parquet(tmp_path / "straight" / layers.LAYERS_NAME)
    assert list(table.columns[-4:]) == ["round", "group", "metric", "value"]
    assert table[["dataset", "model", "clients", "seed"]].drop_duplicates().values.tolist() == [["synth", "tiny-bert",
                                                                                               2, 0]]
    assert sorted(table["round"].unique()) == [2, 3]  # the evaluated rounds
    assert table["group"].unique().tolist() == BLOCKS
    assert len(table) == 2 * len(BLOCKS) * len(layers.LAYER_METRICS)
    assert (table.loc[table["metric"] == "client_drift_rms", "value"] > 0).all()
    pd.testing.assert_frame_equal(table, pd.read_parquet(tmp_path / "resumed" / layers.LAYERS_NAME))


def _fake_layers() -> pd.DataFrame:
    """Two models at K=1 and K=8 (seeds 0 and 1), the distilled one's drift in its block 1."""
    rows = []
    for model, hot in (("tiny-bert", None), ("tiny-distilbert", "block 1")):
        for k in (1, 8):
            for seed in (0, 1):
                for r in range(1, 6):
                    for group in BLOCKS:
                        value = 0.0 if k == 1 else 0.01 * r * (5 if group == hot else 1)
                        rows += [("synth", model, "fedavg", "iid", k, seed, r, group, m, value)
                                 for m in layers.LAYER_METRICS]
    return pd.DataFrame(rows, columns=["dataset", "model", "algorithm", "partition", "clients", "seed", "round",
                                       "group", "metric", "value"])


def test_the_figure_renders_from_a_layers_table(tmp_path):
    from fedsweep.report.layer_drift import layer_drift_figure, load_layers
    from fedsweep.report.plotting import save, style

    fake = _fake_layers()
    with style():
        fig = layer_drift_figure(fake)
        paths = save(fig, str(tmp_path), "layer_drift")
    assert all(p.stat().st_size > 0 for p in paths.values())
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 4  # two models, K=1 beside K=8
    distilled = heatmaps[3].images[0].get_array()
    assert distilled.shape == (4, 5) and distilled[2].max() == pytest.approx(0.25)  # block 1, round 5: hot
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == ["embeddings", "0", "1", "head"]
    # beside metrics files with and without a layer table; none at all: a figure that says so
    (tmp_path / "a").mkdir()
    fake.to_parquet(tmp_path / "a" / layers.LAYERS_NAME)
    assert len(load_layers([str(tmp_path / "a" / "metrics.parquet"), str(tmp_path / "metrics.parquet")])) == len(fake)
    with style():
        assert not [ax for ax in layer_drift_figure(load_layers([str(tmp_path / "metrics.parquet")])).axes
                    if ax.images]
