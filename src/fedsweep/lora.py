"""Parameter-efficient fine-tuning: LoRA adapters (via the ``peft`` library) and how they are averaged.

A cell's ``peft`` setting (``fedsweep train --peft SPEC``) is a mapping::

    {method: lora, r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, v_proj],
     aggregation: exact, base_dtype: bf16}

``method: none`` (the default) is full fine-tuning, as before. With ``method: lora`` the model's
weights are frozen, LoRA adapters ``W + (alpha / r) B A`` are added to ``target_modules`` (default:
peft's choice for the architecture, e.g. ``q_proj, v_proj`` for Llama and Qwen2, ``c_attn`` for
GPT-2, ``query, value`` for BERT) and the classification head stays trainable (peft's
``SEQ_CLS`` task). Only the trainable tensors (adapters and head, fp32) are in the engine's flat
vector, so only they are trained, averaged, communicated and checkpointed. ``base_dtype: bf16``
holds the frozen base in bf16 (an 8B model's base is then 16 GB).

``aggregation`` says how the clients' adapters become the global ones:

- ``fedit``: A and B averaged separately, like every other trainable tensor (FedIT, what most
  federated LoRA code does). The product of the averages is not the average of the products:
  the global model is not the average of the clients' models.
- ``ffa``: A frozen at its random initialisation, only B (and the head) trained and averaged
  (FFA-LoRA, Sun et al. 2024). With a shared A, averaging B averages ``B A`` exactly.
- ``exact``: A and B averaged separately, and the residual ``mean_k(B_k A_k) - mean(B) mean(A)``
  (size-weighted, in float64), times the LoRA scaling, added into the frozen base weight
  (FedEx-LoRA, Singhal et al. 2025): the global model's weights are then the average of the
  clients' ``W + s B_k A_k``, to rounding. The base weights of the target modules change every
  round, so they are part of the checkpoint (the strategy's state) and the server sends the
  residual to every client (counted in the download bytes). The clients' products are summed in
  a float64 buffer of the target modules' base-weight size (8 bytes per such weight), all-reduced
  over ranks like the average, so every rank adds the same residual. With a server optimiser
  (FedAdam, ...) the residual is still taken against the average, so the server step acts on the
  adapters' pseudo-gradient and the averaging error is corrected on top of it. With a bf16 base
  the residual is rounded to bf16 when added.

The interface is small: :func:`fedsweep.adapters.parse` (the setting's declaration and checks,
torch-free, re-exported here), :func:`base_dtype`,
:func:`apply` (wraps a model) and :class:`ExactAggregation` (wraps a server strategy), plus
:func:`communication_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import FedsweepError
from .adapters import PeftSpec, parse  # noqa: F401  (re-exported: the spec and its checks, torch-free)
from .background import done

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def base_dtype(spec: PeftSpec) -> torch.dtype | None:
    """The dtype to load the model in (None: fp32, the default of full fine-tuning)."""
    return _TORCH_DTYPES[spec.base_dtype] if spec.enabled and spec.base_dtype != "fp32" else None


def _require_peft():
    try:
        import peft
    except ImportError:
        raise FedsweepError("--peft needs the peft package: pip install peft") from None
    return peft


def _to_float32(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the fp32 head over a bf16 base: its input arrives in bf16."""
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def apply(model: torch.nn.Module, spec: PeftSpec) -> torch.nn.Module:
    """The model with LoRA adapters (``spec.method == 'lora'``), else the model itself.

    Call it right after building the model: peft draws A's random initialisation from torch's
    generator, which :func:`fedsweep.models.build_model` seeded. Trainable tensors (adapters,
    head) are fp32, as the engine's flat vector holds them; ``ffa`` freezes A."""
    if not spec.enabled:
        return model
    _require_peft()
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules) if spec.target_modules is not None else None)
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D: peft says it sets fan_in_fan_out (expected)
            warnings.simplefilter("ignore")
            wrapped = get_peft_model(model, config)
    except (ValueError, KeyError) as exc:
        raise FedsweepError(f"peft: cannot add LoRA to this model ({str(exc).splitlines()[0]})") from None
    for name, p in wrapped.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if spec.aggregation == "ffa" and ".lora_A." in name:
            p.requires_grad_(False)  # FFA-LoRA: A stays at its (seeded, shared) initialisation
    if spec.base_dtype != "fp32":
        from peft.utils import ModulesToSaveWrapper

        for module in wrapped.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.register_forward_pre_hook(_to_float32)
    return wrapped


@dataclass
class LoraModule:
    """One adapted layer: where its A and B sit in the flat vector, its base weight, its scaling."""

    name: str
    a_index: int  # position of lora_A's weight among FlatParameters.params
    b_index: int
    base_weight: torch.Tensor  # the frozen W (out, in), or (in, out) where fan_in_fan_out (GPT-2)
    scaling: float
    fan_in_fan_out: bool


def lora_modules(model: torch.nn.Module, params: list[torch.Tensor]) -> list[LoraModule]:
    """The LoRA layers of ``model`` whose A and B are both among ``params`` (the flat vector's)."""
    from peft.tuners.lora import LoraLayer

    position = {id(p): i for i, p in enumerate(params)}
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if id(a) not in position or id(b) not in position:
            continue
        found.append(LoraModule(name, position[id(a)], position[id(b)], module.get_base_layer().weight,
                                float(module.scaling["default"]), bool(getattr(module, "fan_in_fan_out", False))))
    return found


class ExactAggregation:
    """A server strategy with FedEx-LoRA's correction: after the strategy's step, the frozen base
    weights gain ``s (sum_k w_k B_k A_k - B_avg A_avg)`` (``w_k = n_k / N``, float64).

    It stands in for the strategy it wraps (``weights``, ``total``, ``reduce``, ``begin_round``,
    ``add``, ``submit`` (here: at once), ``finish_round``, ``state_dict``) and adds the target
    modules' base weights to the state, so a checkpoint resumes them bitwise.
    """

    def __init__(self, strategy, model: torch.nn.Module, flat):
        self.inner = strategy
        self.views = flat.views
        self.modules = lora_modules(model, flat.params)
        if not self.modules:
            raise FedsweepError("peft: aggregation=exact found no LoRA layer with trainable A and B")
        sizes = [m.base_weight.numel() for m in self.modules]
        # One buffer for every module's sum of products: one all-reduce with several ranks.
        self.products = torch.zeros(sum(sizes), dtype=torch.float64, device=strategy.weights.device)
        self._product_views, start = [], 0
        for m, n in zip(self.modules, sizes):
            shape = (m.base_weight.shape[1], m.base_weight.shape[0]) if m.fan_in_fan_out else m.base_weight.shape
            self._product_views.append(self.products[start:start + n].view(shape))  # (out, in): B @ A's shape
            start += n
        self._reduce = None
        self._start: torch.Tensor | None = None
        self.residual_norm = float("nan")  # ||s (mean(BA) - mean(B) mean(A))||, summed over modules, last round

    # --- the wrapped strategy's interface -----------------------------------------------------------

    @property
    def weights(self) -> torch.Tensor:
        return self.inner.weights

    @property
    def total(self) -> int:
        return self.inner.total

    @property
    def reduce(self):
        return self._reduce

    @reduce.setter
    def reduce(self, hook) -> None:
        self._reduce = hook
        self.inner.reduce = hook

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def embedding(self):
        return self.inner.embedding

    def begin_round(self, total_examples: int) -> None:
        self.inner.begin_round(total_examples)
        self.products.zero_()
        # the round's global adapters: the strategy sums the clients' updates from them
        self._start = self.inner.weights.clone() if self._start is None else self._start.copy_(self.inner.weights)

    @torch.no_grad()
    def add(self, client_weights: torch.Tensor, num_examples: int, rows: torch.Tensor | None = None,
            deferred=None) -> float:
        alpha = num_examples / self.inner.total
        views = self.views(client_weights)
        for m, product in zip(self.modules, self._product_views):
            # torch.mm, then add: the very operations finish_round uses for the product of the
            # averages, so at K=1 the residual is exactly zero (a centralised LoRA fine-tune).
            product.add_(torch.mm(views[m.b_index].double(), views[m.a_index].double()), alpha=alpha)
        return self.inner.add(client_weights, num_examples, rows, deferred)

    def submit(self, client_weights: torch.Tensor, num_examples: int, rows: torch.Tensor | None = None,
               deferred=None):
        return done(self.add(client_weights, num_examples, rows, deferred))  # the products need the client's weights now

    def drain(self) -> None:
        self.inner.drain()

    @torch.no_grad()
    def finish_round(self, scratch: torch.Tensor):
        stats = self.inner.finish_round(scratch)  # all-reduces (and keeps) the fp64 sum of updates
        if self._reduce is not None:
            self._reduce(self.products)
        average = self.views(self.inner.accum.add_(self._start))  # x + u: the fp64 average
        squares = 0.0
        for m, product in zip(self.modules, self._product_views):
            # The averages as the global adapters hold them (rounded to fp32), products in fp64.
            b = average[m.b_index].float().double()
            a = average[m.a_index].float().double()
            residual = product.sub_(torch.mm(b, a)).mul_(m.scaling)  # the buffer is not needed any more
            squares += float(torch.dot(residual.reshape(-1), residual.reshape(-1)))
            weight = m.base_weight.T if m.fan_in_fan_out else m.base_weight
            weight.copy_(residual.add_(weight))  # W + s (mean(BA) - mean(B) mean(A)), rounded once
        self.residual_norm = math.sqrt(squares)
        return stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict(), **{f"lora_base.{m.name}": m.base_weight for m in self.modules}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = {f"lora_base.{m.name}": m for m in self.modules}
        self.inner.load_state_dict({k: v for k, v in state.items() if k not in mine})
        for key, m in mine.items():
            if key not in state or state[key].shape != m.base_weight.shape:
                raise ValueError(f"LoRA exact state lacks {key!r} or has another shape")
            with torch.no_grad():
                m.base_weight.copy_(state[key])


def communication_bytes(flat, strategy=None) -> tuple[dict[str, int], dict[str, int]]:
    """(upload, download) bytes of ONE client in one round, by dtype name.

    A client uploads its trainable tensors (the flat vector's parameters, fp32, without the
    alignment padding) and downloads the global ones; with ``exact`` aggregation it also downloads
    the residual added to each target module's base weight (in the base weight's dtype)."""
    trainable = {"float32": 4 * flat.num_parameters}
    download = dict(trainable)
    if isinstance(strategy, ExactAggregation):
        for m in strategy.modules:
            key = str(m.base_weight.dtype).removeprefix("torch.")
            download[key] = download.get(key, 0) + m.base_weight.numel() * m.base_weight.element_size()
    return trainable, download
