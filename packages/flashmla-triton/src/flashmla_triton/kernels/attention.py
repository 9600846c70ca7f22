"""One Triton kernel for MLA attention over a cache: dense decode, sparse decode, sparse prefill.

MLA's key fact drives the layout: K and V share the latent row (V = the first 512 dims) and all
query rows of a *group* share the same keys, so a CTA stacks a group's queries as the M dimension
(dense: the ``s_q * h_q / h_kv`` rows of one KV head; sparse: the ``h_q`` heads of one query token)
and reads each key tile once for all of them. K is split into NoPE (512) and RoPE (64) parts so
every tile has power-of-two sizes, and the NoPE tile is also the V tile::

    S = Q_nope K_nope^T + Q_rope K_rope^T          [BLOCK_M, BLOCK_N]
    O = softmax(S) K_nope                          [BLOCK_M, 512]

Grid ``(m_tiles, groups_axis, parts)``. With ``PERSISTENT`` each program walks its part of the
split-KV schedule (``flashmla.scheduler`` metadata rows): whole requests write the final output,
split pieces write fp32 partials for the combine kernel. Without it, program ``part`` does all
of request ``part`` (sparse prefill: one "request" per query token).

Token sources: ``SPARSE=False`` reads logical tokens through the block table; ``SPARSE=True``
reads flat slots from an index list. Cache formats (``FMT``): 0 plain bf16/fp16 rows, 1 FP8 V3.2
(656-byte records), 2 FP8 MODEL1 (block-planar pages). Invalid tokens are masked loads (never a
memory access) and ``-inf`` scores.

Variants: ``TRANS`` swaps the roles of tokens and query rows (for h_q <= 32, so Hopper's
warpgroup MMA still applies); ``USE_TMA`` fetches whole tiles of plain page-contiguous caches
with bulk tensor copies. ``NOTES.md`` beside the package records what each measured.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

FMT_PLAIN, FMT_V32, FMT_MODEL1 = 0, 1, 2


@triton.jit
def _i64(x):
    """``x`` as int64 (works for loop counters, which the interpreter leaves as Python ints)."""
    return x + tl.zeros([], dtype=tl.int64)


@triton.jit
def round_to_bf16(x):
    """Round fp32 to the nearest bf16 value, ties to even, staying in fp32. The interpreter's own
    fp32 -> bf16 cast truncates; rounding first makes that truncation exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_float(raw, HW: tl.constexpr):
    """e4m3 bytes to fp32: the hardware conversion where it exists (sm_89+), else bit
    arithmetic (sign, 4-bit exponent with bias 7, 3-bit mantissa; 0x7F/0xFF are NaN)."""
    if HW:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    bits = raw.to(tl.uint32)
    expo = (bits >> 3) & 0xF
    mant = bits & 0x7
    sign = (bits & 0x80) << 24
    normal = (sign | ((expo + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    subnormal = (sign | 0x3F800000).to(tl.float32, bitcast=True) * mant.to(tl.float32) * 0.001953125
    value = tl.where(expo == 0, subnormal, normal)
    return tl.where((bits & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _dequantize(
    raw, scale, TILES: tl.constexpr, TILE: tl.constexpr, HW: tl.constexpr, UPCAST: tl.constexpr
):
    """``raw [N, TILES * TILE]`` e4m3 bytes times per-tile ``scale [N, TILES]``, as FlashMLA's
    Hopper kernels compute it: ``bf16(fp8) * bf16(scale)`` in bf16 (exact for power-of-two
    scales). The interpreter keeps fp32 (its bf16 arithmetic is wrong)."""
    n: tl.constexpr = raw.shape[0]
    values = e4m3_to_float(raw, HW).reshape(n, TILES, TILE)
    if UPCAST:
        return (values * scale.to(tl.bfloat16).to(tl.float32)[:, :, None]).reshape(n, TILES * TILE)
    values = values.to(tl.bfloat16) * scale.to(tl.bfloat16)[:, :, None]
    return values.reshape(n, TILES * TILE)


@triton.jit
def _load_keys(
    cache, page, row, valid, stride_page, stride_row, PAGE: tl.constexpr,
    FMT: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, UPCAST: tl.constexpr,
    FP8_HW: tl.constexpr,
):  # fmt: skip
    """The key tile of ``BLOCK_N`` tokens as ``(K_nope^T [512, N], K_rope^T [64, N], V [N, 512])``.

    ``page``/``row`` locate each token; invalid ones load zeros. FP8 tiles are dequantized here
    (``e4m3 * power-of-two scale`` is exact in bf16)."""
    cols = tl.arange(0, D_NOPE)
    m2 = valid[:, None]
    if FMT == 0:
        # Plain rows: Triton pipelines the tile straight into shared memory (cp.async).
        base = cache + page.to(tl.int64) * stride_page + row.to(tl.int64) * stride_row
        v = tl.load(base[:, None] + cols[None, :], mask=m2, other=0.0)
        k_t = tl.trans(v)  # one shared-memory tile serves both products
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        rope_t = k_t  # placeholder when there is no RoPE part (d_qk = 512)
        if D_ROPE > 0:
            rope_t = tl.load(
                base[None, :] + D_NOPE + tl.arange(0, D_ROPE)[:, None],
                mask=valid[None, :],
                other=0.0,
            )
            if UPCAST:
                rope_t = rope_t.to(tl.float32)
        return k_t, rope_t, v
    elif FMT == 1:
        # V3.2: 512 e4m3 values with one float32 scale per 128, then 64 bf16 RoPE values.
        rcols = tl.arange(0, D_ROPE)
        base = cache + page.to(tl.int64) * stride_page + row.to(tl.int64) * 656
        raw = tl.load(base[:, None] + cols[None, :], mask=m2, other=0)
        scale_ptr = (base + 512).to(tl.pointer_type(tl.float32))
        scale = tl.load(scale_ptr[:, None] + tl.arange(0, 4)[None, :], mask=m2, other=0.0)
        nope = _dequantize(raw, scale, 4, 128, FP8_HW, UPCAST)
        rope_ptr = (base + 528).to(tl.pointer_type(tl.bfloat16))
        k_rope = tl.load(rope_ptr[:, None] + rcols[None, :], mask=m2, other=0.0)
        if UPCAST:
            k_rope = k_rope.to(tl.float32)
        return tl.trans(nope), tl.trans(k_rope), nope
    else:
        # MODEL1: token records (448 e4m3 + 64 bf16) at page + row * 576, then the page's
        # 8-byte scale records (7 UE8M0 exponents, one per 64 values) at page + PAGE * 576 + row * 8.
        page_base = cache + page.to(tl.int64) * stride_page
        rec = page_base + row.to(tl.int64) * 576
        is_fp8 = cols[None, :] < 448
        raw = tl.load(rec[:, None] + cols[None, :], mask=m2 & is_fp8, other=0)
        scale_rec = page_base + PAGE * 576 + row.to(tl.int64) * 8
        expo = tl.load(scale_rec[:, None] + tl.arange(0, 8)[None, :], mask=m2, other=127)
        nope = _dequantize(raw, tl.exp2(expo.to(tl.float32) - 127.0), 8, 64, FP8_HW, UPCAST)
        rope_ptr = (rec + 448).to(tl.pointer_type(tl.bfloat16))
        rope = tl.load(
            rope_ptr[:, None] + (cols[None, :] - 448), mask=m2 & (cols[None, :] >= 448), other=0.0
        )
        if UPCAST:
            rope = rope.to(tl.float32)
        k_nope = tl.where(is_fp8, nope, rope)
        k_t = tl.trans(k_nope)
        return k_t, k_t, k_nope  # no separate RoPE part: d_qk = 512


@triton.jit
def _attend(
    acc, m_i, l_i, q_nope, q_rope, t_row, lo, hi,
    cache, stride_page, stride_row, num_pages, PAGE: tl.constexpr,
    slots, L, causal_base,
    SPARSE: tl.constexpr, FMT: tl.constexpr, CAUSAL: tl.constexpr,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr, UPCAST: tl.constexpr, FP8_HW: tl.constexpr, scale_log2,
    TRANS: tl.constexpr,
    USE_TMA: tl.constexpr = False, k_desc=None, r_desc=None, col=0,
):  # fmt: skip
    """Online softmax (base 2) over positions ``lo..hi`` of one token list; returns the state.

    ``TRANS`` computes the transposed problem (``S^T = K Q^T``, ``O^T += V^T P^T``) so that
    tokens, not query rows, are the MMA's M dimension: with few query rows (h_q = 16) this
    still gets Hopper's warpgroup MMA.

    Dense: position j is logical token j, found through the block-table row ``slots``; it exists
    when ``j < L`` and its page id is in range. Sparse: position p holds a flat slot
    ``slots[p]``, valid when ``p < L`` and ``0 <= slot < num_pages * PAGE``."""
    offs = tl.arange(0, BLOCK_N)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        pos = start + offs
        inside = pos < L
        if SPARSE:
            slot = tl.load(slots + pos, mask=inside, other=-1)
            valid = inside & (slot >= 0) & (slot < num_pages * PAGE)
            slot = tl.where(valid, slot, 0)
            page = slot // PAGE
            row = slot % PAGE
        elif PAGE % BLOCK_N == 0:  # the tile lies in one page: one scalar page id
            page = tl.load(slots + start // PAGE)
            page_ok = (page >= 0) & (page < num_pages)
            valid = inside & page_ok
            page = tl.where(page_ok, page, 0)
            row = start % PAGE + offs
        else:
            page = tl.load(slots + pos // PAGE, mask=inside, other=-1)
            valid = inside & (page >= 0) & (page < num_pages)
            page = tl.where(valid, page, 0)
            row = pos % PAGE
        if USE_TMA:
            # Bulk tensor copies of whole rows of one page; an invalid page reads past the
            # end of the cache view, which the copy engine fills with zeros.
            row0 = tl.where(page_ok, page, num_pages) * PAGE + start % PAGE
            v = k_desc.load([row0, col])
            k_rope = r_desc.load([row0, col + D_NOPE])
            if UPCAST:
                v = v.to(tl.float32)
                k_rope = k_rope.to(tl.float32)
            k_t = tl.trans(v)
            rope_t = tl.trans(k_rope)
        else:
            k_t, rope_t, v = _load_keys(
                cache, page, row, valid, stride_page, stride_row, PAGE, FMT, D_NOPE, D_ROPE,
                UPCAST, FP8_HW,
            )  # fmt: skip
        if TRANS:  # q_nope is Q^T [512, M], acc is O^T [512, M]
            s = tl.dot(v, q_nope)
            if D_ROPE > 0:
                s = tl.dot(tl.trans(rope_t), q_rope, s)
            s = s * scale_log2
            sees = valid[:, None]
            if CAUSAL:  # bottom-right: query token t sees j <= L - s_q + t
                sees = sees & (pos[:, None] <= causal_base + t_row[None, :])
            s = tl.where(sees, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha[None, :]
            acc = tl.dot(k_t, p.to(v.dtype), acc)
        else:
            s = tl.dot(q_nope, k_t)
            if D_ROPE > 0:
                s = tl.dot(q_rope, rope_t, s)
            s = s * scale_log2
            sees = valid[None, :]
            if CAUSAL:  # bottom-right: query token t sees j <= L - s_q + t
                sees = sees & (pos[None, :] <= causal_base + t_row[:, None])
            s = tl.where(sees, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_rows(
    q_rows,
    row_ok,
    start: tl.constexpr,
    width: tl.constexpr,
    TRANS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Columns ``start .. start + width`` of the queries: ``[M, width]``, or ``[width, M]``
    when ``TRANS``."""
    cols = start + tl.arange(0, width)
    if TRANS:
        x = tl.load(q_rows[None, :] + cols[:, None], mask=row_ok[None, :], other=0.0)
    else:
        x = tl.load(q_rows[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_partial(o_acc, lse_acc, slot, t_row, head, row_ok, acc, m_i, l_i,
                   stride_ab, stride_at, stride_ah, D_V: tl.constexpr):  # fmt: skip
    """One piece of a split request: fp32 output normalised by its own sum, base-2 lse."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    rows = _i64(slot) * stride_ab + t_row.to(tl.int64) * stride_at + head.to(tl.int64) * stride_ah
    tl.store(o_acc + rows[:, None] * D_V + tl.arange(0, D_V)[None, :], o, mask=row_ok[:, None])
    tl.store(lse_acc + rows, lse2, mask=row_ok)


@triton.jit
def _store_final(out, lse, max_logits, sink, r, t_row, head, row_ok, acc, m_i, l_i,
                 stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                 HAS_SINK: tl.constexpr, HAS_MAX_LOGITS: tl.constexpr, D_V: tl.constexpr,
                 UPCAST: tl.constexpr):  # fmt: skip
    """A whole request: output (sink applied) in the output dtype, natural lse (+inf if empty)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))
    if HAS_SINK:  # out / (1 + exp(sink - lse)); lse itself is not changed
        sink_h = tl.load(sink + head, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        o = o / (1.0 + tl.exp2(sink_h - lse2))[:, None]
    o = tl.where(empty[:, None], 0.0, o)
    if UPCAST and out.dtype.element_ty == tl.bfloat16:
        o = round_to_bf16(o)
    out_rows = _i64(r) * stride_ob + t_row.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    tl.store(
        out + out_rows[:, None] + tl.arange(0, D_V)[None, :],
        o.to(out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse_rows = _i64(r) * stride_lb + t_row.to(tl.int64) * stride_lt + head.to(tl.int64) * stride_lh
    tl.store(lse + lse_rows, tl.where(empty, float("inf"), lse2 * 0.6931471805599453), mask=row_ok)
    if HAS_MAX_LOGITS:
        tl.store(
            max_logits + lse_rows,
            tl.where(empty, float("-inf"), m_i * 0.6931471805599453),
            mask=row_ok,
        )


@triton.jit
def mla_attention_kernel(
    # queries [b, s_q, h_q, d] and outputs
    q, stride_qb, stride_qt, stride_qh,
    out, stride_ob, stride_ot, stride_oh,
    lse, stride_lb, stride_lt, stride_lh,
    max_logits,
    o_acc, lse_acc, stride_ab, stride_at, stride_ah,
    # the cache and its token list (block table or indices)
    cache, stride_page, stride_row, stride_head, num_pages, k_desc, r_desc,
    slots, stride_sb, stride_st, seqlens, list_len,
    # optional extra cache (sparse)
    cache2, stride2_page, stride2_row, num_pages2,
    slots2, stride2_sb, stride2_st, seqlens2, list_len2,
    sink,
    # schedule
    metadata, num_splits,
    # sizes
    s_q, group, rows_per_group, scale_log2,
    PAGE: tl.constexpr, PAGE2: tl.constexpr,
    SPARSE: tl.constexpr, FMT: tl.constexpr, CAUSAL: tl.constexpr, PERSISTENT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_LENGTHS2: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_MAX_LOGITS: tl.constexpr,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, UPCAST: tl.constexpr,
    FP8_HW: tl.constexpr, TRANS: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)  # dense: KV head; sparse: query token t
    part = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_group
    if SPARSE:  # one query token's heads; one KV head
        t_row = pid_g + rows * 0
        head = rows
        cache_h = cache
    else:  # the s_q * group rows of KV head pid_g: row = t * group + local head
        t_row = rows // group
        head = pid_g * group + rows % group
        cache_h = cache + pid_g.to(tl.int64) * stride_head
    BIG: tl.constexpr = 1 << 24
    if PERSISTENT:
        row_md = metadata + part * 8
        begin_req = tl.load(row_md)
        end_req = tl.load(row_md + 1)
        begin_blk = tl.load(row_md + 2)
        end_blk = tl.load(row_md + 3)
        begin_split = tl.load(row_md + 4)
        first_split = tl.load(row_md + 5)
        last_split = tl.load(row_md + 6)
    else:
        begin_req = part
        end_req = part
        begin_blk = 0
        end_blk = BIG
        begin_split = 0
        first_split = 0
        last_split = 0

    for r in range(begin_req, end_req + 1):
        # The request's queries.
        q_rows = (
            q + _i64(r) * stride_qb + t_row.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
        )
        q_nope = _load_rows(q_rows, row_ok, 0, D_NOPE, TRANS, UPCAST)
        q_rope = q_nope
        if D_ROPE > 0:
            q_rope = _load_rows(q_rows, row_ok, D_NOPE, D_ROPE, TRANS, UPCAST)
        if TRANS:
            acc = tl.zeros([D_V, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        blk_lo = tl.where(r == begin_req, begin_blk, 0)
        blk_hi = tl.where(r == end_req, end_blk, BIG)
        if SPARSE:
            length = list_len
            if HAS_LENGTHS:
                length = tl.minimum(tl.maximum(tl.load(seqlens + r), 0), list_len)
            main_blocks = (tl.maximum(length, 1) + 63) // 64
            row_slots = slots + _i64(r) * stride_sb + pid_g.to(tl.int64) * stride_st
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q_nope, q_rope, t_row, blk_lo * 64,
                tl.minimum(tl.minimum(blk_hi, main_blocks) * 64, length),
                cache, stride_page, stride_row, num_pages, PAGE, row_slots, length, 0,
                True, FMT, False, D_NOPE, D_ROPE, BLOCK_N, NUM_STAGES, UPCAST, FP8_HW, scale_log2,
                TRANS,
            )  # fmt: skip
            if HAS_EXTRA:
                length2 = list_len2
                if HAS_LENGTHS2:
                    length2 = tl.minimum(tl.maximum(tl.load(seqlens2 + r), 0), list_len2)
                row_slots2 = slots2 + _i64(r) * stride2_sb + pid_g.to(tl.int64) * stride2_st
                lo2 = tl.maximum(blk_lo - main_blocks, 0) * 64
                hi2 = tl.minimum((blk_hi - main_blocks) * 64, length2)
                acc, m_i, l_i = _attend(
                    acc, m_i, l_i, q_nope, q_rope, t_row, lo2, hi2,
                    cache2, stride2_page, stride2_row, num_pages2, PAGE2, row_slots2, length2, 0,
                    True, FMT, False, D_NOPE, D_ROPE, BLOCK_N, NUM_STAGES, UPCAST, FP8_HW, scale_log2,
                    TRANS,
                )  # fmt: skip
        else:
            length = tl.minimum(tl.maximum(tl.load(seqlens + r), 0), list_len * PAGE)
            row_table = slots + _i64(r) * stride_sb
            lo = blk_lo * 64
            hi = tl.minimum(blk_hi * 64, length)
            # Tiles every query row sees in full need neither the length mask nor the causal
            # one (only the last s_q - 1 tokens are causally masked) and may use bulk copies;
            # the rest, at most a tile or two, goes through masked loads.
            seen_by_all = length - s_q + 1 if CAUSAL else length
            split = tl.maximum(tl.minimum(seen_by_all // BLOCK_N * BLOCK_N, hi), lo)
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q_nope, q_rope, t_row, lo, split,
                cache_h, stride_page, stride_row, num_pages, PAGE, row_table, length, 0,
                False, FMT, False, D_NOPE, D_ROPE, BLOCK_N, NUM_STAGES, UPCAST, FP8_HW, scale_log2,
                TRANS, USE_TMA, k_desc, r_desc, pid_g * stride_head,
            )  # fmt: skip
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q_nope, q_rope, t_row, split, hi,
                cache_h, stride_page, stride_row, num_pages, PAGE, row_table, length, length - s_q,
                False, FMT, CAUSAL, D_NOPE, D_ROPE, BLOCK_N, NUM_STAGES, UPCAST, FP8_HW, scale_log2,
                TRANS,
            )  # fmt: skip

        # Epilogue: the whole request's result, or one piece of a split request.
        if TRANS:
            acc = tl.trans(acc)
        if PERSISTENT:
            split = ((r == begin_req) & (first_split != 0)) | ((r == end_req) & (last_split != 0))
            if split:
                slot = tl.load(num_splits + r) + tl.where(r == begin_req, begin_split, 0)
                _store_partial(o_acc, lse_acc, slot, t_row, head, row_ok, acc, m_i, l_i,
                               stride_ab, stride_at, stride_ah, D_V)  # fmt: skip
            else:
                _store_final(out, lse, max_logits, sink, r, t_row, head, row_ok, acc, m_i, l_i,
                             stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                             HAS_SINK, HAS_MAX_LOGITS, D_V, UPCAST)  # fmt: skip
        else:
            _store_final(out, lse, max_logits, sink, r, t_row, head, row_ok, acc, m_i, l_i,
                         stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                         HAS_SINK, HAS_MAX_LOGITS, D_V, UPCAST)  # fmt: skip
