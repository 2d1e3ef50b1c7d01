"""GPU throughput and MFU of fedsweep's engine on a BERT-base-sized model, per setting.

A BERT-base (BertConfig() defaults, random init: speed does not depend on the weights) is
trained at length 128, B=32 on the AG News tokens of benchmarks/common.py through fedsweep's
engine (FlatParameters + train_round + FedAvg): K=1 (one client, --steps batches) and K=32
(32 clients, --steps batches each, so per-client overhead shows). Each variant changes one thing
from fedsweep's GPU default (bf16 autocast, SDPA attention, no compile, dynamic padding, clients
one after another): precision fp32 / TF32 / bf16, attention sdpa / eager, torch.compile on /
off, padding dynamic / fixed, client batching (``bf16-group4`` / ``-group8``: 4 or 8 clients
trained at once by vmap, ``client_group`` in the config; at K=1 the same as ``bf16``). Also
timed: one full eval pass over the test set.

MFU = model FLOPs / (time x --peak-tflops), with model FLOPs per token = 6 x non-embedding
parameters + 12 x layers x hidden x width (the attention scores and their use, forward and
backward), forward only (eval) a third of that. Tokens are those computed, padding included:
dynamic padding shows up as more examples/s, not as more MFU. The peak is one number for every
variant (default: H100 SXM, bf16 dense, 989 TFLOP/s), so fp32 rows read as "share of the bf16 peak".

    python benchmarks/bench_gpu.py                                   # on a GPU: BERT-base
    python benchmarks/bench_gpu.py --device cpu --model tiny-bert --steps 3   # does it run?
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

VARIANTS = {  # name: (precision, attention, compile, dynamic padding, clients trained at once)
    "fp32": ("fp32", "sdpa", False, True, 1),
    "tf32": ("tf32", "sdpa", False, True, 1),
    "bf16": ("bf16", "sdpa", False, True, 1),  # fedsweep's default on a GPU
    "bf16-eager": ("bf16", "eager", False, True, 1),
    "bf16-fixed": ("bf16", "sdpa", False, False, 1),
    "bf16-compile": ("bf16", "sdpa", True, True, 1),
    "bf16-compile-fixed": ("bf16", "sdpa", True, False, 1),
    "bf16-group4": ("bf16", "sdpa", False, True, 4),
    "bf16-group8": ("bf16", "sdpa", False, True, 8),
}


@dataclass
class Setup:
    device: torch.device
    model: str
    batch_size: int
    length: int
    steps: int
    warmup: int
    peak_flops: float
    eval_examples: int


def build(spec: str, attention: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from fedsweep.models import tiny_config

    config = tiny_config(spec, 4) if spec.startswith("tiny-") else BertConfig(num_labels=4)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)


def flops_per_token(model: torch.nn.Module, width: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence width ``width``."""
    cfg = model.config
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 6 * non_embedding + 12 * cfg.num_hidden_layers * cfg.hidden_size * width


def batch_flops(model, batches: list[np.ndarray], lengths: np.ndarray, dynamic: bool, full: int) -> float:
    widths = [int(lengths[b].max()) if dynamic else full for b in batches]
    return sum(len(b) * w * flops_per_token(model, w) for b, w in zip(batches, widths))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(s: Setup, name: str, clients: int, train, test) -> dict:
    from fedsweep.engine import FlatParameters, Protocol, client_batches, eval_batches, evaluate
    from fedsweep.rounds import train_round
    from fedsweep.strategies import FedAvg
    from fedsweep.grouped import ClientGroups
    from fedsweep.train import precision_settings

    precision, attention, compiled, dynamic, group = VARIANTS[name]
    torch._dynamo.reset()  # no compiled graph carries over from the previous variant
    bf16 = precision_settings(precision, s.device)
    protocol = Protocol(name, attention_mask=True, dynamic_padding=dynamic, reshuffle=True, drop_last=False)
    model = build(s.model, attention).to(s.device)
    flat = FlatParameters(model)  # before compile: the compiled module reads the same parameters
    run_model = torch.compile(model) if compiled else model
    strategy = FedAvg(flat.data.clone())
    groups = ClientGroups(model, flat, group) if group > 1 else None
    per_client = s.steps * s.batch_size
    rows = np.arange(clients * per_client) % len(train)  # wraps round the training set if needed
    shards = [rows[k * per_client:(k + 1) * per_client] for k in range(clients)]
    lengths = train.lengths.cpu().numpy()

    def one_round(round_: int) -> float:
        sync(s.device)
        t0 = time.perf_counter()
        strategy.begin_round(len(rows))
        train_round(run_model, flat, strategy, train, lengths, shards, range(clients), epochs=1,
                    batch_size=s.batch_size, lr=1e-5, protocol=protocol, seed=0, round_=round_, bf16=bf16,
                    groups=groups)
        strategy.finish_round(scratch=flat.data)
        sync(s.device)
        return time.perf_counter() - t0

    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    for r in range(s.warmup):  # warm-up rounds: allocator, cuDNN/cuBLAS choices, compilation
        one_round(r)
    seconds = one_round(s.warmup)  # a new round: new batch orders, so new widths with dynamic padding
    batches = [b for k, shard in enumerate(shards)
               for b in client_batches(shard, s.batch_size, protocol, 0, s.warmup, k, 0)]
    train_flops = batch_flops(model, batches, lengths, dynamic, train.ids.shape[1])

    test_len = test.lengths.cpu().numpy()
    ebatches = eval_batches(test_len, 256)
    evaluate(run_model, test, ebatches[:2], test_len, protocol, bf16)  # warm-up (and compile) the eval shapes
    if compiled and dynamic:
        evaluate(run_model, test, ebatches, test_len, protocol, bf16)  # every eval width compiled once
    sync(s.device)
    t0 = time.perf_counter()
    evaluate(run_model, test, ebatches, test_len, protocol, bf16)
    sync(s.device)
    eval_s = time.perf_counter() - t0
    eval_flops = batch_flops(model, ebatches, test_len, dynamic, test.ids.shape[1]) / 3
    peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else float("nan")
    del run_model, model, flat, strategy, groups
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"variant": name, "clients": clients, "examples_per_s": len(rows) / seconds,
            "step_ms": 1000 * seconds / len(batches), "mfu": train_flops / seconds / s.peak_flops,
            "eval_s": eval_s, "eval_mfu": eval_flops / eval_s / s.peak_flops, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="bert-base", help="bert-base (BertConfig()) or tiny-bert")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 32])
    p.add_argument("--steps", type=int, default=20, help="timed batches per client")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed one")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense: 989")
    p.add_argument("--eval-examples", type=int, default=0, help="test rows evaluated (0: all)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    a = p.parse_args()

    from common import tokens_dir
    from fedsweep.tokens import TokenTensors, load_split

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    s = Setup(device, a.model, a.batch_size, a.length, a.steps, a.warmup, a.peak_tflops * 1e12, a.eval_examples)
    tok = tokens_dir(max_length=a.length)
    train = load_split(tok, "train", width=a.length).to(device)  # padded to the full length: fixed padding
    test = load_split(tok, "test", width=a.length)
    if a.eval_examples:
        n = a.eval_examples
        test = TokenTensors(test.ids[:n], test.lengths[:n], test.labels[:n], test.pad_token_id)
    test = test.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{a.model} on {name}: B={a.batch_size}, length {a.length}, {a.steps} batches per client, "
          f"eval over {len(test)} test rows; MFU vs {a.peak_tflops:g} TFLOP/s")
    print(f"{'variant':<20}{'K':>4}{'ex/s':>10}{'ms/step':>9}{'TFLOP/s':>9}{'MFU':>8}{'vs K=1':>8}{'eval s':>8}"
          f"{'eval MFU':>9}{'peak GiB':>9}")
    for variant in a.variants:
        k1 = None
        for k in a.clients:
            r = measure(s, variant, k, train, test)
            k1 = k1 or r["examples_per_s"]
            peak = f"{r['peak_gib']:.2f}" if device.type == "cuda" else "-"
            print(f"{variant:<20}{k:>4}{r['examples_per_s']:>10.1f}{r['step_ms']:>9.1f}"
                  f"{r['mfu'] * a.peak_tflops:>9.3g}{100 * r['mfu']:>7.1f}%{r['examples_per_s'] / k1:>8.3f}"
                  f"{r['eval_s']:>8.2f}{100 * r['eval_mfu']:>8.1f}%{peak:>9}", flush=True)


if __name__ == "__main__":
    main()
