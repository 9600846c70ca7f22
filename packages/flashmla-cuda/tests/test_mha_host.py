"""Host-side checks of the CUDA dense MHA launchers (no GPU needed): the shared-memory sizes the
launchers request are the kernels', every build fits every target's shared memory and compiles
without spills, and inputs the kernels cannot copy in 16-byte pieces are repacked. (The
parameter structs are checked against the C ones in test_host.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from flashmla_cuda import mha
from flashmla_cuda.compiler import Build, CompileError


@pytest.mark.parametrize("dims", mha.HEAD_DIMS)
def test_tiles_fit_every_target(dims):
    tiles = mha.TILES[dims]
    for smem in (tiles.fwd_smem(*dims), tiles.dq_smem(*dims), tiles.kv_smem(*dims)):
        assert smem <= 99 * 1024  # sm_86 / sm_89 / sm_120 opt-in limit
    assert all(t in (64, 128, 256) for t in tiles.threads())
    assert tiles.fwd_bm % (16 * tiles.fwd_mw) == 0 and 2 * tiles.kv_bm <= tiles.threads()[2]


def test_builds_cover_every_head_dim_and_dtype():
    for cc in ((8, 0), (8, 9), (9, 0), (10, 0), (12, 0)):
        builds = mha.builds(cc)
        assert len(set(builds)) == len(mha.HEAD_DIMS) * 2
        seen = {(dict(b.defines)["D_QK"], dict(b.defines)["D_V"], dict(b.defines)["DTYPE_FP16"])
                for b in builds}  # fmt: skip
        assert seen == {(*dims, f) for dims in mha.HEAD_DIMS for f in (0, 1)}
    with pytest.raises(ValueError, match="d_qk"):
        mha.build(256, 128, torch.bfloat16)


def test_tile_ready_repacks_only_what_it_must():
    t = torch.randn(10, 4, 136).to(torch.bfloat16)[:, :, :128]  # row stride 544, head 136
    assert mha._tile_ready(t) is t
    odd = torch.randn(10, 4, 129).to(torch.bfloat16)[:, :, :128]  # head stride 129: not 16 B
    fixed = mha._tile_ready(odd)
    assert fixed is not odd and fixed.is_contiguous() and torch.equal(fixed, odd)
    shifted = torch.randn(10 * 4 * 128 + 1).to(torch.bfloat16)[1:].view(10, 4, 128)
    assert mha._tile_ready(shifted) is not shifted  # base not 16-byte aligned
    expanded = torch.randn(1, 1, 128).to(torch.bfloat16).expand(10, 4, 128)
    assert mha._tile_ready(expanded) is expanded  # stride 0 reads the same row: fine
    single = torch.randn(10, 1, 128).to(torch.bfloat16).as_strided((10, 1, 128), (128, 3, 1))
    assert mha._tile_ready(single) is single  # the stride of a size-1 dim is never used


def _nvrtc_or_skip():
    pytest.importorskip("cupy")
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"NVRTC unavailable: {exc}")


@pytest.mark.parametrize("dims", mha.HEAD_DIMS)
def test_launcher_smem_matches_kernels(dims):
    """mha.cu static_asserts that the sizes mha.py requests are its own."""
    _nvrtc_or_skip()
    from flashmla_cuda.compiler import compile_nvrtc

    tiles = mha.TILES[dims]
    build = mha.build(*dims, torch.bfloat16)
    checked = Build.of(
        "mha.cu", **dict(build.defines), MHA_SMEM_FWD=tiles.fwd_smem(*dims),
        MHA_SMEM_DQ=tiles.dq_smem(*dims), MHA_SMEM_KV=tiles.kv_smem(*dims),
    )  # fmt: skip
    compile_nvrtc(checked, "sm_80")
    wrong = Build.of("mha.cu", **{**dict(checked.defines), "MHA_SMEM_FWD": 1})
    with pytest.raises(CompileError, match="shared-memory sizes"):
        compile_nvrtc(wrong, "sm_80")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_100a"])
def test_builds_compile_without_spills(arch):
    """Every build of every kernel: no local memory (spills) on each target family."""
    _nvrtc_or_skip()
    from flashmla_cuda.compiler import cubin, cuobjdump, precompile, resource_usage

    if cuobjdump() is None and shutil.which("cuobjdump") is None:
        pytest.skip("no cuobjdump")
    builds = mha.builds((int(arch[3:5]) // 10, int(arch[3:5]) % 10))
    precompile(builds, arch)
    for b in builds:
        usage = resource_usage(cubin(b, arch))
        kernels = {"mha_fwd", "mha_bwd_prep", "mha_bwd_dq", "mha_bwd_dkdv"}
        assert kernels <= set(usage), usage
        for name in kernels:
            assert usage[name].get("STACK", 0) == 0 and usage[name].get("LOCAL", 0) == 0, (
                arch, b.defines, name, usage[name],
            )  # fmt: skip
