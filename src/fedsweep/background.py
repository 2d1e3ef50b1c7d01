"""A second thread for work a free core can take off the training thread (CPU runs).

Torch releases the GIL inside its kernels, so a Python thread that runs torch ops runs them
beside the training thread. Used where the order of the work is fixed and its results do not
depend on which thread did it: SCAFFOLD's per-client work (:mod:`fedsweep.scaffold`), the
server's sums of a client added by its rows (:meth:`fedsweep.average.Strategy.submit`) and half of
the server step's chunks (:class:`fedsweep.server_steps._ServerStep`). Only where the process's cores
(its CPU affinity: a SLURM job's allocation) exceed torch's intra-op threads; otherwise a second
thread would take the training threads' cores.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a SLURM job's allocation, not the
    node's cores) where the platform has one."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_core() -> bool:
    """Whether this process may use more cores than torch's intra-op threads."""
    return usable_cores() > torch.get_num_threads()


def single_thread_pool(name: str) -> ThreadPoolExecutor:
    """One background thread whose torch ops use the caller's intra-op thread count (the same
    chunking, hence the same bits, as the same ops on the calling thread)."""
    threads = torch.get_num_threads()
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(threads,))


_SHARED: dict[int, ThreadPoolExecutor] = {}


def shared_worker() -> ThreadPoolExecutor:
    """The process's one background thread (for the caller's intra-op thread count): every user of
    the free core queues its work here, so a free core never runs two of them beside the training
    thread (measured: SCAFFOLD's per-client work and the server's adds, each on a thread of its
    own, took turns with the training thread on 2 cores). Jobs run in the order they are queued;
    a job must not wait for one queued after it."""
    threads = torch.get_num_threads()
    if threads not in _SHARED:
        _SHARED[threads] = single_thread_pool("fedsweep-background")
    return _SHARED[threads]


def split_map(work: Callable[[int, int], T], count: int, worker: ThreadPoolExecutor | None) -> list[T]:
    """``[work(i, lane) for i in range(count)]``, ``lane`` 0 on this thread and 1 on ``worker``
    (None: all on this thread): the worker takes the second half of the items. ``work`` must be
    independent across items, and may use per-lane scratch; the results come back in item order,
    so sums over them are the same in either case."""
    if worker is None or count < 2:
        return [work(i, 0) for i in range(count)]
    half = (count + 1) // 2
    later = worker.submit(lambda: [work(i, 1) for i in range(half, count)])
    try:
        first = [work(i, 0) for i in range(half)]
    finally:
        rest = later.result()  # always waited for: the worker is never left writing
    return first + rest


def done(value: T) -> Future:
    """A future that already holds ``value`` (work done on the calling thread)."""
    future: Future = Future()
    future.set_result(value)
    return future
