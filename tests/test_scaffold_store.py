"""SCAFFOLD's control-variate store and pipeline (fedsweep.scaffold): the variates held in memory
within a budget, the background writes and prefetches give the bits of the plain sequential code
(no memory, no thread), and the files a checkpoint names are on disk when it is saved."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsweep.clients import ClientSettings
from fedsweep.engine import PROTOCOLS, FlatParameters
from fedsweep.rounds import Federation
from fedsweep.scaffold import ControlVariateStore, Scaffold
from fedsweep.strategies import build_strategy
from fedsweep.tokens import TokenTensors

SIZE = 1000
MIB = SIZE * 4 / 2 ** 20  # one variate


@pytest.fixture(autouse=True)
def free_core(monkeypatch):
    """The pipeline runs where a core is free of training threads: here, always (these tests are
    about its bits, not its speed)."""
    monkeypatch.setattr("fedsweep.scaffold.free_core", lambda: True)


def _store(folder: Path, **kw) -> ControlVariateStore:
    return ControlVariateStore(folder, 8, **kw)


def _file(store: ControlVariateStore, client: int, round_: int) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(store.path(client, round_), dtype=np.float32))


@pytest.mark.parametrize("background", [True, False])
def test_budget_exceeded_spills_to_the_files_with_the_same_values(tmp_path, background):
    store = _store(tmp_path, memory_mib=2.5 * MIB, background=background)  # holds 2 variates
    gen = torch.Generator().manual_seed(0)
    values = {k: torch.randn(SIZE, generator=gen) for k in range(6)}
    for k, v in values.items():
        store.write(k, 1, v)
        assert store.held_bytes() <= store.budget
    store.flush()
    store.commit_round(list(values), 1)
    assert store.held_bytes() == 2 * SIZE * 4  # the last two written
    out = torch.empty(SIZE)
    for k, v in values.items():
        assert torch.equal(_file(store, k, 1), v)  # every variate is in its file
        assert torch.equal(store.get(k), v)  # held or read back: the same bits
        store.read(k, out)
        assert torch.equal(out, v)
    assert store.get(7) is None  # never trained: c_i = 0
    store.read(7, out)
    assert not out.any()
    store.close()


def test_no_budget_holds_nothing_and_superseded_variates_leave_memory(tmp_path):
    none = _store(tmp_path / "none", memory_mib=0)
    none.write(0, 1, torch.ones(SIZE))
    assert none.held_bytes() == 0
    none.flush()
    assert torch.equal(none.get(0, version=1), torch.ones(SIZE))
    store = _store(tmp_path / "held", memory_mib=100 * MIB)
    store.write(0, 1, torch.ones(SIZE))
    store.commit_round([0], 1)
    store.write(0, 2, torch.full((SIZE,), 2.0))
    assert store.held_bytes() == 2 * SIZE * 4  # both versions until the round commits
    assert torch.equal(store.get(0), torch.ones(SIZE))  # the current one until then
    store.commit_round([0], 2)
    assert store.held_bytes() == SIZE * 4 and torch.equal(store.get(0), torch.full((SIZE,), 2.0))
    store.close()


def test_flush_waits_for_slow_background_writes_and_raises_their_errors(tmp_path, monkeypatch):
    store = _store(tmp_path, memory_mib=0)
    original = ControlVariateStore._write_file

    def slow(self, *a, **k):
        time.sleep(0.05)
        return original(self, *a, **k)

    monkeypatch.setattr(ControlVariateStore, "_write_file", slow)
    for k in range(6):  # more than MAX_PENDING_WRITES: the writer waits for the oldest
        store.write(k, 1, torch.full((SIZE,), float(k)))
        assert torch.equal(store.get(k, version=1), torch.full((SIZE,), float(k)))  # readable before it is written
    store.flush()
    assert all(torch.equal(_file(store, k, 1), torch.full((SIZE,), float(k))) for k in range(6))

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ControlVariateStore, "_write_file", broken)
    store.write(0, 2, torch.zeros(SIZE))
    with pytest.raises(OSError, match="disk full"):
        store.flush()
    store.close()


# --- the pipeline against the sequential code -------------------------------------------------------

def _micro_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=1000, max_position_embeddings=32, num_labels=4, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _data(num_clients: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 600
    lengths = rng.integers(8, 33, n)
    ids = torch.from_numpy(rng.integers(5, 1000, (n, 32)))
    ids[torch.arange(32)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    data = TokenTensors(ids, torch.from_numpy(lengths), torch.from_numpy(rng.integers(0, 4, n)), 0)
    sizes = rng.integers(8, 40, num_clients)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    perm = rng.permutation(n)
    return data, lengths, [perm[starts[k]:starts[k + 1]] for k in range(num_clients)]


class _Run:
    """A SCAFFOLD federation of a micro BERT (5 of 10 clients a round), its store in ``folder``."""

    def __init__(self, folder: Path, weighting: str = "size", **store):
        background = store.pop("background", True)
        self.data, self.lengths, self.shards = _data()
        self.model = _micro_bert()
        self.flat = FlatParameters(self.model)
        self.strategy = build_strategy("fedavg", self.flat.data.clone())
        self.store = ControlVariateStore(folder, len(self.shards), background=background, **store)
        self.update = Scaffold(ClientSettings(client="scaffold", scaffold_weighting=weighting),
                               self.strategy.weights, self.store, background=background)
        assert self.update.pipelined == background
        self.fed = Federation(self.model, self.flat, self.strategy, self.update, self.data, self.lengths, self.shards,
                              epochs=2, batch_size=8, protocol=PROTOCOLS["standard"], seed=0, lr=0.05, rounds=6,
                              per_round=5)

    def round(self, r: int, saved: bool = True) -> dict:
        metrics = self.fed.finish(self.fed.train(r))
        state = self.update.state_dict() if saved else None
        self.update.commit(saved)
        return {"metrics": metrics, "state": state}

    def result(self):
        self.store.flush()  # the last round was not saved: its files may still be on their way
        files = {p.name: p.read_bytes() for p in self.store.folder.iterdir()}
        return self.strategy.weights.clone(), self.update.c.clone(), files


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("weighting", ["size", "uniform"])
def test_memory_and_background_thread_give_the_sequential_bits(tmp_path, weighting):
    """The same rounds with no memory and no thread (the sequential code), with a budget that holds
    3 of the 10 clients' variates (so that some are read back from their files) and with one that
    holds all: the weights, c and every file, to the bit."""
    runs = {}
    for name, store in {"sequential": dict(background=False, memory_mib=0), "spills": dict(memory_mib=None),
                        "held": dict(memory_mib=1024), "prefetch-no-memory": dict(memory_mib=0)}.items():
        if store.get("memory_mib", 0) is None:
            store["memory_mib"] = 3.5 * len(FlatParameters(_micro_bert()).data) * 4 / 2 ** 20
        run = _Run(tmp_path / name, weighting, **store)
        for r in range(1, 6):
            run.round(r, saved=r % 2 == 0)
            assert run.store.held_bytes() <= run.store.budget
        runs[name] = run.result()
        run.update.close(keep=True)
    assert runs["sequential"][2]  # files were written
    for name, got in runs.items():
        assert _same(runs["sequential"], got), name


def test_resume_after_a_kill_with_variates_in_memory_is_bitwise(tmp_path):
    """Killed in round 4 after two clients trained (their variates in memory, perhaps not yet on
    disk), with round 3's checkpoint saved: a new process (the saved state, the files the
    checkpoint names, the killed round's removed) gives the straight run's bits."""
    straight = _Run(tmp_path / "straight", memory_mib=1024)
    for r in range(1, 6):
        straight.round(r)
    expected = straight.result()
    straight.update.close(keep=True)

    killed = _Run(tmp_path / "killed", memory_mib=1024)
    saved = None
    for r in range(1, 4):
        saved = killed.round(r)["state"]
    saved = {k: v.clone() for k, v in saved.items()}
    torch.save({"weights": killed.strategy.weights.clone(), "client_state": saved}, tmp_path / "ckpt.pt")
    import fedsweep.rounds as frounds
    original, calls = frounds.train_client, []

    class Killed(BaseException):
        pass

    def train_client(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed()
        return original(*a, **k)

    frounds.train_client = train_client
    try:
        with pytest.raises(Killed):
            killed.fed.train(4)
    finally:
        frounds.train_client = original
    killed.update.close(keep=True)  # a kill takes its threads too: let them end before the new process starts

    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed = _Run(tmp_path / "killed", memory_mib=1024)
    resumed.strategy.weights.copy_(checkpoint["weights"])
    resumed.update.load_state_dict(checkpoint["client_state"])
    resumed.update.prepare(tmp_path / "ckpt.pt", lambda message: None)
    assert not any(p.name.endswith(".r4.f32") for p in resumed.store.folder.iterdir())  # the killed round's
    for r in (4, 5):
        resumed.round(r)
    assert _same(expected, resumed.result())
    resumed.update.close(keep=True)


def test_state_dict_waits_for_the_files_it_names(tmp_path, monkeypatch):
    original = ControlVariateStore._write_file

    def slow(self, *a, **k):
        time.sleep(0.03)
        return original(self, *a, **k)

    monkeypatch.setattr(ControlVariateStore, "_write_file", slow)
    run = _Run(tmp_path / "run", memory_mib=1024)
    run.fed.finish(run.fed.train(1))
    state = run.update.state_dict()
    versions = state["versions"].numpy()
    assert (versions > 0).sum() == 5
    for k, v in enumerate(versions):
        if v:
            assert run.store.path(k, int(v)).stat().st_size == run.store.get(k).numel() * 4  # all of it
    run.update.close(keep=False)
    assert not (tmp_path / "run").exists()
