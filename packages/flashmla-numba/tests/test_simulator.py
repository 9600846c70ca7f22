"""The numba backend in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), beyond the shared
parity suite: the bit conversions every kernel relies on (exhaustively against torch), split-KV
pieces and their combine on purpose, and the registry declaration.

What the simulator runs is the kernels' own Python source, thread by thread, on CPU tensors.
What it does NOT cover:

* GPU compilation: numba's typing (fp32 silently widened to fp64), accumulators spilling to
  local memory, register use. ``test_compile.py`` compiles every variant for sm_90 instead.
* The GPU launch path: torch tensors handed over through ``__cuda_array_interface__``
  (``sync=False``), ``cuda.external_stream`` on torch's current stream, the device context,
  CUDA-graph capture (``tests/test_graphs.py`` runs on a GPU), and speed.
* The GPU's thread counts: attention kernels run with 64 threads per CTA here (256 on a GPU),
  so the S = Q K^T dim slices are 1-2 per score block instead of 4-8; the cache write runs 4
  threads and 16 rows per CTA (32 threads, 1 row on a GPU). Same code, other constants.
* Concurrency between CTAs (the simulator runs one CTA at a time; no kernel here shares data
  between CTAs) and the GPU memory model. Threads of a CTA do interleave (OS threads), which
  is how a missing barrier was caught, but not every interleaving is tried.
* Bit casts: libdevice's ``__nv_int_as_float`` / ``__nv_float_as_int`` become numpy views, and
  ``math.exp`` / ``math.log`` run in float64 before being stored as float32 (well inside the
  tolerances). There is no bf16 type anywhere (16-bit floats are int16 bits on both targets)
  and no warp-level primitive (no shuffles: reductions go through shared memory).
* Big shapes: the spec declares cases with more than 64 query rows per key tile unsupported
  under the simulator (one of them, in tests/test_steps.py, would take minutes).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("simulator tests: set NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from flashmla_numba import numerics

import flashmla
from flashmla import formats, testing
from flashmla.errors import NoBackendError
from flashmla.registry import REGISTRY

# --------------------------------------------------------------------------------------------
# Bit conversions


def _all_16bit() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)


def _f32_bits(values) -> torch.Tensor:
    """Bit patterns of float32 results (not through Python floats: those quiet NaNs)."""
    return torch.tensor([numerics.float_as_int(v) for v in values], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_to_f32_every_value(dtype):
    bits = _all_16bit()
    want = bits.view(dtype).float().view(torch.int32)
    got = [numerics.half_to_f32(int(b), dtype == torch.float16) for b in bits.tolist()]
    assert torch.equal(_f32_bits(got), want)


def _interesting_floats(n: int = 40000) -> torch.Tensor:
    """Random magnitudes over every exponent, both signs, plus exact bf16/fp16 ties and
    neighbours, overflow and underflow boundaries, zeros, infinities, NaN."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    randoms = bits.to(torch.int32).view(torch.float32)
    randoms = randoms[torch.isfinite(randoms)]
    halves = torch.cat(
        [_all_16bit().view(torch.bfloat16).float(), _all_16bit().view(torch.float16).float()]
    )
    halves = halves[torch.isfinite(halves)]
    ties = torch.cat([halves, (halves.view(torch.int32) + 1).view(torch.float32),
                      (halves.view(torch.int32) - 1).view(torch.float32),
                      (halves.view(torch.int32) | 0x8000).view(torch.float32),
                      (halves.view(torch.int32) | 0x1000).view(torch.float32)])  # fmt: skip
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0,
                          2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 3.0e38, 1e-45])  # fmt: skip
    return torch.cat(
        [randoms[:20000], ties[torch.randperm(ties.numel(), generator=g)[:20000]], edges]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_f32_to_half_rounds_like_torch(dtype):
    x = _interesting_floats()
    want = x.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    got = torch.tensor([numerics.f32_to_half(v, dtype == torch.float16) for v in x.tolist()])
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], want[~nan])
    assert torch.isnan(got[nan].to(torch.int16).view(dtype)).all()


def test_e4m3_decoding_every_byte():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float().view(torch.int32)
    assert torch.equal(_f32_bits([numerics.e4m3_to_f32(b) for b in codes.tolist()]), want)


def test_e4m3_encoding_matches_torch():
    """Every value the quantizer can produce (|v| <= 448): random, e4m3 grid points and the
    midpoints between them (ties to even), subnormals, signed zeros."""
    g = torch.Generator().manual_seed(1)
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].sort().values
    mid = (grid[1:] + grid[:-1]) / 2
    mid = mid[(grid[1:] > 0) == (grid[:-1] >= 0)]  # ties of same-signed neighbours
    rand = (
        (torch.rand(20000, generator=g) * 2 - 1)
        * 448
        * torch.pow(2.0, -torch.randint(0, 20, (20000,), generator=g).float())
    )
    x = torch.cat([grid, mid, rand, torch.tensor([-0.0, 2.0**-10, 2.0**-11, 1.5 * 2.0**-10])])  # fmt: skip
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    got = torch.tensor([numerics.e4m3_bits(v) for v in x.tolist()])
    assert torch.equal(got, want)


def test_scale_exponent_matches_formats():
    """k of 2^k for every non-negative finite bf16 amax, against flashmla.formats' rule."""
    bits = torch.arange(0, 0x7F80, dtype=torch.int32)
    amax = bits.to(torch.int16).view(torch.bfloat16).float()
    want = torch.log2(formats.power_of_two_scale(amax)).round().to(torch.int64)
    got = torch.tensor([numerics.fp8_scale_exponent(b) for b in bits.tolist()])
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# Split-KV pieces and the combine


@pytest.fixture
def many_pieces(monkeypatch):
    """Cut requests into 32-key pieces (many empty ones past short requests' ends)."""
    from flashmla_numba import attention

    monkeypatch.setattr(attention, "MIN_PIECE", 32)
    monkeypatch.setattr(attention, "WAVES", 64)


def _check(inputs: dict, key: str) -> None:
    ref_out, ref_lse = testing.reference("decode", inputs)
    with flashmla.use_backend("numba"):
        out, lse = flashmla.flash_mla_with_kvcache(**inputs)
    tol = testing.TOLERANCES[key]
    testing.assert_close("out", out, ref_out, tol["out"])
    testing.assert_close("lse", lse, ref_lse, tol["lse"])


def test_split_dense_causal_with_empty_requests(many_pieces):
    from flashmla_numba import attention

    inputs = testing.dense_decode_inputs(
        3, 2, 4, 0, seqlens=[130, 0, 33], causal=True, page_block_size=16, seed=3
    )
    p = testing.problem_for("decode", inputs)
    launches = attention.attention_launches(
        q4=p.q, out4=torch.empty(3, 2, 4, 512, dtype=torch.bfloat16),
        lse3=torch.empty(3, 2, 4), max_logits3=None, cache=p.k_cache, fmt=p.cache_format,
        slots=p.block_table, lengths=p.cache_seqlens, extra=None, sink=None, sparse=False,
        causal=True, scale=p.softmax_scale, group=4, rows=8, groups=1, split=True,
    )  # fmt: skip
    assert len(launches) == 2 and launches[0].args[5].shape[1] == 5  # 5 pieces, then combine
    _check(inputs, "dense_decode")


def test_split_sparse_with_sink_and_invalid_rows(many_pieces):
    inputs = testing.sparse_decode_inputs(
        2, 2, 4, 64, s_k=100, cache_format="fp8_model1", topk_length=True, attn_sink=True,
        extra_topk=32, extra_page_block_size=8, extra_topk_length=True, seed=5,
    )  # fmt: skip
    inputs["indices"][1, 0] = -1  # a row whose main candidates are all invalid
    inputs["attn_sink"][:2] = torch.tensor([math.inf, -math.inf])
    _check(inputs, "sparse_decode")


# --------------------------------------------------------------------------------------------
# Registry


def test_spec_is_import_light_and_declares_cpu():
    code = (
        "import sys, flashmla_numba; spec = flashmla_numba.spec(); "
        "assert 'numba' not in sys.modules, 'numba imported by the spec'; "
        "assert spec.ops['dense_decode'].devices == {'cpu'}; print(spec.priority)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


def test_backward_is_declared_unsupported():
    spec = REGISTRY.get("numba").spec
    assert "mha_backward" not in spec.ops and "mha_backward" in spec.description
    inputs = testing.mha_inputs(1, 4, 4, 2, requires_grad=True)
    with flashmla.use_backend("numba"):
        out, _ = flashmla.flash_attn_varlen_func(**inputs)
        with pytest.raises(NoBackendError, match="does not implement mha_backward"):
            out.float().sum().backward()
