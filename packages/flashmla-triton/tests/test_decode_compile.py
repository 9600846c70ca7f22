"""Ahead-of-time compilation of every attention-kernel configuration the benchmark shapes use,
for sm_80, sm_90 and sm_100 (no GPU needed). Prints registers and spills; on sm_90 the
kernels' main loop (from the first to the last tensor-core instruction) must not spill, and
64-row tiles must use Hopper's warpgroup MMA."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "compiles for real GPU targets: run without TRITON_INTERPRET", allow_module_level=True
    )

import triton
from flashmla_triton import decode
from flashmla_triton.launch import resource_usage

from flashmla import testing
from flashmla.bench.shapes import SHAPES
from flashmla.scheduler import DecodePlan, Schedule

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _small(shape) -> dict:
    """Inputs with the shape's facts (heads, s_q, format, page size, features) but tiny sizes."""
    p = dict(shape.params)
    if shape.op == "sparse_prefill":
        return testing.sparse_prefill_inputs(**{**p, "s_q": 2, "s_kv": 64, "topk": 64})
    if "topk" in p:
        return testing.sparse_decode_inputs(**{**p, "b": 2, "topk": 64, "s_k": 64, "varlen": False})
    return testing.dense_decode_inputs(**{**p, "b": 2, "s_k": 64, "varlen": False})


def _attention_launch(shape, cc: int = 90):
    decode.target_cc = lambda device: divmod(cc, 10)  # build the launch for that target
    inputs = _small(shape)
    if shape.op == "sparse_prefill":
        p = testing.problem_for("sparse_prefill", inputs)
        return decode.sparse_prefill_launches(p, *p.empty_outputs())[0]
    p = testing.problem_for("decode", inputs)
    plan = DecodePlan.of(
        p.q, Schedule(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    )
    make = (
        decode.sparse_decode_launches
        if p.facts.op == "sparse_decode"
        else decode.dense_decode_launches
    )
    return make(p, plan, *p.empty_outputs())[0]


def _configs():
    seen, out = set(), []
    for shape in SHAPES:
        if shape.op not in ("decode", "sparse_prefill"):
            continue
        launch = _attention_launch(shape)
        key = tuple(sorted((k, v) for k, v in launch.args.items() if k in launch.constexprs))
        if key not in seen:
            seen.add(key)
            out.append(pytest.param(shape.id, id=shape.id))
    return out


def hot_loops(cubin: bytes) -> list[tuple[int, int]]:
    """(tensor-core instructions, spill instructions) of every loop of the SASS that contains
    tensor-core instructions; a loop spans a backward branch and its target."""
    path = "/tmp/flashmla_aot.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run(
        [os.path.join(TOOLS, "cuobjdump"), "-sass", path], capture_output=True, text=True
    ).stdout
    ins = []  # (address, text)
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        branch = re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) <= addr:
            body = [t for a, t in ins if int(branch.group(1), 16) <= a <= addr]
            mma = sum("MMA" in t for t in body)
            if mma:
                loops.append((mma, sum(" STL" in t or " LDL" in t for t in body)))
    return loops


@pytest.mark.parametrize("cc", [80, 90, 100])
@pytest.mark.parametrize("shape_id", _configs())
def test_attention_kernel_compiles(shape_id, cc):
    launch = _attention_launch(next(s for s in SHAPES if s.id == shape_id), cc)
    compiled = launch.compile(cc)
    usage = resource_usage(compiled)
    print(f"{shape_id} sm_{cc}: {usage} smem={compiled.metadata.shared}")
    assert compiled.metadata.shared <= 227 * 1024
    if cc == 90:
        loops = hot_loops(compiled.asm["cubin"])
        assert loops, "no loop with tensor-core instructions found: the SASS parser is broken"
        assert all(spills == 0 for _, spills in loops), f"spills in the main loop: {loops}"
        if launch.args["BLOCK_M"] >= 64:
            assert usage["hgmma"], "64-row tiles should use warpgroup MMA on sm_90"


@pytest.mark.parametrize("cc", [80, 90, 100])
@pytest.mark.parametrize("sparse", [False, True])
def test_schedule_and_combine_kernels_compile(cc, sparse):
    from flashmla_triton.kernels.combine import combine_kernel
    from flashmla_triton.kernels.schedule import schedule_kernel
    from flashmla_triton.launch import Launch

    i32 = torch.zeros(8, dtype=torch.int32)
    schedule = Launch(
        schedule_kernel, (1,),
        dict(lengths=i32, topk_len=i32 if sparse else None, extra_len=None, b=7, topk=2048,
             extra_topk=0, num_parts=66, metadata=i32, num_splits=i32, SPARSE=sparse,
             HAS_TOPK_LEN=sparse, HAS_EXTRA=False, HAS_EXTRA_LEN=False, OVERHEAD=5, CHUNK=1024),
        constexprs=frozenset({"SPARSE", "HAS_TOPK_LEN", "HAS_EXTRA", "HAS_EXTRA_LEN", "OVERHEAD", "CHUNK"}),
    )  # fmt: skip
    f32 = torch.zeros(8)
    combine = Launch(
        combine_kernel, (1, 1),
        dict(o_acc=f32, lse_acc=f32, stride_ab=256, stride_at=128, stride_ah=1, num_splits=i32,
             out=torch.zeros(8, dtype=torch.bfloat16), stride_ob=1024, stride_ot=512, stride_oh=512,
             lse=f32, stride_lb=256, stride_lt=1, stride_lh=2, sink=f32 if sparse else None,
             s_q=2, h_q=128, HAS_SINK=sparse, BLOCK_S=16, BLOCK_D=128, D_V=512, UPCAST=False),
        constexprs=frozenset({"HAS_SINK", "BLOCK_S", "BLOCK_D", "D_V", "UPCAST"}),
    )  # fmt: skip
    for launch in (schedule, combine):
        usage = resource_usage(launch.compile(cc))
        print(f"{launch.kernel.__name__} sm_{cc}: {usage}")
        assert usage["stack"] == 0
