#!/usr/bin/env bash
# On the GPU machine: the small parity cases of one backend under compute-sanitizer's memcheck
# (every tensor its own allocation, so out-of-bounds reads are caught) and racecheck (shared
# memory hazards).   bash benchmarks/sanitize.sh [backend [extra -k filter, e.g. sparse]]
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(python3 benchmarks/intree_env.py)"
BACKEND=${1:-cuda}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
ONLY=${2:+ and ($2)}
K="$BACKEND and not gpu and (dense or sparse or prefill or mha or strided or invalid)$ONLY"
echo "== memcheck ($BACKEND)"
compute-sanitizer --tool memcheck --print-limit 10 python3 -m pytest tests/test_parity.py \
    tests/test_cache_write_parity.py -q -p no:cacheprovider -k "$K" 2>&1 | tail -3
echo "== racecheck ($BACKEND)"
compute-sanitizer --tool racecheck --print-limit 10 python3 -m pytest tests/test_parity.py -q \
    -p no:cacheprovider -k "$BACKEND and not gpu and (dense or sparse or prefill or mha)$ONLY" 2>&1 | tail -3
