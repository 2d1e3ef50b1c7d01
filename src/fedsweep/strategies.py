"""Server strategies: what the server makes of the round's client models (as Flower's ``Strategy``).

Every strategy first forms the average of the round's client models, weighted by their shard
sizes, accumulated in place in ONE float64 buffer (:meth:`Strategy.add`, one client at a time:
memory independent of K, and the sum independent, beyond its final rounding, of the order in
which clients or ranks add their models). It then moves the global weights ``x`` with the
pseudo-gradient ``delta = x - average`` (Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2, with their sign of delta flipped so that it points like a gradient):

- ``fedavg``: ``x <- average`` (McMahan et al. 2017);
- ``fedavgm``: ``m <- momentum * m + delta; x <- x - server_lr * m`` (Hsu et al. 2019);
- ``fedadam``: ``m <- b1 m + (1 - b1) delta; v <- b2 v + (1 - b2) delta^2``;
- ``fedyogi``: the same ``m``; ``v <- v - (1 - b2) delta^2 sign(v - delta^2)``;
- ``fedadagrad``: the same ``m``; ``v <- v + delta^2``;

and for the last three ``x <- x - server_lr * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and
``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``), without bias correction (as in the paper).

Precision: the average is summed in float64 and rounded to float32 (FedAvg's new weights; the
rounding makes it, in practice, independent of the order in which clients and ranks were added,
so 2 ranks give 1 process's numbers); from there the server step is float32 arithmetic, chunk by
chunk in reused scratch buffers, and the moments ``m`` and ``v`` are float32 buffers (one or two
model-sized vectors on the device, flat in K). FedAvgM is
evaluated as ``x_new = average + (1 - lr) * delta - lr * momentum * m_old`` (the same quantity as
``x - lr * m_new``), so that with ``server_lr=1, server_momentum=0`` it is ``average`` to the bit:
FedAvg. The state (``m``, ``v``) is what :meth:`Strategy.state_dict` returns, saved in every
checkpoint so a resumed run continues bitwise.

Adding a strategy: subclass :class:`Strategy` (or :class:`AdaptiveStrategy` for another second
moment), register it in ``STRATEGIES``, and declare its name and the settings it reads in
:data:`fedsweep.algorithm.STRATEGY_SETTINGS` (torch-free: the workflow checks configs with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .algorithm import STRATEGY_SETTINGS


def chunk_size(device: torch.device) -> int:
    """Elements per chunk of the server's elementwise passes.

    On a CPU, ``fp64.add_(fp32)`` casts the whole fp32 operand into a fresh fp64 temporary (35 MB
    of new pages per client for a 4.4M-parameter model, ~10x the arithmetic); chunks of 128k
    elements keep every temporary in a reused, cache-sized scratch. GPUs cast inside the kernel;
    their chunks only bound the server step's fp64 temporaries (32 MiB each).
    """
    return 1 << 17 if device.type == "cpu" else 1 << 22


@dataclass
class ServerStats:
    """What the server step did: the norm of the applied update ``x_new - x`` and of ``delta``."""

    update_norm: float
    pseudo_gradient_norm: float


class Strategy:
    """FedAvg: the global model becomes the size-weighted average of the round's client models."""

    name: ClassVar[str] = "fedavg"
    CPU_CHUNK = 1 << 17

    def __init__(self, global_weights: torch.Tensor, **settings: float):
        self.weights = global_weights  # fp32, the global model between rounds
        self.accum = torch.zeros_like(global_weights, dtype=torch.float64)
        self.total = 0
        self.reduce: Callable[[torch.Tensor], None] | None = None  # all-reduce hook (multi-process)
        self.settings = settings
        if global_weights.device.type == "cpu":
            chunk = min(self.CPU_CHUNK, global_weights.numel())
            self._cast, self._delta = torch.empty(chunk, dtype=torch.float64), torch.empty(chunk)

    # --- the average ------------------------------------------------------------------------------

    def begin_round(self, total_examples: int) -> None:
        """``total_examples``: the examples of the clients that enter this round's average."""
        self.total = total_examples
        self.accum.zero_()

    @torch.no_grad()
    def add(self, client_weights: torch.Tensor, num_examples: int) -> float:
        """Add ``(n_k / N) x_k`` to the average; return the client's drift ``||x_k - global||``.

        Afterwards ``client_weights`` holds the global weights again, ready for the next
        client: on a CPU that reload rides in the same pass, while the global weights are in
        the cache for the drift. The accumulated values do not depend on the chunking: every
        element gets the same fp64 ``accum + alpha * x`` either way.
        """
        alpha = num_examples / self.total
        if self.weights.device.type != "cpu":
            self.accum.add_(client_weights, alpha=alpha)
            drift = torch.linalg.vector_norm(client_weights.sub_(self.weights))
            client_weights.copy_(self.weights)
            return float(drift)
        squares = 0.0
        size = client_weights.numel()
        for start in range(0, size, self.CPU_CHUNK):
            stop = min(start + self.CPU_CHUNK, size)
            x, w = client_weights[start:stop], self.weights[start:stop]
            cast = self._cast[:stop - start]
            cast.copy_(x)
            self.accum[start:stop].add_(cast, alpha=alpha)
            delta = torch.sub(x, w, out=self._delta[:stop - start])
            squares += float(torch.dot(delta, delta))
            x.copy_(w)
        return math.sqrt(squares)

    # --- the server step --------------------------------------------------------------------------

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        """Move the global weights with this round's average (after the all-reduce, if any).

        ``scratch`` is any fp32 buffer of the model's size that may be overwritten (the model's
        own flat weights, which the next client reloads anyway): no allocation of model size.
        """
        if self.reduce is not None:
            self.reduce(self.accum)
        scratch.copy_(self.accum).sub_(self.weights)
        update_norm = float(torch.linalg.vector_norm(scratch))
        self.weights.copy_(self.accum)
        return ServerStats(update_norm, update_norm)  # x_new - x = average - x = -delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's state between rounds (beyond the global weights): saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"strategy {self.name!r} state has {sorted(state)}, expected {sorted(expected)}")
        for key, value in self.state_dict().items():
            if state[key].shape != value.shape:
                raise ValueError(f"strategy {self.name!r} state {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(value.shape)}")
            value.copy_(state[key])


FedAvg = Strategy


class _ServerStep(Strategy):
    """A strategy whose step is elementwise in ``(x, average, state)``: computed chunk by chunk in
    reused fp32 scratch buffers (no model-sized temporaries), the state in float32."""

    def __init__(self, global_weights: torch.Tensor, **settings: float):
        super().__init__(global_weights, **settings)
        self.chunk = min(chunk_size(global_weights.device), global_weights.numel())
        self._f32 = [torch.empty(self.chunk, device=global_weights.device) for _ in range(3)]

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        if self.reduce is not None:
            self.reduce(self.accum)
        size = self.weights.numel()
        delta_sq = update_sq = 0.0
        for start in range(0, size, self.chunk):
            stop = min(start + self.chunk, size)
            average, delta, t = (b[:stop - start] for b in self._f32)
            x = self.weights[start:stop]
            # The average rounded to fp32 first: FedAvg's new weights. The fp64 sum depends (in its
            # last bits) on the order clients and ranks added; its fp32 rounding practically never.
            average.copy_(self.accum[start:stop])
            torch.sub(x, average, out=delta)
            delta_sq += float(torch.dot(delta, delta))
            update_sq += self._step(slice(start, stop), x, average, delta, t)
        return ServerStats(math.sqrt(update_sq), math.sqrt(delta_sq))

    def _step(self, s: slice, x: torch.Tensor, average: torch.Tensor, delta: torch.Tensor, t: torch.Tensor) -> float:
        """Update the state's chunk ``s`` and the global weights' chunk ``x`` in place; return the
        squared norm of the change of ``x``. ``delta`` (= x - average), ``average`` and ``t`` may
        be overwritten."""
        raise NotImplementedError


class FedAvgM(_ServerStep):
    """Server momentum (Hsu et al. 2019): ``m <- momentum m + delta; x <- x - lr m``."""

    name = "fedavgm"

    def __init__(self, global_weights: torch.Tensor, *, server_lr: float, server_momentum: float):
        super().__init__(global_weights, server_lr=server_lr, server_momentum=server_momentum)
        self.lr, self.beta = float(server_lr), float(server_momentum)
        self.momentum = torch.zeros_like(global_weights)

    def _step(self, s, x, average, delta, t):
        m = self.momentum[s]
        # x_new = average + (1 - lr) delta - lr beta m_old (= x - lr (beta m_old + delta)): exactly
        # `average` when lr=1 and momentum=0, i.e. FedAvg to the bit
        torch.add(average, delta, alpha=1.0 - self.lr, out=t)
        t.sub_(m, alpha=self.lr * self.beta)
        m.mul_(self.beta).add_(delta)  # m_new = beta m_old + delta
        change = torch.sub(t, x, out=delta)
        squares = float(torch.dot(change, change))
        x.copy_(t)
        return squares

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"momentum": self.momentum}


class AdaptiveStrategy(_ServerStep):
    """Reddi et al.'s adaptive server optimisers; subclasses define the second moment."""

    def __init__(self, global_weights: torch.Tensor, *, server_lr: float, beta1: float, tau: float,
                 beta2: float = 0.0):
        super().__init__(global_weights, server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
        self.lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        self.m = torch.zeros_like(global_weights)
        self.v = torch.full_like(global_weights, self.tau ** 2)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor, scratch: torch.Tensor) -> None:
        """Update ``v`` in place with ``delta_sq`` = delta^2 (``scratch``: free)."""
        raise NotImplementedError

    def _step(self, s, x, average, delta, t):
        m, v = self.m[s], self.v[s]
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        delta.mul_(delta)  # delta^2
        self._second_moment(v, delta, average)  # the average is not needed any more: scratch
        torch.sqrt(v, out=t).add_(self.tau)
        step = torch.div(m, t, out=t)
        x.sub_(step, alpha=self.lr)  # x <- x - lr m / (sqrt(v) + tau)
        return self.lr * self.lr * float(torch.dot(step, step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"m": self.m, "v": self.v}


class FedAdam(AdaptiveStrategy):
    name = "fedadam"

    def _second_moment(self, v, delta_sq, scratch):
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)


class FedYogi(AdaptiveStrategy):
    name = "fedyogi"

    def _second_moment(self, v, delta_sq, scratch):
        torch.sub(v, delta_sq, out=scratch).sign_()
        v.addcmul_(delta_sq, scratch, value=-(1.0 - self.beta2))


class FedAdagrad(AdaptiveStrategy):
    name = "fedadagrad"
    # no second-moment decay (beta2): v sums every delta^2

    def _second_moment(self, v, delta_sq, scratch):
        v.add_(delta_sq)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Strategy, FedAvgM, FedAdam, FedYogi, FedAdagrad)}


def build_strategy(name: str, global_weights: torch.Tensor, **settings: float) -> Strategy:
    """The strategy ``name`` with the settings it reads (fedsweep.algorithm.STRATEGY_SETTINGS;
    others are ignored)."""
    return STRATEGIES[name](global_weights, **{k: settings[k] for k in STRATEGY_SETTINGS[name]})
