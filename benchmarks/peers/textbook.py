"""FedAvg the way most tutorials write it: a deep copy of the global model per client, a fresh
torch.optim.SGD per client, the K client state_dicts collected, then averaged key by key
weighted by shard size and loaded back into the global model.

    python benchmarks/peers/textbook.py '{"clients": 8}'
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cell import Cell, Data, PeakRSS, now, report
from fedsweep.models import build_model


def fedavg(states: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in states)
    return {key: sum(sd[key] * (n / total) for sd, n in states) for key in states[0][0]}


def main() -> None:
    cell = Cell.from_argv()
    torch.set_num_threads(cell.threads)
    data = Data(cell)
    mem = PeakRSS()
    t0 = now()
    global_model = build_model(cell.model, 4, seed=cell.seed)
    rounds = []
    for round_ in range(1, cell.rounds + 1):
        t1 = now()
        states = []
        for client in range(cell.clients):
            local = copy.deepcopy(global_model)
            opt = torch.optim.SGD(local.parameters(), lr=cell.lr)  # momentum 0, weight decay 0
            local.train()
            data.seed_dropout(round_, client)
            for epoch in range(cell.epochs):
                for ids, mask, labels in data.batches(round_, client, epoch):
                    loss = F.cross_entropy(local(input_ids=ids, attention_mask=mask).logits, labels)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append((local.state_dict(), len(data.shards[client])))
        global_model.load_state_dict(fedavg(states))
        rounds.append(now() - t1)
    test = data.evaluate(global_model)
    report(cell, "textbook", now() - t0, rounds, test, mem.stop_mib())


if __name__ == "__main__":
    main()
