"""Where a strategy's server step spends its time, kernel by kernel (issue #20).

    python benchmarks/bench_server_ops.py                     # FedAdam, tiny-bert's 4.39M parameters, 1 thread
    python benchmarks/bench_server_ops.py --strategy fedavgm --threads 2
    python benchmarks/bench_server_ops.py --chunks 32768 65536 131072 262144 524288   # the chunk size

The real strategy (``fedsweep.strategies.build_strategy``) on a vector of the model's size: each
round adds --clients client models (the global weights plus noise; not timed) and runs
``finish_round``. Printed: its wall time (best and median of --rounds after --warmup), with the
worker thread that takes half the chunks where torch's threads leave a core free
(fedsweep.background.free_core) and without it; then, from torch.profiler on the one-thread step
(the profiler sees the calling thread only), each torch op's self CPU time and calls per round.
``--chunks``: the wall times at other chunk sizes (``Strategy.CPU_CHUNK``) first. Also: the streaming speed of ``add_`` over vectors of the model's size, to compare the step's time
with what its bytes would take.
"""

from __future__ import annotations

import argparse
import os
import time
import contextlib
from collections import defaultdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="fedadam")
    p.add_argument("--parameters", type=int, default=4_386_436, help="default: tiny-bert's")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="also time these chunk sizes")
    a = p.parse_args()

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop lines
    import torch
    from torch.profiler import ProfilerActivity, profile

    import fedsweep.average
    from fedsweep.strategies import build_strategy

    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(a.parameters, generator=gen)
    clients = [base + 1e-3 * torch.randn(a.parameters, generator=gen) for _ in range(2)]
    settings = {"server_lr": 0.01, "server_momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    scratch = torch.empty_like(base)
    free_core = fedsweep.average.free_core

    def rounds(worker: bool, profiled: bool):
        fedsweep.average.free_core = free_core if worker else (lambda: False)
        strategy = build_strategy(a.strategy, base.clone(), **settings)
        walls, totals, counts = [], defaultdict(float), defaultdict(int)
        for r in range(a.warmup + a.rounds):
            strategy.begin_round(a.clients * 100)
            for k in range(a.clients):
                scratch.copy_(clients[k % 2])
                strategy.add(scratch, 100)
            with profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext() as prof:
                t0 = time.perf_counter()
                strategy.finish_round(scratch=scratch)
                wall = time.perf_counter() - t0
            if r >= a.warmup:
                walls.append(wall)
                for event in prof.key_averages() if profiled else ():
                    totals[event.key] += event.self_cpu_time_total / 1e3  # ms
                    counts[event.key] += event.count
        walls.sort()
        return walls, totals, counts

    print(f"{a.strategy}: {a.parameters / 1e6:.2f}M parameters, {a.clients} clients per round, threads {a.threads}")
    default_chunk = fedsweep.average.Strategy.CPU_CHUNK
    for chunk in [*a.chunks, default_chunk]:  # today's last: the profile below uses it
        fedsweep.average.Strategy.CPU_CHUNK = chunk
        for worker in (True, False):
            walls, _, _ = rounds(worker, profiled=False)
            print(f"chunk {chunk}, finish_round, {'worker where a core is free' if worker else 'one thread'}: "
                  f"best {walls[0] * 1e3:.1f} ms, median {walls[len(walls) // 2] * 1e3:.1f} ms over {a.rounds} rounds")
    walls, totals, counts = rounds(False, profiled=True)
    print(f"one thread under torch.profiler (median {walls[len(walls) // 2] * 1e3:.1f} ms), per round:")
    print(f"{'op':<28}{'self ms':>10}{'calls':>8}")
    for key, ms in sorted(totals.items(), key=lambda item: -item[1]):
        if ms / a.rounds >= 0.05:
            print(f"{key:<28}{ms / a.rounds:>10.2f}{counts[key] / a.rounds:>8.0f}")
    print(f"{'all ops':<28}{sum(totals.values()) / a.rounds:>10.2f}{sum(counts.values()) / a.rounds:>8.0f}")

    x, y = torch.rand(a.parameters), torch.rand(a.parameters)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        x.add_(y)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"add_ of two {4 * a.parameters / 1e6:.1f} MB vectors: best {best * 1e3:.2f} ms "
          f"({12 * a.parameters / best / 1e9:.0f} GB/s read + written)")


if __name__ == "__main__":
    main()
