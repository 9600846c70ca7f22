"""MLA attention in one numba kernel: dense decode, sparse decode and sparse prefill.

The algorithm, for one CTA:

* **Work.** A CTA owns ``BLOCK_M`` query rows that read the same keys (dense: the ``s_q * h_q /
  h_kv`` rows of one KV head; sparse: the ``h_q`` heads of one query token) and one *piece* of
  one request: a contiguous range of its candidate keys. Short requests are one piece; long
  ones are cut into several pieces run by different CTAs (split-KV) and merged afterwards by
  :mod:`.combine`. Grid: ``(m_tiles * b * n_chunks, groups)``.
* **MLA's trick.** K and V are the same cache row (V = its first 512 dims), and all the CTA's
  rows share it, so each key tile is read from memory once for all ``BLOCK_M`` rows.
* **Online softmax over tiles of ``BLOCK_N`` keys.** For each tile: find where its keys live
  (page table or flat indices; invalid ones are masked), compute the scores ``S = Q K^T``,
  update every row's running max ``m`` and sum ``l`` (rescaling what was accumulated by
  ``alpha = exp(m_old - m_new)``), then accumulate ``O += P V``. At the end
  ``out = O / l`` and ``lse = m + log(l)``.

Math is fp32 on CUDA cores. Both products are register-tiled from shared memory: for
``S = Q K^T`` each thread owns a 4 x 4 block of scores over a slice of the dims (the slices'
partial sums are added in shared memory), for ``O += P V`` each warp owns a few rows and each
lane 16 of their 512 output columns. Shared memory holds fp32 copies of a chunk of the query and
key dims at a time (144 or 192 of the 576; 48 KiB of static shared memory decides), then of 8
value rows at a time in the same buffer: FP8 keys are dequantized while being copied.

Everything is in fp32 once staged; the differences to FlashMLA's own kernels are that P is not
rounded to bf16 before ``P V`` and exponentials are natural (both only change rounding).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, float32, int32

from flashmla.formats import CacheFormat
from flashmla.problems import DenseDecodeProblem, SparseDecodeProblem, SparsePrefillProblem

from . import SIM
from .combine import MAX_CHUNKS, combine_launch
from .launch import (
    ATTENTION_THREADS,
    MIN_CTAS_PER_SM,
    Launch,
    array,
    device_function,
    kernel,
    placeholder,
    run,
    scalar,
    sm_count,
)
from .numerics import (
    as_int16,
    bf16_to_f32,
    e4m3_to_f32,
    f32_to_half,
    half_to_f32,
    int_as_float,
    round_to_bf16,
)
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

BLOCK_N = 32  # keys per tile
V_TOKENS = 8  # value rows staged per step of O += P V (all 512 columns at once)
D_V = 512

FMT_PLAIN, FMT_V32, FMT_MODEL1 = 0, 1, 2
FMT_CODE = {
    CacheFormat.BF16: FMT_PLAIN,
    CacheFormat.FP16: FMT_PLAIN,
    CacheFormat.FP8_V32: FMT_V32,
    CacheFormat.FP8_MODEL1: FMT_MODEL1,
}
# FP8 token records: (bytes per token record, quantized NoPE dims, dims per scale, RoPE offset)
V32_RECORD, V32_NOPE, V32_TILE, V32_ROPE_AT = 656, 512, 128, 528
MODEL1_RECORD, MODEL1_NOPE, MODEL1_TILE, MODEL1_ROPE_AT = 576, 448, 64, 448
MAX_SCALES = 8  # scale slots per key (V3.2 uses 4, MODEL1 7)

NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)

# Splitting requests into pieces (split-KV): aim for this many CTAs per SM, never cut a piece
# below MIN_PIECE keys (each piece costs a partial result and a share of the combine).
WAVES = 3
MIN_PIECE = 64 if SIM else 256


@functools.cache
def mla_kernel(fmt: int, is_fp16: bool, sparse: bool, block_m: int, d_qk: int):
    """The kernel for one variant. Everything here is a compile-time constant of the kernel
    (numba freezes closure variables), so untaken format and mode branches compile away."""
    tl = tiling(ATTENTION_THREADS, block_m, BLOCK_N, d_qk, D_V, V_TOKENS)
    threads, chunk_d, rows_per_warp, dims_per_group = (
        tl.threads, tl.chunk_d, tl.rows_per_warp, tl.dims_per_group,
    )  # fmt: skip
    k_stride, tiles_n, dim_groups = tl.k_stride, tl.tiles_n, tl.dim_groups
    # shared and local array shapes (numba needs them as constants)
    q_shape, p_shape = (block_m, k_stride), (block_m, BLOCK_N + 1)
    scale_shape, acc_shape = (BLOCK_N, MAX_SCALES), (rows_per_warp, tl.cols_per_lane)
    stage_size, cols_per_lane = tl.stage_size, tl.cols_per_lane
    if fmt == FMT_V32:
        record, nope, scale_tile, rope_at = V32_RECORD, V32_NOPE, V32_TILE, V32_ROPE_AT
    else:
        record, nope, scale_tile, rope_at = MODEL1_RECORD, MODEL1_NOPE, MODEL1_TILE, MODEL1_ROPE_AT

    @device_function
    def read_scales(src, page_id, row, page_size, key_scale, n):
        """Dequantization scales of one FP8 key -> ``key_scale[n, :]`` (read once per tile)."""
        if fmt == FMT_V32:  # 4 float32 after the 512 e4m3 bytes; kernels use bf16(scale)
            at = row * record + nope
            for k in range(4):
                b = at + 4 * k
                bits = (
                    int(src[page_id, b])
                    | (int(src[page_id, b + 1]) << 8)
                    | (int(src[page_id, b + 2]) << 16)
                    | (int(src[page_id, b + 3]) << 24)
                )
                key_scale[n, k] = round_to_bf16(int_as_float(bits))
        elif fmt == FMT_MODEL1:  # 7 UE8M0 exponents after the page's token records
            at = page_size * record + row * 8
            for k in range(7):
                key_scale[n, k] = int_as_float(int(src[page_id, at + k]) << 23)

    @device_function
    def stored_value(src, page_id, row, head, key_scale, n, d):
        """Dim ``d`` of the key stored at (``page_id``, ``row``) of cache ``src``, as fp32."""
        if fmt == FMT_PLAIN:
            return half_to_f32(src[page_id, row, head, d], is_fp16)
        at = row * record
        if d < nope:  # bf16(e4m3) * bf16(scale), rounded to bf16 as FlashMLA computes it
            return round_to_bf16(e4m3_to_f32(src[page_id, at + d]) * key_scale[n, d // scale_tile])
        at += rope_at + 2 * (d - nope)  # RoPE dims: raw bf16, little-endian
        return bf16_to_f32(int(src[page_id, at]) | (int(src[page_id, at + 1]) << 8))

    @device_function
    def key_value(cache, cache2, key_page, key_row, key_list, key_scale, head, n, d):
        """Dim ``d`` of key ``n`` of the current tile (0 for an invalid key, so that NaN
        padding in the cache can never reach the products)."""
        page_id = key_page[n]
        if page_id < 0:
            return ZERO
        if key_list[n] == 0:
            return stored_value(cache, page_id, key_row[n], head, key_scale, n, d)
        return stored_value(cache2, page_id, key_row[n], head, key_scale, n, d)

    @device_function
    def token_and_head(r, group_id, group):
        """Query token and head of row ``r`` of a group (see the module docstring)."""
        if sparse:
            return group_id, r
        return r // group, group_id * group + r % group

    @device_function
    def store_half(dst, acc, i, lane):
        """Row ``i`` of a lane's accumulator -> its columns of output row ``dst`` (16 bits)."""
        for c in range(cols_per_lane):
            dst[lane + 32 * c] = as_int16(f32_to_half(acc[i, c], is_fp16))

    @device_function
    def store_f32(dst, acc, i, lane):
        """Row ``i`` of a lane's accumulator -> its columns of partial-output row ``dst``."""
        for c in range(cols_per_lane):
            dst[lane + 32 * c] = acc[i, c]

    @kernel(launch_bounds=(threads, MIN_CTAS_PER_SM))
    def mla_attention(
        q, out, lse, max_logits, o_part, lse_part,
        cache, slots, lengths, cache2, slots2, lengths2, sink,
        page, num_pages, page2, num_pages2, group, rows, scale,
        causal, has_lengths, has_extra, has_lengths2, has_sink, write_max, m_tiles, chunk_len,
    ):  # fmt: skip
        """q [b, s_q, h_q, d] and out [b, s_q, h_q, 512]: 16-bit bits; lse / max_logits
        [b, s_q, h_q]; o_part [b, n_chunks, s_q, h_q, 512] / lse_part [b, n_chunks, s_q, h_q]:
        partial results of split requests. Dense: slots = block table [b, width], lengths =
        cache_seqlens. Sparse: slots = indices [b, s_q, topk] of flat slots, lengths =
        topk_length, cache2 / slots2 / lengths2 the extra cache. FP8 caches are byte arrays
        [pages, page bytes]; plain caches [pages, page, h_kv, d]."""
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        n_chunks = lse_part.shape[1]
        m_tile = cuda.blockIdx.x % m_tiles
        req = cuda.blockIdx.x // m_tiles // n_chunks
        chunk = cuda.blockIdx.x // m_tiles % n_chunks
        group_id = cuda.blockIdx.y  # dense: KV head; sparse: query token
        m0 = m_tile * block_m  # first row of this CTA within the group
        s_q = q.shape[1]
        head = 0 if sparse else group_id  # KV head of plain caches

        q_s = cuda.shared.array(q_shape, float32)  # a chunk of dims of the queries
        kv_s = cuda.shared.array(stage_size, float32)  # the same dims of the keys, or values
        p_s = cuda.shared.array(p_shape, float32)  # scores, then probabilities
        key_page = cuda.shared.array(BLOCK_N, int32)  # where each key of the tile lives,
        key_row = cuda.shared.array(BLOCK_N, int32)  # page -1 for an invalid key
        key_list = cuda.shared.array(BLOCK_N, int32)  # 0: main cache, 1: extra cache
        key_scale = cuda.shared.array(scale_shape, float32)
        row_max = cuda.shared.array(block_m, float32)  # running max of scaled scores
        row_sum = cuda.shared.array(block_m, float32)  # running sum of exp(score - max)
        row_alpha = cuda.shared.array(block_m, float32)  # this tile's rescaling factor

        # This request's candidate keys are positions 0 .. length - 1 (sparse: its first
        # n_main indices, then its extra ones); this CTA's piece is [lo, hi).
        if sparse:
            n_main = slots.shape[2]
            if has_lengths:
                n_main = min(max(lengths[req], 0), n_main)
            length = n_main
            if has_extra:
                n_extra = slots2.shape[2]
                if has_lengths2:
                    n_extra = min(max(lengths2[req], 0), n_extra)
                length += n_extra
        else:
            n_main = min(max(lengths[req], 0), slots.shape[1] * page)  # clamped to the table
            length = n_main
        lo = chunk * chunk_len
        hi = min(lo + chunk_len, length)

        start_rows(row_max, row_sum, block_m, tid, threads)
        acc = cuda.local.array(acc_shape, float32)  # this lane's part of O
        clear(acc)
        # S = Q K^T: this thread's 4 x 4 block of scores and its slice of each chunk's dims
        tile_n, tile_m, dim0 = score_block(tid, tiles_n, block_m, dims_per_group)
        s_acc = cuda.local.array((MICRO, MICRO), float32)
        k_reg = cuda.local.array(MICRO, float32)
        v_reg = cuda.local.array(cols_per_lane, float32)

        for start in range(lo, hi, BLOCK_N):
            # 1. Where each key of the tile lives (and its FP8 scales).
            for n in range(tid, BLOCK_N, threads):
                pos = start + n
                page_id = -1
                row = 0
                which = 0
                if pos < hi:
                    if sparse:
                        if pos < n_main:
                            slot = slots[req, group_id, pos]
                            size, pages = page, num_pages
                        else:
                            slot = slots2[req, group_id, pos - n_main]
                            size, pages = page2, num_pages2
                            which = 1
                        if slot >= 0 and slot < pages * size:  # -1 and out of range: invalid
                            page_id = slot // size
                            row = slot % size
                    else:
                        p = slots[req, pos // page]
                        if p >= 0 and p < num_pages:  # a bad page id hides its keys
                            page_id = p
                            row = pos % page
                key_page[n] = page_id
                key_row[n] = row
                key_list[n] = which
                if fmt != FMT_PLAIN and page_id >= 0:
                    if which == 0:
                        read_scales(cache, page_id, row, page, key_scale, n)
                    else:
                        read_scales(cache2, page_id, row, page2, key_scale, n)
            cuda.syncthreads()

            # 2. S = Q K^T over chunks of chunk_d dims staged in shared memory (queries are
            # re-staged per tile: fp32 copies of all their dims would not fit beside the keys).
            for i in range(MICRO):
                for j in range(MICRO):
                    s_acc[i, j] = ZERO
            for d0 in range(0, d_qk, chunk_d):
                for e in range(tid, block_m * chunk_d, threads):
                    r = e // chunk_d
                    d = e % chunk_d
                    value = ZERO
                    if m0 + r < rows:
                        t, h = token_and_head(m0 + r, group_id, group)
                        value = half_to_f32(q[req, t, h, d0 + d], is_fp16)
                    q_s[r, d] = value
                for e in range(tid, BLOCK_N * chunk_d, threads):
                    n = e // chunk_d
                    d = e % chunk_d
                    kv_s[n * k_stride + d] = key_value(
                        cache, cache2, key_page, key_row, key_list, key_scale, head, n,
                        d0 + d,
                    )  # fmt: skip
                cuda.syncthreads()
                scores_step(q_s, kv_s, k_stride, s_acc, k_reg, tile_m * MICRO, tile_n * MICRO,
                            dim0, dims_per_group)  # fmt: skip
                cuda.syncthreads()
            for g in range(dim_groups):  # the dim slices add up in p_s, one after another
                if dim0 == g * dims_per_group:
                    add_scores(p_s, s_acc, tile_m * MICRO, tile_n * MICRO, g == 0)
                cuda.syncthreads()

            # 3. Scale, mask what a row may not see, online softmax (one thread per row).
            for r in range(tid, block_m, threads):
                last = hi - 1
                if causal:  # bottom-right aligned: token t sees positions <= length - s_q + t
                    last = min(last, length - s_q + (m0 + r) // group)
                for n in range(BLOCK_N):
                    if start + n <= last and key_page[n] >= 0:
                        p_s[r, n] *= scale
                    else:
                        p_s[r, n] = NEG_INF
                softmax_row(p_s, r, BLOCK_N, row_max, row_sum, row_alpha)
            cuda.syncthreads()

            # 4. O = alpha O + P V, values staged V_TOKENS keys at a time (all 512 columns).
            rescale_rows(acc, row_alpha, warp * rows_per_warp)
            for v0 in range(0, min(BLOCK_N, hi - start), V_TOKENS):
                for e in range(tid, V_TOKENS * D_V, threads):
                    n = e // D_V
                    c = e % D_V
                    kv_s[e] = key_value(
                        cache, cache2, key_page, key_row, key_list, key_scale, head,
                        v0 + n, c,
                    )  # fmt: skip
                cuda.syncthreads()
                pv_step(acc, p_s, kv_s, v_reg, warp * rows_per_warp, lane, v0, V_TOKENS)
                cuda.syncthreads()

        # 5. Epilogue. Row statistics first, one thread per row: lse = m + log(l) (+inf if the
        # row saw no key) and the factor turning O into the output (1 / l, times the attention
        # sink's share 1 / (1 + exp(sink - lse)); a piece of a split request leaves the sink
        # to the combine and writes its partial lse instead).
        cuda.syncthreads()  # (an empty piece ran no tile: the row statistics' init is visible)
        for r in range(tid, block_m, threads):
            if m0 + r < rows:
                t, h = token_and_head(m0 + r, group_id, group)
                total = row_sum[r]
                empty = total == ZERO
                row_lse = POS_INF if empty else row_max[r] + math.log(total)
                factor = ZERO if empty else ONE / total
                if n_chunks == 1:
                    if has_sink and not empty:
                        factor /= ONE + math.exp(sink[h] - row_lse)
                    lse[req, t, h] = row_lse
                    if write_max:
                        max_logits[req, t, h] = row_max[r]
                else:
                    lse_part[req, chunk, t, h] = NEG_INF if empty else row_lse
                row_alpha[r] = factor
        cuda.syncthreads()
        # Then the outputs: each lane its columns of its warp's rows.
        rescale_rows(acc, row_alpha, warp * rows_per_warp)
        for i in range(rows_per_warp):
            r = warp * rows_per_warp + i
            if m0 + r < rows:
                t, h = token_and_head(m0 + r, group_id, group)
                if n_chunks == 1:
                    store_half(out[req, t, h], acc, i, lane)
                elif row_sum[r] != ZERO:  # an empty piece writes no output (combine skips it)
                    store_f32(o_part[req, chunk, t, h], acc, i, lane)

    return mla_attention


# --------------------------------------------------------------------------------------------
# Launch


def _block_m(rows: int) -> int:
    """Rows per CTA: 16 for small groups (h_q = 16 decode wastes nothing), else 32."""
    return 16 if rows <= 16 else 32


def split_plan(ctas: int, list_len: int, device: torch.device) -> tuple[int, int]:
    """(pieces per request, keys per piece). Requests are cut into pieces only when there are
    too few CTAs to fill the GPU; pieces are whole tiles and at least MIN_PIECE keys long.
    ``list_len`` bounds every request's length, so the grid is known without reading lengths
    on the host (capturable); pieces past a request's end exit at once."""
    want = -(-WAVES * sm_count(device) // max(ctas, 1))
    n = max(1, min(want, MAX_CHUNKS, list_len // MIN_PIECE))
    chunk = -(-max(list_len, 1) // n)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    return -(-max(list_len, 1) // chunk), chunk


def cache_array(cache: torch.Tensor, fmt: CacheFormat):
    """Plain caches as [pages, page, h_kv, d] bits; FP8 ones as [pages, page bytes] (a page's
    bytes are contiguous; MODEL1's token and scale records both live there)."""
    if not fmt.is_fp8:
        return array(cache)
    raw = cache.view(torch.uint8)
    page_bytes = cache.shape[1] * cache.shape[3]
    return array(raw.as_strided((raw.shape[0], page_bytes), (raw.stride(0), 1)))


def attention_launches(
    *, q4: torch.Tensor, out4: torch.Tensor, lse3: torch.Tensor,
    max_logits3: torch.Tensor | None, cache: torch.Tensor, fmt: CacheFormat,
    slots: torch.Tensor, lengths: torch.Tensor | None, extra: tuple | None,
    sink: torch.Tensor | None, sparse: bool, causal: bool, scale: float, group: int,
    rows: int, groups: int, split: bool,
) -> list[Launch]:  # fmt: skip
    """The attention kernel's launch (and the combine's when requests are split). ``q4`` is
    ``[b, s_q, h_q, d]``, ``out4`` ``[b, s_q, h_q, 512]``, ``lse3`` / ``max_logits3``
    ``[b, s_q, h_q]`` views; ``rows`` query rows per group, ``groups`` groups per request."""
    b, s_q, h_q, d = q4.shape
    dev = q4.device
    page = cache.shape[1]
    block_m = _block_m(rows)
    m_tiles = -(-rows // block_m)
    if sparse:
        list_len = slots.shape[2] + (0 if extra is None else extra[1].shape[2])
    else:
        list_len = slots.shape[1] * page
    n_chunks, chunk_len = (1, max(list_len, 1))
    if split:
        n_chunks, chunk_len = split_plan(b * groups * m_tiles, list_len, dev)
    kern = mla_kernel(FMT_CODE[fmt], q4.dtype == torch.float16, sparse, block_m, d)

    def maybe(t: torch.Tensor | None, dtype: torch.dtype, ndim: int):
        return placeholder(dev, dtype, ndim) if t is None else array(t)

    if extra is not None:
        cache2_t, slots2, lengths2 = extra
        cache2, page2, pages2 = cache_array(cache2_t, fmt), cache2_t.shape[1], cache2_t.shape[0]
    else:
        cache2, slots2, lengths2, page2, pages2 = cache_array(cache, fmt), None, None, 1, 0
    if n_chunks > 1:
        o_part = torch.empty((b, n_chunks, s_q, h_q, D_V), dtype=torch.float32, device=dev)
        lse_part = torch.empty((b, n_chunks, s_q, h_q), dtype=torch.float32, device=dev)
    else:
        o_part = lse_part = None
    args = (
        array(q4), array(out4), array(lse3), maybe(max_logits3, torch.float32, 3),
        maybe(o_part, torch.float32, 5),
        array(lse_part) if lse_part is not None else placeholder(dev, torch.float32, 4),
        cache_array(cache, fmt), array(slots), maybe(lengths, torch.int32, 1),
        cache2, maybe(slots2, torch.int32, 3), maybe(lengths2, torch.int32, 1),
        maybe(sink, torch.float32, 1),
        page, cache.shape[0], page2, pages2, group, rows, scalar(scale),
        causal, lengths is not None, extra is not None, lengths2 is not None, sink is not None,
        max_logits3 is not None, m_tiles, chunk_len,
    )  # fmt: skip
    launches = [Launch(kern, (m_tiles * b * n_chunks, groups), ATTENTION_THREADS, args)]
    if n_chunks > 1:
        launches.append(combine_launch(o_part, lse_part, out4, lse3, sink))
    return launches


def dense_decode(p: DenseDecodeProblem, plan: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = p.empty_outputs()
    _, s_q, h_q, _ = p.q.shape
    h_kv = p.k_cache.shape[2]
    group = h_q // h_kv
    launches = attention_launches(
        q4=p.q, out4=out, lse3=lse.transpose(1, 2), max_logits3=None, cache=p.k_cache,
        fmt=p.cache_format, slots=p.block_table, lengths=p.cache_seqlens, extra=None, sink=None,
        sparse=False, causal=p.causal, scale=p.softmax_scale, group=group, rows=s_q * group,
        groups=h_kv, split=True,
    )  # fmt: skip
    run(launches, p.q.device)
    return out, lse


def sparse_decode(p: SparseDecodeProblem, plan: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = p.empty_outputs()
    _, s_q, h_q, _ = p.q.shape
    extra = None
    if p.extra_k_cache is not None:
        extra = (p.extra_k_cache, p.extra_indices, p.extra_topk_length)
    launches = attention_launches(
        q4=p.q, out4=out, lse3=lse.transpose(1, 2), max_logits3=None, cache=p.k_cache,
        fmt=p.cache_format, slots=p.indices, lengths=p.topk_length, extra=extra,
        sink=p.attn_sink, sparse=True, causal=False, scale=p.softmax_scale, group=h_q, rows=h_q,
        groups=s_q, split=True,
    )  # fmt: skip
    run(launches, p.q.device)
    return out, lse


def sparse_prefill(p: SparsePrefillProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query token is a one-token "request" whose candidates are flat indices into ``kv``
    seen as a cache of one-token pages (so ``s_kv`` bounds the valid indices)."""
    out, max_logits, lse = p.empty_outputs()
    h_q = p.q.shape[1]
    launches = attention_launches(
        q4=p.q.unsqueeze(1), out4=out.unsqueeze(1), lse3=lse.unsqueeze(1),
        max_logits3=max_logits.unsqueeze(1), cache=p.kv.unsqueeze(1), fmt=CacheFormat.BF16,
        slots=p.indices, lengths=p.topk_length, extra=None, sink=p.attn_sink, sparse=True,
        causal=False, scale=p.sm_scale, group=h_q, rows=h_q, groups=1, split=False,
    )  # fmt: skip
    run(launches, p.q.device)
    return out, max_logits, lse
