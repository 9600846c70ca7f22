#!/usr/bin/env bash
# One GPU call for work in progress: parity of the cuda-sm90 backend (dense and sparse), the
# combine on every backend, per-kernel times, an A/B of the dense kernel against a saved copy
# (kernels/ab_base.cu, if present) and a bench of chosen shapes. Logs under $OUT.
#   bash benchmarks/session_probe.sh SHAPES BACKENDS
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
eval "$(python3 benchmarks/intree_env.py)"
export FLASHMLA_CUDA_CACHE=/tmp/fc PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 240 python3 -m pytest tests -q -p no:cacheprovider -k "cuda-sm90 or 65536" 2>&1 | tee "$OUT/pytest.log" | grep -E "FAILED|passed|failed|Error" | head -20
python3 benchmarks/kernel_times.py D7,D9 cuda-sm90,triton,cuda 2>&1 | grep -v Warn | tee "$OUT/kernel_times.log"
if [ -f packages/flashmla-cuda/src/flashmla_cuda/kernels/ab_base.cu ]; then
  python3 benchmarks/sm90_ab.py ab_base.cu,mla_decode_sm90.cu D8,D1 2>&1 | grep "^1 " | tee "$OUT/ab.log"
fi
python3 -m flashmla bench --shapes "$1" --backends "$2" --json "$OUT/bench.json" 2> "$OUT/bench.log" | tail -n 30
