#!/usr/bin/env bash
# Every GPU measurement the open large-problem items ask for, in one run that
# fits one device command (under 10 minutes; each step has its own timeout so
# that a slow step costs its budget, not the whole run):
#
#   1. the tests marked `cuda` (default and slow);
#   2. 102,000 rows (N = 2,000, D = 50, values + gradients), RBF and Matérn 5/2,
#      the plain API on the device, float64 then float32 (target: <= 5 s);
#   3. the largest size: 1,010,000 and 2,020,000 rows (N = 10,000 and 20,000,
#      D = 100), Matérn 5/2;
#   4. 1,000 independent problems x 50 points in 3-D with gradients, fit +
#      predict (target: >= 100x the 2-core CPU's throughput, measured there
#      with `python benchmarks/batched.py --problems 100`).
#
# Usage (from the repository root; results under $OUT, default
# benchmarks/results/gpu):
#
#   bash benchmarks/gpu_session.sh
#   DEVICE=cpu LARGE_N=100 HUGE_N=200 PROBLEMS=8 bash benchmarks/gpu_session.sh
#                                    # a smoke run of the same steps on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
LARGE_N=${LARGE_N:-2000}
HUGE_N=${HUGE_N:-10000,20000}
PROBLEMS=${PROBLEMS:-1000}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit} s): $*" | tee -a "$OUT/session.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/session.log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/session.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    python -c "import torch, numpy, scipy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee "$OUT/machine.txt"

# addopts off: the device machine may lack pytest-xdist
step tests 90 python -m pytest -q -p no:cacheprovider -o addopts="" -m cuda tests
step large-float64 120 python benchmarks/scaling.py --only large --backends torch \
    --large-n "$LARGE_N" --device "$DEVICE" --out "$OUT" --tag "_${DEVICE}_float64"
step large-float32 90 python benchmarks/scaling.py --only large --backends torch \
    --large-n "$LARGE_N" --device "$DEVICE" --dtype float32 --out "$OUT" \
    --tag "_${DEVICE}_float32"
step huge 150 python benchmarks/scaling.py --only huge --huge-n "$HUGE_N" \
    --device "$DEVICE" --out "$OUT" --tag "_${DEVICE}"
step batched 120 python benchmarks/batched.py --device "$DEVICE" \
    --problems "$PROBLEMS" --looped 5 --optimizer per-problem --json "$OUT/batched_${DEVICE}_${PROBLEMS}.json"
echo "=== done $(date -u +%T)" | tee -a "$OUT/session.log"
