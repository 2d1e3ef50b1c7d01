"""What the three implementations in bench_peers.py share: the cell, its data, its batches, its eval.

Everything here is identical across implementations on purpose, so the measured differences
come from the federated machinery alone (model copies, optimiser, aggregation, serialisation,
actors): same tokenised AG News rows, same i.i.d. shards, same batch order and same dropout
seed per (round, client, epoch), same eval batches.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/common.py

import torch  # noqa: E402

from common import tokens_dir  # noqa: E402
from fedsweep.engine import PROTOCOLS, _batches_on_device, client_batches, derive_seed, eval_batches, evaluate  # noqa: E402
from fedsweep.partition import iid_shards  # noqa: E402
from fedsweep.tokens import TokenTensors, load_split  # noqa: E402

PROTOCOL = PROTOCOLS["standard"]  # mask over padding, dynamic padding, reshuffle each epoch


@dataclass
class Cell:
    model: str = "tiny-bert"
    clients: int = 8
    examples: int = 1024  # the first N training rows, split over the clients
    test: int = 512  # the first N test rows
    rounds: int = 2
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    threads: int = 2
    flower_actors: int = 1  # Ray actors (the threads are divided between them)
    flower_reuse_model: bool = False  # keep one model per actor instead of one per fit()

    @classmethod
    def from_argv(cls) -> "Cell":
        return cls(**json.loads(sys.argv[1]))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Data:
    """The training rows, the shards and the test subset, loaded once per process."""

    def __init__(self, cell: Cell):
        tok = tokens_dir()
        self.cell = cell
        self.train = load_split(tok, "train")
        self.train_len = self.train.lengths.numpy()
        test = load_split(tok, "test")
        n = cell.test
        self.test = TokenTensors(test.ids[:n], test.lengths[:n], test.labels[:n], test.pad_token_id)
        self.test_len = self.test.lengths.numpy()
        self.shards = iid_shards(cell.examples, cell.clients, cell.seed)

    def batches(self, round_: int, client: int, epoch: int):
        """(input_ids, attention_mask, labels) of one local epoch, in fedsweep's order."""
        c = self.cell
        idx = client_batches(self.shards[client], c.batch_size, PROTOCOL, c.seed, round_, client, epoch)
        return _batches_on_device(self.train, self.train_len, idx, PROTOCOL)

    def seed_dropout(self, round_: int, client: int) -> None:
        # The seed train_client uses: every implementation draws the same dropout masks.
        torch.manual_seed(derive_seed(self.cell.seed, "dropout", round_, client))

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        """(accuracy, mean loss) on the test rows: the loss tells apart models the accuracy may not."""
        correct, loss = evaluate(model, self.test, eval_batches(self.test_len, 256), self.test_len, PROTOCOL, False)
        return correct / len(self.test), loss / len(self.test)


_PER_PROCESS: dict = {}


def per_process(key, make):
    """One object per process and key: Flower's Ray actors keep it between messages (this
    module is imported by reference in the actors, so its globals live as long as the actor)."""
    if key not in _PER_PROCESS:
        _PER_PROCESS[key] = make()
    return _PER_PROCESS[key]


class PeakRSS:
    """Peak resident memory of this process plus all its descendants (Ray's workers included),
    sampled every 50 ms: getrusage alone would miss the actors, which are not our children."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self.seen: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                self.seen.add(p)  # psutil.Process: equal only if pid AND start time match
            except Exception:  # a process that just ended
                pass
        return total

    def reap(self) -> None:
        """End the descendants seen that outlived their parent: after run_simulation returned,
        Ray's actor processes were seen orphaned and still busy for tens of seconds, which
        would slow whatever the benchmark runs next."""
        import psutil

        left = [p for p in self.seen if p != self.me and p.is_running()]
        for p in left:
            try:
                p.terminate()
            except psutil.NoSuchProcess:  # it ended meanwhile
                pass
        _, alive = psutil.wait_procs(left, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._sample())

    def stop_mib(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        return self.peak / 2**20


def report(cell: Cell, impl: str, wall: float, rounds: list[float], test: tuple[float, float],
           peak_mib: float) -> None:
    """Print the one JSON line bench_peers.py reads."""
    import resource

    per_round = cell.examples // cell.clients * cell.clients * cell.epochs
    train = sum(rounds)
    print(json.dumps({"impl": impl, "clients": cell.clients, "model": cell.model, "wall_s": wall,
                      "train_s": train, "round_s": rounds, "examples": per_round * cell.rounds,
                      "examples_per_s": per_round * cell.rounds / train,
                      "last_round_examples_per_s": per_round / rounds[-1],
                      "accuracy": test[0], "test_loss": test[1], "peak_rss_mib": peak_mib,
                      "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def now() -> float:
    return time.perf_counter()
