"""SCAFFOLD's correction on the embedding rows a client never indexes, applied by the server.

A client ``i`` of SCAFFOLD steps with ``g - c_i + c`` (:mod:`fedsweep.scaffold`). On a row ``r``
of the input embedding that none of its tokens index, ``g`` is exactly 0 at every step, and the
row's value feeds no forward pass: after ``S`` steps of lr ``eta`` it is, in exact arithmetic,
``x_r - S eta (c_r - c_i,r)``, and ``c_i+,r = c_i,r - c_r + (x_r - y_i,r) / (S eta) = 0``. A
client of a cross-device sweep indexes ~1,000 of 30,522 rows (:mod:`fedsweep.row_support`), so
applying that correction at every step, and adding, storing and summing the ~29,500 rows it moved
per client, is most of SCAFFOLD's cost.

So the client's correction is ``c - c_i`` outside the matrix and on its rows ``R_i`` (the
distinct token ids of its shard), and 0 on every other row: those rows stay ``x`` to the bit, the
client's ``c_i+`` is 0 there to the bit (``0 - 0``), and the strategy adds the client by its rows.
What the average is still owed, ``-sum_i a_i S_i eta (c - c_i)`` over each client's other rows, is
added here in closed form (:class:`DeferredRows`): per client only the rows of its old ``c_i``
outside ``R_i`` (:meth:`DeferredRows.client`), once per round one pass over the matrix, every row
``r`` scaled by ``sum_{i: r not in R_i} a_i S_i eta`` (:meth:`DeferredRows.finish`). The client
norms (``||u_i||``, the update cosine's directions, the layer groups) include that part. This is
the same algorithm in exact arithmetic; it rounds differently from taking the ``S`` steps on every
row (and more accurately: ``c_i+`` there is the exact 0 that ``(x - y) / (S eta) - (c - c_i)``
approximates with a cancellation). At K=1 it adds exactly 0 (``c = c_1`` is 0 off ``R_1``): the
run is still SGD to the bit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .background import split_map

if TYPE_CHECKING:
    from .row_support import EmbeddingRows


@dataclass
class Deferred:
    """One client's deferred part of its update ``u_i``: ``square`` is its ``||.||^2``, ``apply(accum,
    direction, alpha, scale)`` adds its per-client rows to the strategy's sums (``alpha``: the
    client's weight in the average, ``scale``: ``alpha / ||u_i||``), and ``offset`` is where the
    embedding starts in the flat vector (its layer group)."""

    square: float
    apply: Callable[[torch.Tensor, torch.Tensor, float, float], None]
    offset: int


class DeferredRows:
    """The deferred correction of one round's clients (this process's), given the server variate
    ``c`` (constant during the round), the model's ``embedding`` and each client's rows
    (``rows_of(client)``: ascending token ids, or None for a client that indexes over half the
    vocabulary, which is trained on every row as before)."""

    BLOCK = 1 << 16  # elements per block of the round's pass over the matrix (fp64 temporaries)

    def __init__(self, embedding: EmbeddingRows, c: torch.Tensor, rows_of: Callable[[int], torch.Tensor | None]):
        self.embedding, self.c, self.rows_of = embedding, c, rows_of
        self.compact = CompactVectors(embedding)
        device = c.device
        self.row_sq = torch.zeros(embedding.rows, dtype=torch.float64, device=device)  # ||c_r||^2
        # per row, sum over this round's deferring clients whose rows include r of a_i S_i eta (and
        # of a_i S_i eta / ||u_i||): the server owes the row the totals minus these
        self.kept_average = torch.zeros_like(self.row_sq)
        self.kept_direction = torch.zeros_like(self.row_sq)
        self.total_average = self.total_direction = 0.0
        self.extra_rows = False  # whether a client's apply added rows of its old c_i
        self._measured = False  # whether row_sq holds c's row norms
        self._rows: dict[int, torch.Tensor | None] = {}

    def measure(self, rows: torch.Tensor | None = None) -> float:
        """Take the row norms of ``c`` (after it changed: on ``rows``, None for every row); returns
        ``||c||^2``. The norms of rows are fp32 (~1e-7 relative: they feed diagnostics; a row of
        zeros has 0 exactly), 10x faster than fp64 ones; the sums are fp64."""
        matrix = self.embedding.matrix(self.c)
        if rows is None or not self._measured:
            self.row_sq.copy_(torch.linalg.vector_norm(matrix, dim=1)).square_()
        else:
            self.row_sq.index_copy_(0, rows, torch.linalg.vector_norm(matrix.index_select(0, rows), dim=1).double().square_())
        self._measured = True
        return float(self.row_sq.sum()) + sum(float(torch.dot(x, x)) for x in map(torch.Tensor.double, self.compact.outside_of(self.c)))

    def stale(self) -> None:
        """``c`` was replaced (a checkpoint loaded): measure it again."""
        self._measured = False

    def begin_round(self) -> None:
        if not self._measured:
            self.measure()
        self.kept_average.zero_()
        self.kept_direction.zero_()
        self.total_average = self.total_direction = 0.0
        self.extra_rows = False
        self._rows.clear()

    def rows(self, client: int) -> torch.Tensor | None:
        """The client's rows this round (computed once)."""
        if client not in self._rows:
            self._rows[client] = self.rows_of(client)
        return self._rows[client]

    def restrict(self, correction: torch.Tensor, client: int) -> None:
        """``correction`` (``c - c_i``, the client's vector layout) becomes 0 on the rows ``client``
        does not index (unchanged for a client without rows)."""
        rows = self.rows(client)
        if rows is None:
            return
        matrix = self.embedding.matrix(correction)
        kept = matrix.index_select(0, rows)
        matrix.zero_()
        matrix.index_copy_(0, rows, kept)

    def client(self, client: int, old: torch.Tensor | None, steps_lr: float) -> Deferred | None:
        """The deferred part of ``client``'s update (``old``: its ``c_i`` before this round, None for
        0; ``steps_lr``: its ``S_i eta``), or None for a client trained on every row."""
        rows = self.rows(client)
        if rows is None:
            return None
        elsewhere = torch.ones(self.embedding.rows, dtype=torch.bool, device=self.c.device)
        elsewhere[rows] = False  # the rows the client's correction left out
        square = float(self.row_sq[elsewhere].sum())  # ||c||^2 over them, where c_i is 0
        extra = old_rows = None
        if old is not None:  # where c_i is not 0 on them: ||c - c_i||^2 instead of ||c||^2
            if self.compact.is_dense(old):  # a file of a run that corrected every row
                old_matrix = self.embedding.matrix(old)
                extra = torch.nonzero(old_matrix.ne(0).any(1) & elsewhere).flatten()
                old_rows = old_matrix.index_select(0, extra).to(self.c.device)
            else:  # its rows (the same shard's: none left out)
                have, _, values = self.compact.parts(old)
                out = ~torch.isin(have, rows.to(have.device))
                extra, old_rows = have[out].to(self.c.device), values[out].to(self.c.device)
            if extra.numel():
                c_rows = self.embedding.matrix(self.c).index_select(0, extra)
                gap = (c_rows.double() - old_rows.double()).flatten()
                square += float(torch.dot(gap, gap))
                square -= float(self.row_sq.index_select(0, extra).sum())
            else:
                old_rows = None
        square = max(square, 0.0) * steps_lr * steps_lr

        def apply(accum: torch.Tensor, direction: torch.Tensor, alpha: float, scale: float) -> None:
            # u_i = -S_i eta (c - c_i) there: -S_i eta c is owed per row (finish), +S_i eta c_i here
            self.kept_average[rows] += alpha * steps_lr
            self.kept_direction[rows] += scale * steps_lr
            self.total_average += alpha * steps_lr
            self.total_direction += scale * steps_lr
            if old_rows is not None:
                self.extra_rows = True
                self.embedding.matrix(accum).index_add_(0, extra, old_rows.double(), alpha=alpha * steps_lr)
                if scale:
                    self.embedding.matrix(direction).index_add_(0, extra, old_rows, alpha=scale * steps_lr)

        return Deferred(square, apply, self.embedding.start)

    @torch.no_grad()
    def finish(self, accum: torch.Tensor, direction: torch.Tensor, worker: ThreadPoolExecutor | None = None) -> bool:
        """Add the round's ``-sum_i a_i S_i eta c_r`` over the clients that left row ``r`` out (and the
        direction's part) to the strategy's fp64 sum ``accum`` and fp32 ``direction``; returns whether
        this round's sums hold rows its clients did not index (K=1: none, ``c`` is 0 off ``R_1``).
        ``worker``: a thread that takes half of the blocks of rows (each row is computed alone: the
        same bits)."""
        owed_average = self.kept_average.neg_().add_(self.total_average)  # in place: begin_round zeroes it
        owed_direction = self.kept_direction.neg_().add_(self.total_direction)
        if not bool(((owed_average != 0) & (self.row_sq != 0)).any()):
            return self.extra_rows
        c, sums, directions = (self.embedding.matrix(v) for v in (self.c, accum, direction))
        owed_direction = owed_direction.float()  # the direction is an fp32 diagnostic
        step = max(1, self.BLOCK // self.embedding.width)
        starts = range(0, self.embedding.rows, step)

        def block(index: int, lane: int) -> None:
            start = starts[index]
            stop = min(start + step, self.embedding.rows)
            sums[start:stop].addcmul_(c[start:stop].double(), owed_average[start:stop, None], value=-1.0)
            directions[start:stop].addcmul_(c[start:stop], owed_direction[start:stop, None], value=-1.0)

        split_map(block, len(starts), worker)
        return True


class RowSum:
    """SCAFFOLD's fp64 sum of a round, ``accum = c + sum_i w_i (c_i+ - c_i)``, started from ``c`` only
    where the round's variates have values: around the matrix at :meth:`begin`, a row of the matrix
    when an add first reaches it (:meth:`open`; :meth:`whole` for a dense variate). :meth:`end` writes
    those rows back to ``c``. Each element goes through the operations of the dense sum (copy to
    fp64, the adds in client order, rounding to fp32), so ``c`` gets the same bits, and the ~29,000
    rows no variate of the round holds are neither copied nor written (two model-sized passes a
    round)."""

    def __init__(self, embedding: EmbeddingRows, c: torch.Tensor, accum: torch.Tensor):
        self.embedding, self.c, self.accum = embedding, c, accum
        self.compact = CompactVectors(embedding)
        self.opened = torch.zeros(embedding.rows, dtype=torch.bool, device=c.device)
        self.all_open = False

    def begin(self) -> None:
        for sums, values in zip(self.compact.outside_of(self.accum), self.compact.outside_of(self.c)):
            sums.copy_(values)
        self.opened.zero_()
        self.all_open = False

    def open(self, rows: torch.Tensor) -> None:
        """Rows (ids) an add is about to reach."""
        if self.all_open:
            return
        rows = rows.to(self.opened.device)
        new = rows[~self.opened[rows]]
        if new.numel():
            self.opened[new] = True
            self.embedding.matrix(self.accum).index_copy_(0, new, self.embedding.matrix(self.c).index_select(0, new).double())

    def whole(self) -> None:
        """Every row (a dense add comes)."""
        if not self.all_open:
            self.open(torch.nonzero(~self.opened).flatten())
            self.all_open = True

    def end(self) -> torch.Tensor | None:
        """``c`` becomes the sum, rounded to fp32; returns the rows that changed (None: maybe all)."""
        for values, sums in zip(self.compact.outside_of(self.c), self.compact.outside_of(self.accum)):
            values.copy_(sums)
        if self.all_open:
            self.embedding.matrix(self.c).copy_(self.embedding.matrix(self.accum))
            return None
        rows = torch.nonzero(self.opened).flatten()
        self.embedding.matrix(self.c).index_copy_(0, rows, self.embedding.matrix(self.accum).index_select(0, rows).float())
        return rows


class CompactVectors:
    """A client's control variate, correction and update where it has rows: the vector around the
    matrix and its rows ``R_i``, never the ~29,500 rows that are 0 (``c_i+``) or not used.

    A stored ``c_i+`` packs, in one fp32 vector, ``[R_i as floats | the vector around the matrix |
    its rows of the matrix]`` (ids are exact in fp32 below 2**24; :meth:`fits`); a vector of the
    model's size is a dense one (a client without rows, or a file of a run that corrected every
    row). Every value is computed by the same elementwise operation as on the dense vectors, so the
    rows and the rest hold the dense computation's bits.
    """

    def __init__(self, embedding: EmbeddingRows):
        self.emb = embedding
        self.outside_size = embedding.size - embedding.rows * embedding.width

    @staticmethod
    def fits(embedding: EmbeddingRows) -> bool:
        return embedding.rows < 1 << 24

    def empty(self, rows: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """A packed vector for ``rows``, its ids written."""
        n = rows.numel()
        packed = torch.empty(n + self.outside_size + n * self.emb.width, device=device)
        packed[:n].copy_(rows)
        return packed

    def parts(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, outside, values)`` of a packed vector: int64 ids, the vector around the matrix
        (flat) and the rows' values (``len(rows) x width``), views but the ids."""
        n = (packed.numel() - self.outside_size) // (self.emb.width + 1)
        return (packed[:n].long(), packed[n:n + self.outside_size],
                packed[n + self.outside_size:].view(n, self.emb.width))

    def is_dense(self, vector: torch.Tensor | None) -> bool:
        """Whether ``vector`` is of the model's size (None, for 0, is not)."""
        return vector is not None and vector.numel() == self.emb.size

    def dense(self, vector: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """``vector`` (packed, dense or None for 0) as a dense vector, in ``out``."""
        if vector is None:
            return out.zero_()
        if self.is_dense(vector):
            return out.copy_(vector)
        rows, _, values = self.parts(vector)
        for part, stored in zip(self.outside_of(out), self.outside_of(vector)):
            part.copy_(stored)
        matrix = self.emb.matrix(out)
        matrix.zero_()
        matrix.index_copy_(0, rows.to(out.device), values.to(out.device))
        return out

    def rows_of(self, vector: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """The values of ``vector`` (packed, dense or None) at ``rows`` (0 where it has none)."""
        if vector is None:
            return torch.zeros(rows.numel(), self.emb.width, device=rows.device)
        if self.is_dense(vector):
            return self.emb.matrix(vector).index_select(0, rows.to(vector.device)).to(rows.device)
        have, _, values = self.parts(vector)
        return _aligned(have.to(rows.device), values.to(rows.device), rows)

    def outside_of(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the vector before and after the matrix, in a packed or dense vector (of any dtype)."""
        if self.is_dense(vector):
            return vector[:self.emb.start], vector[self.emb.stop:]
        _, outside, _ = self.parts(vector)
        return outside[:self.emb.start], outside[self.emb.start:]

    def correction(self, c: torch.Tensor, old: torch.Tensor | None, rows: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        """``c - c_i`` into ``out`` around the matrix and on ``rows`` (its other rows are left as
        they are: the client's optimiser does not read them); returns the rows' values."""
        olds = self.outside_of(old) if old is not None else (None, None)
        for part, c_part, old_part in zip(self.outside_of(out), self.outside_of(c), olds):
            if old_part is None:
                part.copy_(c_part)  # c - 0 = c, to the bit
            else:
                torch.sub(c_part, old_part.to(c.device), out=part)
        values = self.emb.matrix(c).index_select(0, rows)
        if old is not None:
            values.sub_(self.rows_of(old, rows))
        self.emb.matrix(out).index_copy_(0, rows, values)
        return values

    def difference(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``x - y`` around the matrix and on ``rows``, packed."""
        packed = self.empty(rows, x.device)
        for part, x_part, y_part in zip(self.outside_of(packed), self.outside_of(x), self.outside_of(y)):
            torch.sub(x_part, y_part, out=part)
        _, _, values = self.parts(packed)
        torch.sub(self.emb.matrix(x).index_select(0, rows), self.emb.matrix(y).index_select(0, rows), out=values)
        return packed

    def new_variate(self, q: torch.Tensor, correction: torch.Tensor, steps_lr: float) -> torch.Tensor:
        """``c_i+ = (x - y) / (S eta) - (c - c_i)`` in place of the packed ``q = x - y``
        (``correction``: the dense buffer :meth:`correction` filled)."""
        rows, _, values = self.parts(q)
        q[rows.numel():].div_(steps_lr)
        for part, correction_part in zip(self.outside_of(q), self.outside_of(correction)):
            part.sub_(correction_part)
        values.sub_(self.emb.matrix(correction).index_select(0, rows.to(correction.device)))
        return q

    def add64(self, accum: torch.Tensor, new: torch.Tensor, old: torch.Tensor | None, alpha: float,
              cast: torch.Tensor) -> None:
        """``accum += alpha (new - old)`` in fp64 (``new`` packed, ``old`` packed or None) as the dense
        chunks add it, element by element; ``cast``: an fp64 scratch of at least a row."""
        chunk = cast.numel()
        olds = self.outside_of(old) if old is not None else (None, None)
        for sums, part, old_part in zip(self.outside_of(accum), self.outside_of(new), olds):
            for s in range(0, part.numel(), chunk):
                e = min(s + chunk, part.numel())
                piece = cast[:e - s].copy_(part[s:e])
                if old_part is not None:
                    piece.sub_(old_part[s:e])
                sums[s:e].add_(piece, alpha=alpha)
        rows, _, values = self.parts(new)
        if old is not None:
            old_rows = self.parts(old)[0]
            if not torch.equal(old_rows, rows):  # rows of another shard (never in one run): on their union
                union = torch.unique(torch.cat([rows, old_rows]))
                values, rows = _aligned(rows, values, union), union
            gap = values.double().sub_(self.rows_of(old, rows).double())
        else:
            gap = values.double()
        self.emb.matrix(accum).index_add_(0, rows.to(accum.device), gap.to(accum.device), alpha=alpha)


def _aligned(have: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values`` (of the ascending ids ``have``) at ``rows``, 0 where ``have`` lacks a row."""
    out = torch.zeros(rows.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    if have.numel():
        at = torch.searchsorted(have, rows).clamp_(max=have.numel() - 1)
        found = have[at] == rows
        out[found] = values[at[found]]
    return out
