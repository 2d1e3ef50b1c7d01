"""The rows of the input embedding a client's tokens index: all of the matrix a client can change.

In a classifier's flat vector the word embeddings are most of the parameters (89% of tiny-bert's,
21% of BERT-base's), and a client of a cross-device sweep indexes few of their rows: 16-64 short
texts use ~1,000 of 30,522. A client whose steps are plain SGD (FedProx's term included) leaves
every other row bitwise unchanged: the embedding's backward writes exact zeros there,
``p - lr * 0 == p``, and FedProx adds ``mu (w - w_global) == 0`` where ``w`` is still
``w_global``. So the server's per-client work (:meth:`fedsweep.average.Strategy.add`) needs only
the rest of the vector and those rows: about a sixth of the bytes in that sweep. The values it
adds are the dense add's to the bit (an unchanged row adds ``alpha * 0``); only the order in which
norms are summed differs (:mod:`tests.test_row_support`).

Which client updates qualify is theirs to say (``ClientUpdate.row_sparse``: not AdamW; SCAFFOLD,
whose correction ``c - c_i`` would move every row, once it leaves the other rows to the server,
:mod:`fedsweep.scaffold_rows`); :class:`Federation <fedsweep.rounds.Federation>` attaches the rows to
the strategy (:func:`attach`) only for those, and only for a model whose input embedding is
trainable and not tied to another layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .engine import FlatParameters


@dataclass(frozen=True)
class EmbeddingRows:
    """Where a model's input-embedding matrix lies in its flat vector (``size`` elements long)."""

    start: int
    rows: int  # the vocabulary
    width: int
    size: int

    @classmethod
    def of(cls, model: torch.nn.Module, flat: FlatParameters) -> "EmbeddingRows | None":
        """The input embedding's place in ``flat``, or None: no plain ``nn.Embedding`` input, a
        frozen one (LoRA), or one tied to another layer (whose gradient reaches every row)."""
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if get is not None else None
        if not isinstance(embedding, torch.nn.Embedding) or embedding.max_norm is not None:
            return None
        weight = embedding.weight
        positions = [i for i, p in enumerate(flat.params) if p is weight]
        output = getattr(model, "get_output_embeddings", lambda: None)()
        if not positions or (output is not None and getattr(output, "weight", None) is weight):
            return None
        return cls(flat.offsets[positions[0]], weight.shape[0], weight.shape[1], len(flat))

    @property
    def stop(self) -> int:
        return self.start + self.rows * self.width

    def matrix(self, vector: torch.Tensor) -> torch.Tensor:
        """The (rows, width) view of the matrix in a flat ``vector`` of the model's layout."""
        return vector[self.start:self.stop].view(self.rows, self.width)

    def outside(self, chunk: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` chunks of the vector around the matrix, at most ``chunk`` long."""
        return [(s, min(s + chunk, stop)) for begin, stop in ((0, self.start), (self.stop, self.size))
                for s in range(begin, stop, chunk)]

    def blocks(self, rows: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
        """``rows`` (ascending) split into blocks of at most ``chunk`` elements (at least a row each)."""
        return rows.split(max(1, chunk // self.width))

    def client_rows(self, ids: torch.Tensor, shard: np.ndarray) -> torch.Tensor | None:
        """The distinct token ids (ascending, on ``ids``' device) of the shard's rows of ``ids``
        (every column: a superset of what the batches feed), or None where they are over half the
        vocabulary (the dense add is then cheaper than gathering rows)."""
        index = torch.tensor(shard, dtype=torch.int64).to(ids.device)
        rows = torch.unique(ids.index_select(0, index))
        return rows if 2 * rows.numel() <= self.rows else None


def base(strategy: Any) -> Any:
    """The strategy that sums (the one a wrapper such as :class:`fedsweep.lora.ExactAggregation` holds in ``inner``)."""
    return getattr(strategy, "inner", strategy)


def attach(strategy: Any, model: torch.nn.Module, flat: FlatParameters) -> EmbeddingRows | None:
    """Let ``strategy`` (its :func:`base`) add clients by their rows; returns the rows, None where the
    model has none."""
    base(strategy).use_rows(EmbeddingRows.of(model, flat))
    return base(strategy).embedding


def detach(strategy: Any) -> None:
    """``strategy`` adds every client densely (a client update that moves other rows)."""
    base(strategy).use_rows(None)
