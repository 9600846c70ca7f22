#!/usr/bin/env bash
# On the GPU machine, one call for SM90 builds that are not on by default yet: the sparse and
# prefill parity cases and the sanitizer with FLASHMLA_CUDA_SM90_UNVERIFIED=KINDS, then an A/B
# in one process (sources and defines as benchmarks/sm90_ab.py takes them). Logs under $OUT.
#   bash benchmarks/sm90_trial.sh KINDS SOURCES SHAPES
#   bash benchmarks/sm90_trial.sh fp8_pairs,row_gathers \
#     mla_decode_sm90.cu,mla_decode_sm90.cu:FP8_PAIRS=1,mla_decode_sm90.cu:SHARED_ROW_GATHERS=1 \
#     S1,S3,P1
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(python3 benchmarks/intree_env.py)"
export FLASHMLA_CUDA_CACHE=/tmp/fc PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
echo "== parity, FLASHMLA_CUDA_SM90_UNVERIFIED=$1"
FLASHMLA_CUDA_SM90_UNVERIFIED=$1 timeout 150 python3 -m pytest tests -q -x -p no:cacheprovider \
  -k "cuda-sm90 and (sparse or prefill)" 2>&1 | tee "$OUT/trial-pytest.log" \
  | grep -E "passed|failed|FAILED" | tail -5
echo "== sanitizer, FLASHMLA_CUDA_SM90_UNVERIFIED=$1"
FLASHMLA_CUDA_SM90_UNVERIFIED=$1 timeout 150 bash benchmarks/sanitize.sh cuda-sm90 \
  "sparse or prefill" 2>&1 | grep -E "passed|failed|SUMMARY"
echo "== A/B"
timeout 200 python3 benchmarks/sm90_ab.py "$2" "$3" 2>&1 | grep -v Warn | tee "$OUT/trial-ab.log"
