"""The adaptive strategies' two conventions (``adaptive_convention``): ``flower`` against Flower 1.42's
formulas written out (tests/algorithm_cases.py, ``flower_step``), its state through a checkpoint,
and ``reddi``'s state as before. End to end (a model, clients, resume after a kill):
``fedadam-flower`` in tests/algorithm_cases.py, run by tests/test_algorithms.py."""

from __future__ import annotations

import pytest
import torch

from algorithm_cases import flower_step

from fedsweep.strategies import build_strategy

SIZES = [40, 64, 96]  # unequal: the average is weighted


def _round(server, clients):
    """One round with fixed client models (each added as a copy: add reloads its buffer)."""
    server.begin_round(sum(SIZES))
    for y, n in zip(clients, SIZES):
        server.add(y.clone(), n)
    server.finish_round(scratch=torch.empty_like(server.weights))


def _problem(scale: float, size: int = 4000):
    """Global weights and 3 fixed client models of magnitude ``scale`` (fp32)."""
    gen = torch.Generator().manual_seed(0)
    x0 = scale * torch.randn(size, generator=gen)
    clients = [scale * torch.randn(size, generator=gen) for _ in SIZES]
    return x0, clients


def _settings(strategy: str, scale: float, convention: str = "flower") -> dict:
    # tau = 1e-3: comparable to the pseudo-gradient at scale 1e-3, negligible at scale 1
    return dict(server_lr=0.1 * scale, beta1=0.0 if strategy == "fedadagrad" else 0.9, beta2=0.99, tau=1e-3,
                adaptive_convention=convention)


@pytest.mark.parametrize("scale", [1e-3, 1.0])
@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_flower_convention_follows_flowers_formulas(strategy, scale):
    """5 rounds: the weights equal Flower's (float64 reference) to 1e-6 of their magnitude (measured:
    <= 2.5e-7), having moved by 5-20% of it. Not 1e-6 of each element's own move: where |delta| is
    small against tau, m / (sqrt(v) + tau) amplifies the fp32 rounding of x and of the average
    (Flower's float32 arrays round them too), and a larger server lr amplifies more."""
    x0, clients = _problem(scale)
    settings = _settings(strategy, scale)
    server = build_strategy(strategy, x0.clone(), **settings)
    average = sum(n * y.double() for y, n in zip(clients, SIZES)) / sum(SIZES)
    x, m, v = x0.double(), torch.zeros_like(x0, dtype=torch.float64), torch.zeros_like(x0, dtype=torch.float64)
    for r in range(1, 6):
        _round(server, clients)
        x, m, v = flower_step(strategy, r, x, average, m, v, eta=settings["server_lr"], beta1=settings["beta1"],
                              beta2=settings["beta2"], tau=settings["tau"])
        size, moved = float(x.abs().max()), float((x - x0.double()).abs().max())
        error = float((server.weights.double() - x).abs().max())
        assert error <= 1e-6 * size, (r, error / size)
    assert moved > 0.03 * size
    reddi = build_strategy(strategy, x0.clone(), **_settings(strategy, scale, "reddi"))
    for _ in range(5):
        _round(reddi, clients)
    assert float((reddi.weights.double() - x).abs().max()) > 1e-3 * moved  # the conventions differ


@pytest.mark.parametrize("convention", ["reddi", "flower"])
@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_state_resumes_bitwise(strategy, convention):
    """3 rounds, the state through a (CPU) checkpoint into a fresh strategy, 2 more: the straight run's
    weights and state to the bit. Flower's FedAdam keeps its round count; reddi keeps m and v only."""
    x0, clients = _problem(1e-2)
    settings = _settings(strategy, 1e-2, convention)
    straight = build_strategy(strategy, x0.clone(), **settings)
    for _ in range(3):
        _round(straight, clients)
    saved = {k: v.clone() for k, v in straight.state_dict().items()}
    expected = {"m", "v", "rounds"} if (strategy, convention) == ("fedadam", "flower") else {"m", "v"}
    assert set(saved) == expected
    resumed = build_strategy(strategy, straight.weights.clone(), **settings)
    resumed.load_state_dict(saved)
    for _ in range(2):
        _round(straight, clients)
        _round(resumed, clients)
    assert torch.equal(resumed.weights, straight.weights)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
