"""The FedAvg engine: client training and server aggregation, split as in Flower.

- :class:`FlatParameters` re-points every trainable parameter of ONE model
  into a single contiguous fp32 buffer, each parameter starting at a 64-byte boundary (zero
  padding between them). All clients are trained on that one model in turn, so loading the
  global weights into a client is one copy and an SGD step is one fused ``add_``.
- :func:`train_client` is the client: E local epochs of plain SGD (constant lr, no momentum, no
  weight decay) over its shard, with batch order fixed by (seed, round, client, epoch).
- :class:`FedAvg` is the strategy: ``global <- sum_k (n_k / N) x_k``, accumulated in place into
  one float64 buffer, so peak memory is independent of K and the average does not depend
  (beyond its final rounding to fp32) on the order in which clients, or ranks, add their models.
- :func:`train_round` is one process's share of a round: each client trained from the global
  weights and added to the strategy (or groups of clients at once: :mod:`fedsweep.grouped`).

Buffers: the models used here (BERT, ALBERT, DistilBERT) have no trained buffers (no batch norm);
their buffers (``position_ids``, ``token_type_ids``) are constants, identical in every client, so
they are not averaged and keep the values they were built with.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .tokens import TokenTensors

if TYPE_CHECKING:
    from .grouped import ClientGroups


@dataclass(frozen=True)
class Protocol:
    name: str
    attention_mask: bool  # feed the model a mask over padding
    dynamic_padding: bool  # pad each batch to its longest sequence, not to max_length
    reshuffle: bool  # new order of the shard each epoch (else one fixed random order)
    drop_last: bool  # drop the last partial batch of an epoch


PROTOCOLS = {
    "standard": Protocol("standard", attention_mask=True, dynamic_padding=True, reshuffle=True, drop_last=False),
    # What the paper's released code did: tokenizer padding to max length and only input_ids fed
    # to the model (so padding is attended), DataLoaders without shuffle, drop_last=True.
    "paper": Protocol("paper", attention_mask=False, dynamic_padding=False, reshuffle=False, drop_last=True),
}


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that is a pure function of (seed, keys): the RNG state never needs saving."""
    words = [seed] + [k if isinstance(k, int) else int.from_bytes(k.encode()[:8], "little") for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def client_batches(shard: np.ndarray, batch_size: int, protocol: Protocol, seed: int,
                   round_: int, client: int, epoch: int) -> list[np.ndarray]:
    """The batches (arrays of training-row indices) a client sees in one local epoch."""
    if protocol.reshuffle:
        order = shard[np.random.default_rng(derive_seed(seed, "order", round_, client, epoch)).permutation(len(shard))]
    else:
        order = shard  # the shard's fixed random order, drawn once at partition time
    stop = len(order) - len(order) % batch_size if protocol.drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


class FlatParameters:
    """The trainable parameters of a model as views into one flat fp32 buffer.

    Loading the global model into a client, averaging and measuring drift are then single
    vector operations over ``data``. Gradients are left to autograd (each backward allocates
    them, ``sgd_step`` consumes and frees them): accumulating into a flat gradient buffer would
    cost an extra read-modify-write and a zeroing pass over all parameters every step.

    Layout: every parameter starts at a multiple of ``ALIGN`` elements (64 bytes) and ``data``
    is a multiple of ``ALIGN`` long, so rows of a (G, len) buffer are aligned too. CPU kernels
    round differently at other alignments (MKL's matrix-vector product, i.e. a one-example
    batch, differs by ~1e-7 when its matrix starts 4 bytes off a 16-byte boundary), so without
    this the numbers would depend on where a parameter happens to fall in the buffer, and
    would differ from a model trained with its own, allocator-aligned, tensors. The padding
    elements are zero and stay zero: SGD writes only through the views, so every client's
    ``data``, the average (a weighted sum of zeros), norms of differences, the all-reduce and
    the checkpointed vector all carry exact zeros there. ``len(flat)`` is the padded length
    (the length of ``data`` and of every vector FedAvg handles); ``num_parameters`` is the
    parameter count; ``unpadded`` extracts the parameters from such a vector.
    """

    ALIGN = 16  # elements: 64 bytes of fp32, a cache line and an AVX-512 register
    LAYOUT = "fp32-align16"  # recorded in checkpoints: a vector of another layout is not ours

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]  # shared params appear once
        dtypes = {p.dtype for p in self.params}
        if dtypes != {torch.float32}:
            raise ValueError(f"FlatParameters needs fp32 master weights, got {dtypes}")
        device = self.params[0].device
        self.offsets: list[int] = []
        offset = 0
        for p in self.params:
            self.offsets.append(offset)
            offset = self._aligned(offset + p.numel())
        self.data = torch.zeros(offset, dtype=torch.float32, device=device)  # padding: zeros
        for p, offset in zip(self.params, self.offsets):
            n = p.numel()
            self.data[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.data[offset:offset + n].view_as(p)
            p.grad = None

    @classmethod
    def _aligned(cls, n: int) -> int:
        return -(-n // cls.ALIGN) * cls.ALIGN

    def __len__(self) -> int:
        """The padded length: that of ``data`` and of every weights vector of this model."""
        return self.data.numel()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def unpadded(self, vector: torch.Tensor | None = None) -> torch.Tensor:
        """The parameters in ``vector`` (default ``data``), concatenated without the padding:
        what ``torch.cat([p.reshape(-1) for p in params])`` gives for a model in this state."""
        vector = self.data if vector is None else vector
        return torch.cat([vector[o:o + p.numel()] for o, p in zip(self.offsets, self.params)])

    def sgd_step(self, lr: float) -> None:
        sgd_step(self.params, lr)


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], lr: float) -> None:
    """Plain SGD, p <- p - lr * g, consuming (freeing) the gradients.

    The arithmetic of torch.optim.SGD(lr) with momentum=0 and weight_decay=0, as one
    multi-tensor kernel on GPUs. A parameter without a gradient this step (unused by the
    forward) is left unchanged, as torch.optim.SGD leaves it.
    """
    params = [p for p in params if p.grad is not None]
    torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
    for p in params:
        p.grad = None


class FedAvg:
    """The server's strategy: size-weighted average of client models, accumulated in place."""

    # On a CPU, ``accum.add_(fp32, alpha)`` casts the whole fp32 operand into a temporary fp64
    # tensor first: 35 MB of fresh pages per client for a 4.4M-parameter model, ~10x the cost
    # of the arithmetic (33 ms vs 3 ms, measured). Chunks of this many elements keep the cast
    # in a reused, cache-sized scratch, and every pass over a chunk after the first hits the
    # cache. GPUs cast inside the kernel and need no chunks.
    CPU_CHUNK = 1 << 17

    def __init__(self, global_weights: torch.Tensor):
        self.weights = global_weights  # fp32, the global model between rounds
        self.accum = torch.zeros_like(global_weights, dtype=torch.float64)
        self.total = 0
        self.reduce: Callable[[torch.Tensor], None] | None = None  # all-reduce hook (multi-process)
        if global_weights.device.type == "cpu":
            chunk = min(self.CPU_CHUNK, global_weights.numel())
            self._cast, self._delta = torch.empty(chunk, dtype=torch.float64), torch.empty(chunk)

    def begin_round(self, total_examples: int) -> None:
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

    def finish_round(self, scratch: torch.Tensor) -> float:
        """Set the global weights to the average; return the norm of the averaged update.

        ``scratch`` is any fp32 buffer of the model's size that may be overwritten (the model's
        own flat weights, which the next client reloads anyway): no allocation of model size.
        """
        if self.reduce is not None:
            self.reduce(self.accum)
        scratch.copy_(self.accum).sub_(self.weights)
        update_norm = torch.linalg.vector_norm(scratch)
        self.weights.copy_(self.accum)
        return float(update_norm)


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generators dropout draws from on ``device`` (and the CPU's).

    Same effect on those generators as ``torch.manual_seed``, which also walks every CUDA,
    XPU and MTIA device (with a Python stack trace per lazy call: ~0.6 ms per client).
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None
                                      else torch.cuda.current_device()].manual_seed(seed)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _batches_on_device(data: TokenTensors, lengths_cpu: np.ndarray, batches: list[np.ndarray],
                       protocol: Protocol) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Yield (input_ids, attention_mask or None, labels) per batch, gathered on the device.

    The epoch's indices go to the device in one copy; per-batch widths come from the CPU copy
    of the lengths, so no step waits on the device to learn a shape.
    """
    if not batches:
        return
    device = data.ids.device
    flat = torch.from_numpy(np.concatenate(batches))
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    start = 0
    for b in batches:
        idx = flat[start:start + len(b)]
        start += len(b)
        width = int(lengths_cpu[b].max()) if protocol.dynamic_padding else data.ids.shape[1]
        ids = data.ids.index_select(0, idx)[:, :width]
        mask = None
        if protocol.attention_mask:
            mask = (torch.arange(width, device=device) < data.lengths.index_select(0, idx)[:, None]).long()
        yield ids, mask, data.labels.index_select(0, idx)


def train_client(model: torch.nn.Module, flat: FlatParameters, data: TokenTensors, lengths_cpu: np.ndarray,
                 shard: np.ndarray, *, epochs: int, batch_size: int, lr: float, protocol: Protocol,
                 seed: int, round_: int, client: int, bf16: bool,
                 on_batch: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, int]:
    """Train the model (whose flat weights the caller set) on one shard; return (loss sum, examples).

    The loss sum stays on the device (no host sync per step); callers read it once per client.
    """
    if not model.training:  # train() walks every module: once per eval, not once per client
        model.train()
    # Dropout masks depend only on (seed, round, client): resuming or reordering clients
    # reproduces them exactly.
    seed_dropout(flat.data.device, derive_seed(seed, "dropout", round_, client))
    loss_sum = torch.zeros((), dtype=torch.float64, device=flat.data.device)
    seen = 0
    for epoch in range(epochs):
        batches = client_batches(shard, batch_size, protocol, seed, round_, client, epoch)
        for ids, mask, labels in _batches_on_device(data, lengths_cpu, batches, protocol):
            with autocast(flat.data.device, bf16):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            flat.sgd_step(lr)
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
            if on_batch is not None:
                on_batch(len(labels))
            if should_stop is not None and should_stop():
                raise InterruptedError("stop requested")
    return loss_sum, seen


@dataclass
class RoundStats:
    """What one process's clients did in a round (sums, so ranks can add theirs)."""

    loss_sum: float = 0.0  # training loss summed over every example of every epoch
    examples: int = 0
    drift_sum: float = 0.0  # sum over clients of ||x_k - x_global||
    train_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    first_bad_client: float = math.inf  # the lowest client whose loss was not finite


def train_round(model: torch.nn.Module, flat: FlatParameters, strategy: FedAvg, data: TokenTensors,
                lengths_cpu: np.ndarray, shards: Sequence[np.ndarray], clients: Sequence[int], *,
                epochs: int, batch_size: int, lr: float, protocol: Protocol, seed: int, round_: int,
                bf16: bool, groups: "ClientGroups | None" = None,
                on_batch: Callable[[int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> RoundStats:
    """Train ``clients`` (indices into ``shards``) from the global weights and add them to ``strategy``.

    The caller brackets this with ``strategy.begin_round`` / ``finish_round`` (with several
    processes, each trains its own clients and the strategy's all-reduce joins them).
    ``groups`` trains clients with equal shard sizes several at a time (see
    :mod:`fedsweep.grouped`); without it, one after another on the one model.
    """
    device = flat.data.device
    stats = RoundStats()

    def sync() -> None:  # honest timings on a GPU (kernels run asynchronously)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plan = groups.plan(clients, [len(shards[c]) for c in clients]) if groups is not None else [[c] for c in clients]
    flat.data.copy_(strategy.weights)  # from here on, each strategy.add reloads them
    for members in plan:
        sync()
        t0 = time.perf_counter()
        if len(members) == 1:
            client = members[0]
            loss_sum, seen = train_client(
                model, flat, data, lengths_cpu, shards[client], epochs=epochs, batch_size=batch_size, lr=lr,
                protocol=protocol, seed=seed, round_=round_, client=client, bf16=bf16, on_batch=on_batch,
                should_stop=should_stop)
            losses, trained = [float(loss_sum)], [(client, flat.data, seen)]  # one host sync per client
        else:
            loss_sums, seen = groups.train(
                strategy.weights, data, lengths_cpu, [shards[c] for c in members], members, epochs=epochs,
                batch_size=batch_size, lr=lr, protocol=protocol, seed=seed, round_=round_, bf16=bf16,
                on_batch=on_batch, should_stop=should_stop)
            losses = loss_sums.tolist()
            trained = [(c, groups.data[i], seen) for i, c in enumerate(members)]
        t1 = time.perf_counter()
        for loss, (client, weights, seen) in zip(losses, trained):
            if not math.isfinite(loss):
                stats.first_bad_client = min(stats.first_bad_client, client)
            stats.drift_sum += strategy.add(weights, len(shards[client]))
            stats.loss_sum += loss
            stats.examples += seen
        sync()
        stats.train_seconds += t1 - t0
        stats.aggregate_seconds += time.perf_counter() - t1
    return stats


def eval_batches(lengths_cpu: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Test-set batches, longest first: similar lengths share a batch, so little padding is computed."""
    order = np.argsort(-lengths_cpu, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: TokenTensors, batches: list[np.ndarray], lengths_cpu: np.ndarray,
             protocol: Protocol, bf16: bool) -> tuple[float, float]:
    """(number correct, summed cross-entropy) of the model over the given batches of a split.

    Sums, not means, so that ranks evaluating disjoint batches can add their results."""
    model.eval()
    device = data.ids.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for ids, mask, labels in _batches_on_device(data, lengths_cpu, batches, protocol):
        with autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(-1) == labels).sum()
    return float(correct), float(loss_sum)
