"""Paged-cache write kernels: a plain row copy and the FP8 quantize-on-write (contract §5).

Both kernels work on raw bits only (halves read as int16, FP8 records written as bytes), so
they are byte-exact on every GPU and under Triton's interpreter, whose bf16/fp8 math is wrong:

* bf16 -> fp32 is ``bits << 16``; the tile amax is an integer max over ``|x|`` bits (the order
  of non-negative floats equals the order of their bits);
* the power-of-two scale exponent comes from the amax bits (no log2, no division);
* fp32 -> e4m3 (round to nearest even) is integer arithmetic: Triton has no e4m3 type below
  sm_89, and the same code then runs everywhere.

A slot outside ``[0, capacity)`` masks every load and store of its program: no memory access.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def plain_write_kernel(
    cache_ptr,  # bf16/fp16 cache [num_blocks, B, h_kv, d]
    new_ptr,  # new_kv [n, h_kv, d], same dtype
    slot_ptr,  # [n] int32 or int64
    capacity,  # num_blocks * B
    page_size,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_nn,
    stride_nh,
    stride_nd,
    stride_slot,
    D: tl.constexpr,  # row width (a model constant: one compile per width)
    BLOCK: tl.constexpr,
):
    cache_ptr = cache_ptr.to(tl.pointer_type(tl.int16))  # copy bits, never values
    new_ptr = new_ptr.to(tl.pointer_type(tl.int16))
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)
    valid = (slot >= 0) & (slot < capacity)
    safe = tl.where(valid, slot, 0)  # keeps the (masked) addresses inside the cache
    dst = (
        cache_ptr
        + (safe // page_size) * stride_cb
        + (safe % page_size) * stride_ct
        + head * stride_ch
    )
    src = new_ptr + tok * stride_nn + head * stride_nh
    cols = tl.arange(0, BLOCK)
    for start in range(0, D, BLOCK):
        c = start + cols
        mask = (c < D) & valid
        bits = tl.load(src + c * stride_nd, mask=mask)
        tl.store(dst + c * stride_cd, bits, mask=mask)


@triton.jit
def _e4m3_bits(v):
    """fp32 ``v`` (|v| <= 448) -> e4m3fn byte (as int32), round to nearest even, like torch."""
    u = v.to(tl.int32, bitcast=True)
    sign = (u >> 31) & 1
    a = u & 0x7FFFFFFF
    # normal e4m3 (|v| >= 2^-6): round the 23-bit mantissa to 3 bits, then rebias 127 -> 7
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal e4m3: round(|v| * 2^9) on the full fp32 significand; a result of 8 is 2^-6
    mant = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(14 - ((a >> 23) - 127), 25)  # >= 25 always rounds to 0; caps the shift
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    mag = tl.where(a >= (121 << 23), normal, q)
    return (sign << 7) | mag


@triton.jit
def fp8_write_kernel(
    cache_ptr,  # uint8 view of the FP8 cache [num_blocks, B, 1, 656 or 584]
    new_ptr,  # bf16 new_kv [n, 1, 576 or 512]
    slot_ptr,  # [n] int32 or int64
    capacity,  # num_blocks * B
    page_size,
    stride_page,  # bytes between pages (may be padded)
    stride_nn,
    stride_nd,
    stride_slot,
    MODEL1: tl.constexpr,  # False: V3.2 token records; True: MODEL1 block-planar pages
    TILE: tl.constexpr,  # NoPE values per scale: 128 (V3.2) or 64 (MODEL1)
    NUM_TILES: tl.constexpr,  # 4 (V3.2) or 7 (MODEL1)
    TILES_P2: tl.constexpr,  # NUM_TILES rounded up to a power of two
    ROPE: tl.constexpr,  # 64 bf16 RoPE values after the NoPE part
):
    NOPE: tl.constexpr = TILE * NUM_TILES
    new_ptr = new_ptr.to(tl.pointer_type(tl.int16))  # bf16 bits: no bf16 arithmetic anywhere
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)
    valid = (slot >= 0) & (slot < capacity)
    safe = tl.where(valid, slot, 0)
    page = cache_ptr + (safe // page_size) * stride_page
    row = safe % page_size
    if MODEL1:
        record = page + row * (NOPE + 2 * ROPE)
        scales = page + page_size * (NOPE + 2 * ROPE) + row * 8
        rope_dst = record + NOPE
    else:
        record = page + row * (NOPE + 4 * NUM_TILES + 2 * ROPE)
        scales = record + NOPE
        rope_dst = scales + 4 * NUM_TILES
    src = new_ptr + tok * stride_nn

    tiles = tl.arange(0, TILES_P2)
    cols = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    mask = (tiles[:, None] < NUM_TILES) & valid
    bits = tl.load(src + cols * stride_nd, mask=mask, other=0).to(tl.int32)
    x = (bits << 16).to(tl.float32, bitcast=True)

    # smallest k with amax <= 448 * 2^k = 1.75 * 2^(k+8), floored at 2^-13 (the 1e-4 clamp):
    # exactly ceil(log2(max(amax / 448, 1e-4))): an fp32 amax just above 448 * 2^k is at least
    # 2^-21 / 7 above it (relative), more than half an ulp, so fp32 amax / 448 never rounds
    # down onto 2^k (and the reference's log2 is exact at powers of two)
    amax = tl.max((bits << 16) & 0x7FFFFFFF, axis=1)
    k = (amax >> 23) - 127 - 8 + ((amax & 0x7FFFFF) > 0x600000).to(tl.int32)
    k = tl.maximum(k, -13)
    inv_scale = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2^-k: exact, |x * 2^-k| <= 448
    q = _e4m3_bits(x * inv_scale[:, None])
    tl.store(record + cols, q.to(tl.uint8), mask=mask)

    if MODEL1:
        # 7 UE8M0 exponents (log2(scale) + 127) and a zero pad byte
        ue8m0 = tl.where(tiles < NUM_TILES, k + 127, 0)
        tl.store(scales + tiles, ue8m0.to(tl.uint8), mask=valid)
    else:
        # float32 scales written byte by byte (little-endian): no alignment assumption
        byte = tl.arange(0, 4)
        scale_bits = (k + 127) << 23
        sb = (scale_bits[:, None] >> (byte[None, :] * 8)) & 0xFF
        tl.store(scales + tiles[:, None] * 4 + byte[None, :], sb.to(tl.uint8), mask=valid)

    # RoPE copied bit-exactly as two bytes per bf16
    r = tl.arange(0, ROPE)
    rbits = tl.load(src + (NOPE + r) * stride_nd, mask=valid, other=0).to(tl.int32)
    half = tl.arange(0, 2)
    rb = (rbits[:, None] >> (half[None, :] * 8)) & 0xFF
    tl.store(rope_dst + r[:, None] * 2 + half[None, :], rb.to(tl.uint8), mask=valid)
