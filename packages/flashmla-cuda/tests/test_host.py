"""Host-side logic of the CUDA backend, on the CPU: targets, cache keys, parameter structs and
launch configurations."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flashmla_cuda import attention, compiler
from flashmla_cuda.compiler import Build, target_arch
from flashmla_cuda.launch import I32, PTR, pack, struct_type


@pytest.mark.parametrize(
    "cc,arch",
    [((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 9), "sm_89"), ((9, 0), "sm_90a"),
     ((10, 0), "sm_100a"), ((12, 0), "sm_120")],
)  # fmt: skip
def test_target_arch(cc, arch):
    assert target_arch(cc) == arch


def test_target_arch_rejects_old_gpus():
    with pytest.raises(ValueError, match=r"8\.0"):
        target_arch((7, 5))


def test_build_key_tracks_source_target_and_options(tmp_path, monkeypatch):
    b = Build.of("mla_attention.cu", BLOCK_M=64)
    assert b.key("sm_90a") == Build.of("mla_attention.cu", BLOCK_M=64).key("sm_90a")
    assert b.key("sm_90a") != b.key("sm_80")
    assert b.key("sm_90a") != Build.of("mla_attention.cu", BLOCK_M=32).key("sm_90a")
    # an edit to an included header changes the key of every source including it
    for name in ("mla_attention.cu", "common.cuh"):
        (tmp_path / name).write_text((compiler.KERNELS / name).read_text())
    monkeypatch.setattr(compiler, "KERNELS", tmp_path)
    before = b.key("sm_90a")
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edit\n")
    assert b.key("sm_90a") != before


def test_build_options_name_the_target_and_defines():
    opts = Build.of("x.cu", B=2, A=True).options("sm_90a")
    assert opts[0] == "-arch=sm_90a"
    assert opts[-2:] == ("-DA=1", "-DB=2")  # sorted, so equal builds have equal keys


def test_pack_fills_every_field_and_rejects_mistakes():
    dtype = struct_type([("p", PTR), ("n", I32)])
    raw = pack(dtype, {"p": 0x1234, "n": -5})
    assert raw.nbytes == 16  # C pads the struct to its 8-byte alignment too
    back = np.frombuffer(raw.tobytes(), dtype)[0]
    assert back["p"] == 0x1234 and back["n"] == -5
    with pytest.raises(KeyError, match="missing"):
        pack(dtype, {"p": 1})
    with pytest.raises(KeyError, match="unknown"):
        pack(dtype, {"p": 1, "n": 2, "oops": 3})


def _c_fields(source: str, struct: str) -> list[str]:
    """Field names of ``struct`` in a kernel source, in order."""
    text = (compiler.KERNELS / source).read_text()
    body = re.search(r"struct " + struct + r" \{(.*?)\n\};", text, re.S).group(1)
    names = []
    for decl in re.sub(r"//[^\n]*", "", body).split(";"):
        decl = decl.strip()
        if decl:  # "i64 a, b" or "const u16* q": the last identifier of each declarator
            names.extend(re.findall(r"\w+", part)[-1] for part in decl.split(","))
    return names


def test_attention_params_mirror_the_c_struct():
    assert list(attention.PARAMS.names) == _c_fields("mla_attention.cu", "Params")


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (9, 0), (10, 0)])
@pytest.mark.parametrize("rows", [1, 16, 17, 32, 33, 64, 128, 256])
@pytest.mark.parametrize("fmt,d_qk", [(0, 576), (0, 512), (1, 576), (2, 512)])
def test_attention_config_fits_shared_memory(cc, rows, fmt, d_qk):
    limit = attention.SMEM_LIMITS.get(cc, 99 * 1024)
    cfg = attention.choose_config(rows, fmt, d_qk, limit)
    assert attention.smem_bytes(cfg, fmt, d_qk) <= limit
    assert cfg.stages >= 2 and (cfg.block_m >= min(rows, 64) or limit < 160 * 1024)
    assert (cfg.block_m // 16) * (cfg.warps // (cfg.block_m // 16)) == cfg.warps
