#!/usr/bin/env bash
# One GPU call for work in progress: parity of the cuda-sm90 backend (dense, and the sparse
# kernels not yet dispatched by default) and of the combine on every backend (the D7-like
# case), per-kernel times, an optional A/B of dense kernel variants (AB=sources, as
# benchmarks/sm90_ab.py takes them) and a bench. Logs under $OUT.
#   bash benchmarks/session_probe.sh SHAPES BACKENDS    (SHAPES empty: all shapes)
# TEST_S / BENCH_S cap the test and bench minutes (seconds; default 200 each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
eval "$(python3 benchmarks/intree_env.py)"
export FLASHMLA_CUDA_CACHE=/tmp/fc PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
# The SM90 kernels that have not passed the GPU suite yet take part (flashmla_cuda.sm90_spec):
# the sparse ones, then the dense cluster build on its own (a hang there spares the rest).
FLASHMLA_CUDA_SM90_UNVERIFIED=sparse timeout "${TEST_S:-200}" python3 -m pytest tests -q \
  -p no:cacheprovider -k "cuda-sm90 or 65536" 2>&1 | tee "$OUT/pytest.log" \
  | grep -E "FAILED|passed|failed|Error" | head -20
FLASHMLA_CUDA_SM90_UNVERIFIED=cluster timeout 120 python3 -m pytest tests -q -p no:cacheprovider \
  -k "cuda-sm90 and dense" 2>&1 | tee "$OUT/pytest-cluster.log" \
  | grep -E "FAILED|passed|failed|Error" | head -20
export FLASHMLA_CUDA_SM90_UNVERIFIED=sparse
timeout 60 python3 benchmarks/kernel_times.py D7,D9 cuda-sm90,triton,cuda 2>&1 | grep -v Warn \
  | tee "$OUT/kernel_times.log"
if [ -n "${AB:-}" ]; then  # e.g. AB=mla_decode_sm90.cu,mla_decode_sm90.cu:PREFETCH_Q=1
  timeout 90 python3 benchmarks/sm90_ab.py "$AB" D8,D9 2>&1 | grep "^1 " | tee "$OUT/ab.log"
fi
timeout "${BENCH_S:-200}" python3 -m flashmla bench ${1:+--shapes "$1"} --backends "$2" \
  --json "$OUT/bench.json" 2> "$OUT/bench.log" | tail -n 40
