#!/usr/bin/env bash
# One command for a lent GPU (issue #20): the real runner (`fedsweep train`) on a random-init
# BERT-base and a Qwen2.5-0.5B-shaped decoder (LoRA) in each mode (dynamic padding, buckets of 32,
# compiled, tf32 vs bf16, client_group 4 and 8, LoRA, NCCL on 2 ranks where there are 2 GPUs),
# within 8 minutes on one H100; prints ONE markdown table (ex/s, MFU, eval share, peak memory)
# and writes it to OUT_DIR/gpu_session.md (logs and run folders beside it). The logic is
# benchmarks/bench_session.py (--help lists every option).
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]                      # default benchmarks/out/gpu_session
#   bash benchmarks/gpu_session.sh --peak-tflops 989 /tmp/session # the MFU's peak (H100 SXM bf16 dense)
#   bash benchmarks/gpu_session.sh --device cpu --quick OUT_DIR   # tiny shapes: a smoke test (< 1 min)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root/src:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$root/benchmarks/bench_session.py" "$@"
