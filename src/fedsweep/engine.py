"""The engine's primitives: data order, flat parameters, local SGD steps, evaluation.

- :class:`FlatParameters` re-points every trainable parameter of ONE model
  into a single contiguous fp32 buffer, each parameter starting at a 64-byte boundary (zero
  padding between them). All clients are trained on that one model in turn, so loading the
  global weights into a client is one copy and an SGD step is one fused ``add_``.
- :func:`client_batches`: a client's batches, in an order fixed by (seed, round, client, epoch).
- :func:`evaluate`: accuracy and loss sums of the global model over test batches
  (:func:`evaluate_classes`: the same pass, its sums split by true label).

The federated algorithm is built on these: the server strategies (FedAvg, FedAvgM, FedAdam,
FedYogi, FedAdagrad) are in :mod:`fedsweep.strategies`, the client updates (local SGD or AdamW,
FedProx, SCAFFOLD) in :mod:`fedsweep.clients` (:mod:`fedsweep.client_update`, :mod:`fedsweep.scaffold`), client batching in :mod:`fedsweep.grouped`, and one
round (sampling, training the clients, aggregating) in :mod:`fedsweep.rounds`. This module
imports none of them.

Buffers: the models used here (BERT, ALBERT, DistilBERT, and the decoders: Llama, Qwen2, GPT-2)
have no trained buffers (no batch norm); their buffers (``position_ids``, ``token_type_ids``, rotary
frequencies) are constants, identical in every client, so they are not averaged and keep the values
they were built with. Frozen parameters (LoRA's base, :mod:`fedsweep.lora`) are not in the flat
vector either: only what is trained is averaged, sent and checkpointed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .tokens import TokenTensors


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

    def views(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``vector`` (this layout's length) shaped as the parameters, in their order."""
        return [vector[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]

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


def batches_on_device(data: TokenTensors, lengths_cpu: np.ndarray, batches: list[np.ndarray],
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


_batches_on_device = batches_on_device  # the earlier name (benchmarks use it)


def eval_batches(lengths_cpu: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Test-set batches, longest first: similar lengths share a batch, so little padding is computed."""
    order = np.argsort(-lengths_cpu, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class EvalSums(NamedTuple):
    """Per-class sums of one evaluation (index: the true label), and the total loss.

    ``loss_sum`` is summed batch by batch as before per-class sums existed (so the test loss is
    bitwise what it was); ``loss_c`` holds the same per-example losses split by true label."""

    correct_c: torch.Tensor  # int64 (C,): examples of class c predicted right
    loss_c: torch.Tensor  # float64 (C,): summed cross-entropy of the examples of class c
    count_c: torch.Tensor  # int64 (C,): examples of class c
    loss_sum: torch.Tensor  # float64 (): summed cross-entropy of all examples


@torch.inference_mode()
def evaluate_classes(model: torch.nn.Module, data: TokenTensors, batches: list[np.ndarray], lengths_cpu: np.ndarray,
                     protocol: Protocol, bf16: bool, num_classes: int | None = None) -> EvalSums:
    """Per-class (correct, summed cross-entropy, count) of the model over the given batches.

    Sums, not means, so that ranks evaluating disjoint batches can add their results, and so
    that any weighting of the classes (a client's label distribution, :mod:`fedsweep.client_eval`)
    is computed from this one pass. ``num_classes`` None: the model's number of logits (then a
    rank with no batches returns empty tensors). The per-class sums are masked column sums, not
    ``index_add_`` (atomic float adds on GPUs, in no fixed order): the results are reproducible."""
    model.eval()
    device = data.ids.device
    sums = None if num_classes is None else _zero_sums(num_classes, device)
    for ids, mask, labels in batches_on_device(data, lengths_cpu, batches, protocol):
        with autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits.float()
        if sums is None:
            sums = _zero_sums(logits.shape[-1], device)
        # cross_entropy is nll_loss of log_softmax: the same total, bitwise, with the per-example terms kept.
        log_probs = F.log_softmax(logits, dim=-1)
        sums.loss_sum.add_(F.nll_loss(log_probs, labels, reduction="sum"))
        example_loss = -log_probs.gather(1, labels[:, None]).squeeze(1).double()
        hit = logits.argmax(-1) == labels
        of_class = F.one_hot(labels, sums.count_c.numel()).bool()  # (B, C)
        sums.correct_c.add_((of_class & hit[:, None]).sum(0))
        sums.loss_c.add_(torch.where(of_class, example_loss[:, None], 0.0).sum(0))
        sums.count_c.add_(of_class.sum(0))
    return sums if sums is not None else _zero_sums(0, device)


def _zero_sums(num_classes: int, device: torch.device) -> EvalSums:
    return EvalSums(torch.zeros(num_classes, dtype=torch.int64, device=device),
                    torch.zeros(num_classes, dtype=torch.float64, device=device),
                    torch.zeros(num_classes, dtype=torch.int64, device=device),
                    torch.zeros((), dtype=torch.float64, device=device))


def evaluate(model: torch.nn.Module, data: TokenTensors, batches: list[np.ndarray], lengths_cpu: np.ndarray,
             protocol: Protocol, bf16: bool) -> tuple[float, float]:
    """(number correct, summed cross-entropy) of the model over the given batches of a split.

    Sums, not means, so that ranks evaluating disjoint batches can add their results."""
    sums = evaluate_classes(model, data, batches, lengths_cpu, protocol, bf16)
    return float(sums.correct_c.sum()), float(sums.loss_sum)
