"""Ahead-of-time compilation of every Triton MHA launch configuration for real GPU targets (no GPU
needed): no register spills, shared memory within the tier's budget, and tensor-core code (wgmma
on sm_90). Runs WITHOUT ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "AOT compilation needs the compiled (not interpreted) kernels", allow_module_level=True
    )

import triton
from flashmla_triton import mha
from triton.backends.compiler import GPUTarget

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# per-block opt-in shared memory: sm_90/sm_100 227 KiB; the sm80 tier must also fit the 99 KiB
# of sm_86/sm_89/sm_120 (A100's 163 KiB is then implied)
SMEM_LIMIT = {"sm90": 232448, "sm100": 232448, "sm80": 101376}
# (tier, compute capability) pairs: each tier is compiled for the GPUs it serves
TARGETS = [("sm90", 90), ("sm100", 100), ("sm80", 80)]

CASES = [
    pytest.param(tier, cc, kernel, d_qk, d_v, causal, id=f"sm{cc}-{kernel}-{d_qk}x{d_v}-{'causal' if causal else 'full'}")
    for tier, cc in TARGETS
    for (t, kernel, d_qk, d_v, causal) in mha.configs()
    if t == tier and (causal or cc == 90)  # non-causal variants only on the perf target (time)
]  # fmt: skip


def _cuobjdump(cubin: bytes, tmp_path: Path, *args: str) -> str:
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run(
        [str(CUOBJDUMP), *args, str(path)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton wheel ships no cuobjdump")
@pytest.mark.parametrize(("tier", "cc", "kernel", "d_qk", "d_v", "causal"), CASES)
def test_compiles_without_spills(tier, cc, kernel, d_qk, d_v, causal, tmp_path):
    cfg = mha.configs()[tier, kernel, d_qk, d_v, causal]
    fn, signature, constexprs, attrs = mha.aot_source_args(tier, kernel, d_qk, d_v, causal)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    usage = _cuobjdump(compiled.asm["cubin"], tmp_path, "--dump-resource-usage")
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert match, usage
    regs, stack = int(match[1]), int(match[2])
    smem = compiled.metadata.shared
    print(
        f"sm_{cc} {kernel} {d_qk}x{d_v} causal={causal} {cfg}: REG {regs} STACK {stack} smem {smem}"
    )
    assert stack == 0, f"register spills: {usage.strip()}"
    assert smem <= SMEM_LIMIT[tier], f"shared memory {smem} > {SMEM_LIMIT[tier]}"
    sass = _cuobjdump(compiled.asm["cubin"], tmp_path, "-sass")
    if cc == 90:
        assert "HGMMA" in sass, "no wgmma on sm_90"
    else:  # mma.sync (sm_80) or tcgen05 (sm_100: UTCHMMA)
        assert "HMMA" in sass, "no tensor-core instructions"
