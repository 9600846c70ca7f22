// Shared device helpers of the portable kernel family (compute capability 8.0 and newer).
//
// No CUDA headers are included: NVRTC has no include path by default, so 16-bit floats are raw
// bits (u16) converted with PTX, and the warp-level tensor-core instructions (mma.sync,
// ldmatrix, cp.async) are wrapped here once.
#pragma once

#ifndef DTYPE_FP16
#define DTYPE_FP16 0  // 16-bit element type of queries and outputs: 0 bf16, 1 fp16
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define DEV __device__ __forceinline__

#define F_INF __int_as_float(0x7f800000)
#define F_NAN __int_as_float(0x7fffffff)
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// 16-bit floats

DEV float bf16_to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }

DEV float half_to_float(u16 x) {
  float f;
  asm("{.reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "h"(x));
  return f;
}

// The element type's value as fp32.
DEV float to_float(u16 x) { return DTYPE_FP16 ? half_to_float(x) : bf16_to_float(x); }

// Two fp32 values rounded (to nearest even) into a pair of elements: lo in the low half.
DEV u32 pack2(float lo, float hi) {
  u32 r;
#if DTYPE_FP16
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

DEV u16 from_float(float x) { return (u16)(pack2(x, 0.f) & 0xffffu); }

// Round fp32 to the nearest bf16 value, staying fp32.
DEV float round_bf16(float x) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r << 16);
}

// e4m3 (bias 7, 3 mantissa bits, 0x7f/0xff NaN) to fp32, exactly, on every architecture.
DEV float e4m3_to_float(u32 byte) {
  const u32 expo = (byte >> 3) & 0xf, mant = byte & 7, sign = (byte & 0x80) << 24;
  float v = expo == 0 ? __uint_as_float(sign | 0x3f800000u) * (float)mant * 0.001953125f
                      : __uint_as_float(sign | ((expo + 120) << 23) | (mant << 20));
  return (byte & 0x7f) == 0x7f ? F_NAN : v;
}

// ---------------------------------------------------------------------------------------------
// Shared memory, asynchronous copies, tensor cores

DEV u32 smem_u32(const void* p) {
  u32 r;
  asm("{.reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a;}" : "=r"(r) : "l"(p));
  return r;
}

// 16 bytes global -> shared; zero-filled (nothing read) when !valid.
DEV void cp_async16(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

DEV void cp_async8(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 8 : 0));
}

DEV void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

DEV void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

DEV void ldsm_x4_t(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

DEV void ldsm_x2(u32 (&r)[2], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

DEV void ldsm_x2_t(u32 (&r)[2], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// D += A (16x16, row) * B (16x8, col), fp32 accumulators, element-type operands.
DEV void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if DTYPE_FP16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Offset (in elements) of 16-byte chunk `chunk` of row `row` in a tile whose rows hold `CHUNKS`
// chunks (a multiple of 8), XOR-swizzled so that ldmatrix reads of 8 rows hit 8 distinct bank
// groups.
template <int CHUNKS>
DEV int swz(int row, int chunk) {
  static_assert(CHUNKS % 8 == 0, "swizzled rows need a multiple of 8 chunks");
  return row * CHUNKS * 8 + ((chunk ^ (row & 7)) << 3);
}

DEV float warp_max4(float x) {  // over the 4 lanes of a quad (one row of an mma fragment)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

DEV float warp_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Appended for mha.cu: fast base-2 exponent / logarithm (flush denormals; ex2(-inf) = 0,
// lg2(+inf) = +inf) and a 4-byte asynchronous copy (zero-filled when !valid).

DEV float ex2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

DEV float lg2_approx(float x) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

DEV void cp_async4(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0));
}

// Two e4m3 bytes (the low byte is the first value) to fp32, exactly: the hardware conversion on
// sm_89 and newer, bit arithmetic before.
DEV float2 e4m3x2_to_float2(u32 two) {
#if __CUDA_ARCH__ >= 890
  u32 h;
  asm("{.reg .b16 b; cvt.u16.u32 b, %1; cvt.rn.f16x2.e4m3x2 %0, b;}" : "=r"(h) : "r"(two));
  return make_float2(half_to_float((u16)(h & 0xffff)), half_to_float((u16)(h >> 16)));
#else
  return make_float2(e4m3_to_float(two & 0xff), e4m3_to_float((two >> 8) & 0xff));
#endif
}
