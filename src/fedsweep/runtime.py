"""What a training process runs beside the algorithm: its ranks (torchrun) and its progress output."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from . import FedsweepError


def check_device(device: str) -> None:
    """The ``device`` setting names a device this machine has (one line otherwise)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FedsweepError(f"train: invalid device={device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FedsweepError(f"train: device={device!r} but CUDA is not available")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Progress:
    def __init__(self, mode: str, rounds: int, label: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.rounds, self.label = mode, rounds, label
        self.bar = None

    def start_round(self, round_: int, examples: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=examples, desc=f"{self.label} round {round_}/{self.rounds}",
                            unit="ex", leave=False, file=sys.stderr)

    def step(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end_round(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode == "none":
            return
        acc = row.get("test_accuracy")
        acc_s = "" if acc is None or (isinstance(acc, float) and math.isnan(acc)) else f"acc {acc:.4f} "
        loss = row.get("train_loss", float("nan"))
        secs = row.get("train_seconds", 0.0)
        rate = row["examples"] / secs if secs else float("nan")
        print(f"[{self.label}] round {row['round']}/{self.rounds} {acc_s}train_loss {loss:.4f} "
              f"train {secs:.1f}s eval {row.get('eval_seconds', 0.0):.1f}s {rate:.0f} ex/s",
              file=sys.stderr, flush=True)


class Ranks:
    """The processes sharing one cell (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK).

    Clients are dealt round-robin over ranks; each rank adds its clients' weighted models into
    its float64 accumulator and an all-reduce sums them (NCCL on GPUs, gloo on CPUs). Every
    random draw depends on (seed, round, client, epoch), never on the rank, so a client trains
    identically wherever it runs; only the order of the float64 additions changes, far below
    fp32 resolution. One process (world 1) is the same code with the collectives skipped.
    """

    def __init__(self, rank: int, world: int, device: torch.device, owns_group: bool = False):
        self.rank, self.world, self.device = rank, world, device
        self.owns_group = owns_group  # whether close() ends the process group (not if a caller began it)

    @classmethod
    def from_env(cls, device_name: str) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, pick_device(device_name))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)

    def _reduce(self, values: list[float], op) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.SUM)

    def min(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        return self._reduce([value], dist.ReduceOp.MIN)[0]

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        return self._reduce([value], dist.ReduceOp.MAX)[0]

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
