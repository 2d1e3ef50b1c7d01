"""The server optimisers that step from the round's average (:mod:`fedsweep.average`) otherwise
than to it: FedAvgM and Reddi et al.'s adaptive strategies (formulas: :mod:`fedsweep.strategies`)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .average import ServerStats, Strategy, _span, dot64
from .background import split_map


class _ServerStep(Strategy):
    """A strategy whose step is elementwise in ``(x, average, state)``: computed chunk by chunk in
    reused fp32 scratch buffers (no model-sized temporaries), the state in float32."""

    def __init__(self, global_weights: torch.Tensor, **settings: float):
        super().__init__(global_weights, **settings)
        self._f32 = [self._scratch(torch.float32, 3)]  # per lane, as the fp64 casts

    def _lanes(self):
        """The base class's worker (measured: 18 -> 13-16 ms for FedAdam's step of tiny-bert), with
        this class's fp32 scratch for its lane."""
        worker = super()._lanes()
        if worker is not None and len(self._f32) == 1:
            self._f32.append(self._scratch(torch.float32, 3))
        return worker

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        self._all_reduce()
        # One client added by rows: the sums over its pieces (K=1: rms exactly 0). Otherwise, as the
        # state moves everywhere, the sums ride along the dense pass (the pieces' gathers cost ~5 ms).
        by_rows = self._by_rows() and self._added == 1
        average_sq = direction_dot = 0.0
        if by_rows:
            for index, (get, _) in enumerate(self._pieces()):
                square, dot, _ = self._update_sums(get, index)
                average_sq, direction_dot = average_sq + square, direction_dot + dot
        spans = list(self._spans())

        def chunk(index: int, lane: int) -> tuple[float, float, float, float]:
            start, stop = spans[index]
            average, delta, t = (b[:stop - start] for b in self._f32[lane])
            x = self.weights[start:stop]
            # The average rounded to fp32 first: FedAvg's new weights. The fp64 sum depends (in its
            # last bits) on the order clients and ranks added; its fp32 rounding practically never.
            average.copy_(self._f64(x, 0, lane).add_(self.accum[start:stop]))
            torch.sub(x, average, out=delta)
            # the base class's sums, chunk for chunk: FedAvgM(lr 1, momentum 0) gets FedAvg's bits
            delta_sq = dot64(delta, delta, self.chunk)
            square = dot = 0.0
            if not by_rows:
                square, dot, _ = self._update_sums(_span(start, stop), index)
            return delta_sq, square, dot, self._step(slice(start, stop), x, average, delta, t)

        delta_sq = update_sq = 0.0
        for d_sq, square, dot, u_sq in split_map(chunk, len(spans), self._lanes()):  # summed in chunk order
            delta_sq, update_sq = delta_sq + d_sq, update_sq + u_sq
            if not by_rows:
                average_sq, direction_dot = average_sq + square, direction_dot + dot
        return ServerStats(math.sqrt(update_sq), math.sqrt(delta_sq), average_sq, direction_dot)

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
        squares = dot64(change, change, self.chunk)
        x.copy_(t)
        return squares

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"momentum": self.momentum}


class AdaptiveStrategy(_ServerStep):
    """Reddi et al.'s adaptive server optimisers; subclasses define the second moment.

    ``adaptive_convention`` says where the moments start and how large the step is:

    - ``reddi`` (Reddi et al. 2021, Algorithm 2): ``m`` starts at 0, ``v`` at ``tau^2``; every round
      steps with ``server_lr`` (no bias correction);
    - ``flower`` (flwr 1.x: ``fedopt.py``, and ``aggregate_fit`` of ``fedadam.py``, ``fedyogi.py``,
      ``fedadagrad.py``): ``m`` and ``v`` start at 0; FedAdam steps in round t with
      ``server_lr sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` (Flower's ``server_round + 1.0``), FedYogi
      and FedAdagrad with ``server_lr``. Flower's pseudo-gradient is ``average - x``, minus ours:
      its ``m`` is minus ours, its ``v`` is ours, and its ``x + eta m / (sqrt(v) + tau)`` is our
      ``x - eta m / (sqrt(v) + tau)``. That t is counted in the state (``rounds``), so a resumed
      run continues the correction.
    """

    BIAS_CORRECTED: ClassVar[bool] = False  # whether the flower convention corrects the server lr

    def __init__(self, global_weights: torch.Tensor, *, server_lr: float, beta1: float, tau: float,
                 beta2: float = 0.0, adaptive_convention: str = "reddi"):
        super().__init__(global_weights, server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau,
                         adaptive_convention=adaptive_convention)
        self.lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        flower = adaptive_convention == "flower"
        self.corrected = flower and self.BIAS_CORRECTED
        self.step_lr = self.lr  # this round's server lr
        self.rounds = torch.zeros((), dtype=torch.int64)  # server steps taken, counted for the correction
        self.m = torch.zeros_like(global_weights)
        self.v = torch.full_like(global_weights, 0.0 if flower else self.tau ** 2)

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor) -> ServerStats:
        if self.corrected:  # fedadam.py's eta_norm, its server_round being the rounds stepped
            self.rounds += 1
            t = int(self.rounds) + 1.0
            self.step_lr = self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        return super().finish_round(scratch)

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor, scratch: torch.Tensor) -> None:
        """Update ``v`` in place with delta^2 (``delta`` and ``scratch`` may be overwritten)."""
        raise NotImplementedError

    def _step(self, s, x, average, delta, t):
        m, v = self.m[s], self.v[s]
        m.lerp_(delta, 1.0 - self.beta1)  # b1 m + (1 - b1) delta, in one pass
        self._second_moment(v, delta, average)  # the average is not needed any more: scratch
        torch.sqrt(v, out=t).add_(self.tau)
        step = torch.div(m, t, out=t)
        x.sub_(step, alpha=self.step_lr)  # x <- x - lr m / (sqrt(v) + tau)
        return self.step_lr * self.step_lr * dot64(step, step, self.chunk)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # the round count only where it matters: reddi checkpoints keep the keys they always had
        return {"m": self.m, "v": self.v, **({"rounds": self.rounds} if self.corrected else {})}


class FedAdam(AdaptiveStrategy):
    name = "fedadam"
    BIAS_CORRECTED = True

    def _second_moment(self, v, delta, scratch):
        v.mul_(self.beta2).addcmul_(delta, delta, value=1.0 - self.beta2)


class FedYogi(AdaptiveStrategy):
    name = "fedyogi"

    def _second_moment(self, v, delta, scratch):
        delta_sq = delta.mul_(delta)
        torch.sub(v, delta_sq, out=scratch).sign_()
        v.addcmul_(delta_sq, scratch, value=-(1.0 - self.beta2))


class FedAdagrad(AdaptiveStrategy):
    name = "fedadagrad"
    # no second-moment decay (beta2): v sums every delta^2

    def _second_moment(self, v, delta, scratch):
        v.addcmul_(delta, delta)
