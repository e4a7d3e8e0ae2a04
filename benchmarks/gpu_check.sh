#!/bin/bash
# One GPU run: every kernel test on the GPU (bf16/fp16, CUDA graphs), then `attnplug bench` for the
# benchmarks named in $BENCH (default: the simulated decode step). Results land in $OUT.
# Usage (repo root, GPU machine, .vendor carried): OUT=dir [BENCH=metadata,copy,attention,step] bash benchmarks/gpu_check.sh
source "$(dirname "$0")/gpu_prelude.sh"
timeout ${TEST_TIMEOUT:-360} python3 -m pytest tests/core -q -p no:cacheprovider 2>&1 | tail -15 | tee -a "$OUT/log.txt" || status=1
timeout ${BENCH_TIMEOUT:-300} python3 -m attnplug.cli bench --only "${BENCH:-step}" --out "$OUT" 2>&1 | tee -a "$OUT/log.txt" || status=1
exit $status
