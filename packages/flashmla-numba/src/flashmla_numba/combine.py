"""Split-KV combine: merge the pieces of requests that several CTAs attended to.

Piece ``c`` of request ``i`` wrote ``o_part[i, c] = O_c / l_c`` (its output normalised by its
own softmax sum) and ``lse_part[i, c] = m_c + log(l_c)`` (``-inf``, and no output, when it saw
no key). The request's result is the softmax-weighted mix of its pieces:

    lse = log(sum_c exp(lse_c)),   out = sum_c exp(lse_c - lse) * o_part[c]

and the attention sink, when given, scales ``out`` by ``1 / (1 + exp(sink - lse))`` (``lse`` is
returned without it). A request whose pieces all saw nothing gets ``out = 0``, ``lse = +inf``.

One CTA per (request, query token) and block of HEADS heads: first one thread per head
computes the merged lse and every piece's weight into shared memory, then all threads produce
the heads' 512 output columns.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda, float32

from . import SIM
from .launch import Launch, array, kernel, placeholder
from .numerics import as_int16, f32_to_half

MAX_CHUNKS = 64  # pieces per request (the weights live in shared memory)
HEADS = 8  # heads per CTA
THREADS = 32 if SIM else 256
D_V = 512

NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)


@kernel(launch_bounds=THREADS)
def combine_kernel(o_part, lse_part, out, lse, sink, has_sink, is_fp16):
    """o_part [b, n_chunks, s_q, h_q, 512] / lse_part [b, n_chunks, s_q, h_q] fp32 pieces ->
    out [b, s_q, h_q, 512] (16-bit bits) and lse [b, s_q, h_q] (natural log)."""
    n_chunks = lse_part.shape[1]
    s_q = lse_part.shape[2]
    h_q = lse_part.shape[3]
    req = cuda.blockIdx.x // s_q
    t = cuda.blockIdx.x % s_q
    h0 = cuda.blockIdx.y * HEADS
    tid = cuda.threadIdx.x
    weight = cuda.shared.array((HEADS, MAX_CHUNKS), float32)

    # 1. One thread per head: merged lse, then each piece's weight exp(lse_c - lse) * sink.
    for i in range(tid, HEADS, THREADS):
        h = h0 + i
        if h < h_q:
            m = NEG_INF
            for c in range(n_chunks):
                m = max(m, lse_part[req, c, t, h])
            total = ZERO
            if m != NEG_INF:
                for c in range(n_chunks):
                    total += math.exp(lse_part[req, c, t, h] - m)
            merged = POS_INF
            factor = ZERO
            if total > ZERO:
                merged = m + math.log(total)
                factor = ONE
                if has_sink:
                    factor = ONE / (ONE + math.exp(sink[h] - merged))
            for c in range(n_chunks):
                piece = lse_part[req, c, t, h]
                w = ZERO
                if total > ZERO and piece != NEG_INF:
                    w = math.exp(piece - merged) * factor
                weight[i, c] = w
            lse[req, t, h] = merged
    cuda.syncthreads()

    # 2. Outputs: weighted sum of the pieces. A piece of weight 0 is never read (an empty
    # piece wrote no output, so its slot holds whatever memory held before).
    for e in range(tid, HEADS * D_V, THREADS):
        i = e // D_V
        col = e % D_V
        h = h0 + i
        if h < h_q:
            value = ZERO
            for c in range(n_chunks):
                w = weight[i, c]
                if w != ZERO:
                    value += w * o_part[req, c, t, h, col]
            out[req, t, h, col] = as_int16(f32_to_half(value, is_fp16))


def combine_launch(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    out4: torch.Tensor,
    lse3: torch.Tensor,
    sink: torch.Tensor | None,
) -> Launch:
    """The combine of pieces ``o_part`` / ``lse_part`` into ``out4`` / ``lse3``."""
    b, n_chunks, s_q, h_q = lse_part.shape
    assert n_chunks <= MAX_CHUNKS
    sink_arg = placeholder(out4.device, torch.float32, 1) if sink is None else array(sink)
    args = (
        array(o_part), array(lse_part), array(out4), array(lse3), sink_arg, sink is not None,
        out4.dtype == torch.float16,
    )  # fmt: skip
    return Launch(combine_kernel, (b * s_q, -(-h_q // HEADS)), THREADS, args)
