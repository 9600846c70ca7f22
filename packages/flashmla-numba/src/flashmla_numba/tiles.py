"""The flash-attention tile math both attention kernels share (device functions).

A CTA keeps, per query row it owns, a running max ``m`` and sum ``l`` of its softmax and an
fp32 output accumulator ``O``. For every tile of keys:

1. ``S = Q K^T``: :func:`scores_step` over chunks of dims staged in shared memory (``q_s``,
   ``k_s``); each thread owns a ``MICRO x MICRO`` block of scores over a slice of the dims,
   and the slices are added into ``p_s`` by :func:`add_scores`;
2. the kernel scales and masks ``p_s`` (``-inf`` = not visible), then :func:`softmax_row`
   turns each row into ``P = exp(S - m_new)`` and records ``alpha = exp(m_old - m_new)``;
3. ``O = alpha O + P V``: :func:`rescale_rows`, then :func:`pv_step` over values staged in
   ``v_s``; a warp owns a few rows, a lane the columns ``lane, lane + 32, ...`` of them.

Register blocking is what makes fp32 math affordable: every value a thread loads from shared
memory feeds several multiply-adds (4 in ``S``, and all of a warp's rows in ``O``), and the
loads of a warp either hit 32 different banks or broadcast one address. The accumulators are
small local arrays whose loops have compile-time trip counts: inlined into the kernel they
stay in registers.
"""

from __future__ import annotations

import math

import numpy as np

from .launch import device_function

MICRO = 4  # a thread of S = Q K^T owns a MICRO x MICRO block of scores
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)


@device_function
def scores_step(q_s, k_s, s_acc, k_reg, row0, key0, dim0, dims):
    """``s_acc[i, j] += q_s[row0 + i, d] * k_s[key0 + j, d]`` for ``d`` in
    ``[dim0, dim0 + dims)``: one thread's 4 x 4 block of scores over its slice of a chunk."""
    for d in range(dim0, dim0 + dims):
        for j in range(MICRO):
            k_reg[j] = k_s[key0 + j, d]
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
def rescale_rows(acc, row_alpha, row0):
    """``O *= alpha`` for the accumulator rows ``row0, row0 + 1, ...`` of one lane."""
    for i in range(acc.shape[0]):
        alpha = row_alpha[row0 + i]
        for c in range(acc.shape[1]):
            acc[i, c] *= alpha


@device_function
def pv_step(acc, p_s, v_s, v_reg, row0, lane, key0, n_keys):
    """``acc[i, c] += p_s[row0 + i, key0 + n] * v_s[n, lane + 32 c]`` for ``n < n_keys``: each
    value row is loaded once (32 lanes, 32 banks) and used for all of the warp's rows, whose
    probabilities every lane reads at the same address (a broadcast)."""
    for n in range(n_keys):
        for c in range(acc.shape[1]):
            v_reg[c] = v_s[n, lane + 32 * c]
        for i in range(acc.shape[0]):
            prob = p_s[row0 + i, key0 + n]
            for c in range(acc.shape[1]):
                acc[i, c] += prob * v_reg[c]
