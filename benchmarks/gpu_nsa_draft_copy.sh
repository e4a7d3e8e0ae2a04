#!/bin/bash
# GPU run for the SGLang 0.5.8 NSA draft-step copy (patch sglang.spec.metadata_copy): the core copy's GPU
# tests, then SGLang 0.5.8's per-tensor copies vs the patch's copy. Usage (repo root, on the GPU machine):
#   OUT=dir bash benchmarks/gpu_nsa_draft_copy.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/log.txt"
timeout 200 python3 -m pytest tests/core/test_metadata_copy.py -q -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt"
timeout 300 python3 benchmarks/bench_nsa_draft_copy.py --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
