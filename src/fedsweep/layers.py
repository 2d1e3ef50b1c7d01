"""Layer-wise drift (issue #19): where in the model the federated clients diverge.

Per evaluated round and per layer group of the model (:func:`layer_group`: the embeddings, each
transformer block, the head), the same measures as the whole-model drift metrics
(:func:`fedsweep.rounds.drift_metrics`), restricted to the group's parameters ``g``:

- ``pseudo_gradient_norm``: ``||u_g||``, ``u = average - x`` from the unrounded fp64 average;
- ``client_drift_rms``: ``sqrt(sum_k w_k ||u_k,g||^2 - ||u_g||^2)``, ``u_k = x_k - x`` (the identity
  of the whole model's ``client_drift_rms``: the groups' squares sum to the whole model's);
- ``weight_norm``: ``||x_g||`` of the round's global model (before the server step);
- ``relative_pseudo_gradient``, ``relative_drift``: the two norms over ``weight_norm`` (NaN if 0).

Cost: :class:`Strategy.add <fedsweep.average.Strategy.add>` already holds each chunk of ``u_k``
in fp64; :class:`LayerDrift` adds one dot product per (chunk, group) piece of it, weighted into a
G-vector. Groups are contiguous runs of the flat vector (parameters of a group are registered
together), so no per-element index is needed: memory is G numbers and a list of runs, flat in K
and in the model's size. It runs only on the rounds the strategy is told to measure (the
evaluated ones). The rows travel in the checkpoint's metric rows (key ``layers``), so a resumed
run writes the same ``layers.parquet`` (long format: round, group, metric, value).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

if TYPE_CHECKING:
    import pandas as pd

    from .engine import FlatParameters

LAYERS_NAME = "layers.parquet"
LAYER_METRICS = ("pseudo_gradient_norm", "client_drift_rms", "weight_norm", "relative_pseudo_gradient",
                 "relative_drift")
EMBEDDINGS, HEAD = "embeddings", "head"
_EMBEDDING_PARTS = re.compile(r"embed|^wte$|^wpe$")
_HEAD_PARTS = re.compile(r"classifier|score|pooler|head")


def layer_group(name: str) -> str:
    """The layer group of a parameter, from its dotted name alone (any Hugging Face encoder or decoder,
    with or without LoRA): the first integer component is the block (``encoder.layer.3.``,
    ``layers.3.``, ``h.3.``, ``transformer.layer.3.``, ALBERT's shared ``albert_layer_groups.0.``:
    ``block 3``), unless a component before it names the embeddings (``embed``, ``wte``, ``wpe``:
    ``embeddings``) or a head (``classifier``, ``score``, ``pooler``, ``head``: a Sequential head's
    ``classifier.0`` is no block); names without a block are ``embeddings`` or else ``head`` (pooler,
    classifier, score, final norms). LoRA adapters (``lora_A``/``lora_B``) fall in their block: with
    LoRA only adapters and head train, so a block's group is its adapters."""
    for part in name.split("."):
        if _EMBEDDING_PARTS.search(part):
            return EMBEDDINGS
        if _HEAD_PARTS.search(part):
            return HEAD
        if part.isdigit():
            return f"block {int(part)}"
    return HEAD


def group_order(groups: Iterable[str]) -> list[str]:
    """The distinct groups in model order: embeddings, blocks by number, head."""
    def key(group: str) -> tuple[int, int]:
        if group == EMBEDDINGS:
            return (0, 0)
        return (1, int(group.split()[1])) if group.startswith("block ") else (2, 0)
    return sorted(set(groups), key=key)


def trainable_names(model: torch.nn.Module, flat: FlatParameters) -> list[str]:
    """The names of ``flat.params`` (the model's trainable parameters, shared ones once), in their order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(named) != len(flat.params) or any(p is not q for (_, p), q in zip(named, flat.params)):
        raise ValueError("the model's trainable parameters are not those of its flat vector")
    return [n for n, _ in named]


def group_runs(names: Sequence[str], offsets: Sequence[int], size: int) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The groups (model order) and the runs ``(start, stop, group index)`` covering ``[0, size)`` of a
    flat vector whose parameter ``i`` starts at ``offsets[i]``. A run extends to the next parameter's
    offset: the aligned layout's padding is exact zeros in every vector measured, so it adds nothing."""
    of_param = [layer_group(n) for n in names]
    groups = group_order(of_param)
    index = {g: i for i, g in enumerate(groups)}
    runs: list[tuple[int, int, int]] = []
    for i, group in enumerate(of_param):
        stop = offsets[i + 1] if i + 1 < len(offsets) else size
        if runs and runs[-1][2] == index[group] and runs[-1][1] == offsets[i]:
            runs[-1] = (runs[-1][0], stop, index[group])
        else:
            runs.append((offsets[i], stop, index[group]))
    return groups, runs


class LayerDrift:
    """The per-group sums of one round, fed chunk by chunk by a :class:`~fedsweep.average.Strategy`
    (its chunking: ``chunk`` elements per chunk). ``active``: whether this round is measured."""

    def __init__(self, names: Sequence[str], offsets: Sequence[int], size: int, chunk: int, device: torch.device):
        self.groups, runs = group_runs(names, offsets, size)
        self.active = False
        self.chunk = chunk
        # per chunk: the (start, stop) pieces local to the chunk and their groups (a device index tensor)
        self.pieces: list[list[tuple[int, int]]] = []
        self.piece_groups: list[torch.Tensor] = []
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            cut = [(max(a, start) - start, min(b, stop) - start, g) for a, b, g in runs if a < stop and b > start]
            self.pieces.append([(a, b) for a, b, _ in cut])
            self.piece_groups.append(torch.tensor([g for _, _, g in cut], device=device))
        # sum_k w_k ||u_k,g||^2; ||u_g||^2; ||x_g||^2 (fp64, G each: one all-reduce for the first)
        self.client_sq, self.average_sq, self.weight_sq = (
            torch.zeros(len(self.groups), dtype=torch.float64, device=device) for _ in range(3))

    @classmethod
    def for_model(cls, model: torch.nn.Module, flat: FlatParameters, chunk: int) -> LayerDrift:
        return cls(trainable_names(model, flat), flat.offsets, len(flat), chunk, flat.data.device)

    def begin_round(self) -> None:
        for sums in (self.client_sq, self.average_sq, self.weight_sq):
            sums.zero_()

    def _add(self, target: torch.Tensor, index: int, a: torch.Tensor, b: torch.Tensor | None, alpha: float) -> None:
        """``target[g] += alpha <a, b>`` over chunk ``index``'s pieces (``b`` None: ``<a, a>``)."""
        dots = [torch.dot(a[s:e], a[s:e] if b is None else b[s:e]) for s, e in self.pieces[index]]
        target.index_add_(0, self.piece_groups[index], torch.stack(dots), alpha=alpha)

    def add_client(self, index: int, update: torch.Tensor, alpha: float) -> None:
        """Chunk ``index`` of a client's ``u_k`` (fp64), ``alpha = w_k``."""
        self._add(self.client_sq, index, update, None, alpha)

    def add_square(self, offset: int, value: float) -> None:
        """``value`` (a client's ``w_k ||.||^2`` of a part of ``u_k`` no chunk carried) to the group of
        the element at ``offset``."""
        index, local = divmod(offset, self.chunk)
        for (start, stop), group in zip(self.pieces[index], self.piece_groups[index].tolist()):
            if start <= local < stop:
                self.client_sq[group] += value
                return

    def add_average(self, index: int, update: torch.Tensor, weights: torch.Tensor) -> None:
        """Chunk ``index`` of ``u`` (fp64, after the all-reduce) and of the global weights (fp32)."""
        self._add(self.average_sq, index, update, None, 1.0)
        x = weights.double()  # a chunk-sized temporary: fp32 squares summed exactly in fp64
        self._add(self.weight_sq, index, x, None, 1.0)

    def rows(self) -> list[tuple[str, str, float]]:
        """This round's ``(group, metric, value)`` triples (one host copy)."""
        client_sq, average_sq, weight_sq = (t.tolist() for t in (self.client_sq, self.average_sq, self.weight_sq))
        out = []
        for group, spread, u_sq, x_sq in zip(self.groups, client_sq, average_sq, weight_sq):
            pseudo, drift, norm = math.sqrt(u_sq), math.sqrt(max(spread - u_sq, 0.0)), math.sqrt(x_sq)
            values = (pseudo, drift, norm, pseudo / norm if norm > 0 else math.nan,
                      drift / norm if norm > 0 else math.nan)
            out += [(group, metric, value) for metric, value in zip(LAYER_METRICS, values)]
        return out


def attach(strategy: Any, model: torch.nn.Module, flat: FlatParameters) -> LayerDrift:
    """A :class:`LayerDrift` fed by ``strategy`` (or the strategy a wrapper such as
    :class:`fedsweep.lora.ExactAggregation` holds in ``inner``); inactive until told."""
    base = getattr(strategy, "inner", strategy)
    base.layers = LayerDrift.for_model(model, flat, base.chunk)
    return base.layers


def layers_frame(rows: Iterable[dict[str, Any]], metrics: pd.DataFrame) -> pd.DataFrame:
    """``layers.parquet``: the cell's id columns (those of ``metrics`` before ``round``), then round,
    group, metric, value, for the metric rows with layer measures up to ``metrics``' last round."""
    import pandas as pd

    ids = list(metrics.columns[:list(metrics.columns).index("round")])
    last = int(metrics["round"].max()) if len(metrics) else -1
    records = [(int(row["round"]), *triple) for row in rows if row.get("layers") and int(row["round"]) <= last
               for triple in row["layers"]]
    frame = pd.DataFrame(records, columns=["round", "group", "metric", "value"])
    for column in reversed(ids):
        frame.insert(0, column, metrics[column].iloc[0] if len(metrics) else None)
    return frame
