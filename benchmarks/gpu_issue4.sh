#!/bin/bash
# GPU run for issue 4 (paged attention): tests on the GPU, then the benchmark sections in $SECTIONS.
# Usage (repo root, on the GPU machine, .vendor/vllm_stock carried):
#   OUT=dir SECTIONS=ceiling,decode,mixed,host [PYTEST_ARGS="-m gpu"] [SKIP_TESTS=1] bash benchmarks/gpu_issue4.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
SECTIONS=${SECTIONS:-ceiling,decode,mixed,host}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/log.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    PYTHONPATH=. timeout 240 python3 -m pytest tests/core/test_paged_attention.py -q -x -p no:cacheprovider $PYTEST_ARGS 2>&1 | tail -25 | tee -a "$OUT/log.txt"
fi
PYTHONPATH=. timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_paged_attention.py --sections "$SECTIONS" --out "$OUT" $BENCH_ARGS 2>&1 | tee -a "$OUT/log.txt"
