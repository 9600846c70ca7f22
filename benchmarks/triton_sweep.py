"""Time the Triton MLA attention kernel under several tile configurations (GPU only).

    python3 benchmarks/triton_sweep.py D1,D4,S1 "64,64,8,1 64,32,8,2"

Each config is block_m,block_n,num_warps,num_stages; block_m is clamped to what the shape's
rows allow. Prints one line per (shape, config) with time, TFLOP/s, GB/s and max error."""

from __future__ import annotations

import sys
from functools import partial

import torch
from flashmla_triton import decode

import flashmla
from flashmla import testing
from flashmla.bench.runner import time_us
from flashmla.bench.shapes import SHAPES


def main() -> None:
    ids = sys.argv[1].split(",")
    configs = [tuple(int(x) for x in c.split(",")) for c in sys.argv[2].split()]
    for shape in (s for s in SHAPES if s.id in ids):
        inputs = shape.inputs(torch.device("cuda"))
        flop, nbytes = shape.work(inputs)
        op = "decode" if shape.op == "decode" else shape.op
        ref = testing.reference(op, inputs)
        for cfg in configs:
            decode.choose_config = lambda rows, fmt=None, cc=None, cfg=cfg: decode.Config(
                min(cfg[0], max(16, rows)), *cfg[1:]
            )
            with flashmla.use_backend("triton"):
                if op == "decode":
                    meta = flashmla.get_mla_metadata()[0]
                    fn = partial(flashmla.flash_mla_with_kvcache, **inputs)
                    fn = partial(fn, tile_scheduler_metadata=meta)
                else:
                    fn = partial(flashmla.flash_mla_sparse_fwd, **inputs)
                try:
                    out = fn()
                    err = testing.max_error(out[0], ref[0])
                    t = time_us(fn, torch.device("cuda"))
                except Exception as exc:
                    print(
                        f"{shape.id} {cfg} FAILED {type(exc).__name__}: {str(exc)[:200]}",
                        flush=True,
                    )
                    continue
            ratio = f" {t / shape.flashmla_us:.2f}x FlashMLA" if shape.flashmla_us else ""
            print(
                f"{shape.id} {cfg} {t:9.1f} us {flop / t / 1e6:7.1f} TFLOP/s {nbytes / t / 1e3:7.0f} GB/s err {err:.1e}{ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
