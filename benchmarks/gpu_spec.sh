#!/bin/bash
# One GPU run for speculative decoding in SGLang (issue 13): the GPU tests of the multi-step decode
# metadata and of a whole draft + verify round (CUDA graph replay == eager), the T-step draft
# metadata benchmark vs SGLang 0.5.23's FA multi-step backend, and the verify benchmark on SGLang's
# token pool (page 1 and 16). Results land in $OUT.
# Usage (repo root, GPU machine, .vendor carried): OUT=dir bash benchmarks/gpu_spec.sh
source "$(dirname "$0")/gpu_prelude.sh"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests/core/test_decode_metadata.py tests/core/test_speculative_steps.py -q -p no:cacheprovider 2>&1 | tail -8 | tee -a "$OUT/log.txt" || status=1
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_draft_metadata.py --out "$OUT" 2>&1 | tee -a "$OUT/log.txt" || status=1
for page in 1 16; do
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_verify_attention.py --layout sglang --page-size $page --quick --sections grid --out "$OUT" 2>&1 | tail -60 | tee -a "$OUT/log.txt" || status=1
done
exit $status
