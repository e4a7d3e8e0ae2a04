#!/bin/bash
# One GPU run: the GPU tests named in $TESTS (default: every kernel test, bf16/fp16, CUDA graphs), then
# `attnplug bench $BENCH_ARGS` (default: the default benchmarks, --quick). $OUT gets log.txt and
# results.tar.gz (CSVs and plots: the GPU machine hands back only a few files).
# Usage (repo root, GPU machine without a registry: .vendor carried, see `attnplug bench --fetch-stock`):
#   OUT=dir [TESTS=tests/core|none] [BENCH_ARGS="--only attention"] bash benchmarks/gpu_check.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
RESULTS="$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$RESULTS"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } 2>&1 | tee "$OUT/log.txt"
status=0
if [ "${TESTS:-tests/core}" != none ]; then
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest ${TESTS:-tests/core} -q -p no:cacheprovider 2>&1 | tail -15 | tee -a "$OUT/log.txt" || status=1
fi
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-540} python3 -m attnplug.cli bench ${BENCH_ARGS:---quick} --out "$RESULTS" 2>&1 | tee -a "$OUT/log.txt" || status=1
echo "attnplug bench took $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
tar czf "$OUT/results.tar.gz" -C "$RESULTS" . && rm -rf "$RESULTS"
exit $status
