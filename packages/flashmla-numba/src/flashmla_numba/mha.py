"""Dense MHA prefill forward (varlen, bottom-right causal, GQA): the textbook flash-attention
forward, built from the same tile math as the MLA kernel (:mod:`.tiles`).

A CTA owns ``BLOCK_M`` consecutive queries of one sequence for one query head and walks that
sequence's keys in tiles of ``BLOCK_N`` (when causal, only up to the last key its last query
may see), reading K and V of the head's KV head (GQA: query head ``h`` uses KV head
``h // (h_q / h_kv)``). Query ``i`` of a sequence sees key ``j`` iff ``j < L_k`` and, when
causal, ``j <= i + L_k - L_q``. A query that sees no key gets out 0 and lse +inf.

The backward pass is not implemented here (the backend's spec leaves ``mha_backward`` out, so
gradients go to another backend): the readable backend covers the inference ops.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, float32

from flashmla.problems import MhaProblem

from .launch import (
    ATTENTION_THREADS,
    MIN_CTAS_PER_SM,
    Launch,
    array,
    device_function,
    kernel,
    run,
    scalar,
)
from .numerics import as_int16, f32_to_half, half_to_f32
from .tiles import (
    MICRO,
    add_scores,
    clear,
    pv_step,
    rescale_rows,
    score_block,
    scores_step,
    softmax_row,
    start_rows,
    tiling,
)

BLOCK_M = 32  # queries per CTA
BLOCK_N = 32  # keys per tile

NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)


@functools.cache
def mha_kernel(d_qk: int, d_v: int, is_fp16: bool):
    """The kernel for one (d_qk, d_v, dtype); its tiling is compile-time constant."""
    tl = tiling(ATTENTION_THREADS, BLOCK_M, BLOCK_N, d_qk, d_v, BLOCK_N)
    threads, chunk_d, k_stride, tiles_n = tl.threads, tl.chunk_d, tl.k_stride, tl.tiles_n
    rows_per_warp, cols_per_lane, dims_per_group = (
        tl.rows_per_warp, tl.cols_per_lane, tl.dims_per_group,
    )  # fmt: skip
    dim_groups, stage_size = tl.dim_groups, tl.stage_size
    q_shape, p_shape = (BLOCK_M, k_stride), (BLOCK_M, BLOCK_N + 1)
    acc_shape = (rows_per_warp, cols_per_lane)

    @device_function
    def store_half(dst, acc, i, lane):
        """Row ``i`` of a lane's accumulator -> its columns of output row ``dst``."""
        for c in range(cols_per_lane):
            dst[lane + 32 * c] = as_int16(f32_to_half(acc[i, c], is_fp16))

    @kernel(launch_bounds=(threads, MIN_CTAS_PER_SM))
    def mha_forward(q, k, v, cu_q, cu_k, out, lse, scale, causal):
        """q [total_q, h_q, d_qk], k [total_k, h_kv, d_qk], v [total_k, h_kv, d_v] and out
        [total_q, h_q, d_v]: 16-bit bits; lse [total_q, h_q] float32; cu_* [b + 1] offsets."""
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        m0 = cuda.blockIdx.x * BLOCK_M  # first query of this CTA within its sequence
        h = cuda.blockIdx.y
        seq = cuda.blockIdx.z
        q_start = cu_q[seq]
        len_q = cu_q[seq + 1] - q_start
        k_start = cu_k[seq]
        len_k = cu_k[seq + 1] - k_start
        if m0 >= len_q:
            return  # the whole CTA: no barrier is left waiting
        kv_head = h // (q.shape[1] // k.shape[1])
        offset = len_k - len_q  # causal: query i sees keys j <= i + offset
        hi = len_k
        if causal:  # keys beyond what the CTA's last query sees are never loaded
            hi = min(hi, m0 + BLOCK_M + offset)

        q_s = cuda.shared.array(q_shape, float32)
        kv_s = cuda.shared.array(stage_size, float32)
        p_s = cuda.shared.array(p_shape, float32)
        row_max = cuda.shared.array(BLOCK_M, float32)
        row_sum = cuda.shared.array(BLOCK_M, float32)
        row_alpha = cuda.shared.array(BLOCK_M, float32)
        start_rows(row_max, row_sum, BLOCK_M, tid, threads)
        acc = cuda.local.array(acc_shape, float32)
        clear(acc)
        tile_n, tile_m, dim0 = score_block(tid, tiles_n, BLOCK_M, dims_per_group)
        s_acc = cuda.local.array((MICRO, MICRO), float32)
        k_reg = cuda.local.array(MICRO, float32)
        v_reg = cuda.local.array(cols_per_lane, float32)

        for start in range(0, hi, BLOCK_N):
            # 1. S = Q K^T over chunks of dims (queries past the sequence and keys past its
            # end are staged as zeros).
            for i in range(MICRO):
                for j in range(MICRO):
                    s_acc[i, j] = ZERO
            for d0 in range(0, d_qk, chunk_d):
                for e in range(tid, BLOCK_M * chunk_d, threads):
                    r = e // chunk_d
                    d = e % chunk_d
                    value = ZERO
                    if m0 + r < len_q:
                        value = half_to_f32(q[q_start + m0 + r, h, d0 + d], is_fp16)
                    q_s[r, d] = value
                for e in range(tid, BLOCK_N * chunk_d, threads):
                    n = e // chunk_d
                    d = e % chunk_d
                    value = ZERO
                    if start + n < len_k:
                        value = half_to_f32(k[k_start + start + n, kv_head, d0 + d], is_fp16)
                    kv_s[n * k_stride + d] = value
                cuda.syncthreads()
                scores_step(q_s, kv_s, k_stride, s_acc, k_reg, tile_m * MICRO, tile_n * MICRO,
                            dim0, dims_per_group)  # fmt: skip
                cuda.syncthreads()
            for g in range(dim_groups):
                if dim0 == g * dims_per_group:
                    add_scores(p_s, s_acc, tile_m * MICRO, tile_n * MICRO, g == 0)
                cuda.syncthreads()

            # 2. Scale, mask, online softmax (one thread per row).
            for r in range(tid, BLOCK_M, threads):
                last = len_k - 1
                if causal:
                    last = min(last, m0 + r + offset)
                for n in range(BLOCK_N):
                    if start + n <= last:
                        p_s[r, n] *= scale
                    else:
                        p_s[r, n] = NEG_INF
                softmax_row(p_s, r, BLOCK_N, row_max, row_sum, row_alpha)
            cuda.syncthreads()

            # 3. O = alpha O + P V (the tile's value rows staged at once).
            rescale_rows(acc, row_alpha, warp * rows_per_warp)
            for e in range(tid, BLOCK_N * d_v, threads):
                n = e // d_v
                value = ZERO
                if start + n < len_k:
                    value = half_to_f32(v[k_start + start + n, kv_head, e % d_v], is_fp16)
                kv_s[e] = value
            cuda.syncthreads()
            pv_step(acc, p_s, kv_s, v_reg, warp * rows_per_warp, lane, 0, BLOCK_N)
            cuda.syncthreads()

        # 4. Epilogue: lse and 1 / l per row (one thread per row), then the outputs.
        cuda.syncthreads()  # (a CTA that ran no tile: the row statistics' init is visible)
        for r in range(tid, BLOCK_M, threads):
            if m0 + r < len_q:
                total = row_sum[r]
                empty = total == ZERO
                lse[q_start + m0 + r, h] = POS_INF if empty else row_max[r] + math.log(total)
                row_alpha[r] = ZERO if empty else ONE / total
        cuda.syncthreads()
        rescale_rows(acc, row_alpha, warp * rows_per_warp)
        for i in range(rows_per_warp):
            r = warp * rows_per_warp + i
            if m0 + r < len_q:
                store_half(out[q_start + m0 + r, h], acc, i, lane)

    return mha_forward


def mha_launches(p: MhaProblem, out: torch.Tensor, lse: torch.Tensor) -> list[Launch]:
    """The forward kernel's launch: grid (query tiles, h_q, sequences)."""
    _, h_q, d_qk = p.q.shape
    m_tiles = -(-p.max_seqlen_q // BLOCK_M)
    kern = mha_kernel(d_qk, p.v.shape[2], p.q.dtype == torch.float16)
    args = (
        array(p.q), array(p.k), array(p.v), array(p.cu_seqlens_q), array(p.cu_seqlens_k),
        array(out), array(lse), scalar(p.softmax_scale), p.causal,
    )  # fmt: skip
    return [Launch(kern, (m_tiles, h_q, p.batch), ATTENTION_THREADS, args)]


def mha_forward(p: MhaProblem) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = p.empty_outputs()
    if p.q.shape[0] > 0:
        run(mha_launches(p, out, lse), p.q.device)
    return out, lse
