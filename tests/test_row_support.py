"""Clients added by the input-embedding rows they index (fedsweep.row_support): the dense add's
sums to the bit, the same training, and only where the client update leaves other rows alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from fedsweep.client_update import ClientSettings, ClientUpdate, FedProx
from fedsweep.engine import PROTOCOLS, FlatParameters
from fedsweep.grouped import ClientGroups
from fedsweep.models import build_model
from fedsweep.rounds import Federation, RoundStats, drift_metrics
from fedsweep.row_support import EmbeddingRows
from fedsweep.scaffold import ControlVariateStore, Scaffold
from fedsweep.strategies import FedAvg, build_strategy
from fedsweep.tokens import TokenTensors

SERVER = dict(server_lr=0.01, server_momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3)
# a 2,000-element vector whose elements 160..1,760 are a 100 x 16 embedding matrix
EMBEDDING = EmbeddingRows(start=160, rows=100, width=16, size=2_000)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-albert", "tiny-distilbert"])
def test_the_input_embedding_is_found_in_the_flat_vector(name):
    model = build_model(name, 3, seed=0)
    flat = FlatParameters(model)
    rows = EmbeddingRows.of(model, flat)
    weight = model.get_input_embeddings().weight
    assert (rows.rows, rows.width, rows.size) == (*weight.shape, len(flat))
    assert rows.matrix(flat.data).data_ptr() == weight.data_ptr()


def test_frozen_or_tied_embeddings_have_no_rows():
    model = build_model("tiny-bert", 3, seed=0)
    model.get_input_embeddings().weight.requires_grad_(False)  # e.g. LoRA: not in the flat vector
    assert EmbeddingRows.of(model, FlatParameters(model)) is None
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, tie_word_embeddings=True)
    tied = transformers.BertForMaskedLM(config)  # the output layer's gradient reaches every row
    assert EmbeddingRows.of(tied, FlatParameters(tied)) is None


def _clients(num_clients: int, seed: int = 0, x: torch.Tensor | None = None, embedding: EmbeddingRows = EMBEDDING):
    """Global weights (``x``, else random) and clients that moved the vector outside the matrix and
    some of its rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(embedding.size, generator=gen) if x is None else x
    clients = []
    for _ in range(num_clients):
        client = x + 1e-2 * torch.randn(embedding.size, generator=gen)
        rows = torch.randperm(embedding.rows, generator=gen)[:int(torch.randint(1, 40, (), generator=gen))].sort().values
        matrix, moved = embedding.matrix(client), embedding.matrix(x).clone()
        moved[rows] = matrix[rows]
        matrix.copy_(moved)  # every other row is the global one, bit for bit
        clients.append((client, rows))
    return x, clients


def _round(strategy, clients, sizes, by_rows: bool):
    strategy.begin_round(sum(sizes))
    stats = RoundStats()
    for (client, rows), n in zip(clients, sizes):
        buffer = client.clone()
        stats.add_client(strategy.add(buffer, n, rows if by_rows else None), n / strategy.total, 0.0, n)
        assert torch.equal(buffer, strategy.weights)  # reloaded for the next client
    sums = (strategy.accum.clone(), strategy.direction.clone())
    return sums, drift_metrics(stats, strategy.finish_round(scratch=torch.empty_like(strategy.weights)))


# rows split into blocks of 4 (of 16), of 62 and whole; the device path (temporaries, no scratch) once
@pytest.mark.parametrize("chunk, host_casts", [(64, True), (1000, True), (1 << 17, True), (1000, False)])
@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedavgm"])
@pytest.mark.parametrize("width", [16, 13])  # rows of whole vector registers, and with a remainder
def test_adding_by_rows_sums_what_the_dense_add_sums(monkeypatch, chunk, host_casts, name, width):
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", chunk)
    embedding = EmbeddingRows(start=160, rows=100, width=width, size=160 + 100 * width + 37)
    x, _ = _clients(0, embedding=embedding)
    sizes = [5, 9, 6, 13]
    dense, sparse = (build_strategy(name, x.clone(), **SERVER) for _ in range(2))
    sparse.use_rows(embedding)
    assert sparse.embedding is embedding
    dense.host_casts = sparse.host_casts = host_casts
    for round_ in range(2):  # the state (m, v) carries into a second round
        _, clients = _clients(4, seed=round_, x=dense.weights, embedding=embedding)
        (accum, direction), metrics = _round(dense, clients, sizes, by_rows=False)
        (accum_r, direction_r), metrics_r = _round(sparse, clients, sizes, by_rows=True)
        assert torch.equal(accum_r, accum) and torch.equal(direction_r, direction)
        assert torch.equal(sparse.weights, dense.weights)
        for key, value in metrics.items():  # norms are summed in another order: equal to fp64 rounding
            assert metrics_r[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert {k: v.tolist() for k, v in sparse.state_dict().items()} == \
            {k: v.tolist() for k, v in dense.state_dict().items()}


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_one_client_by_rows_has_no_spread(monkeypatch, name):
    """K=1: the server sums u over the pieces the client's add summed u_1 over, so the spread is
    exactly 0 and FedAvg's new weights are the client's, to the bit."""
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 200)
    x, clients = _clients(1, seed=2)
    strategy = build_strategy(name, x.clone(), **SERVER)
    strategy.use_rows(EMBEDDING)
    _, metrics = _round(strategy, clients, [7], by_rows=True)
    assert metrics["client_drift_rms"] == 0.0
    assert metrics["update_cosine"] == pytest.approx(1.0, rel=1e-6)  # d is fp32
    if name == "fedavg":
        assert torch.equal(strategy.weights, clients[0][0])


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_server_step_split_with_a_worker_thread_gives_the_same_bits(monkeypatch, name):
    """Where a free core allows it, a worker thread takes half of the server step's chunks
    (fedsweep.background.split_map): the weights, the state and every metric are those of one
    thread, to the bit; rounds added densely, by rows, and by rows with one client."""
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 64)  # 32 chunks
    x, _ = _clients(0)
    strategies = {}
    for split in (False, True):
        monkeypatch.setattr("fedsweep.average.free_core", lambda split=split: split)
        strategies[split] = build_strategy(name, x.clone(), **SERVER)
        strategies[split].use_rows(EMBEDDING)
        assert (strategies[split]._lanes() is not None) == split  # decided once, on the first call
    for round_, (count, by_rows) in enumerate([(3, False), (3, True), (1, True)]):
        _, clients = _clients(count, seed=round_, x=strategies[False].weights)
        results = [_round(strategies[split], clients, [5, 9, 6][:count], by_rows) for split in (False, True)]
        assert results[0][1] == results[1][1]  # the metrics
        assert torch.equal(strategies[True].weights, strategies[False].weights)
        assert all(torch.equal(a, b) for a, b in zip(strategies[True].state_dict().values(),
                                                     strategies[False].state_dict().values()))


def test_a_round_with_a_dense_client_steps_densely():
    x, clients = _clients(3, seed=1)
    sizes = [4, 4, 4]
    reference, mixed = FedAvg(x.clone()), FedAvg(x.clone())
    mixed.use_rows(EMBEDDING)
    reference.begin_round(12), mixed.begin_round(12)
    for k, ((client, rows), n) in enumerate(zip(clients, sizes)):
        reference.add(client.clone(), n)
        mixed.add(client.clone(), n, None if k == 1 else rows)
    assert not mixed._by_rows()
    assert reference.finish_round(torch.empty(EMBEDDING.size)) == mixed.finish_round(torch.empty(EMBEDDING.size))
    assert torch.equal(mixed.weights, reference.weights)


def _federation(client_update_for, *, by_rows: bool, groups: bool = False, strategy: str = "fedavg",
                num_shards: int = 16, per_round: int = 4):
    rng = np.random.default_rng(0)
    n, width = 256, 24
    lengths = rng.integers(6, width + 1, n)
    ids = torch.from_numpy(rng.integers(1000, 30000, (n, width)))
    ids[torch.arange(width)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    data = TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, 4, n)), 0)
    shards = [np.arange(k, n, num_shards) for k in range(num_shards)]  # 16 clients of 16 rows
    model = build_model("tiny-bert", 4, seed=0)
    flat = FlatParameters(model)
    server = build_strategy(strategy, flat.data.clone(), **SERVER)
    update = client_update_for(server.weights)
    fed = Federation(model, flat, server, update, data, lengths, shards, epochs=2, batch_size=8,
                     protocol=PROTOCOLS["standard"], seed=0, lr=0.1, rounds=3, per_round=per_round,
                     groups=ClientGroups(model, flat, 2) if groups else None)
    if not by_rows:
        server.use_rows(None)
        update.use_rows(None, None, None)  # SCAFFOLD: its correction on every row
    return fed


@pytest.mark.parametrize("case", ["plain", "fedprox", "groups", "fedadam"])  # 3 rounds: ~1.5 s each
def test_a_federation_by_rows_trains_what_the_dense_one_trains(case):
    """Real tiny-bert clients (plain SGD, FedProx, two at a time, a FedAdam server): the rows they
    did not index stayed put, so adding by rows gives the dense run's weights to the bit."""
    def update(weights):
        if case == "fedprox":
            return FedProx(ClientSettings(client="fedprox", mu=0.1), weights)
        return ClientUpdate(ClientSettings(), weights)

    kwargs = dict(groups=case == "groups", strategy="fedadam" if case == "fedadam" else "fedavg")
    dense, sparse = _federation(update, by_rows=False, **kwargs), _federation(update, by_rows=True, **kwargs)
    assert sparse.strategy.embedding is not None and dense.strategy.embedding is None
    initial = sparse.strategy.weights.clone()
    for round_ in (1, 2, 3):
        got, want = (fed.finish(fed.train(round_)) for fed in (sparse, dense))
        assert sparse.strategy._by_rows()
        assert torch.equal(sparse.strategy.weights, dense.strategy.weights), round_
        assert got["train_loss"] == want["train_loss"]
        for key in ("client_update_norm", "mean_update_norm", "client_drift_rms", "update_cosine"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
    # and the rows no client of the three rounds indexed are the initial ones, bit for bit
    embedding = sparse.strategy.embedding
    indexed = torch.unique(torch.cat([sparse.data.ids[sparse.shards[k]].flatten()
                                      for r in (1, 2, 3) for k in sparse.round_clients(r)]))
    untouched = torch.ones(embedding.rows, dtype=torch.bool)
    untouched[indexed] = False
    assert untouched.sum() > 0.9 * embedding.rows
    assert torch.equal(embedding.matrix(sparse.strategy.weights)[untouched], embedding.matrix(initial)[untouched])


@pytest.mark.parametrize("case", ["fedavg", "fedadam", "scaffold"])
def test_clients_summed_on_a_worker_thread_give_the_same_bits(monkeypatch, tmp_path, case):
    """With a free core the server sums each client on a worker thread while the next client trains
    (Strategy.submit: by rows, or densely for SCAFFOLD, whose own pipeline runs beside it), and
    FedAdam's step splits its chunks with it: 3 rounds of real tiny-bert clients give the
    one-thread run's weights, state and metrics to the bit."""
    def update(weights, folder):
        if case != "scaffold":
            return ClientUpdate(ClientSettings(), weights)
        store = ControlVariateStore(tmp_path / folder, 16)
        return Scaffold(ClientSettings(client="scaffold"), weights, store)

    feds = {}
    for worker in (False, True):
        for module in ("average", "scaffold"):
            monkeypatch.setattr(f"fedsweep.{module}.free_core", lambda worker=worker: worker)
        feds[worker] = _federation(lambda w, f=str(worker): update(w, f), by_rows=True,
                                   strategy="fedadam" if case == "fedadam" else "fedavg")
        assert (feds[worker].strategy._background() is not None) == worker  # decided once, on first use
    for round_ in (1, 2, 3):
        got, want = (feds[w].finish(feds[w].train(round_)) for w in (True, False))
        assert torch.equal(feds[True].strategy.weights, feds[False].strategy.weights), round_
        for key in ("train_loss", "client_update_norm", "client_drift_max", "mean_update_norm",
                    "pseudo_gradient_norm", "client_drift_rms", "update_cosine"):
            assert got[key] == want[key], key
        for a, b in ((feds[True].strategy, feds[False].strategy), (feds[True].client_update, feds[False].client_update)):
            assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y))
                       for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_clients_submitted_by_rows_or_densely_sum_what_adding_them_sums(monkeypatch):
    """Clients handed to the worker thread (Strategy.submit), by rows and one densely (rows=None):
    the sums, norms and new weights of adding them on this thread, in the same order."""
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 64)
    monkeypatch.setattr("fedsweep.average.free_core", lambda: True)
    x, clients = _clients(4, seed=3)
    sizes = [3, 5, 7, 2]
    pipelined, inline = FedAvg(x.clone()), FedAvg(x.clone())
    for strategy in (pipelined, inline):
        strategy.use_rows(EMBEDDING)
        strategy.begin_round(sum(sizes))
    norms = []
    for k, ((client, rows), n) in enumerate(zip(clients, sizes)):
        rows = None if k == 2 else rows
        buffer = client.clone()
        norms.append((pipelined.submit(buffer, n, rows), inline.add(client.clone(), n, rows)))
        assert torch.equal(buffer, pipelined.weights)  # reloaded at once, for the next client
    pipelined.drain()
    assert [a.result() for a, _ in norms] == [b for _, b in norms]
    assert torch.equal(pipelined.accum, inline.accum) and torch.equal(pipelined.direction, inline.direction)
    scratch = torch.empty(EMBEDDING.size)
    assert pipelined.finish_round(scratch) == inline.finish_round(scratch)
    assert torch.equal(pipelined.weights, inline.weights)


def test_client_updates_that_move_every_row_are_added_densely(tmp_path):
    settings = ClientSettings(client_optimizer="adamw", weight_decay=0.01)
    assert not ClientUpdate(settings, torch.zeros(4)).row_sparse
    assert ClientUpdate(ClientSettings(), torch.zeros(4)).row_sparse
    assert FedProx(ClientSettings(client="fedprox", mu=0.1), torch.zeros(4)).row_sparse

    def scaffold(weights):
        store = ControlVariateStore(tmp_path, 16)
        return Scaffold(ClientSettings(client="scaffold"), weights, store, background=False)

    # SCAFFOLD's correction moves every row unless it leaves the other rows to the server
    assert not scaffold(torch.zeros(4)).row_sparse
    fed = _federation(scaffold, by_rows=True)
    assert fed.strategy.embedding is not None and fed.client_update.row_sparse  # fedsweep.scaffold_rows


def test_rows_longer_than_a_chunk_are_added_densely(monkeypatch):
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", 8)  # a row of 16 would not fit the scratch buffers
    strategy = FedAvg(torch.zeros(EMBEDDING.size))
    strategy.use_rows(EMBEDDING)
    assert strategy.embedding is None
