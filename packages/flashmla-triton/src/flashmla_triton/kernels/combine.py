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
    HAS_SINK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, D_V: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One program per (request, query token), head and block of ``BLOCK_D`` output columns;
    each step loads the partials of ``BLOCK_S`` pieces at once, so one long request split over
    every SM still has enough loads in flight. Requests done in one piece were written by the
    attention kernel and are skipped. Partial lse values are base 2."""
    pid = tl.program_id(0)
    i = pid // s_q
    t = pid % s_q
    h = tl.program_id(1)
    begin = tl.load(num_splits + i)
    end = tl.load(num_splits + i + 1)
    if end - begin > 1:
        row = t.to(tl.int64) * stride_at + h.to(tl.int64) * stride_ah
        pieces = tl.arange(0, BLOCK_S)
        m = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for j in range(begin, end, BLOCK_S):
            ok = j + pieces < end
            lj = tl.load(lse_acc + _i64(j + pieces) * stride_ab + row, mask=ok, other=float("-inf"))
            m = tl.maximum(m, lj)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.zeros([BLOCK_S], tl.float32)
        for j in range(begin, end, BLOCK_S):
            ok = j + pieces < end
            lj = tl.load(lse_acc + _i64(j + pieces) * stride_ab + row, mask=ok, other=float("-inf"))
            total += tl.exp2(lj - m_safe)
        s = tl.sum(total, 0)
        g = tl.where(s > 0, tl.log2(tl.where(s > 0, s, 1.0)) + m_safe, float("inf"))
        g_w = g
        if HAS_SINK:  # fold the sink into the normaliser, leaving lse itself untouched
            sink2 = tl.load(sink + h) * 1.4426950408889634
            finite = g != float("inf")
            with_sink = g + tl.log2(1.0 + tl.exp2(sink2 - tl.where(finite, g, 0.0)))
            g_w = tl.where(finite, with_sink, tl.where(sink2 == float("-inf"), float("inf"), sink2))
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for j in range(begin, end, BLOCK_S):
            ok = j + pieces < end
            lj = tl.load(lse_acc + _i64(j + pieces) * stride_ab + row, mask=ok, other=float("-inf"))
            w = tl.exp2(lj - g_w)
            used = w > 0  # empty pieces (and NaN weights) are never read
            w = tl.where(used, w, 0.0)
            o = tl.load(
                o_acc + (_i64(j + pieces) * stride_ab + row)[:, None] * D_V + cols[None, :],
                mask=used[:, None],
                other=0.0,
            )
            acc += tl.sum(w[:, None] * o, 0)
        if UPCAST and out.dtype.element_ty == tl.bfloat16:
            acc = round_to_bf16(acc)
        dst = out + i.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot
        tl.store(dst + h.to(tl.int64) * stride_oh + cols, acc.to(out.dtype.element_ty))
        if tl.program_id(2) == 0:
            lse_row = i.to(tl.int64) * stride_lb + t.to(tl.int64) * stride_lt
            tl.store(lse + lse_row + h.to(tl.int64) * stride_lh, g * 0.6931471805599453)
