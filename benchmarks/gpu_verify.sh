#!/bin/bash
# One GPU run for speculative verify attention: the paged-attention kernel tests on the GPU (bf16/fp16,
# CUDA graphs, verify and padded batches), then bench_verify_attention.py. Results land in $OUT.
# Usage (repo root, GPU machine, .vendor and optionally .scratch/before carried):
#   OUT=dir [TESTS=1] [BENCH_ARGS=--quick] bash benchmarks/gpu_verify.sh
source "$(dirname "$0")/gpu_prelude.sh"
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests/core/test_paged_attention.py -q -p no:cacheprovider 2>&1 | tail -15 | tee -a "$OUT/log.txt" || status=1
fi
before=()
[ -d .scratch/before ] && before=(--before .scratch/before)
timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/bench_verify_attention.py "${before[@]}" ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee -a "$OUT/log.txt" || status=1
exit $status
