"""Client batching: several clients trained at once, as one vmapped model.

At B=32 and length 128 one client's step under-fills a large GPU: BERT-base multiplies
~4k-token activations by 768-wide weights, and the Python and kernel-launch cost of a step
is paid per client. :class:`ClientGroups` stacks G clients' weights into one (G, P) buffer
and runs the model once over a (G, B, L) batch with ``torch.func.vmap`` over
``torch.func.functional_call``: every matmul becomes one batched matmul over the G clients,
every elementwise kernel is G times larger, and the per-step overhead is paid once per group.

The mathematics is the sequential loop's. Each client's loss depends only on its own
weights, so the gradient of the summed group loss w.r.t. client g's weights is exactly client
g's gradient; each client sees its own batches in its own order (``client_batches`` with its
own (seed, round, client, epoch)), takes the same steps (plain SGD, or the client update's
:class:`~fedsweep.clients.LocalOptimizer` over the (G, ...) parameters: AdamW, FedProx's and
SCAFFOLD's corrections are elementwise, so each row gets its own client's step), and is added to
the average with its own shard size in client order. What can differ:

- rounding: batched kernels may sum in another order (CPU: gradients agree to ~1e-7, see
  tests/test_grouped.py);
- padding: a step pads the G clients' batches to the widest of them; the attention mask hides
  the extra columns (the ``paper`` protocol pads every batch to max_length anyway);
- dropout: the group's masks come from one generator seeded by (seed, round, members), not
  from each client's own, so with dropout on they are another (reproducible) draw than the
  sequential loop's. With dropout off the two agree to rounding.

Only clients with equal shard sizes share a group (the i.i.d. split makes every shard equal),
so the members take the same number of steps with batches of the same size. Memory: G copies
of the weights and their gradients, and G clients' activations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import FedsweepError
from .engine import FlatParameters, Protocol, autocast, batches_on_device, client_batches, derive_seed, \
    seed_dropout, sgd_step
from .tokens import TokenTensors

if TYPE_CHECKING:  # type names only: the client update is passed in, never imported at run time
    from .clients import LocalOptimizer


def _vmappable_attention(device: torch.device):
    """SDPA's math backend, plain batched matmuls, which vmap handles (and the speed of eager
    attention, which is what grouping was measured to win with). The fused kernels have no batching
    rule: with a padding mask CUDA picks the memory-efficient kernel, whose backward fails under
    vmap ("LSE is not correctly aligned (strideH)", torch 2.11 on an H100), and on a CPU vmap loops
    over the CPU flash kernel, which on one thread trained grouped DistilBERT clients 6.9e-4 away
    from the same clients one after another (torch 2.13, 2026-12-07; the math backend: within
    the 2e-6 of tests/test_grouped.py, on one thread or two)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _bidirectional_mask():
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        return None
    return create_bidirectional_mask


def check_support() -> None:
    """Fail before any compute where client batching cannot run."""
    if _bidirectional_mask() is None:
        import transformers

        raise FedsweepError(
            f"client_group > 1 needs transformers.masking_utils.create_bidirectional_mask, "
            f"which transformers {transformers.__version__} lacks (5.24 is tested)"
        )


class ClientGroups:
    """Up to ``max_group`` clients' weights as rows of one (G, P) fp32 buffer, trained at once."""

    def __init__(self, model: torch.nn.Module, flat: FlatParameters, max_group: int):
        check_support()
        if max_group < 2:
            raise ValueError(f"max_group must be at least 2, got {max_group}")
        self.model = model
        self.max_group = max_group
        name_of = {id(p): name for name, p in model.named_parameters()}  # shared parameters: once
        self.names = [name_of[id(p)] for p in flat.params]
        self.shapes = [p.shape for p in flat.params]
        self.offsets = list(flat.offsets)  # the flat layout: aligned offsets, zero padding between
        self.device = flat.data.device
        # Rows are copies of the global weights (padding included, so it stays zero); with a
        # padded length that is a multiple of 16 elements every row's parameters stay aligned.
        self.data = torch.zeros(max_group, len(flat), dtype=torch.float32, device=self.device)
        self._params: dict[int, list[torch.nn.Parameter]] = {}
        self._mask = _bidirectional_mask()
        # vmap's batched embedding backward (torch 2.13) keeps the padding_idx row's gradient at
        # zero for the first client only: the others' padding rows would train whenever padding
        # is attended (the paper protocol). Their rows are zeroed after each backward instead.
        position = {id(p): i for i, p in enumerate(flat.params)}
        self._padding_rows = [(position[id(m.weight)], m.padding_idx) for m in model.modules()
                              if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None
                              and id(m.weight) in position]

    def plan(self, clients: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
        """Consecutive clients with equal shard sizes, in chunks of at most ``max_group``."""
        groups: list[list[int]] = []
        group_sizes: list[int] = []
        for client, size in zip(clients, sizes):
            if groups and len(groups[-1]) < self.max_group and group_sizes[-1] == size:
                groups[-1].append(client)
            else:
                groups.append([client])
                group_sizes.append(size)
        return groups

    def params(self, g: int) -> list[torch.nn.Parameter]:
        """(g, *shape) leaf parameters viewing the first g rows of ``data`` (made once per g)."""
        if g not in self._params:
            views = []
            for shape, offset in zip(self.shapes, self.offsets):
                n = math.prod(shape)
                p = torch.nn.Parameter(torch.empty(0, device=self.device))
                p.data = self.data[:g, offset:offset + n].view(g, *shape)
                views.append(p)
            self._params[g] = views
        return self._params[g]

    def views(self, g: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """A function giving, for a (>= g, P) buffer, (g, *shape) views of its first g rows per parameter."""
        def views(buffer: torch.Tensor) -> list[torch.Tensor]:
            return [buffer[:g, o:o + math.prod(shape)].view(g, *shape) for shape, o in zip(self.shapes, self.offsets)]

        return views

    def _client_loss(self, params: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor | None,
                     labels: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(self.model, params, (), {"input_ids": ids, "attention_mask": mask})
        return F.cross_entropy(logits.logits.float(), labels)

    def _expand_mask(self, mask: torch.Tensor | None, g: int) -> torch.Tensor | None:
        """The 4-D mask the model would build from a 2-D one, made outside vmap.

        Inside vmap, transformers' check "is there any padding at all?" (``mask.all()``) is
        data-dependent control flow, which vmap cannot trace; a prepared 4-D mask skips it.
        """
        if mask is None:
            return None
        shape_only = torch.empty(mask.shape[0], mask.shape[1], 0, device=mask.device)  # batch, length, dtype
        # An unpadded batch has no mask (batches_on_device); skipping transformers' own check
        # keeps the step free of host syncs.
        full = self._mask(config=self.model.config, inputs_embeds=shape_only, attention_mask=mask,
                          allow_is_bidirectional_skip=False)
        return full.reshape(g, mask.shape[0] // g, *full.shape[1:])

    def train(self, weights: torch.Tensor, data: TokenTensors, lengths_cpu: np.ndarray,
              shards: Sequence[np.ndarray], clients: Sequence[int], *, epochs: int, batch_size: int, lr: float,
              protocol: Protocol, seed: int, round_: int, bf16: bool, optimizer: "LocalOptimizer | None" = None,
              on_batch: Callable[[int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, int]:
        """Train the clients from ``weights``; rows 0..g-1 of ``data`` then hold their models.

        ``optimizer`` takes the steps, over ``params(g)`` (default: plain SGD at ``lr``).
        Returns (each client's summed training loss, examples each client saw).
        """
        g = len(clients)
        if not 2 <= g <= self.max_group or len({len(s) for s in shards}) != 1:
            raise ValueError(f"a group is 2..{self.max_group} clients with equal shards, got sizes "
                             f"{[len(s) for s in shards]}")
        params = self.params(g)
        optimizer_step = optimizer.step if optimizer is not None else (lambda: sgd_step(params, lr))
        named = dict(zip(self.names, params))
        self.data[:g].copy_(weights.expand(g, -1))
        if not self.model.training:
            self.model.train()
        seed_dropout(self.device, derive_seed(seed, "dropout-group", round_, *clients))
        # Without dropout "different" costs nothing; with it, each client gets its own masks.
        step_masked = torch.func.vmap(self._client_loss, randomness="different")
        step_unmasked = torch.func.vmap(self._client_loss, in_dims=(0, 0, None, 0), randomness="different")
        loss_sums = torch.zeros(g, dtype=torch.float64, device=self.device)
        seen = 0
        for epoch in range(epochs):
            per_client = [client_batches(s, batch_size, protocol, seed, round_, c, epoch)
                          for s, c in zip(shards, clients)]
            # Step t of the group is step t of every member: their batches, side by side.
            steps = [np.concatenate(batches) for batches in zip(*per_client)]
            for ids, mask, labels in batches_on_device(data, lengths_cpu, steps, protocol):
                b = labels.shape[0] // g
                mask = self._expand_mask(mask, g)
                step = step_unmasked if mask is None else step_masked
                with autocast(self.device, bf16), _vmappable_attention(self.device):
                    losses = step(named, ids.view(g, b, -1), mask, labels.view(g, b))
                # d(sum_k L_k)/d(theta_k) = dL_k/d(theta_k): one backward gives every client's gradient.
                losses.sum().backward()
                for i, row in self._padding_rows:
                    if params[i].grad is not None:
                        params[i].grad[:, row] = 0
                optimizer_step()
                loss_sums += losses.detach().double() * b
                seen += b
                if on_batch is not None:
                    on_batch(g * b)
                if should_stop is not None and should_stop():
                    raise InterruptedError("stop requested")
        return loss_sums, seen
