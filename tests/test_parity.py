"""Every backend against the reference, op by op, on FlashMLA's edge cases.

Small cases run everywhere (CI runs them on CPU); cases marked ``gpu`` use real shapes and the
dimensions of FlashMLA's own test matrix and run only with a GPU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import flashmla
from flashmla import testing
from flashmla.registry import REGISTRY

from .conftest import DEVICE, ON_GPU, skip_unless_supported

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def _check_decode(backend: str, inputs: dict, tolerance_key: str) -> None:
    skip_unless_supported(backend, testing.problem_for("decode", inputs))
    ref_out, ref_lse = testing.reference("decode", inputs)
    with flashmla.use_backend(backend):
        out, lse = flashmla.flash_mla_with_kvcache(**inputs)
    assert out.dtype == inputs["q"].dtype and lse.dtype == torch.float32
    assert lse.shape == ref_lse.shape and lse.stride() == ref_lse.stride()
    tol = testing.TOLERANCES[tolerance_key]
    testing.assert_close("out", out, ref_out, tol["out"])
    testing.assert_close("lse", lse, ref_lse, tol["lse"])


# --------------------------------------------------------------------------------------------
# Dense decode

DENSE_SMALL = [
    dict(b=2, s_q=1, h_q=16, s_k=140),
    dict(b=2, s_q=2, h_q=16, s_k=140, causal=True, varlen=True, zero_frac=0.3),
    dict(b=3, s_q=4, h_q=3, h_kv=1, s_k=20, causal=True),
    dict(b=2, s_q=1, h_q=8, h_kv=2, s_k=75, page_block_size=16),
    dict(b=2, s_q=2, h_q=9, h_kv=3, s_k=61, page_block_size=1, causal=True),
    dict(b=2, s_q=1, h_q=16, s_k=100, dtype=torch.float16),
    dict(b=2, s_q=1, h_q=16, s_k=100, contiguous=False),
    dict(b=2, s_q=2, h_q=16, s_k=90, cache_format="fp8_v32", page_block_size=32, causal=True),
    dict(b=2, s_q=1, h_q=16, s_k=90, cache_format="fp8_model1", page_block_size=53),
    dict(b=1, s_q=1, h_q=4, s_k=0),
]

DENSE_GPU = [
    dict(b=64, s_q=1, h_q=128, s_k=4096, varlen=True, causal=True),
    dict(b=32, s_q=2, h_q=128, s_k=4096, varlen=True, causal=True, zero_frac=0.5),
    dict(b=16, s_q=4, h_q=64, s_k=1024, causal=True, contiguous=False),
    dict(b=128, s_q=1, h_q=16, s_k=8192),
    dict(b=8, s_q=1, h_q=128, s_k=20000, page_block_size=256),
    dict(b=1, s_q=1, h_q=128, s_k=65536),  # D7: one request split over every SM
    dict(b=8, s_q=2, h_q=128, s_k=3000, cache_format="fp8_v32", causal=True),
    dict(b=8, s_q=1, h_q=64, s_k=3000, cache_format="fp8_model1", page_block_size=61),
] + [
    # FlashMLA's dense matrix dimensions (§8.2): head pairs x s_q x causal, varlen, NaN pages
    dict(b=6, s_q=s_q, h_q=h_q, h_kv=h_kv, s_k=s_k, varlen=True, causal=causal, dtype=dtype)
    for (h_q, h_kv), s_q, s_k, causal, dtype in itertools.product(
        [(1, 1), (3, 3), (9, 3), (63, 1), (64, 8), (126, 2), (128, 1), (128, 8)],
        [1, 2, 4],
        [20, 140, 4096],
        [False, True],
        [torch.bfloat16, torch.float16],
    )
    if not (s_k == 4096 and dtype == torch.float16)
]


@pytest.mark.parametrize("case", DENSE_SMALL, ids=_case_id)
def test_dense_decode(backend, case):
    _check_decode(
        backend, testing.dense_decode_inputs(device=DEVICE, seed=1, **case), "dense_decode"
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", DENSE_GPU, ids=_case_id)
def test_dense_decode_gpu(backend, case):
    _check_decode(
        backend, testing.dense_decode_inputs(device=DEVICE, seed=2, **case), "dense_decode"
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_dense_decode_zero_length_corner(backend, causal):
    """FlashMLA's corner case: b=128, s_q=2, about half the requests empty."""
    inputs = testing.dense_decode_inputs(
        128, 2, 128, 4096, varlen=True, causal=causal, zero_frac=0.5, device=DEVICE, seed=3
    )
    _check_decode(backend, inputs, "dense_decode")


# --------------------------------------------------------------------------------------------
# Sparse decode

SPARSE_SMALL = [
    dict(b=2, s_q=1, h_q=16, topk=64, s_k=100, page_block_size=16),
    dict(b=3, s_q=2, h_q=8, topk=64, s_k=40, page_block_size=2, attn_sink=True, zero_length_frac=0.3),
    dict(b=2, s_q=1, h_q=16, topk=32, s_k=100, cache_format="fp8_model1", page_block_size=61,
         topk_length=True, attn_sink=True, extra_topk=32, extra_page_block_size=8, extra_topk_length=True),
    dict(b=2, s_q=2, h_q=16, topk=64, s_k=100, cache_format="bf16", contiguous=False, topk_length=True),
    dict(b=2, s_q=1, h_q=5, topk=48, s_k=90, cache_format="fp8_model1", extra_topk=16, contiguous=False),
    # h_q 64: the smallest the SM90 kernels take (the sanitizer runs these small cases)
    dict(b=2, s_q=2, h_q=64, topk=128, s_k=200, attn_sink=True, topk_length=True),
    dict(b=2, s_q=1, h_q=64, topk=64, s_k=100, cache_format="fp8_model1", extra_topk=64,
         extra_topk_length=True),
    dict(b=2, s_q=1, h_q=64, topk=64, s_k=100, cache_format="bf16", contiguous=False),
    # h_q 128: the two head tiles (FP8 V3.2: the SM90 sparse cluster build)
    dict(b=2, s_q=2, h_q=128, topk=128, s_k=200, attn_sink=True, topk_length=True, extra_topk=64,
         extra_topk_length=True),
]  # fmt: skip

SPARSE_GPU = [
    dict(b=74, s_q=s_q, h_q=h_q, topk=topk, s_k=s_k, page_block_size=page, attn_sink=True, cache_format=fmt,
         topk_length=fmt == "fp8_model1", extra_topk=64 if fmt == "fp8_model1" else None)
    for fmt, h_q, s_q, (s_k, topk, page) in itertools.product(
        ["fp8_v32", "fp8_model1"], [64, 128], [1, 3],
        [(512, 64, 2), (512, 64, 69), (1024, 576, 61), (2046, 2048, 64), (2046, 2048, 576)],
    )
] + [
    dict(b=321, s_q=1, h_q=128, topk=2048, s_k=4096, attn_sink=True),
    dict(b=8, s_q=2, h_q=64, topk=512, s_k=650, page_block_size=53, zero_length_frac=0.5, attn_sink=True),
    dict(b=16, s_q=2, h_q=128, topk=1024, s_k=4096, cache_format="bf16", contiguous=False),
    # MODEL1 without the extra cache (the cases above all have one)
    dict(b=32, s_q=2, h_q=128, topk=1024, s_k=4096, cache_format="fp8_model1", topk_length=True,
         attn_sink=True),
    dict(b=16, s_q=1, h_q=64, topk=576, s_k=2000, cache_format="fp8_model1", page_block_size=61),
]  # fmt: skip


@pytest.mark.parametrize("case", SPARSE_SMALL, ids=_case_id)
def test_sparse_decode(backend, case):
    _check_decode(
        backend, testing.sparse_decode_inputs(device=DEVICE, seed=4, **case), "sparse_decode"
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", SPARSE_GPU, ids=_case_id)
def test_sparse_decode_gpu(backend, case):
    _check_decode(
        backend, testing.sparse_decode_inputs(device=DEVICE, seed=5, **case), "sparse_decode"
    )


@pytest.mark.parametrize("h_q", [16, 64])
def test_sparse_decode_all_invalid(backend, h_q):
    """Rows whose every index is invalid: out 0, lse +inf, whatever the sink."""
    inputs = testing.sparse_decode_inputs(
        2, 2, h_q, 64, s_k=100, attn_sink=True, device=DEVICE, seed=6
    )
    inputs["indices"][0] = -1
    inputs["indices"][1, 1] = torch.iinfo(torch.int32).max
    _check_decode(backend, inputs, "sparse_decode")
    with flashmla.use_backend(backend):
        out, lse = flashmla.flash_mla_with_kvcache(**inputs)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all() and (lse[1, :, 1] == math.inf).all()


# --------------------------------------------------------------------------------------------
# Sparse prefill

PREFILL_SMALL = [
    dict(s_q=5, s_kv=40, h_q=16, topk=64, d_qk=576),
    dict(s_q=7, s_kv=200, h_q=8, topk=64, d_qk=512, attn_sink=True, topk_length=True),
    dict(s_q=4, s_kv=30, h_q=16, topk=64, invalid_rows=True, contiguous=False),
    dict(s_q=3, s_kv=100, h_q=64, topk=128, d_qk=512, attn_sink=True, topk_length=True),
    dict(s_q=2, s_kv=100, h_q=64, topk=64, invalid_rows=True),
]
PREFILL_GPU = [
    dict(s_q=s_q, s_kv=s_kv, h_q=h_q, topk=topk, d_qk=d, attn_sink=sink, topk_length=tl)
    for d, h_q, (s_kv, topk), s_q, sink, tl in itertools.product(
        [512, 576], [64, 128], [(128, 128), (592, 128), (1840, 256), (95, 128), (114, 384)],
        [1, 62, 213], [False, True], [False, True],
    )
    if sink == tl or s_q == 62
] + [
    dict(s_q=1234, s_kv=4321, h_q=128, topk=4096, invalid_rows=True),
    dict(s_q=64, s_kv=8192, h_q=64, topk=64, d_qk=512),
    dict(s_q=1024, s_kv=64, h_q=128, topk=8192),
]  # fmt: skip


def _check_prefill(backend: str, inputs: dict) -> None:
    skip_unless_supported(backend, testing.problem_for("sparse_prefill", inputs))
    ref = testing.reference("sparse_prefill", inputs)
    with flashmla.use_backend(backend):
        got = flashmla.flash_mla_sparse_fwd(**inputs)
    tol = testing.TOLERANCES["sparse_prefill"]
    for name, a, r in zip(("out", "max_logits", "lse"), got, ref):
        testing.assert_close(name, a, r, tol[name])


@pytest.mark.parametrize("case", PREFILL_SMALL, ids=_case_id)
def test_sparse_prefill(backend, case):
    _check_prefill(backend, testing.sparse_prefill_inputs(device=DEVICE, seed=7, **case))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", PREFILL_GPU, ids=_case_id)
def test_sparse_prefill_gpu(backend, case):
    _check_prefill(backend, testing.sparse_prefill_inputs(device=DEVICE, seed=8, **case))


# --------------------------------------------------------------------------------------------
# Dense MHA prefill

MHA_SMALL = [
    dict(b=2, mean_s_q=12, mean_s_k=12, h_q=4, causal=True),
    dict(b=3, mean_s_q=8, mean_s_k=20, h_q=4, h_kv=2, d_qk=192, varlen=True, causal=True),
    dict(b=2, mean_s_q=10, mean_s_k=10, h_q=2, d_qk=192, varlen=True),
]
MHA_GPU = [
    dict(b=2, mean_s_q=1024, mean_s_k=1024, h_q=16, d_qk=d, varlen=varlen, causal=causal)
    for d, varlen, causal in itertools.product([128, 192], [False, True], [False, True])
] + [dict(b=2, mean_s_q=512, mean_s_k=1024, h_q=32, h_kv=4, d_qk=192, varlen=True, causal=True)]


def _check_mha(backend: str, case: dict) -> None:
    inputs = testing.mha_inputs(device=DEVICE, seed=9, requires_grad=True, **case)
    skip_unless_supported(backend, testing.problem_for("mha_forward", inputs))
    ref_inputs = {
        k: v.detach().requires_grad_()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v
        for k, v in inputs.items()
    }
    with flashmla.use_backend(backend):
        out, lse = flashmla.flash_attn_varlen_func(**inputs)
    ref_out, ref_lse = testing.reference("mha_forward", inputs)
    tol = testing.TOLERANCES["mha"]
    testing.assert_close("out", out, ref_out, tol["out"])
    testing.assert_close("lse", lse, ref_lse, tol["lse"])
    assert lse.stride() == (1, lse.shape[0])
    if _supports_backward(backend, inputs):
        grad = torch.randn_like(out)
        out.backward(grad)
        with flashmla.use_backend("ref"):
            r_out, _ = flashmla.flash_attn_varlen_func(**ref_inputs)
        r_out.float().backward(grad.float())
        for name in ("q", "k", "v"):
            testing.assert_close(f"d{name}", inputs[name].grad, ref_inputs[name].grad, tol["grad"])


def _supports_backward(backend: str, inputs: dict) -> bool:
    return not REGISTRY.get(backend).reasons(testing.problem_for("mha_backward", inputs).facts)


@pytest.mark.parametrize("case", MHA_SMALL, ids=_case_id)
def test_mha(backend, case):
    _check_mha(backend, case)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", MHA_GPU, ids=_case_id)
def test_mha_gpu(backend, case):
    _check_mha(backend, case)
