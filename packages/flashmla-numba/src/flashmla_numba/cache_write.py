"""Paged-cache write: store new tokens at flat slots, quantizing FP8 caches on the way.

Plain caches get the token's bits as they are. FP8 caches get the record of
:mod:`flashmla.formats` byte for byte: per tile of NoPE dims a power-of-two scale ``2^k`` with
``k = ceil(log2(max(amax / 448, 1e-4)))`` (computed from the bits of the tile's largest
magnitude, no logarithm), values ``x / 2^k`` rounded to e4m3 (exact division, round to nearest
even), the RoPE dims copied as bf16. A slot outside ``[0, num_blocks * B)`` writes nothing.

A CTA writes whole rows (a token, or one head of a token for plain caches); its threads split
the row's values. The op moves a few hundred bytes per token, so nothing here is tuned.
"""

from __future__ import annotations

import functools

from numba import cuda, int32

from flashmla.formats import CacheFormat
from flashmla.problems import CacheWriteProblem

from . import SIM
from .attention import (
    MODEL1_NOPE,
    MODEL1_RECORD,
    MODEL1_ROPE_AT,
    MODEL1_TILE,
    V32_NOPE,
    V32_RECORD,
    V32_ROPE_AT,
    V32_TILE,
    cache_array,
)
from .launch import Launch, array, kernel, run
from .numerics import bf16_to_f32, e4m3_bits, fp8_scale_exponent, int_as_float

ROPE = 64
# Threads per CTA and rows (tokens, or token heads) per CTA. The simulator pays ~10 ms per CTA
# and per thread started, so it runs the same kernels with few threads and many rows per CTA.
THREADS = 4 if SIM else 32
ROWS_PER_CTA = 16 if SIM else 1


@kernel()
def write_plain(cache, new_kv, slots, capacity, page):
    """cache [pages, page, h_kv, d] and new_kv [n, h_kv, d], both 16-bit bits."""
    n, h_kv = new_kv.shape[0], new_kv.shape[1]
    first = cuda.blockIdx.x * ROWS_PER_CTA
    for row in range(first, min(first + ROWS_PER_CTA, n * h_kv)):
        tok = row // h_kv
        head = row % h_kv
        slot = slots[tok]
        if slot >= 0 and slot < capacity:
            page_id = slot // page
            r = slot % page
            for d in range(cuda.threadIdx.x, new_kv.shape[2], THREADS):
                cache[page_id, r, head, d] = new_kv[tok, head, d]


@functools.cache
def fp8_writer(fmt: CacheFormat):
    """The write kernel of one FP8 layout (its geometry is compile-time constant)."""
    if fmt is CacheFormat.FP8_V32:
        record, nope, tile, rope_at = V32_RECORD, V32_NOPE, V32_TILE, V32_ROPE_AT
    else:
        record, nope, tile, rope_at = MODEL1_RECORD, MODEL1_NOPE, MODEL1_TILE, MODEL1_ROPE_AT
    tiles = nope // tile
    model1 = fmt is CacheFormat.FP8_MODEL1

    @kernel()
    def write_fp8(cache, new_kv, slots, capacity, page):
        """cache [pages, page bytes] uint8, new_kv [n, 1, d] bf16 bits."""
        tid = cuda.threadIdx.x
        exponent = cuda.shared.array(8, int32)  # scale 2^k of each NoPE tile
        first = cuda.blockIdx.x * ROWS_PER_CTA
        for tok in range(first, min(first + ROWS_PER_CTA, new_kv.shape[0])):
            slot = slots[tok]
            if slot < 0 or slot >= capacity:
                continue  # the same for every thread of the CTA: barriers stay matched
            page_id = slot // page
            row = slot % page
            at = row * record  # the token's record within its page

            # 1. One thread per tile: k from the bits of its largest magnitude.
            for t in range(tid, tiles, THREADS):
                amax = 0
                for i in range(t * tile, (t + 1) * tile):
                    amax = max(amax, int(new_kv[tok, 0, i]) & 0x7FFF)  # |x| orders like its bits
                exponent[t] = fp8_scale_exponent(amax)
            cuda.syncthreads()

            # 2. NoPE dims: x / 2^k (exact) rounded to e4m3; RoPE dims: bf16 bytes as they are.
            for d in range(tid, nope, THREADS):
                inverse = int_as_float((127 - exponent[d // tile]) << 23)  # 2^-k
                cache[page_id, at + d] = e4m3_bits(bf16_to_f32(new_kv[tok, 0, d]) * inverse)
            for i in range(tid, ROPE, THREADS):
                bits = int(new_kv[tok, 0, nope + i]) & 0xFFFF
                cache[page_id, at + rope_at + 2 * i] = bits & 0xFF
                cache[page_id, at + rope_at + 2 * i + 1] = bits >> 8

            # 3. Scales: V3.2 stores float32 2^k after the NoPE bytes; MODEL1 stores UE8M0
            # bytes (k + 127) and a zero pad byte after all the page's token records.
            if model1:
                for t in range(tid, 8, THREADS):
                    value = exponent[t] + 127 if t < tiles else 0
                    cache[page_id, page * record + row * 8 + t] = value
            else:
                for t in range(tid, tiles, THREADS):
                    bits = (exponent[t] + 127) << 23
                    for b in range(4):
                        cache[page_id, at + nope + 4 * t + b] = (bits >> (8 * b)) & 0xFF
            cuda.syncthreads()  # the exponents are read: the next token may overwrite them

    return write_fp8


def cache_write_launches(p: CacheWriteProblem) -> list[Launch]:
    cache, new_kv, slots = p.kv_cache, p.new_kv, p.slot_mapping
    n, h_kv, _ = new_kv.shape
    page = cache.shape[1]
    capacity = cache.shape[0] * page
    if p.cache_format.is_fp8:
        args = (cache_array(cache, p.cache_format), array(new_kv), array(slots), capacity, page)
        return [Launch(fp8_writer(p.cache_format), (-(-n // ROWS_PER_CTA),), THREADS, args)]
    args = (array(cache), array(new_kv), array(slots), capacity, page)
    return [Launch(write_plain, (-(-n * h_kv // ROWS_PER_CTA),), THREADS, args)]


def cache_write(p: CacheWriteProblem) -> None:
    """Write ``p.new_kv [n, h_kv, d]`` into flat slots ``p.slot_mapping`` of ``p.kv_cache``."""
    if p.new_kv.shape[0] > 0:
        run(cache_write_launches(p), p.kv_cache.device)
