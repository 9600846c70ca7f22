"""The Triton dense MHA prefill forward and backward, run by Triton's interpreter, against the
reference backend (fp32): varlen, bottom-right causal, GQA, every supported head-dim pair, bf16
and fp16, strided inputs, rows that see no key. Small tile configurations make tiny shapes cross
many tiles (both loop phases, causal diagonals, sequence ends); the default ones run too.

Tolerances are ``flashmla.testing.TOLERANCES["mha"]`` (several bf16 ulps): the interpreter
truncates fp32 -> bf16 stores instead of rounding, which stays well inside them."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True
    )

from flashmla_triton.mha import MhaConfig, mha_backward, mha_forward

import flashmla
from flashmla.testing import (
    TOLERANCES,
    assert_close,
    mha_inputs,
    non_contiguous,
    problem_for,
    reference,
)
from flashmla_ref import mha as ref_mha

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)
TOL = TOLERANCES["mha"]
SMALL = MhaConfig(32, 16, 4, 1)  # fwd / dQ: 32 queries x 16 keys per tile
SMALL_KV = MhaConfig(16, 32, 4, 1)  # dK/dV: 32 keys per program, 16 queries per step


def _grads_ref(inputs, dout, dlse):
    """The reference backend's fp32 gradients, from its own fp32 forward."""
    p = problem_for("mha_backward", inputs)
    out, lse = reference("mha_forward", inputs)
    return ref_mha.mha_backward(p, out, lse, dout, dlse, out_dtype=torch.float32)


def _check(inputs, small: bool, with_dlse: bool, seed: int = 0, tma: bool | None = None):
    p = problem_for("mha_forward", inputs)
    out, lse = mha_forward(p, SMALL if small else None, tma=tma)
    assert (
        out.dtype == p.q.dtype and lse.dtype == torch.float32 and lse.stride() == (1, p.q.shape[0])
    )
    ref_out, ref_lse = reference("mha_forward", inputs)
    assert_close("out", out, ref_out, TOL["out"])
    assert_close("lse", lse, ref_lse, TOL["lse"])

    g = torch.Generator().manual_seed(seed)
    dout = (torch.randn(out.shape, generator=g) / 10).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g) / 10 if with_dlse else None
    pb = problem_for("mha_backward", inputs)
    configs = (SMALL, SMALL_KV) if small else (None, None)
    dq, dk, dv = mha_backward(pb, out, lse, dout, dlse, *configs, tma=tma)
    for name, ans, want in zip(("dq", "dk", "dv"), (dq, dk, dv), _grads_ref(inputs, dout, dlse)):
        assert ans.dtype == p.q.dtype and ans.shape == want.shape
        assert_close(name, ans, want, TOL["grad"])
    return out, lse, (dq, dk, dv)


# Loads: "tma" = per-sequence tensor descriptors (what sm_90+ runs; the interpreter's default),
# "ptr" = masked pointer loads (sm_80, or strides TMA cannot take).
CASES = [
    # d_qk, d_v, dtype, causal, varlen, (h_q, h_kv), small tiles, dlse, loads
    (192, 128, torch.bfloat16, True, True, (4, 2), True, True, "tma"),
    (192, 128, torch.bfloat16, True, True, (4, 2), True, False, "ptr"),
    (192, 128, torch.bfloat16, True, True, (2, 2), False, False, "tma"),
    (192, 128, torch.float16, False, True, (4, 1), True, False, "tma"),
    (128, 128, torch.float16, False, True, (4, 1), True, True, "ptr"),
    (128, 128, torch.bfloat16, True, False, (2, 2), False, True, "tma"),
    (64, 64, torch.bfloat16, False, False, (2, 2), False, False, "tma"),
    (64, 64, torch.float16, True, True, (4, 2), True, False, "tma"),
    (128, 64, torch.float16, True, False, (2, 1), True, True, "tma"),
    (128, 64, torch.bfloat16, False, True, (2, 2), False, False, "ptr"),
]


@pytest.mark.parametrize(
    ("d_qk", "d_v", "dtype", "causal", "varlen", "heads", "small", "with_dlse", "loads"),
    CASES,
    ids=[f"{c[0]}x{c[1]}-{str(c[2])[6:]}-{'causal' if c[3] else 'full'}-{'varlen' if c[4] else 'fixed'}"
         f"-h{c[5][0]}kv{c[5][1]}-{'small' if c[6] else 'default'}{'-dlse' if c[7] else ''}-{c[8]}"
         for c in CASES],
)  # fmt: skip
def test_forward_backward_parity(d_qk, d_v, dtype, causal, varlen, heads, small, with_dlse, loads):
    # small tiles: short sequences still span many tiles; default tiles: longer sequences
    mean_q, mean_k = (45, 60) if small else (150, 190)
    inputs = mha_inputs(
        2, mean_q, mean_k, heads[0], h_kv=heads[1], d_qk=d_qk, d_v=d_v, varlen=varlen, causal=causal,
        dtype=dtype, seed=d_qk + d_v + int(causal),
    )  # fmt: skip
    _check(inputs, small, with_dlse, tma=loads == "tma")


def _custom_inputs(lq, lk, h_q, h_kv, d_qk, d_v, dtype, causal, seed=0):
    g = torch.Generator().manual_seed(seed)

    def data(*shape):
        return (torch.randn(*shape, generator=g) / 10).to(dtype)

    return dict(
        q=data(sum(lq), h_q, d_qk), k=data(sum(lk), h_kv, d_qk), v=data(sum(lk), h_kv, d_v),
        cu_seqlens_qo=torch.tensor([0, *lq]).cumsum(0).to(torch.int32),
        cu_seqlens_kv=torch.tensor([0, *lk]).cumsum(0).to(torch.int32),
        max_seqlen_qo=max(lq), max_seqlen_kv=max(lk), softmax_scale=(d_qk + 100) ** -0.5, causal=causal,
    )  # fmt: skip


def test_rows_without_keys():
    """Causal with L_q > L_k (the first L_q - L_k rows see nothing), an empty KV sequence and an
    empty query sequence: out 0 and lse +inf there, zero gradients, dK/dV 0 for unseen keys."""
    lq, lk = [40, 23, 0, 30], [10, 0, 7, 50]
    inputs = _custom_inputs(lq, lk, 4, 2, 192, 128, torch.bfloat16, causal=True)
    out, lse, (dq, dk, dv) = _check(inputs, small=True, with_dlse=True)
    blind = torch.zeros(sum(lq), dtype=torch.bool)
    blind[:30] = True  # sequence 0: rows 0..29 see no key (shift = -30)
    blind[40:63] = True  # sequence 1: no keys at all
    assert (lse[blind] == float("inf")).all() and (lse[~blind].isfinite()).all()
    assert (out[blind] == 0).all() and (dq[blind] == 0).all()
    assert (dk[10:17] == 0).all() and (dv[10:17] == 0).all()  # sequence 2: no queries


@pytest.mark.parametrize("loads", ["tma", "ptr"])
def test_causal_shift_sweep(loads):
    """Every offset L_k - L_q (negative too) modulo the tile sizes: the causal-diagonal tile
    bounds (first/last masked tile, first query that sees a KV tile) are exact."""
    # L_q = 40 (two 32-query tiles), shifts -8..7: m0 + shift and n0 - shift take every residue
    # mod 16 (the step of the tiles they are rounded to) inside the sequences
    lk = [40 + s for s in range(-8, 8)]
    inputs = _custom_inputs([40] * len(lk), lk, 2, 1, 64, 64, torch.float16, causal=True, seed=2)
    _check(inputs, small=True, with_dlse=True, tma=loads == "tma")


@pytest.mark.parametrize("loads", ["tma", "ptr"])
def test_strided_inputs_with_nan_padding(loads):
    """Outer strides that are not packed, NaN in the padding around every row and in unused rows
    past ``cu_seqlens[-1]``: nothing outside the sequences may be read. The gradient of out
    arrives as an expanded (stride-0) tensor."""
    inputs = mha_inputs(3, 40, 55, 4, h_kv=2, d_qk=192, d_v=128, varlen=True, causal=True, seed=7)
    total_q, total_k = inputs["q"].shape[0], inputs["k"].shape[0]
    for name in ("q", "k", "v"):  # 5 unused NaN rows at the end, then NaN padding all around
        t = inputs[name]
        inputs[name] = non_contiguous(torch.cat([t, torch.full_like(t[:5], float("nan"))]))
    p = problem_for("mha_forward", inputs)
    out, lse = mha_forward(p, SMALL, tma=loads == "tma")
    ref_out, ref_lse = reference("mha_forward", inputs)
    assert_close("out", out[:total_q], ref_out[:total_q], TOL["out"])
    assert_close("lse", lse[:total_q], ref_lse[:total_q], TOL["lse"])
    dout = torch.full((1, 1, 1), 0.05, dtype=out.dtype).expand(out.shape)
    pb = problem_for("mha_backward", inputs)
    grads = mha_backward(pb, out, lse, dout, None, SMALL, SMALL_KV, tma=loads == "tma")
    used = (total_q, total_k, total_k)
    for name, ans, want, n in zip(("dq", "dk", "dv"), grads, _grads_ref(inputs, dout, None), used):
        assert_close(name, ans[:n], want[:n], TOL["grad"])


def test_negative_scale():
    """A negative softmax scale flips which raw score is the row maximum."""
    inputs = mha_inputs(2, 30, 40, 2, d_qk=64, d_v=64, varlen=True, causal=True, seed=3)
    inputs["softmax_scale"] = -0.3
    _check(inputs, small=True, with_dlse=False)


def test_public_api_autograd():
    """Through ``flashmla.flash_attn_varlen_func`` and autograd with the Triton backend forced."""
    inputs = mha_inputs(2, 50, 70, 4, h_kv=2, d_qk=128, d_v=128, varlen=True, causal=True, seed=5)
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v")}
    try:
        with flashmla.use_backend("triton"):
            out, lse = flashmla.flash_attn_varlen_func(**{**inputs, **leaves})
    except (ImportError, AttributeError) as exc:  # ops.py not wired yet
        pytest.skip(f"triton backend not importable: {exc}")
    g = torch.Generator().manual_seed(1)
    dout = (torch.randn(out.shape, generator=g) / 10).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g) / 10
    torch.autograd.backward((out, lse), (dout, dlse))
    ref_out, ref_lse = reference("mha_forward", inputs)
    assert_close("out", out.detach(), ref_out, TOL["out"])
    assert_close("lse", lse.detach(), ref_lse, TOL["lse"])
    for name, want in zip(("q", "k", "v"), _grads_ref(inputs, dout, dlse)):
        assert_close(f"d{name}", leaves[name].grad, want, TOL["grad"])
