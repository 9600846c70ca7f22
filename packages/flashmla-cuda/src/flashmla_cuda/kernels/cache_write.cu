// Paged-cache write (contract §5): plain bf16/fp16 rows copied as bits, and the FP8 layouts
// quantized on write, byte-exact with flashmla.formats.quantize_v32 / quantize_model1.
//
// One warp per written row (token, or token and head for plain caches). A slot outside
// [0, capacity) makes its warp leave before any other memory access.
//
// FP8 quantization is integer arithmetic on bf16 bits, identical on every architecture (no
// hardware e4m3 conversion before sm_89):
//   * tile amax: an integer max of |x| bits (non-negative floats order like their bits);
//   * scale 2^k with k = ceil(log2(max(amax / 448, 1e-4))), read off the amax bits: with
//     amax = 2^e (1 + f), amax / 448 = 2^(e-8) (1 + f) / 1.75, so k = e - 8, plus 1 when
//     1 + f > 1.75; k >= -13 is the 1e-4 clamp. (amax is a bf16 value: the next one above
//     1.75 * 2^e is 1.7578125 * 2^e, so the reference's fp32 divide and log2 never round across);
//   * x / 2^k is exact (a power of two; |x / 2^k| <= 448), then rounded to e4m3 to nearest even
//     as torch's float8_e4m3fn cast does.
#include "common.cuh"

constexpr int WARPS = 8;

struct CacheWriteParams {
  u8* cache;          // plain: 16-bit elements; FP8: bytes
  const u16* new_kv;  // [n, h_kv, d] bits (bf16 for FP8 caches)
  const void* slots;  // [n] int32 or int64 flat slots
  i64 capacity;       // num_blocks * page_size
  i64 c_b, c_t, c_h, c_d;  // cache strides (plain: elements; FP8: c_b in bytes)
  i64 n_t, n_h, n_d;       // new_kv strides (elements)
  i64 slot_stride;
  int n;
  int h_kv;
  int d;
  int page_size;
  int slot64;  // slot_mapping is int64
};

// Flat slot of token `tok`, or -1 when it is outside the cache.
DEV i64 slot_of(const CacheWriteParams& p, i64 tok) {
  const i64 s = p.slot64 ? reinterpret_cast<const i64*>(p.slots)[tok * p.slot_stride]
                         : (i64) reinterpret_cast<const int*>(p.slots)[tok * p.slot_stride];
  return s >= 0 && s < p.capacity ? s : -1;
}

// ---------------------------------------------------------------------------------------------
// Stores and loads that take the widest access the address allows

DEV void store_u32(u8* dst, u32 v) {
  if ((reinterpret_cast<u64>(dst) & 3) == 0) {
    *reinterpret_cast<u32*>(dst) = v;
  } else {
#pragma unroll
    for (int b = 0; b < 4; ++b) dst[b] = (u8)(v >> (8 * b));
  }
}

template <int N>  // N words (N a multiple of 4 when the 16-byte path may be taken)
DEV void store_words(u8* dst, const u32 (&w)[N]) {
  if (N % 4 == 0 && (reinterpret_cast<u64>(dst) & 15) == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      reinterpret_cast<uint4*>(dst)[i / 4] = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) store_u32(dst + 4 * i, w[i]);
  }
}

// 16 consecutive elements (stride `stride`) from `src` as 8 words, low element in the low half.
DEV void load16(const u16* src, i64 stride, u32 (&w)[8]) {
  if (stride == 1 && (reinterpret_cast<u64>(src) & 15) == 0) {
    const uint4 a = reinterpret_cast<const uint4*>(src)[0];
    const uint4 b = reinterpret_cast<const uint4*>(src)[1];
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      w[i] = (u32)src[(2 * i) * stride] | ((u32)src[(2 * i + 1) * stride] << 16);
  }
}

// ---------------------------------------------------------------------------------------------
// FP8 quantization

// fp32 v with |v| <= 448 to an e4m3fn byte, round to nearest even (torch's cast).
DEV u32 e4m3_bits(float v) {
  const u32 u = __float_as_uint(v);
  const u32 sign = (u >> 24) & 0x80;
  const u32 a = u & 0x7fffffffu;
  u32 mag;
  if (a >= (121u << 23)) {  // normal e4m3 (>= 2^-6): round the mantissa to 3 bits, rebias
    mag = ((a + 0x7ffffu + ((a >> 20) & 1)) >> 20) - (120u << 3);
  } else {  // subnormal e4m3: round(|v| * 2^9); a result of 8 is 2^-6, the smallest normal
    const u32 expo = a >> 23;
    const u32 shift = 141 - expo;  // |v| * 2^9 = mant >> shift
    if (shift >= 25) {
      mag = 0;  // below 2^-11 (fp32 zeros and subnormals included): rounds to 0
    } else {
      const u32 mant = (a & 0x7fffffu) | 0x800000u;
      const u32 q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
      mag = q + ((rem > half || (rem == half && (q & 1))) ? 1 : 0);
    }
  }
  return sign | mag;
}

// Scale exponent k (scale 2^k) of a tile whose amax has bf16 bits `amax16` (sign cleared).
DEV int scale_exponent(u32 amax16) {
  const u32 a = amax16 << 16;
  const int k = (int)(a >> 23) - 127 - 8 + ((a & 0x7fffffu) > 0x600000u ? 1 : 0);
  return k > -13 ? k : -13;
}

// Quantize the 16 bf16 values in `w` with scale 2^k into 16 e4m3 bytes (4 words).
DEV void quantize16(const u32 (&w)[8], int k, u32 (&q)[4]) {
  const float inv = __uint_as_float((u32)(127 - k) << 23);  // 2^-k, a normal fp32
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 lo = w[2 * i], hi = w[2 * i + 1];
    q[i] = e4m3_bits(bf16_to_float((u16)lo) * inv) |
           (e4m3_bits(bf16_to_float((u16)(lo >> 16)) * inv) << 8) |
           (e4m3_bits(bf16_to_float((u16)hi) * inv) << 16) |
           (e4m3_bits(bf16_to_float((u16)(hi >> 16)) * inv) << 24);
  }
}

DEV u32 abs_max16(const u32 (&w)[8]) {
  u32 m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = max(m, max(w[i] & 0x7fffu, (w[i] >> 16) & 0x7fffu));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Kernels

// Plain caches [num_blocks, B, h_kv, d]: one warp copies one (token, head) row as bits.
extern "C" __global__ void __launch_bounds__(WARPS * 32) write_plain(const CacheWriteParams p) {
  const int lane = threadIdx.x & 31;
  const i64 row = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= (i64)p.n * p.h_kv) return;
  const i64 tok = row / p.h_kv, head = row % p.h_kv;
  const i64 slot = slot_of(p, tok);
  if (slot < 0) return;
  u16* dst = reinterpret_cast<u16*>(p.cache) + (slot / p.page_size) * p.c_b +
             (slot % p.page_size) * p.c_t + head * p.c_h;
  const u16* src = p.new_kv + tok * p.n_t + head * p.n_h;
  const u64 both = reinterpret_cast<u64>(dst) | reinterpret_cast<u64>(src);
  if (p.c_d == 1 && p.n_d == 1 && (both & 15) == 0 && p.d % 8 == 0) {
    for (int c = lane; c < p.d / 8; c += 32)
      reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(src)[c];
  } else if (p.c_d == 1 && p.n_d == 1 && (both & 3) == 0 && p.d % 2 == 0) {
    for (int c = lane; c < p.d / 2; c += 32)
      reinterpret_cast<u32*>(dst)[c] = reinterpret_cast<const u32*>(src)[c];
  } else {
    for (int c = lane; c < p.d; c += 32) dst[c * p.c_d] = src[c * p.n_d];
  }
}

// V3.2 records (656 bytes: 512 e4m3 in 4 tiles of 128, 4 fp32 scales, 64 bf16 RoPE) at
// page + (slot % B) * 656. Lane l quantizes NoPE values [16 l, 16 l + 16) (tile l / 8) and copies
// RoPE values 512 + 2 l, 513 + 2 l.
extern "C" __global__ void __launch_bounds__(WARPS * 32) write_v32(const CacheWriteParams p) {
  const int lane = threadIdx.x & 31;
  const i64 tok = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (tok >= p.n) return;
  const i64 slot = slot_of(p, tok);
  if (slot < 0) return;
  u8* record = p.cache + (slot / p.page_size) * p.c_b + (slot % p.page_size) * 656;
  const u16* src = p.new_kv + tok * p.n_t;

  u32 w[8];
  load16(src + 16 * lane * p.n_d, p.n_d, w);
  u32 amax = abs_max16(w);
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int k = scale_exponent(amax);
  u32 q[4];
  quantize16(w, k, q);
  store_words(record + 16 * lane, q);
  if ((lane & 7) == 0) store_u32(record + 512 + 4 * (lane / 8), (u32)(k + 127) << 23);

  const u16* rope = src + (512 + 2 * lane) * p.n_d;
  store_u32(record + 528 + 4 * lane, (u32)rope[0] | ((u32)rope[p.n_d] << 16));
}

// MODEL1 pages (block-planar): token t's 576-byte record (448 e4m3 in 7 tiles of 64, then 64
// bf16 RoPE) at page + t * 576, its 8-byte scale record (7 UE8M0 exponents, a zero pad byte) at
// page + B * 576 + t * 8. Lane l takes values [16 l, 16 l + 16): lanes 0..27 quantize NoPE
// (tile l / 4), lanes 28..31 copy the RoPE part.
extern "C" __global__ void __launch_bounds__(WARPS * 32) write_model1(const CacheWriteParams p) {
  const int lane = threadIdx.x & 31;
  const i64 tok = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (tok >= p.n) return;
  const i64 slot = slot_of(p, tok);
  if (slot < 0) return;
  const i64 t = slot % p.page_size;
  u8* page = p.cache + (slot / p.page_size) * p.c_b;
  u8* record = page + t * 576;

  u32 w[8];
  load16(p.new_kv + tok * p.n_t + 16 * lane * p.n_d, p.n_d, w);
  u32 amax = abs_max16(w);
  amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const int k = scale_exponent(amax);  // lanes 28..31: unused
  if (lane < 28) {
    u32 q[4];
    quantize16(w, k, q);
    store_words(record + 16 * lane, q);
  } else {
    store_words(record + 32 * lane - 448, w);  // = record + 448 + 32 (lane - 28)
  }

  // Lane 0 gathers the 7 exponents (log2(scale) + 127) from the first lane of each tile.
  u32 lo = 0, hi = 0;
#pragma unroll
  for (int tile = 0; tile < 7; ++tile) {
    const u32 e = (u32)(__shfl_sync(0xffffffffu, k, 4 * tile) + 127) & 0xff;
    if (tile < 4)
      lo |= e << (8 * tile);
    else
      hi |= e << (8 * (tile - 4));
  }
  if (lane == 0) {
    u8* scales = page + (i64)p.page_size * 576 + t * 8;
    store_u32(scales, lo);
    store_u32(scales + 4, hi);
  }
}
