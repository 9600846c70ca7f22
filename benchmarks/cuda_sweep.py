"""Time the CUDA attention kernel's candidate tile configurations on benchmark shapes (GPU):
    python benchmarks/cuda_sweep.py D4,D5,D10

Each candidate replaces :func:`flashmla_cuda.attention.choose_config` for one run (schedule
included), so this measures exactly what a call with that configuration would cost."""

from __future__ import annotations

import sys

import torch
from flashmla_cuda import attention
from triton.testing import do_bench

import flashmla
from flashmla.bench import runner
from flashmla.bench.shapes import SHAPES

C = attention.Config
CANDIDATES = {
    16: [C(16, 32, 4, 2, 2), C(16, 32, 4, 3), C(16, 32, 4, 4), C(16, 32, 4, 5), C(16, 64, 4, 2)],
    64: [C(64, 64, 8, 2), C(64, 32, 8, 3), C(64, 32, 8, 2), C(32, 64, 8, 2), C(32, 32, 8, 3)],
}


def main() -> None:
    original = attention.choose_config
    dev = torch.device("cuda")
    for shape_id in sys.argv[1].split(","):
        shape = next(s for s in SHAPES if s.id == shape_id)
        inputs = shape.inputs(dev)
        rows = inputs["q"].shape[1] * inputs["q"].shape[2]  # s_q * h_q (h_kv = 1)
        for cfg in CANDIDATES[16 if rows <= 16 else 64]:
            attention.choose_config = lambda *args, cfg=cfg: cfg
            inputs["tile_scheduler_metadata"] = flashmla.get_mla_metadata()[0]
            call = runner._call(shape, inputs)
            with flashmla.use_backend("cuda"):
                try:
                    us = do_bench(call, warmup=30, rep=200, return_mode="median") * 1e3
                except Exception as exc:  # a configuration that does not fit
                    print(f"{shape_id} {cfg}: {type(exc).__name__}: {exc}"[:200])
                    continue
            print(f"{shape_id} {cfg}: {us:.1f} us")
        attention.choose_config = original


if __name__ == "__main__":
    main()
