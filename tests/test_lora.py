"""Decoder classifiers and LoRA (fedsweep.lora): the tiny decoders pool the last real token and learn;
LoRA with ``exact`` aggregation is a centralised LoRA fine-tune at K=1 (bitwise) and the average of
the clients' dense models at K=4 (to rounding), ``fedit`` is not (by how much is printed); resume is
bitwise; only adapters (and the head) are trained, sent and checkpointed; the spec is validated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import without_dropout
from fedsweep import FedsweepError, lora
from fedsweep.cli import main
from fedsweep.engine import PROTOCOLS, FlatParameters, batches_on_device, client_batches
from fedsweep.models import TINY_DECODERS, build_model, total_parameters
from fedsweep.partition import iid_shards, write_shards
from fedsweep.rounds import Federation
from fedsweep.clients import ClientSettings, ClientUpdate
from fedsweep.strategies import build_strategy
from fedsweep.tokens import load_split
from fedsweep.train import METRIC_COLUMNS, TrainConfig, _hashed_config, _read_inputs, run

pytest.importorskip("peft")

# Columns that differ between two runs of the same cell: wall-clock times and the process's memory.
UNREPRODUCIBLE = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def _lora_model(family: str, seed: int = 3, **spec) -> torch.nn.Module:
    spec = lora.parse({**LORA, **spec})
    model = without_dropout(build_model(family, 4, seed=seed, pad_token_id=0, dtype=lora.base_dtype(spec)))
    return lora.apply(model, spec)


def _federation(model, data, shards, *, aggregation: str, strategy: str = "fedavg", lr: float = 0.1,
                batch_size: int = 16, seed: int = 0) -> Federation:
    flat = FlatParameters(model)
    server = build_strategy(strategy, flat.data.clone(), server_lr=0.01, server_momentum=0.0, beta1=0.9,
                            beta2=0.99, tau=1e-3)
    if aggregation == "exact":
        server = lora.ExactAggregation(server, model, flat)
    return Federation(model, flat, server, ClientUpdate(ClientSettings(), server.weights), data,
                      data.lengths.numpy(), shards, epochs=1, batch_size=batch_size, protocol=PROTOCOLS["standard"],
                      seed=seed, lr=lr)


def _round(fed: Federation, round_: int) -> None:
    fed.finish(fed.train(round_))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- decoder classifiers -------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_DECODERS)
def test_tiny_decoders_classify_the_last_real_token_of_a_padded_batch(family):
    model = build_model(family, 4, seed=0, pad_token_id=0).eval()
    assert model.config.pad_token_id == 0 and total_parameters(model) > 4_000_000
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0], [101, 2178, 2742, 2062, 2112, 102]])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        alone = model(input_ids=ids[:1, :4]).logits
    torch.testing.assert_close(batch[:1], alone, rtol=0, atol=1e-5)  # the padding is skipped


@pytest.mark.parametrize("family", TINY_DECODERS)
def test_tiny_decoders_classify_the_last_real_token_with_left_padding_too(family):
    """The pooled position is the last whose id is not the pad id, wherever the padding is."""
    model = build_model(family, 4, seed=0, pad_token_id=0).eval()
    ids = torch.tensor([[0, 0, 101, 2023, 2003, 102], [101, 2178, 2742, 2062, 2112, 102]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what the model sees without padding
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=ids[:1, 2:]).logits
    torch.testing.assert_close(batch[:1], alone, rtol=0, atol=1e-5)


def test_a_pad_token_is_set_where_the_config_has_none():
    from fedsweep.models import set_pad_token

    model = build_model("tiny-gpt2", 4, seed=0)
    model.config.pad_token_id = None
    set_pad_token(model, 7)
    assert model.config.pad_token_id == 7
    bert = build_model("tiny-bert", 4, seed=0, pad_token_id=5)  # encoders keep theirs
    assert bert.config.pad_token_id == 0


def _shards(root: Path, clients: int, rows: int = 256) -> str:
    path = root / f"shards_K{clients}_{rows}.parquet"
    if not path.exists():
        parts = [s[: rows // clients] for s in iid_shards(256, clients, 0)]
        write_shards(path, parts, {"scheme": "manual", "seed": 0, "train_rows": 256})
    return str(path)


def _cfg(root: Path, out: Path, clients: int = 1, rows: int = 256, **kw) -> TrainConfig:
    base = dict(tokens_dir=str(root / "tokens"), shards=_shards(root, clients, rows), model="tiny-llama",
                out_dir=str(out), rounds=3, epochs=1, batch_size=16, lr=0.05, progress="none", dataset="synth")
    base.update(kw)
    return TrainConfig(**base)


def test_a_tiny_decoder_learns_and_every_run_reports_its_size(synth_tokens, tmp_path):
    m = run(_cfg(synth_tokens, tmp_path / "full", clients=2, rounds=4, lr=0.05))
    assert list(m.columns[-len(METRIC_COLUMNS):]) == METRIC_COLUMNS
    acc = m["test_accuracy"].tolist()
    print("tiny-llama full fine-tuning, test accuracy by round:", [round(a, 3) for a in acc])
    assert acc[-1] > 0.45 and acc[-1] > acc[0] + 0.15  # chance 0.25 (sd 0.044 on 96 examples)
    model = build_model("tiny-llama", 4, seed=0)
    trainable = sum(p.numel() for p in model.parameters())
    assert (m["trainable_parameters"] == trainable).all() and (m["total_parameters"] == trainable).all()
    assert (m.loc[1:, "upload_bytes_per_client"] == 4 * trainable).all()
    assert (m.loc[1:, "upload_bytes"] == 2 * 4 * trainable).all() and m.loc[0, "upload_bytes"] == 0
    assert (m.loc[1:, "download_bytes"] == m.loc[1:, "upload_bytes"]).all()
    assert (m["peak_memory_bytes"] > 0).all()
    summary = json.loads((tmp_path / "full" / "run.json").read_text())
    assert summary["peft"] == {"method": "none"}
    assert summary["communication"]["upload_bytes_total"] == {"float32": 4 * 4 * 2 * trainable}


# --- exactness ----------------------------------------------------------------------------------


def test_exact_lora_with_one_client_is_a_centralised_lora_fine_tune_bitwise(synth_tokens):
    """K=1, exact: the residual is exactly zero and the run is plain SGD on the adapters and head."""
    data = load_split(synth_tokens / "tokens", "train")
    shard = iid_shards(len(data), 4, seed=0)[0]  # 64 rows: 4 steps per round
    fed = _federation(_lora_model("tiny-llama"), data, [shard], aggregation="exact")
    for r in (1, 2, 3):
        _round(fed, r)
    fed.flat.data.copy_(fed.strategy.weights)
    federated = _state(fed.model)

    model = _lora_model("tiny-llama")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for r in (1, 2, 3):
        batches = client_batches(shard, 16, PROTOCOLS["standard"], 0, r, 0, 0)
        for ids, mask, labels in batches_on_device(data, data.lengths.numpy(), batches, PROTOCOLS["standard"]):
            F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    centralised = _state(model)
    assert federated.keys() == centralised.keys()
    changed = [k for k in federated if not torch.equal(federated[k], centralised[k])]
    assert changed == []
    trained = [k for k in centralised if "lora_B" in k]
    assert trained and all(centralised[k].abs().sum() > 0 for k in trained)  # B left zero: it trained


def _dense(model, flat: FlatParameters, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every adapted layer's effective weight W + s B A (fp64), with the trainable adapters read
    from ``weights`` (a frozen A, FFA's, from the model): written from peft's layers, not fedsweep's."""
    from peft.tuners.lora import LoraLayer

    position = {id(p): i for i, p in enumerate(flat.params)}
    views = flat.views(weights)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a = views[position[id(a)]] if id(a) in position else a
            b = views[position[id(b)]]
            base = module.get_base_layer().weight
            base = base.T if module.fan_in_fan_out else base
            out[name] = base.double() + module.scaling["default"] * (b.double() @ a.double())
    return out


def _average_dense_vs_global(fed: Federation, round_: int) -> float:
    """Train round ``round_``, and return max |global effective weight - average of the clients'|."""
    model, flat, server = fed.model, fed.flat, fed.strategy
    inner = server.inner if isinstance(server, lora.ExactAggregation) else server
    reference: dict[str, torch.Tensor] = {}
    add = inner.add

    def capture(client_weights, num_examples, rows=None, deferred=None):  # each client's dense model, weighted as FedAvg's
        w = num_examples / inner.total
        for name, dense in _dense(model, flat, client_weights).items():
            reference[name] = reference.get(name, 0) + w * dense
        return add(client_weights, num_examples, rows, deferred)

    inner.add = capture
    try:
        _round(fed, round_)
    finally:
        del inner.add
    result = _dense(model, flat, server.weights)
    return max(float((result[k] - reference[k]).abs().max()) for k in reference)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_exact_lora_equals_the_average_of_dense_updates_and_fedit_does_not(synth_tokens, family, monkeypatch):
    # every client through Strategy.add, which the reference captures (with a free core, FedAvg's
    # Strategy.submit sums on a worker thread without calling it)
    monkeypatch.setattr("fedsweep.average.free_core", lambda: False)
    data = load_split(synth_tokens / "tokens", "train")
    shards = [s[:48] for s in iid_shards(len(data), 4, seed=0)]
    errors = {}
    for aggregation in ("exact", "fedit", "ffa"):
        # lr 0.5: the adapters move far enough in one round for the product of averages to show
        fed = _federation(_lora_model(family, aggregation=aggregation), data, shards, aggregation=aggregation, lr=0.5)
        errors[aggregation] = [_average_dense_vs_global(fed, r) for r in (1, 2)]
    print(f"{family} K=4: max |W + sBA - mean_k(W + sB_kA_k)| by round:", errors)
    # exact and ffa: fp32 rounding of the global weights (|W| ~ 0.3: ulp 3e-8); fedit: the
    # product of averages, orders of magnitude more
    assert max(errors["exact"]) < 1e-6 and max(errors["ffa"]) < 1e-6
    assert min(errors["fedit"]) > 100 * max(errors["exact"])


def test_server_optimisers_act_on_the_adapters_and_bf16_bases_train(synth_tokens):
    data = load_split(synth_tokens / "tokens", "train")
    shards = [s[:32] for s in iid_shards(len(data), 2, seed=0)]
    model = _lora_model("tiny-qwen2", base_dtype="bf16", aggregation="exact")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    fed = _federation(model, data, shards, aggregation="exact", strategy="fedadam")
    before = fed.strategy.weights.clone()
    base = _state(model)
    _round(fed, 1)
    assert not torch.equal(before, fed.strategy.weights) and torch.isfinite(fed.strategy.weights).all()
    assert fed.strategy.inner.m.abs().sum() > 0  # FedAdam's moment follows the adapters' pseudo-gradient
    moved = [k for k, v in _state(model).items() if "base_layer" in k and not torch.equal(v, base[k])]
    assert moved  # the residual went into the bf16 base


# --- runs: resume, checkpoint content, communication -------------------------------------------


def test_lora_resume_is_bitwise_and_the_checkpoint_holds_only_what_is_trained(synth_tokens, tmp_path):
    spec = {**LORA, "aggregation": "exact", "target_modules": ["q_proj", "v_proj"]}
    kw = dict(clients=4, rows=128, peft=spec, lr=0.2, strategy="fedavgm", server_lr=1.0, server_momentum=0.5,
              algorithm="fedavgm", clients_per_round=2)
    straight = run(_cfg(synth_tokens, tmp_path / "straight", rounds=3, **kw))
    run(_cfg(synth_tokens, tmp_path / "resumed", rounds=2, **kw))
    resumed = run(_cfg(synth_tokens, tmp_path / "resumed", rounds=3, **kw))  # resumes from round 2
    pd.testing.assert_frame_equal(resumed.drop(columns=UNREPRODUCIBLE), straight.drop(columns=UNREPRODUCIBLE),
                                  check_exact=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert torch.equal(a["weights"], b["weights"])
    assert a["server_state"].keys() == b["server_state"].keys()
    assert all(torch.equal(a["server_state"][k], b["server_state"][k]) for k in a["server_state"])

    # What is trained, sent and saved: adapters on q and v and the head, not the 4.4M base.
    model = lora.apply(build_model("tiny-llama", 4, seed=0, pad_token_id=0), lora.parse(spec))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.01 * total_parameters(model)
    assert (straight.loc[1:, "trainable_parameters"] == trainable).all()
    assert (straight.loc[1:, "upload_bytes"] == 2 * 4 * trainable).all()  # 2 clients sampled per round
    assert a["weights"].numel() < trainable + 16 * 64  # the flat vector: trainable tensors and alignment
    # exact: the target modules' changed base weights (2 layers x q and v, 128 x 128 each), sent
    # to every client as the residual and kept in the checkpoint
    base = {k: v for k, v in a["server_state"].items() if k.startswith("lora_base.")}
    assert len(base) == 4 and sum(v.numel() for v in base.values()) == 4 * 128 * 128
    residual_bytes = 4 * 4 * 128 * 128
    assert (straight.loc[1:, "download_bytes"] == 2 * (4 * trainable + residual_bytes)).all()
    summary = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert summary["communication"]["download_bytes_per_client_per_round"] == {"float32": 4 * trainable
                                                                                + residual_bytes}
    assert summary["peft"]["aggregation"] == "exact" and summary["trainable_parameters"] == trainable


def test_fedit_checkpoint_is_adapter_sized(synth_tokens, tmp_path):
    out = tmp_path / "fedit"
    m = run(_cfg(synth_tokens, out, clients=2, rows=64, rounds=1, peft={**LORA, "aggregation": "fedit"}))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    trainable = int(m["trainable_parameters"].iloc[-1])
    assert ckpt["server_state"] == {} and ckpt["weights"].numel() < trainable + 16 * 64
    size = (out / "checkpoint.pt").stat().st_size
    print(f"fedit checkpoint: {size} bytes for {trainable} trainable parameters "
          f"(a full checkpoint of tiny-llama: {4 * int(m['total_parameters'].iloc[-1])} bytes of weights)")
    assert size < 4 * trainable + 200_000  # the vector plus metrics, config and RNG state
    assert size < 0.05 * 4 * int(m["total_parameters"].iloc[-1])


# --- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ({"method": "lora", "r": 0}, "--peft: r=0 must be a positive integer"),
    ({"method": "lora", "alpha": -1}, "--peft: alpha=-1 must be a positive number"),
    ({"method": "lora", "dropout": 1.5}, "--peft: dropout=1.5 must be a number in [0, 1)"),
    ({"method": "lora", "aggregation": "mean"}, "--peft: aggregation='mean' is not one of fedit, ffa, exact"),
    ({"method": "lora", "base_dtype": "int4"}, "--peft: base_dtype='int4' (bitsandbytes quantisation)"),
    ({"method": "lora", "target_modules": []}, "--peft: target_modules=[] must be a name or a non-empty list of names"),
    ({"method": "prefix"}, "--peft: method='prefix' is not one of none, lora"),
    ({"method": "none", "r": 4}, "--peft: r=4 is a LoRA setting, but method=none"),
    ({"method": "lora", "rank": 4}, "--peft: unknown key 'rank'"),
])
def test_peft_spec_errors_are_one_line_naming_the_field(synth_tokens, tmp_path, capsys, spec, message):
    with pytest.raises(FedsweepError, match="^" + re.escape(message)):
        lora.parse(spec, "--peft")
    code = main(["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 1),
                 "--model", "tiny-llama", "--out-dir", str(tmp_path / "x"), "--rounds", "1",
                 "--peft", json.dumps(spec)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fedsweep: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()  # refused before anything ran


def test_the_config_hash_of_full_fine_tuning_is_unchanged(synth_tokens, tmp_path):
    inputs = _read_inputs(_cfg(synth_tokens, tmp_path))
    hashed = {str(p): _hashed_config(_cfg(synth_tokens, tmp_path, peft=p), inputs)
              for p in (None, "none", {"method": "none"})}
    assert all("peft" not in h for h in hashed.values())
    assert len({json.dumps(h, sort_keys=True) for h in hashed.values()}) == 1
    a = _hashed_config(_cfg(synth_tokens, tmp_path, peft={"method": "lora", "r": 8}), inputs)
    b = _hashed_config(_cfg(synth_tokens, tmp_path, peft={"method": "lora", "r": 8, "alpha": 16.0}), inputs)
    assert a == b and a["peft"]["r"] == 8  # the defaults written out or not: one hash
    assert lora.parse({"method": "lora", "target_modules": "q_proj"}).target_modules == ("q_proj",)


@pytest.mark.slow
def test_exact_lora_on_two_ranks_equals_one_process(synth_tokens, tmp_path):
    """torchrun, 2 processes (gloo): the clients' products are all-reduced like the average, so
    both ranks add the same residual; the result is the single process's to float64 summation order."""
    import os
    import sys

    from helpers import TORCHRUN, run_side_by_side

    spec = json.dumps({**LORA, "aggregation": "exact"})
    args = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 4, 128),
            "--model", "tiny-llama", "--rounds", "2", "--epochs", "1", "--batch-size", "16", "--lr", "0.2",
            "--progress", "none", "--peft", spec]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_side_by_side([sys.executable, "-m", "fedsweep", *args, "--out-dir", str(tmp_path / "one")],
                     [*TORCHRUN, "-m", "fedsweep", *args, "--out-dir", str(tmp_path / "two")], env, tmp_path)
    a = pd.read_parquet(tmp_path / "one" / "metrics.parquet").drop(columns=UNREPRODUCIBLE)
    b = pd.read_parquet(tmp_path / "two" / "metrics.parquet").drop(columns=UNREPRODUCIBLE)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=0)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(one["weights"], two["weights"], rtol=0, atol=1e-6)
    assert one["server_state"].keys() == two["server_state"].keys()
    for key in one["server_state"]:
        torch.testing.assert_close(one["server_state"][key], two["server_state"][key], rtol=0, atol=1e-6)


def test_client_groups_train_lora_encoders_and_refuse_decoders(synth_tokens, tmp_path):
    """client_group > 1 (vmapped clients) with LoRA on an encoder gives the sequential clients'
    adapters and base residual to rounding; a decoder is refused (the vmapped mask is bidirectional)."""
    from fedsweep.grouped import ClientGroups

    data = load_split(synth_tokens / "tokens", "train")
    shards = [s[:32] for s in iid_shards(len(data), 4, seed=0)]
    results = []
    for group in (1, 2):
        model = _lora_model("tiny-bert", aggregation="exact")
        fed = _federation(model, data, shards, aggregation="exact", lr=0.2)
        fed.groups = ClientGroups(model, fed.flat, group) if group > 1 else None
        for r in (1, 2):
            _round(fed, r)
        results.append([fed.strategy.weights.clone()] + [m.base_weight.clone() for m in fed.strategy.modules])
    for sequential, grouped in zip(*results):
        torch.testing.assert_close(grouped, sequential, rtol=0, atol=1e-6)
    with pytest.raises(FedsweepError, match="^train: client_group=2 trains encoders only"):
        run(_cfg(synth_tokens, tmp_path / "g", clients=2, rows=64, client_group=2, peft=LORA))
