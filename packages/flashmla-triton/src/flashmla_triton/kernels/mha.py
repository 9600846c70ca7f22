"""Triton kernels for dense MHA prefill (varlen, bottom-right causal, GQA): forward and backward.

Layout: ``q [total_q, h_q, d_qk]``, ``k [total_k, h_kv, d_qk]``, ``v [total_k, h_kv, d_v]`` with any
outer strides (last dim contiguous); sequence ``b`` owns rows ``cu[b]:cu[b+1]``. Causal means query
``i`` sees key ``j`` iff ``j <= i + (L_k - L_q)``. A query row that sees no key gets ``out = 0``
and ``lse = +inf`` (so ``exp(s - lse) = 0`` in the backward and its gradients are 0).

Design notes (why):
- The QK head dim is split into a power-of-two part ``D_A`` and an optional remainder ``D_B``
  (192 = 128 + 64): ``tl.arange`` needs powers of two and padding 192 to 256 would waste a third
  of the QK^T tensor-core work. ``S = Q_a K_a^T + Q_b K_b^T`` is two chained dots.
- Scores live in the log2 domain (``qk_scale = softmax_scale * log2(e)``, ``exp2``): one FMA per
  element instead of a multiply plus ``exp``.
- The KV loops (forward, dQ) run in two phases: tiles that need no mask at all, then the few on
  the causal diagonal / sequence end that do. The dK/dV query loop is a single loop with a scalar
  branch around the diagonal mask (see there why). Fully masked tiles are never visited (causal
  early exit).
- ``TMA`` (sm_90+): the K/V tiles of the forward and dQ loops and the Q/dO tiles of the dK/dV
  loop come through device-side tensor descriptors (TMA) built per program over the sequence's
  own rows instead of per-thread pointers: ~60 fewer registers (128-key forward tiles fit
  without spilling), no address arithmetic, and rows past the sequence end read zeros from the
  descriptor's bounds, never the next sequence's (or unused, possibly NaN) rows.
- ``UPCAST`` (chosen by the launcher, True under ``TRITON_INTERPRET=1``) converts every bf16/fp16
  tile to fp32 right after loading: the interpreter computes bf16 dots and elementwise ops on raw
  bits (silently wrong). On a GPU it is False and the dots take 16-bit operands (wgmma / mma).
- Rows past a sequence end are loaded as zeros (q, dO) / ``+inf`` (lse) so they contribute
  nothing; pointers are 64-bit at the row base so ``row * stride`` never overflows int32.
- The backward is deterministic: dQ per (Q block, head) in one kernel (which also computes
  ``delta = rowsum(dO * O) - dlse``), dK/dV per (KV block, KV head) in another that loops over the
  group's query heads itself (GQA needs no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_rows(base, offs_row, row_ok, stride_row, D: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr):  # fmt: skip
    """A ``[len(offs_row), D]`` tile of rows ``offs_row`` (row stride ``stride_row``) at ``base``;
    masked rows read 0."""
    ptrs = base + offs_row[:, None] * stride_row + tl.arange(0, D)[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _desc(base, rows, cols, stride, D: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """A TMA descriptor over one sequence's ``[rows, cols]`` slice at ``base`` (row stride
    ``stride``), loading ``[BLOCK, D]`` tiles: loads past its end read zeros, so no masks are
    needed. None without TMA."""
    if TMA:
        # an empty sequence issues no loads; 1 row keeps the tensor map well formed anyway
        d = tl.make_tensor_descriptor(base, shape=[tl.maximum(rows, 1), cols], strides=[stride, 1],
                                      block_shape=[BLOCK, D])  # fmt: skip
    else:
        d = None
    return d


@triton.jit
def _tile(desc, base, col, start, offs, ok, stride, D: tl.constexpr, MASKED: tl.constexpr,
          TMA: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """Rows ``start + offs``, columns ``col .. col + D`` of a sequence (``base``: its first row);
    rows where ``ok`` is False read 0 (with TMA the descriptor's bounds do that)."""
    if TMA:
        x = desc.load([start, col])
        if UPCAST:
            x = x.to(tl.float32)
    else:
        row = base + col + tl.cast(start, tl.int64) * stride
        x = _load_rows(row, offs, ok, stride, D, MASKED, UPCAST)
    return x


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q_a, q_b, k_base, v_base, kd_a, kd_b, vd, stride_kt, stride_vt, lo, hi,
    offs_m, L_k, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SCALE_NEG: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L_k
        k_a = _tile(kd_a, k_base, 0, start_n, offs_n, col_ok, stride_kt, D_A, MASKED, TMA, UPCAST)
        qk = tl.dot(q_a, tl.trans(k_a))
        if D_B > 0:
            k_b = _tile(kd_b, k_base, D_A, start_n, offs_n, col_ok, stride_kt, D_B, MASKED, TMA,
                        UPCAST)  # fmt: skip
            qk = tl.dot(q_b, tl.trans(k_b), qk)
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row that has seen no key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            # max of the raw scores, scaled afterwards: the exponent is then a single FMA
            if SCALE_NEG:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _tile(vd, v_base, 0, start_n, offs_n, col_ok, stride_vt, D_V, MASKED, TMA, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def mha_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lt, stride_lh,
    qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SCALE_NEG: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # grid (m blocks, h_q, b); m blocks are walked last-first so that under causal masking the
    # longest programs start first (less tail imbalance), consecutive programs share one head's
    # K/V in L2.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    L_q = tl.load(CU_Q + b + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= L_q:
        return
    k_start = tl.load(CU_K + b)
    L_k = tl.load(CU_K + b + 1) - k_start
    shift = L_k - L_q
    hk = h // GROUP

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    row_ok = offs_m < L_q
    q_base = Q + (q_start + m0).to(tl.int64) * stride_qt + h * stride_qh
    q_a = _load_rows(q_base, offs_r, row_ok, stride_qt, D_A, True, UPCAST)
    if D_B > 0:
        q_b = _load_rows(q_base + D_A, offs_r, row_ok, stride_qt, D_B, True, UPCAST)
    else:
        q_b = q_a  # unused placeholder
    k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    # descriptors bounded by this sequence and head: [L_k, d_qk] of K, [L_k, d_v] of V
    kd_a = _desc(k_base, L_k, D_A + D_B, stride_kt, D_A, BLOCK_N, TMA)
    kd_b = _desc(k_base, L_k, D_A + D_B, stride_kt, D_B, BLOCK_N, TMA and D_B > 0)
    vd = _desc(v_base, L_k, D_V, stride_vt, D_V, BLOCK_N, TMA)

    if CAUSAL:
        # keys < hi are visible to some row of the block, keys < full to all of them
        hi = tl.maximum(tl.minimum(L_k, m0 + BLOCK_M + shift), 0)
        full = tl.maximum(tl.minimum(L_k, m0 + 1 + shift), 0)
    else:
        hi = L_k
        full = L_k
    full = (full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q_a, q_b, k_base, v_base, kd_a, kd_b, vd, stride_kt, stride_vt, 0, full,
        offs_m, L_k, shift, qk_scale,
        False, CAUSAL, SCALE_NEG, D_A, D_B, D_V, BLOCK_N, TMA, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q_a, q_b, k_base, v_base, kd_a, kd_b, vd, stride_kt, stride_vt, full, hi,
        offs_m, L_k, shift, qk_scale,
        True, CAUSAL, SCALE_NEG, D_A, D_B, D_V, BLOCK_N, TMA, UPCAST,
    )  # fmt: skip

    # l == 0 exactly when the row saw no key: out 0, lse +inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    out = acc * (1.0 / l_safe)[:, None]
    o_base = O + (q_start + m0).to(tl.int64) * stride_ot + h * stride_oh
    o_ptrs = o_base + offs_r[:, None] * stride_ot + tl.arange(0, D_V)[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse_ptrs = LSE + (q_start + offs_m).to(tl.int64) * stride_lt + h * stride_lh
    tl.store(lse_ptrs, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward: dQ (and delta)


@triton.jit
def _dq_inner(
    dq_a, dq_b, q_a, q_b, do, lse2, delta, k_base, v_base, kd_a, kd_b, vd, stride_kt, stride_vt,
    lo, hi, offs_m, L_k, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L_k
        k_a = _tile(kd_a, k_base, 0, start_n, offs_n, col_ok, stride_kt, D_A, MASKED, TMA, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a))
        if D_B > 0:
            k_b = _tile(kd_b, k_base, D_A, start_n, offs_n, col_ok, stride_kt, D_B, MASKED, TMA,
                        UPCAST)  # fmt: skip
            s = tl.dot(q_b, tl.trans(k_b), s)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
            p = tl.where(keep, p, 0.0)
        v = _tile(vd, v_base, 0, start_n, offs_n, col_ok, stride_vt, D_V, MASKED, TMA, UPCAST)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a = tl.dot(ds, k_a, dq_a)
        if D_B > 0:
            dq_b = tl.dot(ds, k_b, dq_b)
    return dq_a, dq_b


@triton.jit
def mha_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_lt, stride_lh, stride_dlt, stride_dlh, stride_delh,
    stride_dqt, stride_dqh,
    sm_scale, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DLSE: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    L_q = tl.load(CU_Q + b + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= L_q:
        return
    k_start = tl.load(CU_K + b)
    L_k = tl.load(CU_K + b + 1) - k_start
    shift = L_k - L_q
    hk = h // GROUP

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    row_ok = offs_m < L_q
    rows64 = (q_start + m0).to(tl.int64)
    q_base = Q + rows64 * stride_qt + h * stride_qh
    q_a = _load_rows(q_base, offs_r, row_ok, stride_qt, D_A, True, UPCAST)
    if D_B > 0:
        q_b = _load_rows(q_base + D_A, offs_r, row_ok, stride_qt, D_B, True, UPCAST)
    else:
        q_b = q_a  # unused placeholder
    do = _load_rows(DO + rows64 * stride_dot + h * stride_doh, offs_r, row_ok, stride_dot, D_V,
                    True, UPCAST)  # fmt: skip
    o = _load_rows(O + rows64 * stride_ot + h * stride_oh, offs_r, row_ok, stride_ot, D_V, True,
                   UPCAST)  # fmt: skip
    # delta = rowsum(dO * O) - dlse: d lse / d s = P adds P * dlse to dS = P * (dP - delta)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tok = (q_start + offs_m).to(tl.int64)
    if HAS_DLSE:
        delta -= tl.load(DLSE + tok * stride_dlt + h * stride_dlh, mask=row_ok, other=0.0)
    tl.store(DELTA + h * stride_delh + tok, delta, mask=row_ok)
    # lse in log2 units; rows past the end read +inf so that P = 0 there
    lse2 = tl.load(LSE + tok * stride_lt + h * stride_lh, mask=row_ok, other=float("inf")) * LOG2E

    k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    # descriptors bounded by this sequence and head: [L_k, d_qk] of K, [L_k, d_v] of V
    kd_a = _desc(k_base, L_k, D_A + D_B, stride_kt, D_A, BLOCK_N, TMA)
    kd_b = _desc(k_base, L_k, D_A + D_B, stride_kt, D_B, BLOCK_N, TMA and D_B > 0)
    vd = _desc(v_base, L_k, D_V, stride_vt, D_V, BLOCK_N, TMA)
    if CAUSAL:
        hi = tl.maximum(tl.minimum(L_k, m0 + BLOCK_M + shift), 0)
        full = tl.maximum(tl.minimum(L_k, m0 + 1 + shift), 0)
    else:
        hi = L_k
        full = L_k
    full = (full // BLOCK_N) * BLOCK_N

    dq_a = tl.zeros([BLOCK_M, D_A], tl.float32)
    if D_B > 0:
        dq_b = tl.zeros([BLOCK_M, D_B], tl.float32)
    else:
        dq_b = dq_a  # unused placeholder
    dq_a, dq_b = _dq_inner(
        dq_a, dq_b, q_a, q_b, do, lse2, delta, k_base, v_base, kd_a, kd_b, vd, stride_kt,
        stride_vt, 0, full, offs_m, L_k, shift, qk_scale, False, CAUSAL, D_A, D_B, D_V, BLOCK_N, TMA, UPCAST,
    )  # fmt: skip
    dq_a, dq_b = _dq_inner(
        dq_a, dq_b, q_a, q_b, do, lse2, delta, k_base, v_base, kd_a, kd_b, vd, stride_kt,
        stride_vt, full, hi, offs_m, L_k, shift, qk_scale, True, CAUSAL, D_A, D_B, D_V, BLOCK_N, TMA, UPCAST,
    )  # fmt: skip

    dq_base = DQ + rows64 * stride_dqt + h * stride_dqh
    dq_ptrs = dq_base + offs_r[:, None] * stride_dqt + tl.arange(0, D_A)[None, :]
    tl.store(dq_ptrs, (dq_a * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if D_B > 0:
        dq_ptrs = dq_base + D_A + offs_r[:, None] * stride_dqt + tl.arange(0, D_B)[None, :]
        tl.store(dq_ptrs, (dq_b * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Backward: dK, dV


@triton.jit
def mha_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_lh, stride_delh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    sm_scale, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # grid (n blocks, h_kv, b); first KV blocks first (under causal they see the most queries)
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    k_start = tl.load(CU_K + b)
    L_k = tl.load(CU_K + b + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= L_k:
        return
    q_start = tl.load(CU_Q + b)
    L_q = tl.load(CU_Q + b + 1) - q_start
    shift = L_k - L_q

    offs_r = tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_r
    col_ok = offs_n < L_k
    k_rows64 = (k_start + n0).to(tl.int64)
    k_base = K + k_rows64 * stride_kt + hk * stride_kh
    k_a = _load_rows(k_base, offs_r, col_ok, stride_kt, D_A, True, UPCAST)
    if D_B > 0:
        k_b = _load_rows(k_base + D_A, offs_r, col_ok, stride_kt, D_B, True, UPCAST)
    else:
        k_b = k_a  # unused placeholder
    v = _load_rows(V + k_rows64 * stride_vt + hk * stride_vh, offs_r, col_ok, stride_vt, D_V, True,
                   UPCAST)  # fmt: skip

    if CAUSAL:
        # queries >= lo see some key of the block, queries >= mid see all of them (tiles
        # starting before mid get the causal mask)
        lo = tl.minimum(tl.maximum(n0 - shift, 0), L_q)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - shift, lo), L_q)
    else:
        lo = 0
        mid = 0
    n_tiles = tl.cdiv(L_q - lo, BLOCK_M)

    # q / dO of this sequence, all heads: [L_q, (h_q - 1) * stride_h + d] seen as 2-D, the head
    # picks the column (one descriptor per program, shared by the group's heads)
    q_seq = Q + q_start.to(tl.int64) * stride_qt
    do_seq = DO + q_start.to(tl.int64) * stride_dot
    q_cols = (hk * GROUP + GROUP - 1) * stride_qh + D_A + D_B
    do_cols = (hk * GROUP + GROUP - 1) * stride_doh + D_V
    qd_a = _desc(q_seq, L_q, q_cols, stride_qt, D_A, BLOCK_M, TMA)
    qd_b = _desc(q_seq, L_q, q_cols, stride_qt, D_B, BLOCK_M, TMA and D_B > 0)
    dod = _desc(do_seq, L_q, do_cols, stride_dot, D_V, BLOCK_M, TMA)

    dk_a = tl.zeros([BLOCK_N, D_A], tl.float32)
    if D_B > 0:
        dk_b = tl.zeros([BLOCK_N, D_B], tl.float32)
    else:
        dk_b = dk_a  # unused placeholder
    dv = tl.zeros([BLOCK_N, D_V], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    # One flat loop over (query head of the group, query tile): the group's heads are summed here
    # in a fixed order (deterministic, no atomics), and a single loop keeps ptxas from
    # serializing the wgmmas (C7515), which two loops or a nested head loop carrying the three
    # accumulators made it do. Transposed formulation: S^T = K Q^T is [BLOCK_N, BLOCK_M] so
    # dV += P^T dO and dK += dS^T Q need no transposed register tiles.
    for t in range(0, GROUP * n_tiles):
        if GROUP == 1:
            h = hk
            start_m = lo + t * BLOCK_M
        else:
            g = t // n_tiles
            h = hk * GROUP + g
            start_m = lo + (t - g * n_tiles) * BLOCK_M
        rows = start_m + offs_m
        row_ok = rows < L_q
        # rows past L_q read zeros (row masks or the descriptor's bounds) and lse = +inf: P = 0
        q_col = h * stride_qh
        q_a = _tile(qd_a, q_seq, q_col, start_m, offs_m, row_ok, stride_qt, D_A, True, TMA, UPCAST)
        s_t = tl.dot(k_a, tl.trans(q_a))
        if D_B > 0:
            q_b = _tile(qd_b, q_seq, q_col + D_A, start_m, offs_m, row_ok, stride_qt, D_B, True,
                        TMA, UPCAST)  # fmt: skip
            s_t = tl.dot(k_b, tl.trans(q_b), s_t)
        tok = (q_start + rows).to(tl.int64)
        lse = tl.load(LSE + tok * stride_lt + h * stride_lh, mask=row_ok, other=float("inf"))
        p_t = tl.math.exp2(s_t * qk_scale - (lse * LOG2E)[None, :])
        # causal diagonal: key j sees query i iff j <= i + shift (a compile-time branch around a
        # runtime one: kept apart so that non-causal kernels carry no test at all)
        if CAUSAL:  # noqa: SIM102
            if start_m < mid:
                p_t = tl.where(offs_n[:, None] <= rows[None, :] + shift, p_t, 0.0)
        do = _tile(dod, do_seq, h * stride_doh, start_m, offs_m, row_ok, stride_dot, D_V, True,
                   TMA, UPCAST)  # fmt: skip
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        delta = tl.load(DELTA + h * stride_delh + tok, mask=row_ok, other=0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        dk_a = tl.dot(ds_t, q_a, dk_a)
        if D_B > 0:
            dk_b = tl.dot(ds_t, q_b, dk_b)

    dk_base = DK + k_rows64 * stride_dkt + hk * stride_dkh
    dk_ptrs = dk_base + offs_r[:, None] * stride_dkt + tl.arange(0, D_A)[None, :]
    tl.store(dk_ptrs, (dk_a * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    if D_B > 0:
        dk_ptrs = dk_base + D_A + offs_r[:, None] * stride_dkt + tl.arange(0, D_B)[None, :]
        tl.store(dk_ptrs, (dk_b * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    dv_ptrs = (DV + k_rows64 * stride_dvt + hk * stride_dvh + offs_r[:, None] * stride_dvt
               + tl.arange(0, D_V)[None, :])  # fmt: skip
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
