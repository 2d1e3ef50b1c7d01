"""The round's update and drift metrics (README, "Drift metrics") against their definitions.

A few clients with unequal shards and random fp32 weights go through ``Strategy.begin_round``,
``add`` and ``finish_round`` as :func:`fedsweep.rounds.train_round` drives them, and
:func:`fedsweep.rounds.drift_metrics` turns the sums into metrics; the reference computes each
definition directly in numpy float64 from the explicit client models. Both the CPU's chunked path
(chunks of 1000 elements) and one chunk over the whole model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsweep.rounds import RoundStats, drift_metrics
from fedsweep.strategies import FedAvg, FedAvgM

SIZE = 10_007  # 11 chunks of 1000, the last one partial
CHUNKS = {"chunked": 1000, "whole": 1 << 20}


def _models(num_clients: int, seed: int = 0):
    """The global model and client models that moved along a shared direction plus their own, so
    that the spread is ~10x smaller than the mean update (the rms is a difference of squares)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SIZE, generator=gen)
    shared = 0.01 * torch.randn(SIZE, generator=gen)
    clients = [x + shared + 1e-3 * torch.randn(SIZE, generator=gen) for _ in range(num_clients)]
    return x, clients


def _run(strategy, clients, sizes, mine=None):
    """A round's clients as train_round adds them (``mine``: this rank's, default all): begin with
    the round's total, add each (its buffer reloaded afterwards); finish with :func:`_metrics`."""
    strategy.begin_round(sum(sizes))
    stats = RoundStats()
    for k in range(len(sizes)) if mine is None else mine:
        buffer, n = clients[k].clone(), sizes[k]
        stats.add_client(strategy.add(buffer, n), n / strategy.total, 0.0, n)
        assert torch.equal(buffer, strategy.weights)  # reloaded for the next client
    return stats


def _metrics(strategy, stats):
    return drift_metrics(stats, strategy.finish_round(scratch=torch.empty(SIZE)))


def _reference(x, clients, sizes, new_weights):
    """Each metric from its definition, in float64: u_k = x_k - x, w_k = n_k / N, the average
    sum_k w_k x_k and u = average - x; the pseudo-gradient is the one the server stepped with, from
    the average rounded to fp32 (FedAvg's new model)."""
    x64 = x.double().numpy()
    w = np.array(sizes, dtype=np.float64) / sum(sizes)
    xs = [c.double().numpy() for c in clients]
    average = sum(wk * xk for wk, xk in zip(w, xs))
    us = [xk - x64 for xk in xs]
    u = average - x64
    norms = [np.linalg.norm(uk) for uk in us]
    return {
        "client_update_norm": float(np.mean(norms)),
        "mean_update_norm": float(np.linalg.norm(new_weights.double().numpy() - x64)),
        "pseudo_gradient_norm": float(np.linalg.norm(average.astype(np.float32).astype(np.float64) - x64)),
        "client_drift_max": float(max(norms)),
        "client_drift_rms": float(np.sqrt(sum(wk * np.sum((xk - average) ** 2) for wk, xk in zip(w, xs)))),
        "update_cosine": float(sum(wk * (uk @ u) / (nk * np.linalg.norm(u)) for wk, uk, nk in zip(w, us, norms))),
    }


# Sums are fp64 of exact differences (1e-12 relative) except: the cosine's direction d is fp32
# (measured 3e-8), and the server's delta and step are fp32 differences (1e-12 and 4e-11 measured)
TOLERANCE = {"update_cosine": 1e-6, "pseudo_gradient_norm": 1e-9, "mean_update_norm": 1e-9}

STRATEGIES = {
    "fedavg": lambda x: FedAvg(x),
    "fedavgm": lambda x: FedAvgM(x, server_lr=0.7, server_momentum=0.9),
}


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_metrics_equal_their_definitions(monkeypatch, chunk, name):
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", CHUNKS[chunk])
    x, clients = _models(4)
    sizes = [13, 40, 7, 29]
    strategy = STRATEGIES[name](x.clone())
    got = _metrics(strategy, _run(strategy, clients, sizes))
    expected = _reference(x, clients, sizes, strategy.weights)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=TOLERANCE.get(key, 1e-12)), key
    assert 0.9 < got["update_cosine"] < 1.0 and got["client_drift_rms"] < 0.2 * got["pseudo_gradient_norm"]


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_one_client_has_drift_from_the_server_model_but_no_spread(monkeypatch, chunk, name):
    """K=1: local training moves the model (drift_max = ||u_1|| > 0), the spread about the average
    is exactly 0 and the client's update is the average update (cosine 1)."""
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", CHUNKS[chunk])
    x, clients = _models(1)
    strategy = STRATEGIES[name](x.clone())
    got = _metrics(strategy, _run(strategy, clients, [17]))
    assert got["client_drift_rms"] == 0.0
    assert got["update_cosine"] == pytest.approx(1.0, rel=1e-6)
    assert got["client_drift_max"] == got["client_update_norm"] > 0
    # the server's delta is x - x_1 rounded to fp32: equal to ~1e-8 of ||x|| / ||u_1|| here
    assert got["pseudo_gradient_norm"] == pytest.approx(got["client_drift_max"], rel=1e-6)


def test_fedavgm_without_momentum_measures_what_fedavg_measures():
    x, clients = _models(3, seed=1)
    sizes = [5, 11, 8]
    fedavg = FedAvg(x.clone())
    base = _metrics(fedavg, _run(fedavg, clients, sizes))
    same = FedAvgM(x.clone(), server_lr=1.0, server_momentum=0.0)
    assert _metrics(same, _run(same, clients, sizes)) == base  # the same sums, chunk for chunk
    assert torch.equal(same.weights, fedavg.weights)
    slower = FedAvgM(x.clone(), server_lr=0.5, server_momentum=0.0)
    got = _metrics(slower, _run(slower, clients, sizes))
    for key in ("pseudo_gradient_norm", "client_drift_rms", "update_cosine", "client_drift_max"):
        assert got[key] == pytest.approx(base[key], rel=1e-12, abs=0), key
    assert got["mean_update_norm"] == pytest.approx(0.5 * base["mean_update_norm"], rel=1e-6)


@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_the_gpu_path_sums_what_the_cpu_path_sums(monkeypatch, chunk):
    """Strategy.add's device path (whole-vector fp64 add, chunk-sized casts) run on a CPU: the same
    average and direction, and the same metrics to the bit."""
    monkeypatch.setattr(FedAvg, "CPU_CHUNK", CHUNKS[chunk])
    x, clients = _models(3, seed=3)
    sizes = [4, 9, 6]
    host, device = FedAvg(x.clone()), FedAvg(x.clone())
    device.host_casts = False
    got = [_metrics(s, _run(s, clients, sizes)) for s in (host, device)]
    assert got[0] == got[1]
    assert torch.equal(host.weights, device.weights) and torch.equal(host.direction, device.direction)


def test_no_client_moved_gives_no_cosine():
    x, _ = _models(1)
    strategy = FedAvg(x.clone())
    got = _metrics(strategy, _run(strategy, [x.clone(), x.clone()], [3, 4]))
    assert got["pseudo_gradient_norm"] == got["client_drift_max"] == got["client_drift_rms"] == 0.0
    assert math.isnan(got["update_cosine"])


class _Recorder:
    """A rank's collectives, recorded (the values as given) for its peer to replay."""

    def __init__(self):
        self.calls = []

    def sum(self, values):
        self.calls.append(list(values))
        return list(values)

    def max(self, value):
        self.calls.append(value)
        return value

    min = max


class _Peer:
    """The other rank of a 2-rank world, in one process: each collective joins the recorded values."""

    def __init__(self, recorded):
        self.calls = iter(recorded)

    def sum(self, values):
        return [a + b for a, b in zip(values, next(self.calls))]

    def max(self, value):
        return max(value, next(self.calls))

    def min(self, value):
        return min(value, next(self.calls))


def test_two_ranks_join_their_sums():
    """Rank 0 adds clients 0 and 2, rank 1 client 1; the all-reduce sums the average's and the
    direction's buffers, RoundStats.joined the clients' sums: the single process's metrics."""
    x, clients = _models(3, seed=2)
    # An odd total: with an even one, an exact average can fall on an fp32 rounding tie, which the
    # fp64 sums' order then breaks either way (the weights differing in the last bit)
    sizes = [9, 30, 22]
    one = FedAvg(x.clone())
    single = _metrics(one, _run(one, clients, sizes))
    rank0, rank1 = FedAvg(x.clone()), FedAvg(x.clone())
    stats0, stats1 = _run(rank0, clients, sizes, mine=[0, 2]), _run(rank1, clients, sizes, mine=[1])
    peer = {id(rank0.accum): rank1.accum, id(rank0.direction): rank1.direction}
    rank0.reduce = lambda t: t.add_(peer[id(t)])
    recorder = _Recorder()
    stats1.joined(recorder)
    got = _metrics(rank0, stats0.joined(_Peer(recorder.calls)))
    assert torch.equal(rank0.weights, one.weights)
    for key, value in single.items():
        # fp64 sums in another order (1e-12); the fp32 direction in another order (~1e-9)
        assert got[key] == pytest.approx(value, rel=1e-7 if key == "update_cosine" else 1e-12), key
