"""Merge the partial results of split requests (contract §6.3)."""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import _i64, round_to_bf16


@triton.jit
def combine_kernel(
    o_acc, lse_acc, stride_ab, stride_at, stride_ah, num_splits,
    out, stride_ob, stride_ot, stride_oh,
    lse, stride_lb, stride_lt, stride_lh,
    sink, s_q, h_q,
    HAS_SINK: tl.constexpr, BLOCK_H: tl.constexpr, D_V: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program per (request, query token) and block of heads. Requests done in one piece
    were written by the attention kernel and are skipped. Partial lse values are base 2."""
    pid = tl.program_id(0)
    i = pid // s_q
    t = pid % s_q
    begin = tl.load(num_splits + i)
    end = tl.load(num_splits + i + 1)
    if end - begin > 1:
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = heads < h_q
        rows = t.to(tl.int64) * stride_at + heads.to(tl.int64) * stride_ah
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        for j in range(begin, end):
            m = tl.maximum(
                m, tl.load(lse_acc + _i64(j) * stride_ab + rows, mask=ok, other=float("-inf"))
            )
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_H], tl.float32)
        for j in range(begin, end):
            total += tl.exp2(
                tl.load(lse_acc + _i64(j) * stride_ab + rows, mask=ok, other=float("-inf")) - m_safe
            )
        g = tl.where(total > 0, tl.log2(tl.where(total > 0, total, 1.0)) + m_safe, float("inf"))
        g_w = g
        if HAS_SINK:  # fold the sink into the normaliser, leaving lse itself untouched
            sink2 = tl.load(sink + heads, mask=ok, other=float("-inf")) * 1.4426950408889634
            finite = g != float("inf")
            with_sink = g + tl.log2(1.0 + tl.exp2(sink2 - tl.where(finite, g, 0.0)))
            g_w = tl.where(finite, with_sink, tl.where(sink2 == float("-inf"), float("inf"), sink2))
        cols = tl.arange(0, D_V)
        acc = tl.zeros([BLOCK_H, D_V], tl.float32)
        for j in range(begin, end):
            lj = tl.load(lse_acc + _i64(j) * stride_ab + rows, mask=ok, other=float("-inf"))
            w = tl.exp2(lj - g_w)
            w = tl.where(lj == float("-inf"), 0.0, w)
            o = tl.load(
                o_acc + (_i64(j) * stride_ab + rows)[:, None] * D_V + cols[None, :],
                mask=ok[:, None],
                other=0.0,
            )
            acc += w[:, None] * o
        if UPCAST and out.dtype.element_ty == tl.bfloat16:
            acc = round_to_bf16(acc)
        out_rows = (
            i.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + heads.to(tl.int64) * stride_oh
        )
        tl.store(
            out + out_rows[:, None] + cols[None, :], acc.to(out.dtype.element_ty), mask=ok[:, None]
        )
        lse_rows = (
            i.to(tl.int64) * stride_lb + t.to(tl.int64) * stride_lt + heads.to(tl.int64) * stride_lh
        )
        tl.store(lse + lse_rows, g * 0.6931471805599453, mask=ok)
