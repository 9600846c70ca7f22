"""Ahead-of-time compilation of every Triton MHA launch configuration for real GPU targets (no GPU
needed): no register spills, shared memory within the tier's budget, tensor-core code (wgmma on
sm_90) and, on sm_90, no wgmma serialization by ptxas (warning C7515: every wgmma waited for on
its own, which costs far more than a few registers). Prints registers / spills / shared memory.
Runs WITHOUT ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled)."""

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

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# per-block opt-in shared memory: sm_90/sm_100 227 KiB; the sm80 tier must also fit the 99 KiB
# of sm_86/sm_89/sm_120 (A100's 163 KiB is then implied)
SMEM_LIMIT = {"sm90": 232448, "sm100": 232448, "sm80": 101376}
# (tier, compute capability) pairs: each tier is compiled for the GPUs it serves
TARGETS = [("sm90", 90), ("sm100", 100), ("sm80", 80)]


def _id(cc, kernel, d_qk, d_v, causal, group):
    return f"sm{cc}-{kernel}-{d_qk}x{d_v}-{'causal' if causal else 'full'}" + (
        f"-gqa{group}" if group > 1 else ""
    )


CASES = [
    pytest.param(tier, cc, kernel, d_qk, d_v, causal, group, id=_id(cc, kernel, d_qk, d_v, causal, group))
    for tier, cc in TARGETS
    for (t, kernel, d_qk, d_v, causal) in mha.configs()
    for group in (1, 8)
    # non-causal variants only on the perf target; GQA changes only the dK/dV kernel's loop
    if t == tier and (causal or cc == 90) and (group == 1 or (kernel == "bwd_dkdv" and causal))
]  # fmt: skip


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True)


@pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="triton wheel ships no cuobjdump")
@pytest.mark.parametrize(("tier", "cc", "kernel", "d_qk", "d_v", "causal", "group"), CASES)
def test_compiles_without_spills(tier, cc, kernel, d_qk, d_v, causal, group, tmp_path):
    cfg = mha.configs()[tier, kernel, d_qk, d_v, causal]
    fn, signature, constexprs, attrs = mha.aot_source_args(
        tier, kernel, d_qk, d_v, causal, group=group
    )
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = _tool("cuobjdump", "--dump-resource-usage", str(cubin)).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert match, usage
    regs, stack = int(match[1]), int(match[2])
    smem = compiled.metadata.shared
    print(
        f"{_id(cc, kernel, d_qk, d_v, causal, group)} {cfg}: REG {regs} STACK {stack} smem {smem}"
    )
    assert stack == 0, f"register spills: {usage.strip()}"
    assert smem <= SMEM_LIMIT[tier], f"shared memory {smem} > {SMEM_LIMIT[tier]}"
    sass = _tool("cuobjdump", "-sass", str(cubin)).stdout
    if cc == 90:
        assert "HGMMA" in sass, "no wgmma on sm_90"
        ptx = tmp_path / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = _tool(
            "ptxas", "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "re.cubin")
        ).stderr
        assert "C7515" not in log, f"ptxas serializes the wgmmas: {log}"
    else:  # mma.sync (sm_80) or tcgen05 (sm_100: UTCHMMA)
        assert "HMMA" in sass, "no tensor-core instructions"
