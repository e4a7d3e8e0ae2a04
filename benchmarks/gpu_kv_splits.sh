#!/bin/bash
# GPU run for the SGLang Triton split plan (patch sglang.triton.kv_splits): stock heuristic vs attnplug's plan.
# Usage (repo root, on the GPU machine, .vendor/sglang_triton carried; see benchmarks/fetch_stock.py):
#   OUT=dir [BENCH_ARGS="--quick"] bash benchmarks/gpu_kv_splits.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/log.txt"
timeout 400 python3 benchmarks/bench_sglang_kv_splits.py --out "$OUT" $BENCH_ARGS 2>&1 | tee -a "$OUT/log.txt"
