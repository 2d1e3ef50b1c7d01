"""The client update's interface and the client algorithms without state: ``plain`` and ``fedprox``.

:class:`ClientSettings` are the client side of an algorithm; :class:`LocalOptimizer` takes a
client's steps (SGD or AdamW, after FedProx's or SCAFFOLD's correction of the gradient);
:class:`ClientUpdate` is what a client algorithm does around those steps during a run, and
``plain`` itself; :class:`FedProx` adds the proximal term. The overview is :mod:`fedsweep.clients`,
which holds the registry by name; SCAFFOLD, which keeps files, is :mod:`fedsweep.scaffold`. This
module imports neither, so that both can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from .engine import sgd_step


@dataclass(frozen=True)
class ClientSettings:
    """The client side of an algorithm (TrainConfig's fields of the same names)."""

    client: str = "plain"  # plain | fedprox | scaffold
    client_optimizer: str = "sgd"  # sgd | adamw
    mu: float = 0.0  # FedProx's proximal weight
    scaffold_weighting: str = "size"  # SCAFFOLD's weights of the clients: size | uniform
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's decoupled weight decay


class LocalOptimizer:
    """The steps of one client, or of a group of clients (rows of a (G, P) buffer).

    ``params`` are the leaf tensors autograd fills, viewing ``weights`` (a (P,) or (G, P) fp32
    buffer) through ``views``. ``anchor`` (FedProx) is the global weights, a (P,) vector; ``correction``
    (SCAFFOLD) is ``c - c_i``, shaped like ``weights``. ``rows`` ``(index, rows)``: one client's
    parameter ``index`` (the input embedding) changes on ``rows`` only (the rows its tokens index,
    :mod:`fedsweep.row_support`; None: a client that indexes over half of them), so SGD steps it by
    those rows (:func:`~fedsweep.engine.sgd_step`; AdamW ignores them), plain SGD by each batch's
    (:meth:`step`). ``row_correction``: with ``rows``, SCAFFOLD's correction of those rows, for
    which ``correction`` is not read on parameter ``index`` (:mod:`fedsweep.scaffold_rows`:
    ``index_add_`` adds each row as ``add_`` adds it). ``steps`` counts the steps taken.
    """

    def __init__(self, params: list[torch.Tensor], weights: torch.Tensor,
                 views: Callable[[torch.Tensor], list[torch.Tensor]], *, lr: float, settings: ClientSettings,
                 anchor: torch.Tensor | None = None, prox_scratch: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None, adamw: torch.optim.Optimizer | None = None,
                 rows: tuple[int, torch.Tensor] | None = None, row_correction: torch.Tensor | None = None):
        self.params, self.weights, self.lr, self.settings = params, weights, lr, settings
        self.steps = 0
        self.anchor = anchor
        self.mu = settings.mu
        if anchor is not None:
            self.prox_scratch = prox_scratch
            self.prox_views = views(prox_scratch)
        self.correction = correction
        self.correction_views = views(correction) if correction is not None else None
        self.rows, self.row_correction = rows, row_correction
        self.adamw = adamw
        if adamw is not None:  # a fresh optimiser state: AdamW restarts for every client and round
            for group in adamw.param_groups:
                group["lr"] = lr
            for state in adamw.state.values():
                state["step"].zero_()
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    @torch.no_grad()
    def step(self, ids: torch.Tensor | None = None) -> None:
        """One step from the gradients autograd left in ``params``. ``ids``: the batch's token ids.
        Plain SGD moves a row of the embedding only where this step's gradient is non-zero, so with
        ``rows`` it steps by the batch's rows (~300 for 16 short texts, of the client's ~1,000),
        where they are on the CPU (on a GPU, finding them would wait for the device)."""
        params = self.params
        if self.correction_views is None and self.anchor is None and self.adamw is None:
            rows = self.rows
            if rows is not None and ids is not None and ids.device.type == "cpu":
                rows = (rows[0], torch.unique(ids))
            sgd_step(params, self.lr, rows)  # plain SGD: FedAvg's client
            self.steps += 1
            return
        live = [i for i, p in enumerate(params) if p.grad is not None]  # unused parameters stay as they are
        grads = [params[i].grad for i in live]
        if self.correction_views is not None:  # SCAFFOLD: g - c_i + c
            dense = live
            if self.row_correction is not None:
                skip, rows = self.rows
                if params[skip].grad is not None:
                    params[skip].grad.index_add_(0, rows, self.row_correction)
                dense = [i for i in live if i != skip]
            torch._foreach_add_([params[i].grad for i in dense], [self.correction_views[i] for i in dense])
        if self.anchor is not None:  # FedProx: g + mu (w - w_global), rounded as written (mu x, then +)
            torch.sub(self.weights, self.anchor, out=self.prox_scratch).mul_(self.mu)
            torch._foreach_add_(grads, [self.prox_views[i] for i in live])
        if self.adamw is not None:
            self.adamw.step()
            for p in params:
                p.grad = None
        else:
            sgd_step(params, self.lr, self.rows)
        self.steps += 1


class ClientUpdate:
    """``plain``: E local epochs of the client optimiser from the global weights; no state.

    A run builds it with :meth:`build`, restores a checkpoint's :meth:`state_dict` with
    :meth:`load_state_dict` and calls :meth:`prepare` before the first round. The round loop
    calls :meth:`begin_round` once per round, :meth:`optimizer` for each client (or group)
    before it trains, :meth:`after_client` for each trained client (before the strategy adds
    it: ``weights`` still hold the client's model), :meth:`finish_round` after every client of
    every rank was added and :meth:`commit` after the round's checkpoint decision. At the end
    the run records :meth:`summary` in run.json and calls :meth:`close`.
    """

    name: ClassVar[str] = "plain"
    SETTINGS: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields beyond the optimiser's

    def __init__(self, settings: ClientSettings, global_weights: torch.Tensor):
        self.settings = settings
        self.global_weights = global_weights  # the strategy's weights: constant during a round
        self.lr = float("nan")
        self.round = 0
        self._adamw: dict[int, tuple[list[torch.Tensor], torch.optim.Optimizer]] = {}
        self._prox: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def build(cls, settings: ClientSettings, global_weights: torch.Tensor, *, out_dir: Path, num_clients: int,
              device: torch.device, world: int, writer: bool) -> "ClientUpdate":
        """The client update of a run that writes to ``out_dir``, its ``num_clients`` clients shared
        by ``world`` processes (``writer``: this one deletes the run's files)."""
        return cls(settings, global_weights)

    def prepare(self, checkpoint: Path, log: Callable[[str], None]) -> None:
        """Before the first round, after any state was loaded: refuse (:class:`FedsweepError`, naming
        ``checkpoint``) a state whose files are missing, and remove files it does not use (``log``
        says so)."""

    def summary(self) -> dict[str, Any]:
        """Sections for run.json beyond the algorithm's settings (none here)."""
        return {}

    @property
    def row_sparse(self) -> bool:
        """Whether a client's steps leave every input-embedding row its tokens never index bitwise
        unchanged (:mod:`fedsweep.row_support`): plain SGD's, FedProx's (its term is 0 where
        ``w == w_global``); not AdamW's, whose decay and ``eps`` are not to be relied on there."""
        return self.settings.client_optimizer == "sgd"

    def use_rows(self, embedding: Any, rows_of: Callable[[int], torch.Tensor | None], strategy: Any) -> bool:
        """Offered by a run whose strategy can add clients by their input-embedding rows
        (``embedding``, :class:`fedsweep.row_support.EmbeddingRows`; ``rows_of(client)``: the rows a
        client indexes, or None): whether this update takes them (then it is :attr:`row_sparse`).
        Only a client update whose correction would move other rows needs them (SCAFFOLD,
        :mod:`fedsweep.scaffold_rows`); the others are row-sparse as they are."""
        return False

    def begin_round(self, round_: int, lr: float, clients: Sequence[int], sizes: Sequence[int]) -> None:
        """``clients``: every client of the round (all ranks); ``sizes``: every client's shard size."""
        self.round, self.lr = round_, lr

    def average_weight(self, num_examples: int) -> int:
        """A client's weight in the round's model average, which the strategy divides by the sum of
        the round's weights: its shard size (FedAvg's ``n_k / N``). The round loop asks here, so that
        a client algorithm with another weighting needs no strategy of its own."""
        return num_examples

    def optimizer(self, params: list[torch.Tensor], weights: torch.Tensor,
                  views: Callable[[torch.Tensor], list[torch.Tensor]], clients: Sequence[int],
                  rows: tuple[int, torch.Tensor] | None = None) -> LocalOptimizer:
        """The optimiser of ``clients`` (one, or a group: rows of ``weights``); ``rows``: see
        :class:`LocalOptimizer` (one client of a :attr:`row_sparse` update)."""
        return LocalOptimizer(params, weights, views, lr=self.lr, settings=self.settings,
                              adamw=self._adamw_for(params), rows=rows, **self._prox_args(weights))

    def _adamw_for(self, params: list[torch.Tensor]) -> torch.optim.Optimizer | None:
        """One AdamW per parameter list (the model's, each group size's), its state zeroed per client."""
        if self.settings.client_optimizer != "adamw":
            return None
        key = id(params[0])
        if key not in self._adamw or self._adamw[key][0] is not params:
            s = self.settings
            opt = torch.optim.AdamW(params, lr=self.lr, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps,
                                    weight_decay=s.weight_decay)
            self._adamw[key] = (params, opt)
        return self._adamw[key][1]

    def _prox_args(self, weights: torch.Tensor) -> dict:
        return {}

    def after_client(self, local: LocalOptimizer, row: int, client: int, weights: torch.Tensor,
                     num_examples: int) -> Any:
        """Client ``client`` (row ``row`` of its group) finished training; ``weights`` are its model.
        Returns the part of its update that ``weights`` do not hold, for the strategy's add (a
        :class:`fedsweep.scaffold_rows.Deferred`), or None."""
        return None

    def finish_round(self) -> dict[str, float]:
        """Server-side work after the average; returns metrics (name -> value)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """``state``: a checkpoint's :meth:`state_dict` (on the CPU)."""
        if state:
            raise ValueError(f"client update {self.name!r} keeps no state, got {sorted(state)}")

    def commit(self, saved: bool) -> None:
        """Called after every round; ``saved`` when the round's checkpoint was just written."""

    def close(self, keep: bool) -> None:
        """The run ended; ``keep``: whether its checkpoint (and what it needs) stays."""


class FedProx(ClientUpdate):
    """FedProx (Li et al. 2020): every step's gradient gains ``mu (w - w_global)``."""

    name = "fedprox"
    SETTINGS = ("mu",)

    def _prox_args(self, weights: torch.Tensor) -> dict:
        key = tuple(weights.shape)
        if key not in self._prox:  # one scratch per buffer shape: (P,) or (G, P)
            self._prox[key] = torch.empty_like(weights)
        return {"anchor": self.global_weights, "prox_scratch": self._prox[key]}
