"""Ahead-of-time compilation of every kernel variant the launchers build, for sm_90, on a
machine without a GPU (run WITHOUT ``NUMBA_ENABLE_CUDASIM``; needs NVVM, found through the CUDA
toolkit; ptxas on PATH adds the register and spill check).

The simulator runs the kernels as Python, so it cannot see what only the GPU compiler does:
numba's typing (a float32 mixed with a Python int silently becomes fp64, and fp64 is 1/64 of
the fp32 rate), accumulators that fall out of registers into local memory when a loop over
them does not unroll, register spills. This test compiles exactly the launches the backend
builds (arguments included, typed as numba types them) and checks the PTX and ptxas' report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compiles for the GPU: run without NUMBA_ENABLE_CUDASIM", allow_module_level=True)

import numba
import torch
from numba import cuda

from flashmla import testing
from flashmla.problems import build_cache_write

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Launch arguments as numpy views (numba types them like device arrays) and a pretend
    Hopper device (numba asks the driver for the compute capability of device functions)."""
    from flashmla_numba import attention, cache_write, combine, launch, mha

    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"NVVM is not available: {exc}")
    mp = pytest.MonkeyPatch()

    def as_numpy(t: torch.Tensor):
        view = launch._VIEW_DTYPE.get(t.dtype)
        t = t.detach()
        return (t.view(view) if view is not None else t).numpy()

    for module in (launch, attention, combine, mha, cache_write):
        mp.setattr(module, "array", as_numpy, raising=False)
    mp.setattr(attention, "sm_count", lambda device: 132)
    mp.setattr(launch, "_PLACEHOLDERS", {})

    class Hopper:
        compute_capability = (9, 0)

    mp.setattr(numba.cuda.dispatcher, "get_current_device", lambda: Hopper())
    yield tmp_path_factory.mktemp("ptx")
    mp.undo()


def compile_launches(launches, where, *, attention: bool) -> list[str]:
    """Compile each launch for sm_90; return ptxas' reports (empty without ptxas)."""
    reports = []
    for i, launch in enumerate(launches):
        sig = tuple(numba.typeof(a) for a in launch.args)
        bounds = launch.kernel.targetoptions.get("launch_bounds")
        ptx, _ = cuda.compile_ptx(launch.kernel.py_func, sig, cc=(9, 0), launch_bounds=bounds)
        assert not re.search(r"\.f64\b", ptx), "fp64 arithmetic in the kernel"
        if attention:
            assert ".local" not in ptx, "an accumulator lives in local memory"
        if shutil.which("ptxas"):
            path = where / f"k{i}.ptx"
            path.write_text(ptx)
            out = subprocess.run(
                ["ptxas", "-arch=sm_90", "-v", str(path), "-o", str(where / f"k{i}.cubin")],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
            assert "0 bytes spill stores" in out, out
            reports.append(" ".join(line.strip() for line in out.splitlines() if "Used" in line))
    return reports


DECODE_CASES = {
    "dense-bf16-16rows": dict(b=2, s_q=1, h_q=16, s_k=100),
    "dense-bf16-128rows-causal": dict(b=2, s_q=2, h_q=64, s_k=100, causal=True),
    "dense-fp16-gqa": dict(b=2, s_q=1, h_q=16, h_kv=2, s_k=100, dtype=torch.float16),
    "dense-fp8-v32-split": dict(b=2, s_q=1, h_q=32, s_k=1000, cache_format="fp8_v32"),
    "dense-fp8-model1": dict(b=2, s_q=1, h_q=16, s_k=100, cache_format="fp8_model1"),
}
SPARSE_CASES = {
    "sparse-v32-sink": dict(b=2, s_q=1, h_q=64, topk=64, attn_sink=True),
    "sparse-model1-extra-split": dict(
        b=2, s_q=2, h_q=16, topk=512, s_k=600, cache_format="fp8_model1", topk_length=True,
        extra_topk=64, extra_topk_length=True, attn_sink=True,
    ),
    "sparse-bf16-512": dict(b=2, s_q=1, h_q=16, topk=64, cache_format="bf16", s_k=100),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(DECODE_CASES) + sorted(SPARSE_CASES))
def test_decode_compiles(offline, name):
    from flashmla_numba import attention

    if name in DECODE_CASES:
        inputs = testing.dense_decode_inputs(**DECODE_CASES[name])
    else:
        inputs = testing.sparse_decode_inputs(**SPARSE_CASES[name])
        if name == "sparse-bf16-512":
            inputs["q"] = inputs["q"][..., :512].contiguous()
            inputs["k_cache"] = inputs["k_cache"][..., :512].contiguous()
    p = testing.problem_for("decode", inputs)
    out, lse = p.empty_outputs()
    kind = "sparse" if name in SPARSE_CASES else "dense"
    _, s_q, h_q, _ = p.q.shape
    if kind == "dense":
        group = h_q // p.k_cache.shape[2]
        launches = attention.attention_launches(
            q4=p.q, out4=out, lse3=lse.transpose(1, 2), max_logits3=None, cache=p.k_cache,
            fmt=p.cache_format, slots=p.block_table, lengths=p.cache_seqlens, extra=None,
            sink=None, sparse=False, causal=p.causal, scale=p.softmax_scale, group=group,
            rows=s_q * group, groups=p.k_cache.shape[2], split=True,
        )  # fmt: skip
    else:
        extra = None
        if p.extra_k_cache is not None:
            extra = (p.extra_k_cache, p.extra_indices, p.extra_topk_length)
        launches = attention.attention_launches(
            q4=p.q, out4=out, lse3=lse.transpose(1, 2), max_logits3=None, cache=p.k_cache,
            fmt=p.cache_format, slots=p.indices, lengths=p.topk_length, extra=extra,
            sink=p.attn_sink, sparse=True, causal=False, scale=p.softmax_scale, group=h_q,
            rows=h_q, groups=s_q, split=True,
        )  # fmt: skip
    if name.endswith("-split"):
        assert len(launches) == 2, "a long request in a small batch is split (and combined)"
    reports = compile_launches(launches[:1], offline, attention=True)
    reports += compile_launches(launches[1:], offline, attention=False)
    print(name, reports)


def test_sparse_prefill_compiles(offline):
    from flashmla_numba import attention

    inputs = testing.sparse_prefill_inputs(4, 64, 16, 64, attn_sink=True, topk_length=True)
    p = testing.problem_for("sparse_prefill", inputs)
    out, max_logits, lse = p.empty_outputs()
    launches = attention.attention_launches(
        q4=p.q.unsqueeze(1), out4=out.unsqueeze(1), lse3=lse.unsqueeze(1),
        max_logits3=max_logits.unsqueeze(1), cache=p.kv.unsqueeze(1),
        fmt=attention.CacheFormat.BF16, slots=p.indices, lengths=p.topk_length, extra=None,
        sink=p.attn_sink, sparse=True, causal=False, scale=p.sm_scale, group=16, rows=16,
        groups=1, split=False,
    )  # fmt: skip
    print(compile_launches(launches, offline, attention=True))


@pytest.mark.parametrize(
    "dims,dtype", [((128, 128), torch.bfloat16), ((192, 128), torch.bfloat16), ((64, 64), torch.float16), ((128, 64), torch.bfloat16)]
)  # fmt: skip
def test_mha_compiles(offline, dims, dtype):
    from flashmla_numba import mha

    inputs = testing.mha_inputs(2, 40, 50, 4, h_kv=2, d_qk=dims[0], d_v=dims[1], dtype=dtype,
                                varlen=True, causal=True)  # fmt: skip
    p = testing.problem_for("mha_forward", inputs)
    out, lse = p.empty_outputs()
    print(compile_launches(mha.mha_launches(p, out, lse), offline, attention=True))


@pytest.mark.parametrize("fmt", ["bf16", "fp8_v32", "fp8_model1"])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_cache_write_compiles(offline, fmt, slot_dtype):
    from flashmla_numba import cache_write

    import flashmla

    cache = flashmla.allocate_paged_cache(4, 8, cache_format=fmt)
    d = {"fp8_model1": 512}.get(fmt, 576)
    new = torch.randn(3, 1, d).bfloat16()
    p = build_cache_write(cache, new, torch.tensor([0, 5, 9], dtype=slot_dtype), fmt != "bf16")
    compile_launches(cache_write.cache_write_launches(p), offline, attention=False)
