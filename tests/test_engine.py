"""The FedAvg engine is exact: it equals centralised SGD at K=1 (also with a one-example batch,
whatever the model's shapes: parameters are 64-byte aligned), is invariant to duplicated
clients, averages by shard size, and the two protocols feed the model what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import without_dropout
from fedsweep.clients import train_client
from fedsweep.engine import PROTOCOLS, FlatParameters, client_batches, derive_seed
from fedsweep.rounds import train_round
from fedsweep.row_support import EmbeddingRows
from fedsweep.strategies import FedAvg
from fedsweep.models import build_model
from fedsweep.partition import iid_shards
from fedsweep.tokens import load_split


def _padding(flat):
    """Where ``flat.data`` holds padding, not parameters."""
    pad = torch.ones(len(flat), dtype=torch.bool)
    for offset, p in zip(flat.offsets, flat.params):
        pad[offset:offset + p.numel()] = False
    return pad


def _fedavg(model, data, shards, rounds, *, epochs=2, batch_size=16, lr=0.05, protocol="standard", seed=0,
            loss_sums=None, by_rows=False):
    """The engine's round loop, as train.run drives it (without I/O): the global parameters, unpadded.
    ``by_rows``: clients added by the embedding rows they index (as Federation adds them)."""
    flat = FlatParameters(model)
    strategy = FedAvg(flat.data.clone())
    if by_rows:
        strategy.use_rows(EmbeddingRows.of(model, flat))
    lengths = data.lengths.numpy()
    total = sum(len(s) for s in shards)
    for r in range(1, rounds + 1):
        strategy.begin_round(total)
        stats = train_round(model, flat, strategy, data, lengths, shards, range(len(shards)), epochs=epochs,
                            batch_size=batch_size, lr=lr, protocol=PROTOCOLS[protocol], seed=seed, round_=r,
                            bf16=False)
        assert strategy._by_rows() == by_rows
        strategy.finish_round(scratch=flat.data)
        if loss_sums is not None:
            loss_sums.append(stats.loss_sum)
    assert not strategy.weights[_padding(flat)].any()  # the padding stayed zero through the average
    return flat.unpadded(strategy.weights)


def _plain_sgd(model, synth_tokens, shard, rounds, *, epochs=2, batch_size=16, lr=0.05, seed=0):
    """The reference: an untouched model, torch.optim.SGD, batches padded from the raw token lists.

    Returns (parameters concatenated, per-round loss sums as the engine sums them)."""
    import pyarrow.parquet as pq

    table = pq.read_table(synth_tokens / "tokens" / "train.parquet")
    ragged = table.column("input_ids").to_pylist()
    labels = torch.tensor(table.column("label").to_pylist())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    model.train()
    loss_sums = []
    for r in range(1, rounds + 1):
        torch.manual_seed(derive_seed(seed, "dropout", r, 0))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for epoch in range(epochs):
            for b in client_batches(shard, batch_size, PROTOCOLS["standard"], seed, r, 0, epoch):
                width = max(len(ragged[i]) for i in b)
                ids = torch.tensor([ragged[i] + [0] * (width - len(ragged[i])) for i in b])
                mask = torch.tensor([[1] * len(ragged[i]) + [0] * (width - len(ragged[i])) for i in b])
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(b)
        loss_sums.append(float(loss_sum))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]), loss_sums


def _odd_model():
    """A BERT whose every width is odd (hidden 37, one head, intermediate 73): unaligned, most of
    its parameters would start 4, 8 or 12 bytes off a 16-byte boundary in an unpadded buffer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    config = BertConfig(vocab_size=30522, hidden_size=37, num_hidden_layers=2, num_attention_heads=1,
                        intermediate_size=73, max_position_embeddings=64, num_labels=4, initializer_range=0.1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("by_rows", [False, True], ids=["dense", "by-rows"])
def test_k1_equals_centralised_sgd_bitwise(synth_tokens, by_rows):
    """FedAvg with one client is plain SGD over the same batches: same weights, to the bit (also
    with the client added by its embedding rows, and the server stepping only those)."""
    data = load_split(synth_tokens / "tokens", "train")
    shard = iid_shards(len(data), 2, seed=0)[0]  # 128 rows keep the reference loop quick
    fed_losses = []
    fed = _fedavg(build_model("tiny-bert", 4, seed=3), data, [shard], rounds=2, loss_sums=fed_losses,
                  by_rows=by_rows)
    ref, ref_losses = _plain_sgd(build_model("tiny-bert", 4, seed=3), synth_tokens, shard, rounds=2)
    assert torch.equal(fed, ref)
    assert fed_losses == ref_losses


@pytest.mark.parametrize("make", [_odd_model, lambda: build_model("tiny-albert", 4, seed=3)],
                         ids=["odd-widths", "tiny-albert"])
def test_one_example_batch_equals_plain_sgd_bitwise(synth_tokens, make):
    """A shard of 33 in batches of 32 ends each epoch with a one-example batch, whose products
    are matrix-vector products: on a CPU they round differently when the matrix starts off a
    16-byte boundary (1.2e-7 after 2 rounds for the odd-width model in an unpadded buffer). With
    every parameter at a 64-byte offset, the flat model gives the plain model's numbers exactly.
    """
    data = load_split(synth_tokens / "tokens", "train")
    shard = iid_shards(len(data), 2, seed=0)[0][:33]
    fed_losses = []
    fed = _fedavg(make(), data, [shard], rounds=2, batch_size=32, loss_sums=fed_losses)
    ref, ref_losses = _plain_sgd(make(), synth_tokens, shard, rounds=2, batch_size=32)
    assert torch.equal(fed, ref)
    assert fed_losses == ref_losses


@pytest.mark.parametrize("make", [_odd_model] + [lambda f=f: build_model(f, 3, seed=0)
                                                 for f in ("tiny-bert", "tiny-albert", "tiny-distilbert")],
                         ids=["odd-widths", "tiny-bert", "tiny-albert", "tiny-distilbert"])
def test_every_parameter_starts_at_64_bytes(make):
    """Every parameter's offset in the flat buffer (and in every row of the grouped (G, P)
    buffer) is a multiple of 16 fp32 elements; the padding between them is zero."""
    from fedsweep.grouped import ClientGroups

    model = make()
    expected = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])
    flat = FlatParameters(model)
    assert flat.ALIGN == 16
    assert len(flat) % 16 == 0 and flat.data.data_ptr() % 64 == 0
    assert all(p.storage_offset() % 16 == 0 and p.data_ptr() % 64 == 0 for p in flat.params)
    assert all(o % 16 == 0 for o in flat.offsets)
    assert flat.num_parameters == expected.numel() < len(flat) + 1
    assert torch.equal(flat.unpadded(), expected)  # the values moved in, unchanged
    assert not flat.data[_padding(flat)].any()
    groups = ClientGroups(model, flat, 3)
    for g in (2, 3):
        for p, q in zip(groups.params(g), flat.params):
            assert p.shape[1:] == q.shape and p.data_ptr() % 64 == 0
            assert all(p[i].data_ptr() % 64 == 0 for i in range(g))


@pytest.mark.parametrize("clients", [2, 3])
def test_identical_shards_equal_one_client(synth_tokens, clients):
    """K clients holding the same shard (and seeds) produce the model one of them produces alone.

    Client seeds depend on the client index, so the duplicates get client 0's batch order by
    using the 'paper' protocol (fixed order) with dropout disabled by eval-free tiny models.
    """
    data = load_split(synth_tokens / "tokens", "train", width=32)
    shard = iid_shards(len(data), 2, seed=0)[0]

    def model():
        return without_dropout(build_model("tiny-bert", 4, seed=5))

    alone = _fedavg(model(), data, [shard], rounds=2, protocol="paper")
    together = _fedavg(model(), data, [shard] * clients, rounds=2, protocol="paper")
    assert torch.equal(alone, together)


def test_weighted_average_matches_hand_computation():
    a = torch.tensor([1.0, 2.0, -3.0, 0.5])
    b = torch.tensor([4.0, -2.0, 1.0, 0.25])
    c = torch.tensor([0.0, 1.0, 1.0, 8.0])
    sizes = [10, 30, 60]
    strategy = FedAvg(torch.zeros(4))
    strategy.begin_round(sum(sizes))
    for w, n in zip((a, b, c), sizes):
        strategy.add(w, n)
    strategy.finish_round(scratch=torch.empty(4))
    expected = torch.tensor([
        (10 * 1.0 + 30 * 4.0 + 60 * 0.0) / 100,
        (10 * 2.0 + 30 * -2.0 + 60 * 1.0) / 100,
        (10 * -3.0 + 30 * 1.0 + 60 * 1.0) / 100,
        (10 * 0.5 + 30 * 0.25 + 60 * 8.0) / 100,
    ])
    assert torch.equal(strategy.weights, expected)


def test_chunked_cpu_accumulation_is_exact_and_measures_drift(monkeypatch):
    """The CPU path's chunks change nothing: the same fp64 sums (of the updates x_k - x) as one
    unchunked add, and the drift."""
    gen = torch.Generator().manual_seed(0)
    global_w = torch.randn(10_007, generator=gen)
    clients = [global_w + 0.01 * torch.randn(10_007, generator=gen) for _ in range(3)]
    sizes = [5, 7, 11]
    expected = torch.zeros(10_007, dtype=torch.float64)
    for w, n in zip(clients, sizes):
        expected.add_(w.double() - global_w.double(), alpha=n / sum(sizes))  # the average's update u
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 1000)  # 11 chunks, the last one partial
    strategy = FedAvg(global_w.clone())
    strategy.begin_round(sum(sizes))
    for w, n in zip(clients, sizes):
        buffer = w.clone()
        drift = strategy.add(buffer, n)
        assert drift == pytest.approx(float(torch.linalg.vector_norm(w - global_w)), rel=1e-5)
        assert torch.equal(buffer, global_w)  # reloaded with the global weights for the next client
    assert torch.equal(strategy.accum, expected)


def test_flat_parameters_are_views_and_sgd_updates_them():
    model = build_model("tiny-albert", 3, seed=0)  # ALBERT shares its layers: each parameter once
    flat = FlatParameters(model)
    assert flat.num_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad) <= len(flat)
    start, end = flat.data.data_ptr(), flat.data.data_ptr() + flat.data.numel() * 4
    assert all(start <= p.data_ptr() < end for p in model.parameters())
    ids = torch.randint(1000, 2000, (2, 8))
    F.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1])).backward()
    expected = torch.cat([torch.add(p.detach(), p.grad, alpha=-0.1).reshape(-1) for p in flat.params])
    flat.sgd_step(0.1)
    assert torch.equal(flat.unpadded(), expected)  # p - lr * g, written through the views
    assert not flat.data[_padding(flat)].any()  # and nowhere else
    assert all(p.grad is None for p in flat.params)
    assert all(start <= p.data_ptr() < end for p in model.parameters())  # still views


class _Recorder(torch.nn.Module):
    """Wraps a model and records what the engine feeds it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls = []

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _key_mask(ids, mask):
    """The (B, L) padding mask behind what the engine fed: an encoder gets its attention's 4-D
    mask (B, 1, L, L; query 0's row shows which keys it sees), an unpadded batch none."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1]) and mask.dtype == torch.bool
    assert (mask == mask[:, :, :1, :]).all()  # bidirectional: every query sees the same keys
    return mask[:, 0, 0, :]


def _fed_inputs(synth_tokens, protocol):
    width = 32 if protocol == "paper" else None
    data = load_split(synth_tokens / "tokens", "train", width=width)
    shard = iid_shards(len(data), 4, seed=0)[0]  # 64 rows: 4 batches of 16
    model = _Recorder(build_model("tiny-bert", 4, seed=0))
    flat = FlatParameters(model)
    for round_ in (1, 2):
        train_client(model, flat, data, data.lengths.numpy(), shard[:60], epochs=2, batch_size=16, lr=0.01,
                     protocol=PROTOCOLS[protocol], seed=0, round_=round_, client=0, bf16=False)
    return model.calls, data


def test_paper_protocol_no_mask_fixed_order_full_padding(synth_tokens):
    calls, data = _fed_inputs(synth_tokens, "paper")
    assert len(calls) == 2 * 2 * 3  # 60 rows, batch 16: the partial batch of 12 is dropped
    assert all(mask is None for _, mask in calls)
    assert all(ids.shape == (16, 32) for ids, _ in calls)  # padded to max_length, padding attended
    # One fixed order: every epoch of every round sees the same batches.
    epoch_batches = [tuple(torch.cat([ids for ids, _ in calls[i:i + 3]]).flatten().tolist())
                     for i in range(0, len(calls), 3)]
    assert len(set(epoch_batches)) == 1


def test_standard_protocol_masks_reshuffles_and_pads_dynamically(synth_tokens):
    calls, data = _fed_inputs(synth_tokens, "standard")
    assert len(calls) == 2 * 2 * 4  # the last partial batch (12 rows) is kept
    assert [ids.shape[0] for ids, _ in calls[:4]] == [16, 16, 16, 12]
    assert any(mask is not None for _, mask in calls)
    calls = [(ids, _key_mask(ids, mask)) for ids, mask in calls]
    for ids, mask in calls:
        # Dynamic padding: the batch is as wide as its longest sequence, which the mask shows.
        assert mask.sum(1).max() == ids.shape[1]
        lengths = (ids != data.pad_token_id).sum(1)
        assert torch.equal(mask.sum(1), lengths)

    def rows(ids, mask):  # each example as its unpadded token tuple
        return [tuple(r[:int(n)].tolist()) for r, n in zip(ids, mask.sum(1))]

    epochs = [[rows(*c) for c in calls[i:i + 4]] for i in range(0, len(calls), 4)]
    assert len({tuple(e[0]) for e in epochs}) == 4  # every epoch of every round starts differently
    assert len({frozenset(sum(e, [])) for e in epochs}) == 1  # ... over the same 60 examples


def test_derived_seeds_are_distinct_and_stable():
    seeds = {derive_seed(0, "order", r, k, e) for r in range(3) for k in range(4) for e in range(2)}
    assert len(seeds) == 24
    assert derive_seed(7, "dropout", 1, 2) == derive_seed(7, "dropout", 1, 2)
    assert derive_seed(7, "dropout", 1, 2) != derive_seed(8, "dropout", 1, 2)
