"""SCAFFOLD's correction on the rows a client never indexes, left to the server
(fedsweep.scaffold_rows): the algorithm that corrects every row at every step, to rounding; SGD
to the bit at K=1; and the closed form's sums against the formula written out."""

from __future__ import annotations

import math

import pytest
import torch

from fedsweep.client_update import ClientSettings, ClientUpdate
from fedsweep.row_support import EmbeddingRows
from fedsweep.scaffold import ControlVariateStore, Scaffold
from fedsweep.scaffold_rows import CompactVectors, DeferredRows, RowSum
from test_row_support import _federation

METRICS = ("train_loss", "client_update_norm", "client_drift_max", "mean_update_norm", "pseudo_gradient_norm",
           "client_drift_rms", "update_cosine", "control_variate_norm")


def _scaffold(folder, background: bool = False):
    def build(weights):
        store = ControlVariateStore(folder, 16)
        return Scaffold(ClientSettings(client="scaffold"), weights, store, background=background)
    return build


@pytest.mark.parametrize("case", ["fedavg", "groups", "fedadam"])  # 4 rounds: ~3 s each
def test_rows_left_to_the_server_train_what_correcting_every_row_trains(tmp_path, case):
    """Real tiny-bert clients, 4 of 16 per round (clients come back with their old c_i): the
    weights, c and every metric of the run that corrects all 30,522 rows at every step, to
    float rounding; the client's c_i+ is exactly 0 on the rows it did not index."""
    kwargs = dict(groups=case == "groups", strategy="fedadam" if case == "fedadam" else "fedavg")
    dense = _federation(_scaffold(tmp_path / "dense"), by_rows=False, **kwargs)
    rows = _federation(_scaffold(tmp_path / "rows"), by_rows=True, **kwargs)
    assert rows.client_update.row_sparse and rows.strategy.embedding is not None
    assert not dense.client_update.row_sparse and dense.strategy.embedding is None
    embedding = rows.strategy.embedding
    for round_ in (1, 2, 3, 4):
        got, want = (fed.finish(fed.train(round_)) for fed in (rows, dense))
        scale = float(dense.strategy.weights.abs().max())
        assert float((rows.strategy.weights - dense.strategy.weights).abs().max()) < 1e-6 * scale, round_
        c, c_dense = rows.client_update.c, dense.client_update.c
        assert float((c - c_dense).abs().max()) < 1e-4 * float(c_dense.abs().max()), round_
        for key in METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-4), (round_, key)
        for client in rows.round_clients(round_):
            kept = torch.zeros(embedding.rows, dtype=torch.bool)
            kept[embedding.client_rows(rows.data.ids, rows.shards[client])] = True
            stored = rows.client_update.store.get(client)
            assert stored.numel() < embedding.size // 4  # its rows only (CompactVectors)
            mine = embedding.matrix(rows.client_update.deferred.compact.dense(stored, torch.empty(embedding.size)))
            assert not mine[~kept].any() and mine[kept].any()  # 0 to the bit where it left rows out
            want = embedding.matrix(dense.client_update.store.get(client))
            assert float((mine - want).abs().max()) < 1e-3 * float(want.abs().max())
    assert rows.client_update.deferred.total_average > 0  # the server did correct rows


def test_scaffold_of_one_client_with_rows_is_sgd_to_the_bit(tmp_path):
    """K=1: c = c_1, which is 0 off the client's rows, so the server owes exactly nothing."""
    sgd = _federation(lambda w: ClientUpdate(ClientSettings(), w), by_rows=True, num_shards=1, per_round=1)
    scaffold = _federation(_scaffold(tmp_path), by_rows=True, num_shards=1, per_round=1)
    assert scaffold.client_update.row_sparse
    for round_ in (1, 2, 3):
        got, want = (fed.finish(fed.train(round_)) for fed in (scaffold, sgd))
        assert torch.equal(scaffold.strategy.weights, sgd.strategy.weights), round_
        for key in METRICS[:-1]:
            assert got[key] == want[key] or (math.isnan(got[key]) and math.isnan(want[key])), key
        assert got["control_variate_norm"] > 0


def test_the_closed_form_adds_the_formula(tmp_path):
    """Three clients with random c, old c_i and rows: the sums, the norms and the round's term are
    those of u_i = -S_i eta (c - c_i) on the rows each left out, written out densely in fp64."""
    emb = EmbeddingRows(start=30, rows=50, width=8, size=30 + 50 * 8 + 11)
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(emb.size, generator=gen)
    rows = {k: torch.randperm(emb.rows, generator=gen)[:n].sort().values for k, n in ((0, 5), (1, 20), (2, 12))}
    olds = {0: None, 1: torch.randn(emb.size, generator=gen), 2: torch.randn(emb.size, generator=gen)}
    emb.matrix(olds[2])[::2] = 0  # an old c_i with rows of zeros
    deferred = DeferredRows(emb, c, rows.__getitem__)
    deferred.begin_round()
    accum, direction = torch.zeros(emb.size, dtype=torch.float64), torch.zeros(emb.size)
    want_accum, want_direction = torch.zeros_like(accum), torch.zeros(emb.size, dtype=torch.float64)
    for k, (steps_lr, alpha, scale) in enumerate([(0.3, 0.2, 0.7), (0.5, 0.5, 1.3), (0.2, 0.3, 0.0)]):
        part = deferred.client(k, olds[k], steps_lr)
        u = torch.zeros(emb.size, dtype=torch.float64)
        left_out = torch.ones(emb.rows, dtype=torch.bool)
        left_out[rows[k]] = False
        old = torch.zeros(emb.size) if olds[k] is None else olds[k]
        emb.matrix(u)[left_out] = -steps_lr * (emb.matrix(c).double() - emb.matrix(old).double())[left_out]
        assert part.square == pytest.approx(float(u @ u), rel=1e-6)  # fp32 row norms (DeferredRows.measure)
        part.apply(accum, direction, alpha, scale)
        want_accum += alpha * u
        want_direction += scale * u
    assert deferred.finish(accum, direction)
    assert torch.allclose(accum, want_accum, rtol=1e-12, atol=1e-12)
    assert torch.allclose(direction.double(), want_direction, rtol=1e-6, atol=1e-6)
    assert not accum[:emb.start].any() and not accum[emb.stop:].any()  # rows only


def test_packed_variates_hold_and_sum_the_dense_bits():
    """CompactVectors: a client's c - c_i, c_i+ and fp64 sum on its rows and the rest of the vector
    are the dense computation's, bit for bit (old variates on the same rows, on other rows, none)."""
    emb = EmbeddingRows(start=30, rows=50, width=8, size=30 + 50 * 8 + 11)
    compact = CompactVectors(emb)
    gen = torch.Generator().manual_seed(1)
    c, x, y = (torch.randn(emb.size, generator=gen) for _ in range(3))
    rows = torch.randperm(emb.rows, generator=gen)[:9].sort().values
    kept = torch.zeros(emb.rows, dtype=torch.bool)
    kept[rows] = True

    def on_rows(vector, which=kept):  # a dense vector that is 0 off the rows
        vector = vector.clone()
        emb.matrix(vector)[~which] = 0
        return vector

    others = torch.zeros(emb.rows, dtype=torch.bool)
    others[torch.randperm(emb.rows, generator=gen)[:12]] = True
    for old_dense in (None, on_rows(torch.randn(emb.size, generator=gen)), on_rows(torch.randn(emb.size), others)):
        which = kept if old_dense is None or not emb.matrix(old_dense)[others & ~kept].any() else others
        old = None
        if old_dense is not None:
            have = torch.nonzero(which).flatten()
            old = compact.difference(old_dense, torch.zeros(emb.size), have)  # packed: old - 0
            assert torch.equal(compact.dense(old, torch.empty(emb.size)), old_dense)
        correction = torch.empty(emb.size)
        values = compact.correction(c, old, rows, correction)
        want = on_rows(c - (0 if old_dense is None else old_dense))
        assert torch.equal(on_rows(correction), want) and torch.equal(values, emb.matrix(want)[rows])
        new = compact.new_variate(compact.difference(x, y, rows), correction, 0.3)
        new_dense = on_rows((x - y).div_(0.3) - want)
        assert torch.equal(compact.dense(new, torch.empty(emb.size)), new_dense)
        got, expected = torch.ones(emb.size, dtype=torch.float64), torch.ones(emb.size, dtype=torch.float64)
        compact.add64(got, new, old, 0.7, torch.empty(16, dtype=torch.float64))
        expected.add_(new_dense.double().sub_(0 if old_dense is None else old_dense), alpha=0.7)
        assert torch.equal(got, expected)


def test_layer_groups_count_the_rows_left_to_the_server(tmp_path):
    """On measured rounds the groups' sum_k w_k ||u_k,g||^2 still add up to the model's: the rows the
    server corrects count in the embeddings group."""
    from fedsweep import layers as layer_drift

    fed = _federation(_scaffold(tmp_path), by_rows=True)
    layers = layer_drift.attach(fed.strategy, fed.model, fed.flat)
    for round_ in (1, 2, 3):
        layers.active = True
        stats = fed.train(round_)
        fed.finish(stats)
        assert float(layers.client_sq.sum()) == pytest.approx(stats.drift_weighted_sq, rel=1e-9), round_
    assert fed.client_update.deferred.total_average > 0


def test_a_checkpoint_of_dense_variates_resumes_by_rows(tmp_path):
    """Variates written by the code that corrected every row (dense files, non-zero on rows a client
    never indexes) feed a run by rows: round 3 trains what the dense code trains, to rounding."""
    import shutil

    dense = _federation(_scaffold(tmp_path / "dense"), by_rows=False)
    for round_ in (1, 2):
        dense.finish(dense.train(round_))
    state = {k: v.clone() for k, v in dense.client_update.state_dict().items()}
    shutil.copytree(tmp_path / "dense", tmp_path / "rows")
    rows = _federation(_scaffold(tmp_path / "rows"), by_rows=True)
    rows.strategy.weights.copy_(dense.strategy.weights)
    rows.client_update.load_state_dict(state)
    back = [k for k in rows.round_clients(3) if state["versions"][k] > 0]
    assert back and all(rows.client_update.store.get(k).numel() == len(rows.flat) for k in back)  # dense files
    got, want = (fed.finish(fed.train(3)) for fed in (rows, dense))
    scale = float(dense.strategy.weights.abs().max())
    assert float((rows.strategy.weights - dense.strategy.weights).abs().max()) < 1e-6 * scale
    c, c_dense = rows.client_update.c, dense.client_update.c
    assert float((c - c_dense).abs().max()) < 1e-4 * float(c_dense.abs().max())
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-4), key


@pytest.mark.parametrize("dense_last", [False, True])
def test_cs_sum_by_rows_gives_the_dense_sums_bits(dense_last):
    """RowSum: c's fp64 sum copied from c only on the rows the round's variates hold (and the vector
    around the matrix) gives c the dense sum's bits; the rows it returns are those the adds reached,
    and a dense variate reaches every row."""
    emb = EmbeddingRows(start=30, rows=50, width=8, size=30 + 50 * 8 + 11)
    compact = CompactVectors(emb)
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(emb.size, generator=gen)
    dense_accum = c.double()
    accum = torch.full((emb.size,), float("nan"), dtype=torch.float64)  # what begin does not copy stays unread
    row_sum = RowSum(emb, c, accum)
    row_sum.begin()

    def packed(n):
        rows = torch.randperm(emb.rows, generator=gen)[:n].sort().values
        return compact.difference(torch.randn(emb.size, generator=gen), torch.zeros(emb.size), rows)

    a, b, d = packed(7), packed(5), packed(9)
    adds = [(a, None, 0.25), (b, a, 0.5), (d, None, 0.125)]  # b's old variate holds other rows: their union
    for new, old, alpha in adds:
        for variate in (new, old):
            if variate is not None:
                row_sum.open(compact.parts(variate)[0])
        compact.add64(accum, new, old, alpha, torch.empty(4, dtype=torch.float64))
        compact.add64(dense_accum, new, old, alpha, torch.empty(4, dtype=torch.float64))
    if dense_last:
        dense = torch.randn(emb.size, generator=gen)
        row_sum.whole()
        accum.add_(dense.double(), alpha=0.375)
        dense_accum.add_(dense.double(), alpha=0.375)
    want = dense_accum.float()
    changed = row_sum.end()
    assert torch.equal(c, want)
    if dense_last:
        assert changed is None
    else:
        reached = torch.unique(torch.cat([compact.parts(v)[0] for v in (a, b, d)]))
        assert torch.equal(changed, reached)
