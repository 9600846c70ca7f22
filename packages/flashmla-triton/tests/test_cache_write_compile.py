"""Ahead-of-time compilation of the cache-write launches for sm_80 and sm_90 (no GPU needed):
they must compile (the FP8 kernel has no e4m3 type to lean on below sm_89) and must not spill."""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "needs the real JIT (the interpreter replaces @triton.jit)", allow_module_level=True
    )

import torch
import triton
from flashmla_triton.cache_write import cache_write_launches
from flashmla_triton.launch import Launch, resource_usage
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flashmla
from flashmla.problems import build_cache_write

CASES = {
    # name: (cache format, page size, h_kv, head dim, slot dtype)
    "v32-page64-i32": ("fp8_v32", 64, 1, 576, torch.int32),
    "v32-page1-i64": ("fp8_v32", 1, 1, 576, torch.int64),
    "model1-page64-i64": ("fp8_model1", 64, 1, 512, torch.int64),
    "model1-page3-i32": ("fp8_model1", 3, 1, 512, torch.int32),
    "bf16-d576": ("bf16", 64, 1, 576, torch.int32),
    "fp16-d64-h8": ("fp16", 16, 8, 64, torch.int64),
    "bf16-d4096": ("bf16", 2, 1, 4096, torch.int64),
}


def launch_for(case: str) -> Launch:
    fmt, page, h_kv, d, slot_dtype = CASES[case]
    is_fp8 = fmt.startswith("fp8")
    cache = flashmla.allocate_paged_cache(
        2, page, cache_format=fmt, h_kv=h_kv, head_dim=d, page_align=576 if is_fp8 else None
    )
    dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
    new_kv = torch.zeros(3, h_kv, d, dtype=dtype)
    slots = torch.zeros(3, dtype=slot_dtype)
    (launch,) = cache_write_launches(build_cache_write(cache, new_kv, slots, is_fp8))
    return launch


def assert_no_spills(compiled) -> None:
    usage = resource_usage(compiled)
    assert usage["stack"] == 0 and usage["local"] == 0, usage
    assert 0 < usage["registers"] <= 128, usage


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cc", [80, 90])
def test_launch_compiles_without_spills(cc, case):
    assert_no_spills(launch_for(case).compile(cc))


@pytest.mark.parametrize("case", ["v32-page64-i32", "model1-page3-i32", "fp16-d64-h8"])
@pytest.mark.parametrize("cc", [80, 90])
def test_64bit_sizes_compile_without_spills(cc, case):
    """Caches past 2^31 elements pass their sizes and strides as i64 and drop the divisibility
    hints; that variant must compile cleanly too."""
    sig, const, _attrs = launch_for(case).signature()
    sig = {k: "i64" if v == "i32" else v for k, v in sig.items()}
    src = ASTSource(fn=launch_for(case).kernel, signature=sig, constexprs=const)
    assert_no_spills(
        triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
    )
