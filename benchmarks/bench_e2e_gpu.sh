#!/usr/bin/env bash
# The real runner (`python -m fedsweep train`) on a GPU: a random-init BERT-base (BertConfig(),
# vocab 30522 = the MiniLM/BERT tokens of benchmarks/common.py), AG News tokens of
# benchmarks/out/, K clients, a few rounds, defaults otherwise (E=2, B=32, bf16 on CUDA, eval
# every round). Prints per round train / aggregate / eval seconds and the eval share, and writes
# all rounds (e2e_metrics.csv) and every run.json (e2e_runs.json) into OUT_DIR.
#
#   PYTHONPATH=src bash benchmarks/bench_e2e_gpu.sh [OUT_DIR] [ROUNDS] [K ...]
#   PYTHONPATH=src bash benchmarks/bench_e2e_gpu.sh benchmarks/out/e2e 3 1 8 32
#   DEVICE=cpu BERT_ARGS='hidden_size=64,num_hidden_layers=1,num_attention_heads=2,intermediate_size=128' \
#     bash benchmarks/bench_e2e_gpu.sh /tmp/e2e 1 2       # a smoke test on a CPU
set -euo pipefail
out_dir=${1:-benchmarks/out/e2e}
rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# )) || true
clients=("$@")
[ ${#clients[@]} -gt 0 ] || clients=(1 8 32)
work=${WORK:-/tmp/fedsweep_e2e}
mkdir -p "$out_dir" "$work"
py=${PYTHON:-python3}

"$py" -c "
from transformers import BertConfig, BertForSequenceClassification
import torch
torch.manual_seed(0)
BertForSequenceClassification(BertConfig(num_labels=4, ${BERT_ARGS:-})).save_pretrained('$work/bert-base')"

for k in "${clients[@]}"; do
  "$py" -m fedsweep partition --data-dir benchmarks/out/data/ag_news --clients "$k" --seed 0 \
    --out "$work/shards_K$k.parquet"
  rm -rf "$work/run_K$k"
  "$py" -m fedsweep train --tokens-dir benchmarks/out/tokens/ag_news/minilm_L128 \
    --shards "$work/shards_K$k.parquet" --model "$work/bert-base" --out-dir "$work/run_K$k" \
    --rounds "$rounds" --device "${DEVICE:-cuda}" --progress lines
done

"$py" - "$work" "$out_dir" "${clients[@]}" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd

work, out = Path(sys.argv[1]), Path(sys.argv[2])
frames, runs = [], {}
for k in sys.argv[3:]:
    run = work / f"run_K{k}"
    frames.append(pd.read_parquet(run / "metrics.parquet"))
    runs[k] = json.loads((run / "run.json").read_text())
m = pd.concat(frames, ignore_index=True)
m.to_csv(out / "e2e_metrics.csv", index=False)
(out / "e2e_runs.json").write_text(json.dumps(runs, indent=1, default=str))
m = m[m["round"] > 0].copy()
m["round_s"] = m["train_seconds"] + m["aggregate_seconds"] + m["eval_seconds"]
m["eval_share"] = m["eval_seconds"] / m["round_s"]
m["agg_share"] = m["aggregate_seconds"] / m["round_s"]
m["ex_per_s"] = m["examples"] / m["train_seconds"]
cols = ["clients", "round", "examples", "train_seconds", "aggregate_seconds", "eval_seconds", "round_s",
        "eval_share", "agg_share", "ex_per_s", "test_accuracy"]
print(m[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
for k, r in runs.items():
    print(f"K={k}: peak {r['peak_memory_bytes'] / 2**30:.2f} GiB, train ex/s {r['train_examples_per_second']:.0f}, "
          f"wall {r['wall_seconds_this_run']:.1f} s, device {r.get('device')}, torch {r.get('torch')}, "
          f"transformers {r.get('transformers')}")
EOF
