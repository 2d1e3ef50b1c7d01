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
FedProx, SCAFFOLD) in :mod:`fedsweep.clients` (:mod:`fedsweep.client_update`,
:mod:`fedsweep.scaffold`), client batching in :mod:`fedsweep.grouped`, and one
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
from typing import Callable, Iterator, NamedTuple

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
    # Dynamic padding's widths rounded up to a multiple of this (at most the tokens' width), so
    # that a compiled step sees a few fixed shapes (the ``pad_multiple`` setting); 0: no rounding.
    pad_multiple: int = 0

    def width(self, longest: int, full: int) -> int:
        """The padded width of a batch whose longest sequence is ``longest`` (``full``: the tokens' width)."""
        if not self.dynamic_padding:
            return full
        if self.pad_multiple:
            return min(-(-longest // self.pad_multiple) * self.pad_multiple, full)
        return longest


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
def sgd_step(params: list[torch.Tensor], lr: float, rows: tuple[int, torch.Tensor] | None = None) -> None:
    """Plain SGD, p <- p - lr * g, consuming (freeing) the gradients.

    The arithmetic of torch.optim.SGD(lr) with momentum=0 and weight_decay=0, as one
    multi-tensor kernel on GPUs. A parameter without a gradient this step (unused by the
    forward) is left unchanged, as torch.optim.SGD leaves it.

    ``rows`` ``(index, rows)``: parameter ``index`` (an input embedding) has a zero gradient off
    ``rows`` (the rows a client's or a batch's tokens index), where ``p - lr * 0 == p``: only those
    rows are read and written, gathered, stepped by the same ``add_`` and scattered back, so the
    same bits as the dense step (tests/test_fast_step.py) for a fraction of the bytes (a client of
    short texts indexes ~1k of 30k rows; the dense add streams the whole matrix three times a
    step). ``rows`` None, or ``(index, None)``: every row.
    """
    sparse = None
    if rows is not None and rows[1] is not None and params[rows[0]].grad is not None:
        sparse = params[rows[0]]
        index = rows[1]
        stepped = sparse.index_select(0, index).add_(sparse.grad.index_select(0, index), alpha=-lr)
        sparse.index_copy_(0, index, stepped)
    live = [p for p in params if p.grad is not None and p is not sparse]
    torch._foreach_add_(live, [p.grad for p in live], alpha=-lr)
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
    of the lengths, so no step waits on the device to learn a shape. The mask is None where the
    protocol feeds none, and where no row of the batch is padded (known from the CPU lengths):
    transformers would drop an all-ones mask anyway, after asking the device whether it is all
    ones (a host sync every step).
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
        rows = lengths_cpu[b]
        width = protocol.width(int(rows.max()), data.ids.shape[1])
        ids = data.ids.index_select(0, idx)[:, :width]
        mask = None
        if protocol.attention_mask and int(rows.min()) < width:
            mask = (torch.arange(width, device=device) < data.lengths.index_select(0, idx)[:, None]).long()
        yield ids, mask, data.labels.index_select(0, idx)


_batches_on_device = batches_on_device  # the earlier name (benchmarks use it)


def attention_input(model: torch.nn.Module, mask: torch.Tensor | None) -> torch.Tensor | None:
    """What to pass a model as ``attention_mask`` for a padded batch's 2-D ``mask``.

    The 4-D mask its attention takes, built as the model would build it (bidirectional for an
    encoder, causal for a decoder), except that transformers first asks whether the mask may be
    skipped (``mask.all()``: a host sync every step on a GPU); :func:`batches_on_device` answers
    that on the CPU (an unpadded batch has no mask). A 4-D mask reaches the attention as it is
    (transformers' ``_preprocess_mask_arguments``): the same logits, to the bit
    (tests/test_fast_step.py).
    """
    if mask is None:
        return mask
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    dtype = model.get_input_embeddings().weight.dtype  # that of the embeddings the model passes
    shape_only = torch.empty(mask.shape[0], mask.shape[1], 0, dtype=dtype, device=mask.device)
    if _decoder_classifier(model):
        return create_causal_mask(config=model.config, inputs_embeds=shape_only, attention_mask=mask, cache=None,
                                  allow_is_causal_skip=False)
    return create_bidirectional_mask(config=model.config, inputs_embeds=shape_only, attention_mask=mask,
                                     allow_is_bidirectional_skip=False)


def _decoder_classifier(model: torch.nn.Module) -> bool:
    from .models import is_decoder_classifier

    return is_decoder_classifier(model)


BatchLoss = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def batch_loss(model: torch.nn.Module, bf16: bool, compile: bool = False) -> BatchLoss:
    """``loss(ids, mask, labels)``: the mean cross-entropy of a training batch (the forward and the
    loss; its ``backward`` is compiled with it).

    ``compile``: ``torch.compile`` it, once per batch shape (``pad_multiple`` keeps those few).
    Dropout then draws from the same generator as eager (inductor's ``fallback_random``), so a
    client's masks are still a function of (seed, round, client) and a resumed run repeats them.
    """
    device = next(model.parameters()).device

    def loss(ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits.float(), labels)

    if not compile:
        return lambda ids, mask, labels: loss(ids, attention_input(model, mask), labels)
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    # One graph per (width, batch rows, mask or none): with pad_multiple=32 and max_length 128 at
    # most 4 x 2 x 2; the default limit (8) would fall back to eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(loss, dynamic=False)


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
            logits = model(input_ids=ids, attention_mask=attention_input(model, mask)).logits
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


@torch.inference_mode()
def evaluate_holdout(model: torch.nn.Module, data: TokenTensors, lengths_cpu: np.ndarray, rows: np.ndarray,
                     client: np.ndarray, batches: list[np.ndarray], num_clients: int, protocol: Protocol, bf16: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-client (correct, summed cross-entropy, count), each (K,), of the model on held-out rows:
    ``rows`` (training-row indices, the union of the clients' held-out rows) belong to clients
    ``client``; ``batches`` are positions into ``rows``. ONE pass: each example's correctness and
    loss (as :func:`evaluate_classes` computes them), then per-client segment sums
    (:func:`fedsweep.client_eval.holdout_sums`)."""
    from .client_eval import holdout_sums

    model.eval()
    device = data.ids.device
    hits, losses = [], []
    for ids, mask, labels in batches_on_device(data, lengths_cpu, [rows[b] for b in batches], protocol):
        with autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=attention_input(model, mask)).logits
        logits = logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        losses.append(-log_probs.gather(1, labels[:, None]).squeeze(1).double())
        hits.append(logits.argmax(-1) == labels)
    if not hits:
        return holdout_sums(np.empty(0, np.int64), np.empty(0), np.empty(0), num_clients)
    owner = client[np.concatenate(batches)]
    return holdout_sums(owner, torch.cat(hits).cpu().numpy(), torch.cat(losses).cpu().numpy(), num_clients)
