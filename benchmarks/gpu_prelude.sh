# Sourced by the gpu_*.sh runs: results dir $OUT (default /tmp/out), the device and versions as the
# first lines of $OUT/log.txt, and status=0 for the run to set on a failing step.
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/log.txt"
status=0
