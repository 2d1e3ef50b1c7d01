"""The cell with fedsweep's engine: one model whose parameters live in one flat buffer, every
client trained on it in turn (loading the global weights is one copy), FedAvg accumulated in
place. The same loop as fedsweep.train.run, minus its checkpoints, progress and round-0 eval.

    python benchmarks/peers/fedsweep_cell.py '{"clients": 8}'
"""

from __future__ import annotations

import torch

from cell import PROTOCOL, Cell, Data, PeakRSS, now, report
from fedsweep.engine import FlatParameters
from fedsweep.rounds import train_round
from fedsweep.strategies import FedAvg
from fedsweep.models import build_model


def main() -> None:
    cell = Cell.from_argv()
    torch.set_num_threads(cell.threads)
    data = Data(cell)
    mem = PeakRSS()
    t0 = now()
    model = build_model(cell.model, 4, seed=cell.seed)
    flat = FlatParameters(model)
    strategy = FedAvg(flat.data.clone())
    rounds = []
    for round_ in range(1, cell.rounds + 1):
        t1 = now()
        strategy.begin_round(sum(len(s) for s in data.shards))
        train_round(model, flat, strategy, data.train, data.train_len, data.shards, range(cell.clients),
                    epochs=cell.epochs, batch_size=cell.batch_size, lr=cell.lr, protocol=PROTOCOL, seed=cell.seed,
                    round_=round_, bf16=False)
        strategy.finish_round(scratch=flat.data)
        rounds.append(now() - t1)
    flat.data.copy_(strategy.weights)
    test = data.evaluate(model)
    report(cell, "fedsweep", now() - t0, rounds, test, mem.stop_mib())


if __name__ == "__main__":
    main()
