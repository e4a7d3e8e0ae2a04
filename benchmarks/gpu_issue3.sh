#!/bin/bash
# GPU run for issue 3 (fused decode metadata, fused metadata copy, fast launch path):
# the GPU tests of these files, then both benchmarks; everything lands in $OUT.
# Usage (repo root, on the GPU machine, .vendor carried for SGLang's kernel):
#   OUT=dir [SKIP_TESTS=1] [SECTIONS=launch,decode,copy] bash benchmarks/gpu_issue3.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
SECTIONS=${SECTIONS:-launch,decode,copy}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/log.txt"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 300 python3 -m pytest tests/core/test_launch.py tests/core/test_decode_metadata.py \
        tests/core/test_metadata_copy.py -q -p no:cacheprovider 2>&1 | tail -30 | tee -a "$OUT/log.txt" || status=1
fi
BENCH_SECTIONS=$(echo "$SECTIONS" | tr ',' '\n' | grep -v '^copy$' | paste -sd, -)
if [ -n "$BENCH_SECTIONS" ]; then
    timeout 300 python3 benchmarks/bench_decode_metadata.py --out "$OUT" --sections "$BENCH_SECTIONS" 2>&1 | tee -a "$OUT/log.txt" || status=1
fi
if echo "$SECTIONS" | grep -q copy; then
    timeout 200 python3 benchmarks/bench_metadata_copy.py --out "$OUT" 2>&1 | tee -a "$OUT/log.txt" || status=1
fi
exit $status
