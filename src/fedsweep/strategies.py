"""Server strategies: what the server makes of the round's client models (as Flower's ``Strategy``).

Every strategy first forms the average of the round's client models, weighted by their shard
sizes, as ``x + u`` with ``u = sum_k w_k (x_k - x)`` accumulated in place in ONE float64 buffer
(:meth:`Strategy.add`, one client at a time: memory independent of K, and the sum independent,
beyond its final rounding, of the order in which clients or ranks add their models; a client
that changed only some rows of the input embedding is added by those rows,
:mod:`fedsweep.row_support`; :mod:`fedsweep.average`). It then moves the global weights ``x`` with the
pseudo-gradient ``delta = x - average`` (Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2, with their sign of delta flipped so that it points like a gradient):

- ``fedavg``: ``x <- average`` (McMahan et al. 2017);
- ``fedavgm``: ``m <- momentum * m + delta; x <- x - server_lr * m`` (Hsu et al. 2019);
- ``fedadam``: ``m <- b1 m + (1 - b1) delta; v <- b2 v + (1 - b2) delta^2``;
- ``fedyogi``: the same ``m``; ``v <- v - (1 - b2) delta^2 sign(v - delta^2)``;
- ``fedadagrad``: the same ``m``; ``v <- v + delta^2``;

and for the last three ``x <- x - server_lr * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and
``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``), without bias correction (as in the paper);
``adaptive_convention=flower`` gives Flower's variant instead (:class:`AdaptiveStrategy`).

Precision: the average is summed in float64 and rounded to float32 (FedAvg's new weights; the
rounding makes it, in practice, independent of the order in which clients and ranks were added,
so 2 ranks give 1 process's numbers); from there the server step is float32 arithmetic, chunk by
chunk in reused scratch buffers (on a CPU with a free core, half of the chunks on a worker thread:
the same bits), and the moments ``m`` and ``v`` are float32 buffers (one or two model-sized
vectors on the device, flat in K). FedAvgM is evaluated as ``x_new = average + (1 - lr) * delta - lr * momentum * m_old`` (the same quantity as
``x - lr * m_new``), so that with ``server_lr=1, server_momentum=0`` it is ``average`` to the bit:
FedAvg. The round's norms and dot products (the metrics) are summed in fp64, chunk by chunk, over
exact fp64 differences (``x_k - x``, and their fp64 average ``u``) or fp32 vectors (:func:`dot64`).
The state (``m``, ``v``) is what :meth:`Strategy.state_dict` returns, saved in every
checkpoint so a resumed run continues bitwise.

Adding a strategy: subclass :class:`Strategy` (or, in :mod:`fedsweep.server_steps`,
:class:`AdaptiveStrategy` for another second moment), register it in ``STRATEGIES`` here, and declare its name and the settings it reads in
:data:`fedsweep.algorithm.STRATEGY_SETTINGS` (torch-free: the workflow checks configs with it).
"""

from __future__ import annotations

import torch

from .algorithm import STRATEGY_SETTINGS
from .average import ServerStats, Strategy, chunk_size, dot64
from .server_steps import AdaptiveStrategy, FedAdagrad, FedAdam, FedAvgM, FedYogi

# the package's names for the strategies and what they share (defined in average.py and server_steps.py)
__all__ = ["STRATEGIES", "AdaptiveStrategy", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "ServerStats",
           "Strategy", "build_strategy", "chunk_size", "dot64"]

FedAvg = Strategy

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Strategy, FedAvgM, FedAdam, FedYogi, FedAdagrad)}


def build_strategy(name: str, global_weights: torch.Tensor, **settings: float | str) -> Strategy:
    """The strategy ``name`` with the settings it reads (fedsweep.algorithm.STRATEGY_SETTINGS;
    others are ignored, absent ones with a default take it: adaptive_convention)."""
    return STRATEGIES[name](global_weights, **{k: settings[k] for k in STRATEGY_SETTINGS[name] if k in settings})
