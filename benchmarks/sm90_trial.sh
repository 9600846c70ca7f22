#!/usr/bin/env bash
# On the GPU machine, one call for SM90 builds that are not on by default yet: the sparse builds
# compiled up front (in parallel), the sparse and prefill parity cases and the sanitizer with
# FLASHMLA_CUDA_SM90_UNVERIFIED=KINDS, then A/B runs in one process each (sources and defines as
# benchmarks/sm90_ab.py takes them), one per SOURCES SHAPES pair. Logs under $OUT.
#   bash benchmarks/sm90_trial.sh KINDS SOURCES SHAPES [SOURCES SHAPES ...]
#   S=mla_decode_sm90.cu; bash benchmarks/sm90_trial.sh pipe,pv_first \
#     $S,$S:PIPE=1+FP8_PAIRS=0 S1,S3  $S,$S:PIPE=1,$S:PIPE=1+PV_FIRST=1 P1
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(python3 benchmarks/intree_env.py)"
export FLASHMLA_CUDA_CACHE=/tmp/fc PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
KINDS=$1
shift
# (only the sparse builds the parity run asks for: the A/B runs compile their own)
FLASHMLA_CUDA_SM90_UNVERIFIED=$KINDS python3 -c "
import time
from flashmla_cuda import compiler, decode_sm90 as d
t = time.time()
todo = [d.build_for(False, d.FP8, cluster=c) for c in (False, True)]
todo += [d.build_for(False, d.FP8, model1=True)]
todo += [d.build_for(False, d.ROWS, d_qk=k) for k in (576, 512)]
compiler.precompile(todo, 'sm_90a')
print(f'{len(todo)} builds compiled in {time.time() - t:.0f} s')"
echo "== parity, FLASHMLA_CUDA_SM90_UNVERIFIED=$KINDS"
FLASHMLA_CUDA_SM90_UNVERIFIED=$KINDS timeout 150 python3 -m pytest tests -q -x -p no:cacheprovider \
  -k "cuda-sm90 and (sparse or prefill)" 2>&1 | tee "$OUT/trial-pytest.log" \
  | grep -E "passed|failed|FAILED" | tail -5
echo "== sanitizer, FLASHMLA_CUDA_SM90_UNVERIFIED=$KINDS"
FLASHMLA_CUDA_SM90_UNVERIFIED=$KINDS timeout 150 bash benchmarks/sanitize.sh cuda-sm90 \
  "sparse or prefill" 2>&1 | grep -E "passed|failed|SUMMARY"
while [ $# -ge 2 ]; do
  echo "== A/B $2"
  timeout 200 python3 benchmarks/sm90_ab.py "$1" "$2" 2>&1 | grep -v Warn | tee -a "$OUT/trial-ab.log"
  shift 2
done
