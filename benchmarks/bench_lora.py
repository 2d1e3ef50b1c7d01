"""Peak GPU memory and step time of full fine-tuning vs LoRA for decoder classifiers.

Decoder models (Qwen2.5-0.5B- and Llama-3-8B-shaped, random init from their configs, no hub) get a
4-class sequence-classification head and train on random token ids (B=--batch-size, length
--length, attention mask of ones, bf16 autocast, SDPA attention). Methods:

- ``full``: what fedsweep's engine does today. fp32 weights, plain SGD (no momentum, so no
  optimiser state), gradients for every parameter, plus the FedAvg server state fedsweep keeps
  for full-parameter averaging: an fp32 global copy and an fp64 accumulator (12 bytes per
  parameter), allocated on the GPU and included in the peak (``--no-server-state``: not allocated;
  then it is only reported, computed, in the "server GiB" column).
- ``lora``: the frozen base in bf16, LoRA adapters (r=16, alpha=32, dropout 0.05) on q/k/v/o, in
  fp32, plus the classification head (fp32) trainable; plain SGD on those; the FedAvg state is
  12 bytes per trainable parameter.
- ``lora-mlp``: the same with adapters on the MLP projections too (gate/up/down).

"upload MiB" is what one client sends per round (trainable parameters x 4 bytes, fp32); the
server sends the same amount back. An out-of-memory case prints OOM and the stage it failed at.

A second table (``--rounds-model``, default ``tiny-llama`` with ``--tiny``) runs fedsweep's own
rounds (:class:`fedsweep.rounds.Federation`, plain SGD clients, FedAvg) of one model with full
fine-tuning and with LoRA (``fedsweep.lora``: fedit, ffa, exact), each method in a fresh process
so that its peak memory is its own: peak memory (GPU: max_memory_allocated; CPU: the process's
peak RSS, interpreter and libraries included, and that minus the RSS before the model was
built), seconds per round (after a warm-up round) and the bytes every client of a round uploads
and downloads together (``exact`` also sends the base-weight residual of its target modules).

    python benchmarks/bench_lora.py                      # on a GPU: qwen0.5b and llama8b
    python benchmarks/bench_lora.py --tiny --device cpu  # 2-layer tiny configs; rounds of tiny-llama
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
METHODS = ("full", "lora", "lora-mlp")


def config(name: str, tiny: bool):
    from transformers import LlamaConfig, Qwen2Config

    common = {"num_labels": 4, "pad_token_id": 0}
    if name == "qwen0.5b":
        shape = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768)
        if tiny:
            shape.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000, max_position_embeddings=512)
        return Qwen2Config(tie_word_embeddings=True, **shape, **common)
    if name == "llama8b":
        shape = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0)
        if tiny:
            shape.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000, max_position_embeddings=512)
        return LlamaConfig(**shape, **common)
    raise SystemExit(f"unknown model {name!r} (qwen0.5b, llama8b)")


def build(cfg, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    with torch.device(device):  # built directly on the device: no host copy of 8B parameters
        return AutoModelForSequenceClassification.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def run_case(model_name: str, method: str, a, device: torch.device, stage: dict) -> dict:
    cfg = config(model_name, a.tiny)
    stage["at"] = "build"
    if method == "full":
        model = build(cfg, torch.float32, device)
    else:
        from peft import LoraConfig, get_peft_model

        base = build(cfg, torch.bfloat16, device)
        targets = ATTENTION + (MLP if method == "lora-mlp" else [])
        lora = LoraConfig(task_type="SEQ_CLS", r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                          target_modules=targets)
        model = get_peft_model(base, lora)  # freezes the base; the head ("score") stays trainable
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 adapters and head (peft already casts the adapters)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    server_bytes = 12 * trainable  # fp32 global copy + fp64 accumulator
    row = {"total": total, "trainable": trainable, "server_gib": gib(server_bytes),
           "upload_mib": trainable * 4 / 2**20, "server_on_device": not a.no_server_state}
    if not a.no_server_state:
        stage["at"] = "server state"
        global_copy = torch.empty(trainable, dtype=torch.float32, device=device)
        accum = torch.zeros(trainable, dtype=torch.float64, device=device)
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.0)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (a.batch_size, a.length), device=device, generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (a.batch_size,), device=device, generator=g)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        with bf16:
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    stage["at"] = "first step"
    for _ in range(a.warmup):
        step()
    sync(device)
    stage["at"] = "timed steps"
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / a.steps
    row.update(step_ms=1000 * seconds, examples_per_s=a.batch_size / seconds,
               peak_gib=gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan"))
    if not a.no_server_state:
        del global_copy, accum
    return row


ROUND_METHODS = {  # method -> the peft spec of fedsweep train --peft
    "full": None,
    "lora-fedit": {"method": "lora", "aggregation": "fedit"},
    "lora-ffa": {"method": "lora", "aggregation": "ffa"},
    "lora-exact": {"method": "lora", "aggregation": "exact"},
}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def round_case(a, method: str) -> dict:
    """fedsweep's rounds of ``a.rounds_model`` with ``method``: one warm-up round, then timed ones."""
    import numpy as np

    from fedsweep import lora
    from fedsweep.clients import ClientSettings, ClientUpdate
    from fedsweep.engine import PROTOCOLS, FlatParameters
    from fedsweep.models import build_model, total_parameters
    from fedsweep.rounds import Federation
    from fedsweep.strategies import FedAvg
    from fedsweep.tokens import TokenTensors

    device = torch.device(a.device)
    start_rss = rss_bytes()
    spec = lora.parse({**ROUND_METHODS[method], "r": a.rank, "alpha": 2 * a.rank}
                      if ROUND_METHODS[method] else None)
    model = build_model(a.rounds_model, 4, seed=0, pad_token_id=0, dtype=lora.base_dtype(spec))
    model = lora.apply(model, spec).to(device)
    flat = FlatParameters(model)
    strategy = FedAvg(flat.data.clone())
    if spec.aggregation == "exact" and spec.enabled:
        strategy = lora.ExactAggregation(strategy, model, flat)
    rows = a.clients * a.client_rows
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((rows,), a.length, dtype=torch.int64)
    data = TokenTensors(torch.randint(1000, 30000, (rows, a.length), generator=g), lengths,
                        torch.randint(0, 4, (rows,), generator=g), 0).to(device)
    shards = [np.arange(k * a.client_rows, (k + 1) * a.client_rows) for k in range(a.clients)]
    fed = Federation(model, flat, strategy, ClientUpdate(ClientSettings(), strategy.weights), data,
                     lengths.numpy(), shards, epochs=1, batch_size=a.batch_size, protocol=PROTOCOLS["standard"],
                     seed=0, lr=1e-3, bf16=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fed.finish(fed.train(1))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for r in range(2, 2 + a.round_count):
        fed.finish(fed.train(r))
    sync(device)
    seconds = (time.perf_counter() - t0) / a.round_count
    up, down = lora.communication_bytes(flat, strategy)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes()
    return {"method": method, "trainable": flat.num_parameters, "total": total_parameters(model),
            "peak": peak, "peak_over_start": peak - (0 if device.type == "cuda" else start_rss),
            "seconds": seconds, "upload": sum(up.values()) * a.clients, "download": sum(down.values()) * a.clients,
            "download_by_dtype": down}


def round_table(a) -> None:
    """One fresh process per method (its own peak memory), then the table."""
    print(f"\nfedsweep rounds of {a.rounds_model} on {a.device}: K={a.clients} clients x {a.client_rows} rows, "
          f"B={a.batch_size}, length {a.length}, 1 epoch, plain SGD, FedAvg; LoRA r={a.rank} (alpha {2 * a.rank}, "
          f"peft's default targets), fp32; 1 warm-up + {a.round_count} timed rounds")
    where = "peak GPU MiB" if a.device.startswith("cuda") else "peak RSS MiB"
    print(f"{'method':<12}{'trainable':>12}{'total':>12}{where:>14}{'(-start)':>10}{'s/round':>9}"
          f"{'upload B/round':>16}{'download B/round':>18}")
    for method in a.round_methods:
        cmd = [sys.executable, __file__, "--one-round-case", method, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{method:<12}  failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{method:<12}{row['trainable']:>12,}{row['total']:>12,}{row['peak'] / 2**20:>14.1f}"
              f"{row['peak_over_start'] / 2**20:>10.1f}{row['seconds']:>9.2f}{row['upload']:>16,}"
              f"{row['download']:>18,}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["qwen0.5b", "llama8b"], choices=["qwen0.5b", "llama8b"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tiny", action="store_true", help="2-layer, 64-wide configs (a CPU smoke test)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="LoRA r (lora_alpha = 2r)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny: 1)")
    p.add_argument("--no-server-state", action="store_true",
                   help="do not allocate the FedAvg state on the device (only report it)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    p.add_argument("--rounds-model", default=None,
                   help="fedsweep model spec for the table of rounds (default with --tiny: tiny-llama; "
                        "'none': no such table)")
    p.add_argument("--round-methods", nargs="+", default=list(ROUND_METHODS), choices=list(ROUND_METHODS))
    p.add_argument("--clients", type=int, default=4, help="clients per round (rounds table)")
    p.add_argument("--client-rows", type=int, default=64, help="training rows per client (rounds table)")
    p.add_argument("--round-count", type=int, default=2, help="timed rounds after the warm-up (rounds table)")
    p.add_argument("--one-round-case", help=argparse.SUPPRESS)  # internal: one method, JSON on stdout
    a = p.parse_args()
    if a.rounds_model is None:
        a.rounds_model = "tiny-llama" if a.tiny else "none"
    if a.one_round_case:
        torch.set_num_threads(a.threads)
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(round_case(a, a.one_round_case)))
        return
    a.steps = a.steps if a.steps is not None else (2 if a.tiny else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)

    import transformers
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    where = "allocated on the device, in the peak" if not a.no_server_state else "not allocated, computed only"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}: B={a.batch_size}, "
          f"length {a.length}, bf16 autocast, SDPA, plain SGD, {a.warmup} warm-up + {a.steps} timed steps; "
          f"LoRA r={a.rank}; FedAvg server state (12 B x trainable) {where}")
    print(f"{'model':<10}{'method':<10}{'total params':>14}{'trainable':>14}{'server GiB':>11}{'peak GiB':>10}"
          f"{'ms/step':>9}{'ex/s':>9}{'upload MiB':>12}")
    for model_name in a.models:
        for method in a.methods:
            free(device)
            stage = {"at": "start"}
            row, error = None, None
            try:
                row = run_case(model_name, method, a, device, stage)
            except torch.OutOfMemoryError:
                error = f"OOM at {stage['at']}"
            free(device)
            if row is None:
                print(f"{model_name:<10}{method:<10}  {error}", flush=True)
                continue
            peak = f"{row['peak_gib']:.2f}" if device.type == "cuda" else "-"
            print(f"{model_name:<10}{method:<10}{row['total']:>14,}{row['trainable']:>14,}{row['server_gib']:>11.3f}"
                  f"{peak:>10}{row['step_ms']:>9.1f}{row['examples_per_s']:>9.1f}{row['upload_mib']:>12.2f}",
                  flush=True)
    if a.rounds_model != "none":
        round_table(a)


if __name__ == "__main__":
    main()
