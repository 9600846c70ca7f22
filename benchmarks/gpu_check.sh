#!/usr/bin/env bash
# On the GPU machine, in one call: every GPU parity test, then the benchmark.
# Writes pytest.log, bench.json (and bench.log) under $OUT; prints the short table last.
#   bash benchmarks/gpu_check.sh [pytest -k expression] [bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
eval "$(python3 benchmarks/intree_env.py)"
export PYTHONUNBUFFERED=1
KEXPR=${1:-}
shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m flashmla info
python3 -m pytest tests -q -p no:cacheprovider ${KEXPR:+-k "$KEXPR"} 2>&1 | tee "$OUT/pytest.log" | tail -n 15
python3 benchmarks/launch_overhead.py 2>&1 | tee "$OUT/launch_overhead.log"
python3 -m flashmla bench --json "$OUT/bench.json" "$@" 2> "$OUT/bench.log"
