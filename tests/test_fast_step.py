"""The GPU step's building blocks, exact on a CPU: no device reads inside a client's steps,
length-bucketed batches (``pad_multiple``) and the compiled step (``compile``)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch
from conftest import without_dropout
from torch.overrides import TorchFunctionMode

from fedsweep.client_update import ClientSettings, FedProx, LocalOptimizer
from fedsweep.clients import train_client
from fedsweep.engine import PROTOCOLS, FlatParameters, attention_input, batch_loss, batches_on_device, client_batches
from fedsweep.grouped import ClientGroups
from fedsweep.models import build_model
from fedsweep.modelspec import TINY_DECODERS
from fedsweep.tokens import TokenTensors
from fedsweep.train import TrainConfig, run

STANDARD = PROTOCOLS["standard"]
# What makes the host wait for the device: a tensor's value read into Python or copied to the host.
DEVICE_READS = {"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu", "__array__"}


class DeviceReads(TorchFunctionMode):
    """Counts the tensor-to-Python reads (each a host sync on a GPU) made while it is active."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in DEVICE_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _tokens(n: int = 96, width: int = 40, seed: int = 0, full_rows: int = 0) -> TokenTensors:
    """Random ids of lengths 5..width (the first ``full_rows`` rows full width), 4 labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, width + 1, n)
    lengths[:full_rows] = width
    ids = torch.from_numpy(rng.integers(1000, 30000, (n, width)))
    ids[torch.arange(width)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    return TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, 4, n)), 0)


def _train(model_name: str, data: TokenTensors, protocol, *, optimizer=None, epochs: int = 1, dropout: bool = True):
    model = build_model(model_name, 4, seed=0)
    if not dropout:  # dropout's masks are shaped like the batch: other widths draw other masks
        without_dropout(model)
    flat = FlatParameters(model)
    if optimizer is not None:
        optimizer = optimizer(flat)
    lengths, shard = data.lengths.numpy(), np.arange(len(data))
    with DeviceReads() as reads:
        loss, seen = train_client(model, flat, data, lengths, shard, epochs=epochs, batch_size=16, lr=0.05,
                                  protocol=protocol, seed=0, round_=1, client=0, bf16=False, optimizer=optimizer)
    return flat, loss, seen, reads.reads


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-distilbert", "tiny-albert", *TINY_DECODERS])
def test_a_clients_steps_read_nothing_from_the_device(model_name):
    # Padded and unpadded batches both (an unpadded one has no mask, a padded one the 4-D mask).
    data = _tokens(full_rows=16)
    flat, loss, seen, reads = _train(model_name, data, STANDARD, epochs=2)
    assert seen == 2 * len(data) and torch.isfinite(loss)
    assert sum(reads.values()) == 0, reads


@pytest.mark.parametrize("model_name", ["tiny-bert", *TINY_DECODERS])
def test_the_4d_mask_gives_the_models_own_logits(model_name):
    """The mask attention_input builds (bidirectional, or causal for a decoder) is the one the model
    builds from the 2-D mask, where the model reads the device to decide whether to skip it."""
    data = _tokens(n=16)
    ids, mask, _ = next(batches_on_device(data, data.lengths.numpy(), [np.arange(16)], STANDARD))
    assert mask is not None
    model = build_model(model_name, 4, seed=0).eval()
    with torch.no_grad(), DeviceReads() as counter:
        ours = model(input_ids=ids, attention_mask=attention_input(model, mask)).logits
    with torch.no_grad():
        assert torch.equal(ours, model(input_ids=ids, attention_mask=mask).logits)
    assert sum(counter.reads.values()) == 0, counter.reads


def test_corrected_steps_read_nothing_either():
    data = _tokens()

    def fedprox(flat):  # FedProx's gradient correction against a global copy
        update = FedProx(ClientSettings(client="fedprox", mu=0.1), flat.data.clone())
        update.begin_round(1, 0.05, [0], [len(data)])
        return update.optimizer(flat.params, flat.data, flat.views, [0])

    def scaffold_like(flat):  # SCAFFOLD's correction c - c_i (its store is tested elsewhere)
        return LocalOptimizer(flat.params, flat.data, flat.views, lr=0.05, settings=ClientSettings(),
                              correction=torch.full_like(flat.data, 1e-4))

    for optimizer in (fedprox, scaffold_like):
        _, _, _, reads = _train("tiny-bert", data, STANDARD, optimizer=optimizer)
        assert sum(reads.values()) == 0, (optimizer.__name__, reads)


@pytest.mark.parametrize("client", ["plain", "plain-many-rows", "fedprox", "scaffold"])
def test_stepping_the_embedding_by_the_clients_rows_gives_the_dense_steps_bits(client):
    """A client's SGD steps the input embedding by the rows its tokens index (sgd_step's ``rows``),
    plain SGD by each batch's (also for a client whose rows are not listed, ``plain-many-rows``):
    gathered, stepped by the same add_, scattered back. Two epochs of real tiny-bert steps, with
    FedProx's term and SCAFFOLD's correction (zero off the client's rows, as scaffold_rows keeps
    it), give the dense steps' bits, and the rows no token indexes stay as they were."""
    from fedsweep.row_support import EmbeddingRows

    data = _tokens(n=48)
    probe = build_model("tiny-bert", 4, seed=0)
    embedding = EmbeddingRows.of(probe, FlatParameters(probe))
    index = FlatParameters(probe).offsets.index(embedding.start)
    rows = embedding.client_rows(data.ids, np.arange(len(data)))
    assert rows is not None and len(rows) < embedding.rows // 4

    def optimizer(by_rows: bool):
        def build(flat):
            kwargs = dict(rows=(index, None if client == "plain-many-rows" else rows)) if by_rows else {}
            if client == "fedprox":
                update = FedProx(ClientSettings(client="fedprox", mu=0.1), flat.data.clone())
                update.begin_round(1, 0.05, [0], [len(data)])
                return update.optimizer(flat.params, flat.data, flat.views, [0], kwargs.get("rows"))
            if client == "scaffold":
                correction = torch.randn(len(flat), generator=torch.Generator().manual_seed(1)) * 1e-3
                matrix = embedding.matrix(correction)
                kept = matrix[rows].clone()
                matrix.zero_()[rows] = kept
                if by_rows:
                    kwargs["row_correction"] = kept
                return LocalOptimizer(flat.params, flat.data, flat.views, lr=0.05, settings=ClientSettings(),
                                      correction=correction, **kwargs)
            return LocalOptimizer(flat.params, flat.data, flat.views, lr=0.05, settings=ClientSettings(), **kwargs)
        return build

    dense, *_ = _train("tiny-bert", data, STANDARD, optimizer=optimizer(False), epochs=2)
    sparse, *_ = _train("tiny-bert", data, STANDARD, optimizer=optimizer(True), epochs=2)
    assert torch.equal(sparse.data, dense.data)
    untouched = torch.ones(embedding.rows, dtype=torch.bool)
    untouched[rows] = False
    initial = FlatParameters(build_model("tiny-bert", 4, seed=0)).data
    assert torch.equal(embedding.matrix(sparse.data)[untouched], embedding.matrix(initial)[untouched])
    assert not torch.equal(embedding.matrix(sparse.data)[rows], embedding.matrix(initial)[rows])


def test_grouped_steps_read_nothing_from_the_device():
    data = _tokens()
    model = build_model("tiny-bert", 4, seed=0)
    flat = FlatParameters(model)
    groups = ClientGroups(model, flat, 2)
    shards, weights, lengths = [np.arange(0, 48), np.arange(48, 96)], flat.data.clone(), data.lengths.numpy()
    with DeviceReads() as counter:
        losses, seen = groups.train(weights, data, lengths, shards, [0, 1], epochs=1, batch_size=16, lr=0.05,
                                    protocol=STANDARD, seed=0, round_=1, bf16=False)
    assert seen == 48 and torch.isfinite(losses).all()
    assert sum(counter.reads.values()) == 0, counter.reads


def test_unpadded_batches_have_no_mask_and_padded_ones_keep_theirs():
    data = _tokens(n=32, full_rows=16)
    batches = [np.arange(16), np.arange(16, 32)]
    (ids0, mask0, _), (ids1, mask1, _) = batches_on_device(data, data.lengths.numpy(), batches, STANDARD)
    assert mask0 is None and ids0.shape == (16, 40)  # every row full: nothing to mask
    assert torch.equal(mask1.sum(1), data.lengths[16:32])


@pytest.mark.parametrize("multiple", [8, 32])
def test_bucketed_batches_same_examples_same_numbers(multiple):
    data = _tokens(n=80, width=40)
    bucketed = dataclasses.replace(STANDARD, pad_multiple=multiple)
    lengths = data.lengths.numpy()
    batches = client_batches(np.arange(80), 16, STANDARD, 0, 1, 0, 0)
    assert [b.tolist() for b in client_batches(np.arange(80), 16, bucketed, 0, 1, 0, 0)] == [b.tolist()
                                                                                           for b in batches]
    for (ids, mask, labels), (ids_b, mask_b, labels_b), rows in zip(
            batches_on_device(data, lengths, batches, STANDARD), batches_on_device(data, lengths, batches, bucketed),
            batches):
        longest = int(lengths[rows].max())
        assert ids_b.shape[1] == min(-(-longest // multiple) * multiple, 40)  # a few fixed widths
        assert torch.equal(ids_b[:, :ids.shape[1]], ids) and (ids_b[:, ids.shape[1]:] == 0).all()
        assert torch.equal(labels_b, labels)
    dynamic, loss, _, _ = _train("tiny-bert", data, STANDARD, epochs=2, dropout=False)
    padded, loss_b, _, _ = _train("tiny-bert", data, bucketed, epochs=2, dropout=False)
    # The mask hides the extra columns: the same training to float rounding.
    assert float(loss_b) == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(padded.data, dynamic.data, rtol=0, atol=2e-6)


def test_grouped_clients_with_bucketed_batches():
    data = _tokens()
    shards = [np.arange(0, 48), np.arange(48, 96)]
    results = []
    for protocol in (STANDARD, dataclasses.replace(STANDARD, pad_multiple=16)):
        model = without_dropout(build_model("tiny-bert", 4, seed=0))
        flat = FlatParameters(model)
        groups = ClientGroups(model, flat, 2)
        groups.train(flat.data.clone(), data, data.lengths.numpy(), shards, [0, 1], epochs=1, batch_size=16,
                     lr=0.05, protocol=protocol, seed=0, round_=1, bf16=False)
        results.append(groups.data[:2].clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=2e-6)


def test_the_runner_trains_bucketed_batches_like_dynamic_ones(micro, tmp_path):
    def cell(out: str, **settings):
        return run(TrainConfig(tokens_dir=str(micro.tokens), shards=micro.k4, model=micro.model,
                               out_dir=str(tmp_path / out), rounds=2, epochs=1, batch_size=16, lr=0.1, progress="none",
                               **settings))

    dynamic, bucketed = cell("dynamic"), cell("bucketed", pad_multiple=16)
    for column in ("train_loss", "test_loss", "mean_update_norm"):  # a micro BERT without dropout
        np.testing.assert_allclose(bucketed[column], dynamic[column], rtol=1e-5)
    assert bucketed["test_accuracy"].tolist() == dynamic["test_accuracy"].tolist()


@pytest.mark.slow  # torch.compile on a CPU: ~30-90 s of C++ compilation for even a micro model
def test_compiled_step_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from transformers import BertConfig, BertForSequenceClassification

    data = _tokens(n=64, width=31)  # every batch padded, at width 32: one graph to compile
    protocol = dataclasses.replace(STANDARD, pad_multiple=32)
    weights, losses = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=30000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, num_labels=4))  # dropout on: the compiled step draws the same masks
        flat = FlatParameters(model)
        loss_fn = batch_loss(model, False, compile=compiled)
        total = []
        for round_ in (1, 2):
            loss, _ = train_client(model, flat, data, data.lengths.numpy(), np.arange(64), epochs=1, batch_size=16,
                                   lr=0.1, protocol=protocol, seed=0, round_=round_, client=0, bf16=False,
                                   loss_fn=loss_fn)
            total.append(float(loss))
        weights[compiled], losses[compiled] = flat.data.clone(), total
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    torch.testing.assert_close(weights[True], weights[False], rtol=0, atol=1e-6)
