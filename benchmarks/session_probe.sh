#!/usr/bin/env bash
# One short GPU call for work in progress: the small parity cases of every GPU backend but
# Numba plus the cuda-sm90 suite, the sanitizer over cuda-sm90, per-kernel times of D7/D9, an
# optional A/B of SM90 kernel variants (AB=sources, as benchmarks/sm90_ab.py takes them, on
# AB_SHAPES) and a bench. Logs and bench.json under $OUT.
#   bash benchmarks/session_probe.sh SHAPES BACKENDS    (SHAPES empty: all shapes)
# TEST_S / BENCH_S cap the test and bench minutes (seconds; default 200 each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
eval "$(python3 benchmarks/intree_env.py)"
export FLASHMLA_CUDA_CACHE=/tmp/fc PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout "${TEST_S:-200}" python3 -m pytest tests -q -p no:cacheprovider \
  -k "not numba and (cuda-sm90 or not gpu)" 2>&1 | tee "$OUT/pytest.log" \
  | grep -E "^FAILED|passed|failed" | head -20
timeout 200 bash benchmarks/sanitize.sh cuda-sm90 2>&1 | tee "$OUT/sanitize.log"
timeout 60 python3 benchmarks/kernel_times.py D7,D9 cuda-sm90,cuda,triton 2>&1 | grep -v Warn \
  | tee "$OUT/kernel_times.log"
if [ -n "${AB:-}" ]; then  # e.g. AB=mla_decode_sm90.cu,mla_decode_sm90.cu:PREFETCH_Q=1
  timeout 120 python3 benchmarks/sm90_ab.py "$AB" "${AB_SHAPES:-D1,D8,D9}" 2>&1 | grep "^1 " \
    | tee "$OUT/ab.log"
fi
timeout "${BENCH_S:-200}" python3 -m flashmla bench ${1:+--shapes "$1"} --backends "$2" \
  --json "$OUT/bench.json" 2> "$OUT/bench.log" | tail -n 40
