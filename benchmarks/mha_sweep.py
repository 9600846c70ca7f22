"""Time the CUDA MHA kernels' tile choices on M1/M2's shape (GPU):
python benchmarks/mha_sweep.py"""

from __future__ import annotations

import dataclasses

import torch
from flashmla_cuda import mha
from triton.testing import do_bench

from flashmla.testing import mha_inputs, problem_for

BASE = mha.TILES[(192, 128)]
CANDIDATES = [
    BASE,
    dataclasses.replace(BASE, fwd_bm=128, fwd_bn=64, fwd_mw=1),
    dataclasses.replace(BASE, fwd_bm=256, fwd_bn=32, fwd_mw=2),
    dataclasses.replace(BASE, kv_bm=16),
    dataclasses.replace(BASE, dq_bn=64),
]


def main() -> None:
    inp = mha_inputs(2, 4096, 4096, 128, d_qk=192, d_v=128, causal=True, device="cuda")
    p, pb = problem_for("mha_forward", inp), problem_for("mha_backward", inp)
    for tiles in CANDIDATES:
        mha.TILES[(192, 128)] = tiles
        try:
            out, lse = mha.mha_forward(p)
            dout = torch.randn_like(out)
            fwd = do_bench(lambda: mha.mha_forward(p), return_mode="median") * 1e3
            bwd = do_bench(
                lambda o=out, s=lse, g=dout: mha.mha_backward(pb, o, s, g, None),
                return_mode="median",
            )
        except Exception as exc:  # a tile choice that does not compile or fit
            print(f"{tiles}: {type(exc).__name__}: {exc}"[:200])
            continue
        print(f"{tiles}: fwd {fwd:.0f} us, bwd {bwd * 1e3:.0f} us")
    mha.TILES[(192, 128)] = BASE


if __name__ == "__main__":
    main()
