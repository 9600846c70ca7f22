"""The flash-attention tile math both attention kernels share (device functions).

A CTA keeps, per query row it owns, a running max ``m`` and sum ``l`` of its softmax and an
fp32 output accumulator ``O``. For every tile of keys:

1. ``S = Q K^T``: the CTA stages a chunk of the query and key dims in shared memory (``q_s`` and
   the staging buffer ``kv_s``) and :func:`scores_step` multiplies it; each thread owns a
   ``MICRO x MICRO`` block of scores over a slice of the chunk's dims, and the slices are summed
   into ``p_s`` by :func:`add_scores`;
2. the kernel scales and masks ``p_s`` (``-inf`` = not visible), then :func:`softmax_row`
   turns each row into ``P = exp(S - m_new)`` and records ``alpha = exp(m_old - m_new)``;
3. ``O = alpha O + P V``: :func:`rescale_rows`, then :func:`pv_step` over value rows staged in
   ``kv_s`` (which keys and values take turns to use); a warp owns a few rows, a lane the
   columns ``lane, lane + 32, ...`` of them.

Register blocking is what makes fp32 math affordable: every value a thread loads from shared
memory feeds several multiply-adds (4 in ``S``, and all of a warp's rows in ``O``), and the
loads of a warp either hit 32 different banks or broadcast one address. The accumulators are
small local arrays indexed only by loops with compile-time trip counts: inlined into the
kernel, those loops unroll and the arrays live in registers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .launch import device_function

MICRO = 4  # a thread of S = Q K^T owns a MICRO x MICRO block of scores
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
SHARED_BUDGET = 44 * 1024  # bytes for q_s, kv_s and p_s (numba's static limit is 48 KiB)


class Tiling(NamedTuple):
    """How a CTA of ``threads`` threads splits the work of one tile (compile-time constants)."""

    threads: int
    block_m: int  # query rows of the CTA
    block_n: int  # keys per tile
    chunk_d: int  # query/key dims staged per step of S = Q K^T
    v_tokens: int  # value rows staged per step of O += P V
    rows_per_warp: int  # O: rows of one warp
    cols_per_lane: int  # O: columns of one lane (d_v / 32)
    tiles_n: int  # S: MICRO-wide blocks of keys
    dim_groups: int  # S: threads sharing one block of scores, each summing a slice of dims
    dims_per_group: int
    k_stride: int  # kv_s row stride when it holds keys (chunk_d + 1: no bank conflicts)
    stage_size: int  # floats of kv_s: a chunk of keys or v_tokens rows of values

    def shared_bytes(self) -> int:
        return 4 * (
            self.block_m * self.k_stride + self.stage_size + self.block_m * (self.block_n + 1)
        )


def tiling(threads: int, block_m: int, block_n: int, d_qk: int, d_v: int, v_tokens: int) -> Tiling:
    """The tiling of a kernel variant: the widest dim chunk (a divisor of ``d_qk``) whose
    buffers fit the shared-memory budget. Wider chunks mean fewer barriers per tile."""
    warps = threads // 32
    score_tiles = (block_m // MICRO) * (block_n // MICRO)
    dim_groups = threads // score_tiles
    assert block_m % warps == 0 and threads % score_tiles == 0 and d_v % 32 == 0
    best = None
    for chunk in range(dim_groups, d_qk + 1, dim_groups):
        if d_qk % chunk:
            continue
        stage = max(block_n * (chunk + 1), v_tokens * d_v)
        t = Tiling(
            threads, block_m, block_n, chunk, v_tokens, block_m // warps, d_v // 32,
            block_n // MICRO, dim_groups, chunk // dim_groups, chunk + 1, stage,
        )  # fmt: skip
        if t.shared_bytes() <= SHARED_BUDGET:
            best = t
    assert best is not None, "no dim chunk fits in shared memory"
    return best


@device_function
def start_rows(row_max, row_sum, n_rows, tid, threads):
    """A fresh online softmax for rows ``[0, n_rows)`` (``m = -inf``, ``l = 0``), the CTA's
    threads sharing the rows."""
    for r in range(tid, n_rows, threads):
        row_max[r] = NEG_INF
        row_sum[r] = ZERO


@device_function
def clear(acc):
    """``O = 0`` for one lane's accumulator."""
    for i in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            acc[i, c] = ZERO


@device_function
def score_block(tid, tiles_n, block_m, dims_per_group):
    """The block of ``S`` thread ``tid`` computes: (its key block, its row block, the first dim
    of its slice of each chunk)."""
    tile_n = tid % tiles_n
    tile_m = tid // tiles_n % (block_m // MICRO)
    dim0 = tid // (tiles_n * (block_m // MICRO)) * dims_per_group
    return tile_n, tile_m, dim0


@device_function
def scores_step(q_s, kv_s, k_stride, s_acc, k_reg, row0, key0, dim0, dims):
    """``s_acc[i, j] += q_s[row0 + i, d] * K[key0 + j, d]`` for ``d`` in ``[dim0, dim0 +
    dims)``, with key ``n``'s dim ``d`` at ``kv_s[n * k_stride + d]``: one thread's block of
    scores over its slice of a chunk. Each loaded value feeds 4 multiply-adds."""
    for d in range(dim0, dim0 + dims):
        for j in range(MICRO):
            k_reg[j] = kv_s[(key0 + j) * k_stride + d]
        for i in range(MICRO):
            qv = q_s[row0 + i, d]
            for j in range(MICRO):
                s_acc[i, j] += qv * k_reg[j]


@device_function
def add_scores(p_s, s_acc, row0, key0, first):
    """Store (``first``) or add one thread's block of partial scores into ``p_s``."""
    for i in range(MICRO):
        for j in range(MICRO):
            if first:
                p_s[row0 + i, key0 + j] = s_acc[i, j]
            else:
                p_s[row0 + i, key0 + j] += s_acc[i, j]


@device_function
def softmax_row(p_s, r, n_keys, row_max, row_sum, row_alpha):
    """Online-softmax update of row ``r`` with the tile's ``n_keys`` scaled scores (``-inf``
    where masked): ``p_s[r, :] = exp(S - m_new)``, ``l = alpha l + sum(P)`` and
    ``row_alpha[r] = alpha = exp(m_old - m_new)`` for rescaling the row's output."""
    m_old = row_max[r]
    m_new = m_old
    for n in range(n_keys):
        m_new = max(m_new, p_s[r, n])
    # A row that has seen no key yet keeps max -inf: subtract 0 instead (exp(-inf) = 0, no NaN).
    m_use = m_new if m_new != NEG_INF else ZERO
    alpha = math.exp(m_old - m_use)
    total = ZERO
    for n in range(n_keys):
        prob = math.exp(p_s[r, n] - m_use)
        p_s[r, n] = prob
        total += prob
    row_max[r] = m_new
    row_sum[r] = row_sum[r] * alpha + total
    row_alpha[r] = alpha


@device_function
def rescale_rows(acc, row_factor, row0):
    """``O[i] *= row_factor[row0 + i]`` for the accumulator rows of one lane."""
    for i in range(acc.shape[0]):
        factor = row_factor[row0 + i]
        for c in range(acc.shape[1]):
            acc[i, c] *= factor


@device_function
def pv_step(acc, p_s, kv_s, v_reg, row0, lane, key0, n_keys):
    """``acc[i, c] += P[row0 + i, key0 + n] * V[n, lane + 32 c]`` for ``n < n_keys``, with
    value row ``n`` at ``kv_s[n * d_v:]``. Each value is loaded once (32 lanes, 32 banks) for
    all of the warp's rows, whose probabilities every lane reads at one address (broadcast)."""
    d_v = 32 * acc.shape[1]
    for n in range(n_keys):
        for c in range(acc.shape[1]):
            v_reg[c] = kv_s[n * d_v + lane + 32 * c]
        for i in range(acc.shape[0]):
            prob = p_s[row0 + i, key0 + n]
            for c in range(acc.shape[1]):
                acc[i, c] += prob * v_reg[c]
