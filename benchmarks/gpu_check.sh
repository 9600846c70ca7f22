#!/usr/bin/env bash
# On the GPU machine, in one call: every GPU parity test, then the benchmark.
# Writes pytest.log, bench.json (and bench.log) under $OUT; prints the short table last.
#   bash benchmarks/gpu_check.sh [pytest -k expression] [bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashmla-out}
mkdir -p "$OUT"
eval "$(python3 benchmarks/intree_env.py)"
# numba 0.68 fails on numpy >= 2.5 (the image's): a numpy 2.4 wheel carried along in
# benchmarks/wheels (run's carry; git-ignored) is unpacked and put first on the path.
if python3 -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 5))"; then
    wheel=$(ls benchmarks/wheels/numpy-2.4*-cp3*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ]; then
        python3 -m zipfile -e "$wheel" /tmp/numpy24 && export PYTHONPATH=/tmp/numpy24:$PYTHONPATH
    fi
fi
python3 -c "import numpy; print('numpy', numpy.__version__)"
export PYTHONUNBUFFERED=1
KEXPR=${1:-}
shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m flashmla info
# Compile every CUDA kernel variant for this GPU up front, in parallel (cached on disk).
python3 -c "
import torch, time
from flashmla_cuda import builds, compiler
t = time.time()
cc = torch.cuda.get_device_capability()
todo = [b for bs in builds.all_builds(cc).values() for b in bs]
compiler.precompile(todo, compiler.target_arch(cc))
print(f'flashmla-cuda: {len(set(todo))} kernel variants compiled for {compiler.target_arch(cc)} in {time.time() - t:.1f} s')
"
python3 -m pytest tests -q -p no:cacheprovider ${KEXPR:+-k "$KEXPR"} 2>&1 | tee "$OUT/pytest.log" | tail -n 15
python3 benchmarks/launch_overhead.py 2>&1 | tee "$OUT/launch_overhead.log"
python3 -m flashmla bench --json "$OUT/bench.json" "$@" 2> "$OUT/bench.log"
