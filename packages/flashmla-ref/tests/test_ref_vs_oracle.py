"""The reference backend against an independent float64 brute-force oracle (``oracle.py``).

Configurations are drawn by hypothesis over the dimensions of FlashMLA's own test matrix
(contract §8.2-8.5), scaled down to CPU sizes. Each case is run through the public API with the
``ref`` backend forced (low-precision output: must be the float64 truth rounded, within one ulp)
and through ``flashmla.testing.reference`` (unrounded fp32: must match to fp32 accuracy).
Special values (NaN, +inf, -inf) must sit at exactly the same positions.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import flashmla
from flashmla import testing


def _load_oracle():
    # pytest runs with --import-mode=importlib, so the sibling module is loaded by path.
    path = pathlib.Path(__file__).with_name("oracle.py")
    spec = importlib.util.spec_from_file_location("flashmla_ref_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = _load_oracle()

CHECKS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one intra-op thread is faster, and immune to oversubscribed CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tolerances for the fp32 reference against float64 (measured errors are ~10x below these).
OUT_TOL = dict(rtol=1e-5, atol=1e-6)  # outputs: values are at most ~1
STAT_TOL = dict(rtol=1e-6, atol=2e-6)  # lse / max_logits: a few fp32 ulps of |lse| <~ 10
LOWP_FLOOR = 1e-6  # absolute slack on top of one output ulp (the fp32 error near zero)


# --------------------------------------------------------------------------------------------
# Comparison


def absmax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, tol: np.ndarray, what: str) -> None:
    """Specials (NaN, +inf, -inf) at the same positions, then ``|got - want| <= tol``."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = _as_f64(got), _as_f64(want)
    problems = []
    for special, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        diff = test(g) != test(w)
        if diff.any():
            where = tuple(int(i) for i in np.argwhere(diff)[0])
            problems.append(
                f"{int(diff.sum())} positions differ in {special}, first {list(where)}: "
                f"got {g[where]}, want {w[where]}"
            )
    with np.errstate(invalid="ignore"):
        err = np.abs(g - w)  # NaN where both hold the same special value
        bad = err > tol
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        problems.append(
            f"{int(bad.sum())}/{bad.size} beyond {what} (max err {np.nanmax(err):.3g}); "
            f"first {list(where)}: got {g[where]}, want {w[where]}"
        )
    if problems:
        raise AssertionError(f"{name}:\n  " + "\n  ".join(problems))


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """``|got - want| <= atol + rtol * |want|`` elementwise, specials at the same positions."""
    with np.errstate(invalid="ignore"):
        tol = atol + rtol * np.abs(_as_f64(want))
    _compare(name, got, want, tol, f"atol {atol:g} + rtol {rtol:g}")


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The spacing of ``dtype`` values around float64 ``x`` (subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    _, exponent = np.frexp(np.abs(x))
    return np.maximum(np.ldexp(fi.eps, exponent - 1), fi.smallest_normal * fi.eps)


def check_rounded(
    name: str, got: torch.Tensor, want: torch.Tensor, floor: float = LOWP_FLOOR
) -> None:
    """A bf16/fp16 result against the float64 truth: at most one ulp (plus ``floor``) apart."""
    assert got.dtype in (torch.bfloat16, torch.float16), got.dtype
    w = _as_f64(want)
    tol = ulp(np.where(np.isfinite(w), w, 0.0), got.dtype) + floor
    _compare(name, got, want, tol, f"1 {got.dtype} ulp + {floor:g}")


# --------------------------------------------------------------------------------------------
# Input variations the generators do not make themselves

FP8_CONTAINERS = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def repack_fp8(
    cache: torch.Tensor, pad_bytes: int, lead: int, container: torch.dtype
) -> torch.Tensor:
    """The same FP8 pages at a new page stride (``pad_bytes`` of 0xFF poison after each page),
    starting ``lead`` bytes into the storage, viewed as ``container``."""
    nb, page, _, width = cache.shape
    stride = page * width + pad_bytes
    buf = torch.full((lead + nb * stride,), 0xFF, dtype=torch.uint8)
    view = buf.as_strided((nb, page, 1, width), (stride, width, width, 1), lead)
    view.copy_(cache.view(torch.uint8))
    return view.view(container)


def invalidate_rows(indices: torch.Tensor, capacity: int, seed: int) -> None:
    """Make about a third of the ``[b, s_q, topk]`` rows (at least one) wholly invalid, in place."""
    g = torch.Generator().manual_seed(seed)
    b, s_q, _ = indices.shape
    rows = torch.rand(b, s_q, generator=g) < 0.3
    rows[0, 0] = True
    choices = [*testing.INVALID_INDEX_VALUES, capacity, capacity + 1]
    for i, t in rows.nonzero().tolist():
        indices[i, t] = choices[int(torch.randint(len(choices), (), generator=g))]


# --------------------------------------------------------------------------------------------
# Dense decode (§1.3, §8.2)


def sizes(hi: int, typical: tuple[int, ...]) -> st.SearchStrategy[int]:
    """Lengths in ``1..hi``; half of the draws from ``typical`` (hypothesis favours small ints)."""
    return st.one_of(st.integers(1, hi), st.sampled_from(typical))


HEAD_PAIRS = [(h_q, h_kv) for h_q in (1, 3, 9, 16, 64) for h_kv in (1, 2, 3, 8) if h_q % h_kv == 0]
PAGE_SIZES = (1, 3, 16, 61, 64)


@st.composite
def dense_cases(draw: st.DrawFn) -> dict:
    b = draw(st.integers(1, 3))
    s_q = draw(st.sampled_from((1, 2, 4)))
    h_q, h_kv = draw(st.sampled_from(HEAD_PAIRS))
    s_k = draw(sizes(200, (20, 63, 64, 65, 140, 200)))
    case = dict(
        b=b, s_q=s_q, h_q=h_q, s_k=s_k, h_kv=h_kv,
        page_block_size=draw(st.sampled_from(PAGE_SIZES)),
        dtype=draw(st.sampled_from((torch.bfloat16, torch.float16))),
        causal=draw(st.booleans()),
        contiguous=draw(st.booleans()),
        softmax_scale=draw(st.sampled_from((None, 0.3))),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip
    lengths = draw(st.sampled_from(("fixed", "varlen", "zeros", "explicit")))
    if lengths == "varlen":
        case["varlen"] = True
    elif lengths == "zeros":
        case.update(varlen=True, zero_frac=0.5)
    elif lengths == "explicit":  # short ones too: causal rows that see nothing when L < s_q
        case["seqlens"] = draw(st.lists(st.integers(0, s_k), min_size=b, max_size=b))
    return case


def _check_decode(inputs: dict, want_out: torch.Tensor, want_lse: torch.Tensor) -> None:
    with flashmla.use_backend("ref"):
        out, lse = flashmla.flash_mla_with_kvcache(**inputs)
    assert out.dtype == inputs["q"].dtype and lse.dtype == torch.float32 and out.is_contiguous()
    # dense: lse [b, h_q, s_q] contiguous; sparse: a transposed view of a [b, s_q, h_q] buffer
    assert (lse if inputs.get("indices") is None else lse.transpose(1, 2)).is_contiguous()
    check_rounded("out", out, want_out)
    check_close("lse", lse, want_lse, **STAT_TOL)
    out32, lse32 = testing.reference("decode", inputs)
    check_close("reference out", out32, want_out, **OUT_TOL)
    check_close("reference lse", lse32, want_lse, **STAT_TOL)


@settings(CHECKS, max_examples=400)
@given(dense_cases())
@example(dict(b=2, s_q=4, h_q=9, s_k=2, h_kv=3, page_block_size=1, dtype=torch.bfloat16,
              causal=True, contiguous=False, softmax_scale=None, seed=1,
              seqlens=[0, 2]))  # fmt: skip
@example(dict(b=3, s_q=2, h_q=64, s_k=130, h_kv=8, page_block_size=61, dtype=torch.float16,
              causal=True, contiguous=True, softmax_scale=None, seed=2, varlen=True,
              zero_frac=0.5))  # fmt: skip
def test_dense_decode(case: dict) -> None:
    inputs = testing.dense_decode_inputs(**case)
    _check_decode(inputs, *oracle.dense_decode(**inputs))


@settings(CHECKS, max_examples=200)
@given(
    st.sampled_from(("fp8_v32", "fp8_model1")),
    dense_cases(),
    st.sampled_from(FP8_CONTAINERS),
    st.sampled_from((0, 16, 100)),
)
def test_dense_decode_fp8(fmt: str, case: dict, container: torch.dtype, pad: int) -> None:
    """FP8 caches in dense decode (our extension: is_fp8_kvcache=True without indices)."""
    case.update(cache_format=fmt, h_kv=1, dtype=torch.bfloat16)
    inputs = testing.dense_decode_inputs(**case)
    inputs["k_cache"] = repack_fp8(inputs["k_cache"], pad, pad // 2, container)
    _check_decode(inputs, *oracle.dense_decode(**inputs))


# --------------------------------------------------------------------------------------------
# Sparse decode (§1.4, §8.3)


@st.composite
def sparse_decode_cases(draw: st.DrawFn) -> dict:
    fmt = draw(st.sampled_from(("fp8_v32", "fp8_model1", "bf16")))
    topk = draw(st.sampled_from((1, 7, 64, 100)))
    case = dict(
        b=draw(st.integers(1, 4)),
        s_q=draw(st.sampled_from((1, 2, 3))),
        h_q=draw(st.sampled_from((64, 128))),
        topk=topk,
        s_k=draw(sizes(300, (64, 100, 128, 300))),
        cache_format=fmt,
        page_block_size=draw(st.sampled_from((1, 2, 3, 53, 61, 64))),
        varlen=draw(st.booleans()),
        topk_length=draw(st.booleans()),
        attn_sink=draw(st.booleans()),
        out_of_range=draw(st.booleans()),
        zero_length_frac=draw(st.sampled_from((0.0, 0.0, 0.3, 1.0))),
        contiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    if draw(st.booleans()):
        case.update(
            extra_topk=draw(st.sampled_from((1, 16, 64))),
            extra_page_block_size=draw(st.sampled_from((1, 2, 61, 64))),
            extra_topk_length=draw(st.booleans()),
        )
    return case


@settings(CHECKS, max_examples=400)
@given(
    sparse_decode_cases(),
    st.booleans(),
    st.sampled_from(FP8_CONTAINERS),
    st.sampled_from((0, 48)),
)
@example(dict(b=3, s_q=3, h_q=64, topk=64, s_k=61, cache_format="fp8_model1",
              page_block_size=61, varlen=True, topk_length=True, attn_sink=True,
              out_of_range=True, zero_length_frac=0.3, contiguous=False, seed=3, extra_topk=16,
              extra_page_block_size=2, extra_topk_length=True),
         True, torch.float8_e4m3fn, 48)  # fmt: skip
@example(dict(b=2, s_q=3, h_q=128, topk=100, s_k=53, cache_format="fp8_v32",
              page_block_size=53, varlen=False, topk_length=False, attn_sink=True,
              out_of_range=True, zero_length_frac=0.0, contiguous=True, seed=4),
         True, torch.int8, 0)  # fmt: skip
def test_sparse_decode(case: dict, all_invalid: bool, container: torch.dtype, pad: int) -> None:
    inputs = testing.sparse_decode_inputs(**case)
    if all_invalid:  # the same rows of both index tensors (same seed, same shape)
        for key, cache_key in (
            ("indices", "k_cache"),
            ("extra_indices_in_kvcache", "extra_k_cache"),
        ):
            if key in inputs:
                cache = inputs[cache_key]
                invalidate_rows(inputs[key], cache.shape[0] * cache.shape[1], case["seed"])
    if case["cache_format"] != "bf16":
        for key in ("k_cache", "extra_k_cache"):
            if key in inputs:
                inputs[key] = repack_fp8(inputs[key], pad, pad // 3, container)
    _check_decode(inputs, *oracle.sparse_decode(**inputs))


@settings(CHECKS, max_examples=30)
@given(st.sampled_from(("fp8_v32", "fp8_model1")), st.integers(0, 2**16))
def test_sparse_decode_random_bytes(fmt: str, seed: int) -> None:
    """A cache of random valid FP8 bytes (random codes, power-of-two scales from 2^-12 to 2^-6,
    random bf16 RoPE) written byte by byte here, not by flashmla's quantizer."""
    g = torch.Generator().manual_seed(seed)
    nb, page = 5, 7
    width = 656 if fmt == "fp8_v32" else 584
    raw = torch.randint(0, 256, (nb, page * width), generator=g, dtype=torch.uint8)
    codes = torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, codes ^ 0x01, codes)  # no NaN codes
    exps = torch.randint(-12, -5, (nb, page, 8), generator=g)
    rope = (torch.randn(nb, page, 64, generator=g) / 4).to(torch.bfloat16)
    for blk in range(nb):
        for t in range(page):
            if fmt == "fp8_v32":
                rec = slice(t * 656, (t + 1) * 656)
                raw[blk, rec][:512] = codes[blk, t * 656 : t * 656 + 512]
                scales = torch.exp2(exps[blk, t, :4].float())
                raw[blk, rec][512:528] = scales.view(torch.uint8)
                raw[blk, rec][528:] = rope[blk, t].view(torch.uint8)
            else:
                raw[blk, t * 576 : t * 576 + 448] = codes[blk, t * 576 : t * 576 + 448]
                raw[blk, t * 576 + 448 : (t + 1) * 576] = rope[blk, t].view(torch.uint8)
                sc = page * 576 + t * 8
                raw[blk, sc : sc + 7] = (exps[blk, t, :7] + 127).to(torch.uint8)
    cache = raw.view(nb, page, 1, width)
    d = 576 if fmt == "fp8_v32" else 512
    b, s_q, h_q, topk = 2, 2, 64, 9
    indices = torch.randint(-3, nb * page + 3, (b, s_q, topk), generator=g, dtype=torch.int32)
    inputs = dict(
        q=torch.randn(b, s_q, h_q, d, generator=g).clamp(-1, 1).to(torch.bfloat16),
        k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
        tile_scheduler_metadata=None, softmax_scale=d**-0.55, is_fp8_kvcache=True,
        indices=indices, attn_sink=torch.randn(h_q, generator=g),
    )  # fmt: skip
    _check_decode(inputs, *oracle.sparse_decode(**inputs))


# --------------------------------------------------------------------------------------------
# Sparse prefill (§2, §8.4)


@st.composite
def prefill_cases(draw: st.DrawFn) -> dict:
    return dict(
        s_q=draw(st.sampled_from((1, 2, 5, 9))),
        s_kv=draw(sizes(300, (95, 128, 153, 256, 300))),
        h_q=draw(st.sampled_from((64, 128))),
        topk=draw(st.sampled_from((1, 16, 64, 128, 384))),
        d_qk=draw(st.sampled_from((512, 576))),
        attn_sink=draw(st.booleans()),
        topk_length=draw(st.booleans()),
        invalid_rows=draw(st.booleans()),
        contiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(CHECKS, max_examples=250)
@given(prefill_cases(), st.booleans())
@example(dict(s_q=3, s_kv=20, h_q=64, topk=128, d_qk=512, attn_sink=True, topk_length=True,
              invalid_rows=True, contiguous=False, seed=5), True)  # fmt: skip
def test_sparse_prefill(case: dict, infinite_sinks: bool) -> None:
    inputs = testing.sparse_prefill_inputs(**case)
    if infinite_sinks and "attn_sink" in inputs:
        inputs["attn_sink"][0::3] = math.inf
        inputs["attn_sink"][1::3] = -math.inf
    # NaN into every kv row no in-range index names (as §8.3 does for decode caches)
    kv, idx = inputs["kv"], inputs["indices"].long()
    named = torch.zeros(kv.shape[0], dtype=torch.bool)
    named[idx[(idx >= 0) & (idx < kv.shape[0])]] = True
    kv[~named] = math.nan
    want_out, want_max, want_lse = oracle.sparse_prefill(**inputs)
    with flashmla.use_backend("ref"):
        out, max_logits, lse = flashmla.flash_mla_sparse_fwd(**inputs)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous() and max_logits.is_contiguous() and lse.is_contiguous()
    check_rounded("out", out, want_out)
    check_close("max_logits", max_logits, want_max, **STAT_TOL)
    check_close("lse", lse, want_lse, **STAT_TOL)
    out32, max32, lse32 = testing.reference("sparse_prefill", inputs)
    check_close("reference out", out32, want_out, **OUT_TOL)
    check_close("reference max_logits", max32, want_max, **STAT_TOL)
    check_close("reference lse", lse32, want_lse, **STAT_TOL)


# --------------------------------------------------------------------------------------------
# Dense MHA prefill, forward and backward (§3, §8.5)


@st.composite
def mha_cases(draw: st.DrawFn) -> dict:
    h_q, h_kv = draw(st.sampled_from(((2, 2), (4, 4), (4, 2), (6, 3), (4, 1))))
    d_qk, d_v = draw(st.sampled_from(((128, 128), (192, 128))))
    return dict(
        b=draw(st.integers(1, 3)),
        mean_s_q=draw(sizes(10, (6, 10))),
        mean_s_k=draw(sizes(14, (8, 14))),
        h_q=h_q, h_kv=h_kv, d_qk=d_qk, d_v=d_v,
        varlen=draw(st.booleans()),
        causal=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.bfloat16, torch.float16))),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def _check_mha(inputs: dict, lse_grad: bool, seed: int) -> None:
    """Forward (public API and fp32 reference) and backward (autograd through the public API,
    and the reference's fp32 backward) against the oracle."""
    from flashmla_ref import ops as ref_ops

    dtype = inputs["q"].dtype
    want_out, want_lse = oracle.mha_forward(**inputs)
    with flashmla.use_backend("ref"):
        out, lse = flashmla.flash_attn_varlen_func(**inputs)
    assert lse.stride(0) == 1 and out.dtype == dtype
    check_rounded("out", out, want_out)
    check_close("lse", lse, want_lse, **STAT_TOL)
    out32, lse32 = testing.reference("mha_forward", inputs)
    check_close("reference out", out32, want_out, **OUT_TOL)
    check_close("reference lse", lse32, want_lse, **STAT_TOL)

    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(dtype)  # exactly what autograd hands back
    dlse = torch.randn(lse.shape, generator=g) if lse_grad else None
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:  # rows that see no key (lse = +inf) have no gradient anyway
        loss = loss + (lse.masked_fill(lse == math.inf, 0.0) * dlse).sum()
    with flashmla.use_backend("ref"):
        loss.backward()
    grads = [inputs[key].grad for key in ("q", "k", "v")]
    exact = oracle.mha_backward(dout, **inputs, dlse=dlse)
    # The backward pass (FlashAttention's and the reference's) forms D = rowsum(dO * O) from the
    # saved, rounded O: one ulp against that, FlashMLA's own tolerance against the exact gradient.
    stored = oracle.mha_backward(dout, **inputs, dlse=dlse, out_for_delta=out)
    for name, got, want, truth in zip(("dq", "dk", "dv"), grads, stored, exact):
        assert got.dtype == dtype
        check_rounded(name, got, want, floor=1e-6 * max(1.0, absmax(want)))
        testing.assert_close(name, got.float(), truth.float(), testing.TOLERANCES["mha"]["grad"])
    # The fp32 reference backward from the fp32 forward: the exact gradient to fp32 accuracy.
    p = testing.problem_for("mha_backward", inputs)
    with torch.no_grad():
        grads32 = ref_ops.mha_backward(p, out32, lse32, dout, dlse, out_dtype=torch.float32)
    for name, got, want in zip(("dq", "dk", "dv"), grads32, exact):
        scale = max(1.0, absmax(want))
        check_close(f"reference {name}", got, want, rtol=1e-5, atol=2e-6 * scale)


@settings(CHECKS, max_examples=150)
@given(mha_cases(), st.booleans())
def test_mha_forward_backward(case: dict, lse_grad: bool) -> None:
    _check_mha(testing.mha_inputs(**case, requires_grad=True), lse_grad, case["seed"])


@settings(CHECKS, max_examples=60)
@given(
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 9)), min_size=1, max_size=4),
    st.sampled_from(((2, 2), (4, 1), (6, 3))),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
@example([(3, 1), (0, 4), (5, 0), (2, 2)], (4, 1), True, True, 0)
def test_mha_any_lengths(
    lengths: list[tuple[int, int]], heads: tuple[int, int], causal: bool, lse_grad: bool, seed: int
) -> None:
    """Varlen batches beyond FlashMLA's tests: empty sequences, and L_k < L_q, where causal
    rows see no key (the contract leaves them undefined; flashmla defines out = 0, lse = +inf)."""
    lq, lk = [n for n, _ in lengths], [n for _, n in lengths]
    if sum(lq) == 0:
        lq[0] = 1
    (h_q, h_kv), d_qk = heads, 192 if seed % 2 else 128
    g = torch.Generator().manual_seed(seed)

    def data(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / 10).to(torch.bfloat16).requires_grad_()

    inputs = dict(
        q=data(sum(lq), h_q, d_qk), k=data(sum(lk), h_kv, d_qk), v=data(sum(lk), h_kv, 128),
        cu_seqlens_qo=torch.tensor([0, *lq]).cumsum(0).to(torch.int32),
        cu_seqlens_kv=torch.tensor([0, *lk]).cumsum(0).to(torch.int32),
        max_seqlen_qo=max(lq), max_seqlen_kv=max(lk), softmax_scale=None, causal=causal,
    )  # fmt: skip
    _check_mha(inputs, lse_grad, seed)


# --------------------------------------------------------------------------------------------
# The oracle itself, and proof that these checks can fail


def test_e4m3_decoder_matches_torch() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).double()
    got = torch.tensor([oracle.e4m3_value(c) for c in range(256)], dtype=torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert oracle.e4m3_value(0x7E) == 448.0 and oracle.e4m3_value(0x01) == 2.0**-9


@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_layout_round_trip_is_exact(fmt: str) -> None:
    """Values exactly representable after per-tile power-of-two scaling survive flashmla's
    quantizer and the oracle's byte decoder bit for bit (both layouts, odd page size)."""
    d, tile = (576, 128) if fmt == "fp8_v32" else (512, 64)
    n_nope = 512 if fmt == "fp8_v32" else 448
    g = torch.Generator().manual_seed(0)
    finite = torch.tensor([oracle.E4M3_TABLE[c] for c in range(256) if c & 0x7F != 0x7F])
    n_tok, page = 11, 3
    picks = finite[torch.randint(len(finite), (n_tok, n_nope), generator=g)]
    picks[:, ::tile] = 448.0  # every tile reaches the e4m3 maximum, so its scale is 2^k exactly
    tile_exp = torch.randint(-12, 3, (n_tok, n_nope // tile), generator=g)
    nope = picks * torch.exp2(tile_exp.double()).repeat_interleave(tile, dim=1)
    rope = torch.randn(n_tok, d - n_nope, generator=g, dtype=torch.float64)
    values = torch.cat([nope, rope], dim=1).to(torch.bfloat16)
    assert torch.equal(values[:, :n_nope].double(), nope)  # exact in bf16
    nb = math.ceil(n_tok / page) + 1
    cache = flashmla.allocate_paged_cache(nb, page, cache_format=fmt, page_align=576)
    slots = torch.randperm(nb * page, generator=g)[:n_tok]
    flashmla.write_kv_cache(cache, values.unsqueeze(1), slots, is_fp8=True)
    reader = oracle.CacheReader(cache)
    decoded = torch.from_numpy(np.stack([reader.slot(int(s)) for s in slots]))
    assert torch.equal(decoded, values.double())


def test_mha_backward_formulas_match_float64_autograd() -> None:
    inputs = testing.mha_inputs(2, 4, 6, 4, h_kv=2, d_qk=192, varlen=True, causal=True, seed=7)
    g = torch.Generator().manual_seed(8)
    dout = torch.randn(inputs["q"].shape[0], 4, 128, generator=g, dtype=torch.float64)
    dlse = torch.randn(inputs["q"].shape[0], 4, generator=g, dtype=torch.float64)
    q, k, v = (inputs[key].double().requires_grad_() for key in ("q", "k", "v"))
    cu_q, cu_k = inputs["cu_seqlens_qo"].tolist(), inputs["cu_seqlens_kv"].tolist()
    loss = 0.0
    for s in range(len(cu_q) - 1):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        qs = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)  # [h, lq, d]
        ks = k[cu_k[s] : cu_k[s + 1]].repeat_interleave(2, dim=1).transpose(0, 1)
        vs = v[cu_k[s] : cu_k[s + 1]].repeat_interleave(2, dim=1).transpose(0, 1)
        logits = qs @ ks.transpose(1, 2) * inputs["softmax_scale"]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        logits = logits.masked_fill(~mask, -math.inf)
        lse = logits.logsumexp(-1)  # [h, lq]
        out = torch.softmax(logits, -1) @ vs  # [h, lq, dv]
        loss = loss + (out.transpose(0, 1) * dout[cu_q[s] : cu_q[s + 1]]).sum()
        loss = loss + (lse.t() * dlse[cu_q[s] : cu_q[s + 1]]).sum()
    loss.backward()
    for got, want in zip(oracle.mha_backward(dout, **inputs, dlse=dlse), (q.grad, k.grad, v.grad)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_checks_catch_perturbations() -> None:
    """Every kind of discrepancy the tests look for makes them fail."""
    inputs = testing.dense_decode_inputs(2, 2, 3, 40, seqlens=[0, 40], causal=True)
    want_out, want_lse = oracle.dense_decode(**inputs)
    with flashmla.use_backend("ref"):
        out, lse = flashmla.flash_mla_with_kvcache(**inputs)
    check_rounded("out", out, want_out)
    check_close("lse", lse, want_lse, **STAT_TOL)
    bumped = out.clone()
    bumped[1, 0, 0, 5] += 3 * ulp(want_out[1, 0, 0, 5].numpy(), out.dtype).item()
    with pytest.raises(AssertionError, match="ulp"):
        check_rounded("out", bumped, want_out)
    for value in (math.nan, 1e9):  # an empty row's +inf lse replaced
        broken = lse.clone()
        broken[0, 1, 0] = value
        with pytest.raises(AssertionError):
            check_close("lse", broken, want_lse, **STAT_TOL)
    nudged = lse.clone()
    nudged[1, 2, 1] += 1e-4
    with pytest.raises(AssertionError, match="rtol"):
        check_close("lse", nudged, want_lse, **STAT_TOL)
    # A semantic slip (causal ignored) is far outside the tolerance.
    wrong_out, _ = oracle.dense_decode(**{**inputs, "causal": False})
    with pytest.raises(AssertionError):
        check_rounded("out", out, wrong_out)


def test_checks_catch_a_missing_sink() -> None:
    inputs = testing.sparse_decode_inputs(2, 2, 64, 64, attn_sink=True, seed=9)
    want_out, want_lse = oracle.sparse_decode(**inputs)
    no_sink = {**inputs, "attn_sink": None}
    out32, lse32 = testing.reference("decode", no_sink)
    check_close("lse", lse32, want_lse, **STAT_TOL)  # the sink never changes lse ...
    with pytest.raises(AssertionError):  # ... but it does change the output
        check_close("out", out32, want_out, **OUT_TOL)
