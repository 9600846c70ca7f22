// Dense MHA prefill (varlen, bottom-right causal, GQA), forward and backward, in the style of
// FlashAttention-2 on warp-level tensor cores (mma.sync m16n8k16, sm_80 and newer).
//
// Layout: q [total_q, h_q, D_QK], k [total_k, h_kv, D_QK], v [total_k, h_kv, D_V], unit last
// stride, any (16-byte aligned) outer strides; sequence b owns rows cu[b] .. cu[b+1]. Causal:
// query i of a sequence sees key j iff j <= i + (L_k - L_q). A query that sees no key gets
// out = 0 and lse = +inf, and zero gradients.
//
// Kernels (one build per head dims and dtype; tiles are -D defines):
// - mha_fwd: a CTA per (FWD_BM queries, q head, sequence), 16 * FWD_MW queries per warp (with
//   FWD_MW = 2 every K/V fragment read from shared memory, the bound of mma.sync attention, feeds
//   two m16 tiles; Q's fragments are then re-read per tile, with FWD_MW = 1 they stay in
//   registers). K/V tiles of FWD_BN keys stream through a two-stage cp.async ring in XOR-swizzled
//   shared memory; S and the online softmax (base 2, O rescaled only when a row maximum grows by
//   more than 2^8) stay in registers and P is repacked from the S accumulators into A fragments
//   (no shared-memory round trip).
// - mha_bwd_prep: delta = rowsum(dO * O) - dlse and lse * log2(e), both [h_q, total_q].
// - mha_bwd_dq: a CTA per (DQ_BM queries, q head, sequence) looping over key tiles.
// - mha_bwd_dkdv: a CTA per (KV_BN keys, kv head, sequence), 16 keys per warp, looping over the
//   GQA group's query heads and their query tiles in a fixed order. In the transposed form
//   (S^T = K Q^T) every operand of dV += P^T dO and dK += dS^T Q is a register A fragment or an
//   ldmatrix of the Q / dO tile, so nothing goes through shared memory but the inputs.
// The backward has no atomics: dQ and dK/dV are computed by different CTAs (S and dP are
// recomputed in both), so every output element has exactly one writer and is bitwise
// deterministic.
//
// Causal tiles are visited so that fully masked tiles are skipped and only tiles crossing the
// diagonal (or the sequence end) evaluate the mask.
#include "common.cuh"

#ifndef D_QK
#define D_QK 128
#endif
#ifndef D_V
#define D_V 128
#endif
#ifndef FWD_BM  // queries per forward CTA (16 * FWD_MW per warp)
#define FWD_BM 128
#endif
#ifndef FWD_BN  // keys per forward tile
#define FWD_BN 64
#endif
#ifndef FWD_MW  // 16-row m-tiles per forward warp: 2 halves the K/V fragment reads per query (Q
#define FWD_MW 1  // then stays in shared memory), 1 keeps Q's fragments in registers
#endif
#ifndef DQ_BM  // queries per dQ CTA (16 per warp)
#define DQ_BM 64
#endif
#ifndef DQ_BN  // keys per dQ tile
#define DQ_BN 32
#endif
#ifndef DQ_QREG  // 1: the dQ kernel keeps Q's fragments in registers, 0: re-reads them per tile
#define DQ_QREG 1
#endif
#ifndef KV_BN  // keys per dK/dV CTA (16 per warp)
#define KV_BN 64
#endif
#ifndef KV_BM  // queries per dK/dV tile
#define KV_BM 32
#endif

static_assert(D_QK % 16 == 0 && D_V % 16 == 0 && D_QK / 8 % 8 == 0 && D_V / 8 % 8 == 0,
              "head dims must be multiples of 64");
static_assert(D_V <= D_QK, "output staging reuses D_QK-wide buffers");
static_assert(FWD_BM % 16 == 0 && FWD_BN % 16 == 0 && DQ_BM % 16 == 0 && DQ_BN % 16 == 0 &&
                  KV_BN % 16 == 0 && KV_BM % 16 == 0,
              "tiles are multiples of 16");

constexpr int CQ = D_QK / 8;  // 16-byte chunks per row
constexpr int CV = D_V / 8;

struct alignas(16) U4 {
  u32 x, y, z, w;
};

DEV int imin(int a, int b) { return a < b ? a : b; }
DEV int imax(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Tiles and fragments

// Rows 0 .. ROWS-1 of a [rows, D] tile (row r at src + r * stride elements) into swizzled shared
// memory at dst; rows >= valid are zero-filled and not read (neighbouring sequences and unused
// rows may hold anything, NaN included). Each thread keeps one 16-byte column (LPR lanes span a
// row, 192-element rows leave 8 of 32 lanes idle) and walks down the rows with a running
// pointer: per-row addresses hoisted out of the callers' loops would cost registers.
template <int ROWS, int D, int NT>
DEV void load_tile(u32 dst, const u16* src, i64 stride, int valid, int tid) {
  constexpr int CH = D / 8, LPR = CH <= 8 ? 8 : CH <= 16 ? 16 : 32, RPI = NT / LPR;
  constexpr int ITERS = (ROWS + RPI - 1) / RPI;
  static_assert(CH <= 32 && NT % LPR == 0, "rows of at most 32 chunks");
  const int ch = tid % LPR, r0 = tid / LPR;
  if (CH < LPR && ch >= CH) return;
  const u16* s = src + (i64)r0 * stride + ch * 8;
  const i64 step = (i64)RPI * stride;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int row = r0 + it * RPI;
    if (ROWS % RPI == 0 || row < ROWS) {
      const bool ok = row < valid;
      cp_async16(dst + 2 * swz<CH>(row, ch), ok ? s : src, ok);
    }
    s += step;
  }
}

// Lane-dependent parts of ldmatrix.x4 addresses into a swizzled tile of CH chunks per row, for
// 16 x 16 blocks at rows r0 (a multiple of 8) and chunks 2*c2, 2*c2+1. Since row & 7 = lane & 7,
// the swizzle only depends on the lane and c2 & 3: the address is base + o[c2 & 3] plus a
// constant, so a fully unrolled loop needs one add per tile and immediate offsets.
template <int CH>
struct Frag {
  u32 o[4];
};

// A layout: matrices (rows 0-7, chunk 0), (rows 8-15, chunk 0), (rows 0-7, chunk 1), (rows 8-15,
// chunk 1). Non-transposed it is an A fragment (16 rows x 16 k); transposed, the B fragments
// (b0, b1) of two adjacent n-tiles of a [k rows, n cols] tile.
template <int CH>
DEV Frag<CH> frag_a(int lane) {
  Frag<CH> f;
#pragma unroll
  for (int j = 0; j < 4; ++j) f.o[j] = 2 * swz<CH>(lane & 15, 2 * j + (lane >> 4));
  return f;
}

// B layout: the B fragments of two n-tiles (rows 0-7 and 8-15 of a [n rows, k cols] tile) at one
// k-step: (b0, b1) of the first, then of the second.
template <int CH>
DEV Frag<CH> frag_b(int lane) {
  Frag<CH> f;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    f.o[j] = 2 * swz<CH>((lane & 7) + ((lane >> 4) << 3), 2 * j + ((lane >> 3) & 1));
  return f;
}

template <int CH>
DEV u32 at(const Frag<CH>& f, u32 base, int r0, int c2) {
  return base + f.o[c2 & 3] + (c2 >> 2) * 128 + r0 * CH * 16;
}

// C fragments of n-tiles 2kk, 2kk+1 (fp32, 16 rows x 16 cols) as the A fragment of k-step kk.
template <int N>
DEV void to_a(u32 (&a)[4], const float (&c)[N][4], int kk) {
  a[0] = pack2(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc (16 x 8*NTILE per warp) += A (16 x 16) * B where B's k-step is rows r0.. r0+15 of a
// swizzled [k rows, NTILE*8 cols] tile (transposed ldmatrix).
template <int CH, int NTILE>
DEV void mma_row_tile(float (&acc)[NTILE][4], const u32 (&a)[4], const Frag<CH>& f, u32 base,
                      int r0) {
#pragma unroll
  for (int c2 = 0; c2 < NTILE / 2; ++c2) {
    u32 b[4];
    ldsm_x4_t(b, at(f, base, r0, c2));
    mma16816(acc[2 * c2], a, b[0], b[1]);
    mma16816(acc[2 * c2 + 1], a, b[2], b[3]);
  }
}

// acc (16 x 8*NTILE) += A * B^T over one k-step c2 where B is rows 0 .. 8*NTILE-1 of a swizzled
// [n rows, k cols] tile (non-transposed ldmatrix).
template <int CH, int NTILE>
DEV void mma_col_tile(float (&acc)[NTILE][4], const u32 (&a)[4], const Frag<CH>& f, u32 base,
                      int c2) {
#pragma unroll
  for (int nb = 0; nb < NTILE / 2; ++nb) {
    u32 b[4];
    ldsm_x4(b, at(f, base, nb * 16, c2));
    mma16816(acc[2 * nb], a, b[0], b[1]);
    mma16816(acc[2 * nb + 1], a, b[2], b[3]);
  }
}

// Stores a warp's 16 x (8*NTILE) fp32 accumulator rows (times `scale`) as elements into rows
// r0.. of a swizzled tile at `tile`, then copies those rows to global memory (16-byte stores,
// rows >= valid skipped). Only this warp touches those shared rows.
template <int CH, int NTILE>
DEV void store_rows(const float (&acc)[NTILE][4], float scale0, float scale1, u16* tile, int r0,
                    u16* dst, i64 stride, int valid, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NTILE; ++nt) {
    *(u32*)(tile + swz<CH>(r0 + g, nt) + 2 * t) = pack2(acc[nt][0] * scale0, acc[nt][1] * scale0);
    *(u32*)(tile + swz<CH>(r0 + g + 8, nt) + 2 * t) =
        pack2(acc[nt][2] * scale1, acc[nt][3] * scale1);
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 16 * CH / 32; ++it) {
    const int i = it * 32 + lane, row = i / CH, ch = i % CH;
    if (row < valid)
      *(U4*)(dst + (i64)row * stride + ch * 8) = *(const U4*)(tile + swz<CH>(r0 + row, ch));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

struct MhaFwdParams {
  u64 q, k, v, o, lse, cu_q, cu_k;
  i64 q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head, lse_row, lse_head;
  int group;      // h_q / h_kv
  int causal;     // bottom-right causal mask
  int neg_scale;  // softmax_scale < 0: Q's fragments are negated (exactly) and |scale| is used
  int b0;         // first sequence of this launch (grid z offset)
  float scale_log2;  // |softmax_scale| * log2(e), at least 1e-30 so that -inf * it stays -inf
};

constexpr int F_RW = 16 * FWD_MW;  // query rows per warp
constexpr int F_NW = FWD_BM / F_RW, F_NT = F_NW * 32;
constexpr int F_TILE_K = FWD_BN * D_QK, F_STAGE = FWD_BN * (D_QK + D_V);  // elements
constexpr int F_Q = FWD_BM * D_QK;
// FWD_MW == 1: stage 0 | region R = stage 1, which first holds the Q tile (Q then lives in
// registers). FWD_MW == 2: Q tile | stage 0 | stage 1 (A fragments re-read every tile).
constexpr int F_SMEM = FWD_MW == 1 ? 2 * (F_STAGE + (F_Q > F_STAGE ? F_Q : F_STAGE))
                                   : 2 * (F_Q + 2 * F_STAGE);
static_assert(FWD_BM % F_RW == 0 && (FWD_MW == 1 || FWD_MW == 2), "FWD_MW is 1 or 2");

// Online softmax of one S tile (raw scores, masked ones -inf) for rows g, g+8 of an m-tile; leaves
// P (fp32) in s and updates acc and the running sums. The reference max of a row (mrow) only
// moves when the tile's max exceeds it by more than 8 in exp2 units: P then stays below 256
// (harmless for fp32 sums and 16-bit P fragments) and most tiles skip rescaling acc. A row that
// has seen no key keeps mrow = -inf and exponents use 0 (P = exp2(-inf) = 0).
template <bool MASKED>
DEV void softmax_tile(float (&s)[FWD_BN / 8][4], float (&acc)[D_V / 8][4], float (&mrow)[2],
                      float (&lrow)[2], float c) {
  float alpha[2];
  bool grow_any = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -F_INF;
#pragma unroll
    for (int nt = 0; nt < FWD_BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = warp_max4(mx);
    const bool grow = mx * c > mrow[r] * c + 8.f;  // always when mrow = -inf and mx is finite
    alpha[r] = grow ? ex2_approx(mrow[r] * c - mx * c) : 1.f;
    if (grow) mrow[r] = mx;
    grow_any |= grow;
    const float base = (MASKED && mrow[r] == -F_INF) ? 0.f : mrow[r] * c;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < FWD_BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = ex2_approx(fmaf(s[nt][2 * r + e], c, -base));
        s[nt][2 * r + e] = pv;
        sum += pv;
      }
    }
    lrow[r] = lrow[r] * alpha[r] + sum;  // this thread's part of the row sum (quad-reduced later)
  }
  if (__any_sync(0xffffffffu, grow_any)) {  // warp-uniform: most tiles skip it
#pragma unroll
    for (int dt = 0; dt < D_V / 8; ++dt) {
      acc[dt][0] *= alpha[0];
      acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1];
      acc[dt][3] *= alpha[1];
    }
  }
}

extern "C" __global__ void __launch_bounds__(F_NT) mha_fwd(const MhaFwdParams p) {
  extern __shared__ __align__(128) u8 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // last query blocks first: under causal masking they are the longest
  const int mb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z + p.b0;
  const int* cu_q = (const int*)p.cu_q;
  const int* cu_k = (const int*)p.cu_k;
  const int q0 = cu_q[b], Lq = cu_q[b + 1] - q0, m0 = mb * FWD_BM;
  if (m0 >= Lq) return;
  const int k0 = cu_k[b], Lk = cu_k[b + 1] - k0, shift = Lk - Lq;
  const int hk = h / p.group;
  // keys < hi are seen by some row of the block, keys < full by all of its rows
  int hi = Lk, full = Lk;
  if (p.causal) {
    hi = imax(0, imin(Lk, m0 + FWD_BM + shift));
    full = imax(0, imin(Lk, m0 + 1 + shift));
  }
  const int n_tiles = (hi + FWD_BN - 1) / FWD_BN, n_full = full / FWD_BN;

  const u16* qp = (const u16*)p.q + (i64)(q0 + m0) * p.q_row + (i64)h * p.q_head;
  const u16* kp = (const u16*)p.k + (i64)k0 * p.k_row + (i64)hk * p.k_head;
  const u16* vp = (const u16*)p.v + (i64)k0 * p.v_row + (i64)hk * p.v_head;
  const u32 base = smem_u32(smem);
  // stages 0 and 1 (K tile then V tile each); sq: the Q tile, later the output tile
  const u32 st0 = FWD_MW == 1 ? base : base + 2 * F_Q, st1 = st0 + 2 * F_STAGE;
  const u32 sq = FWD_MW == 1 ? st1 : base;
  u16* const sq_ptr = (u16*)(smem + (sq - base));
  auto load_kv = [&](int stage, int n) {
    const u32 sk = stage ? st1 : st0;
    const int key0 = n * FWD_BN;
    load_tile<FWD_BN, D_QK, F_NT>(sk, kp + (i64)key0 * p.k_row, p.k_row, Lk - key0, tid);
    load_tile<FWD_BN, D_V, F_NT>(sk + 2 * F_TILE_K, vp + (i64)key0 * p.v_row, p.v_row, Lk - key0,
                                 tid);
  };

  // the Q tile, then the last (first processed) K/V tile into stage 0
  load_tile<FWD_BM, D_QK, F_NT>(sq, qp, p.q_row, Lq - m0, tid);
  cp_async_commit();
  if (n_tiles > 0) load_kv(0, n_tiles - 1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  const Frag<CQ> fq = frag_a<CQ>(lane);
#if FWD_MW == 1
  u32 qf[D_QK / 16][4];
#pragma unroll
  for (int kk = 0; kk < D_QK / 16; ++kk) {
    ldsm_x4(qf[kk], at(fq, sq, warp * 16, kk));
    if (p.neg_scale) {  // flip the sign bits: exact, and the row max stays a max
#pragma unroll
      for (int i = 0; i < 4; ++i) qf[kk][i] ^= 0x80008000u;
    }
  }
#else
  if (p.neg_scale) {  // flip Q's sign bits in place: exact, and the row max stays a max
    for (int i = tid; i < F_Q / 2; i += F_NT) ((u32*)sq_ptr)[i] ^= 0x80008000u;
    __syncthreads();
  }
#endif

  float acc[FWD_MW][D_V / 8][4], mrow[FWD_MW][2], lrow[FWD_MW][2];
#pragma unroll
  for (int mw = 0; mw < FWD_MW; ++mw) {
#pragma unroll
    for (int dt = 0; dt < D_V / 8; ++dt)
      acc[mw][dt][0] = acc[mw][dt][1] = acc[mw][dt][2] = acc[mw][dt][3] = 0.f;
    mrow[mw][0] = mrow[mw][1] = -F_INF;
    lrow[mw][0] = lrow[mw][1] = 0.f;
  }
  const float c = p.scale_log2;
  const int r_warp = warp * F_RW;                   // first tile row of this warp
  const int row_g = m0 + r_warp + (lane >> 2);      // sequence row of elements 0, 1 of m-tile 0
  const Frag<CQ> fk = frag_b<CQ>(lane);
  const Frag<CV> fv = frag_a<CV>(lane);

  // Tiles from the last to the first: the masked ones (diagonal, sequence end) come first, then
  // a mask-free loop.
  for (int j = 0; j < n_tiles; ++j) {
    const int n = n_tiles - 1 - j;
    cp_async_wait<0>();
    __syncthreads();  // tile n landed for all threads; all are done with the other stage
    if (n > 0) load_kv((j + 1) & 1, n - 1);
    cp_async_commit();
    const u32 sk = (j & 1) ? st1 : st0, sv = sk + 2 * F_TILE_K;

    // S = Q K^T; each K fragment serves the warp's FWD_MW m-tiles
    float s[FWD_MW][FWD_BN / 8][4];
#pragma unroll
    for (int mw = 0; mw < FWD_MW; ++mw)
#pragma unroll
      for (int nt = 0; nt < FWD_BN / 8; ++nt)
        s[mw][nt][0] = s[mw][nt][1] = s[mw][nt][2] = s[mw][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D_QK / 16; ++kk) {
      u32 a[FWD_MW][4];
#pragma unroll
      for (int mw = 0; mw < FWD_MW; ++mw) {
#if FWD_MW == 1
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mw][i] = qf[kk][i];
#else
        ldsm_x4(a[mw], at(fq, sq, r_warp + mw * 16, kk));
#endif
      }
#pragma unroll
      for (int nb = 0; nb < FWD_BN / 16; ++nb) {
        u32 bf[4];
        ldsm_x4(bf, at(fk, sk, nb * 16, kk));
#pragma unroll
        for (int mw = 0; mw < FWD_MW; ++mw) {
          mma16816(s[mw][2 * nb], a[mw], bf[0], bf[1]);
          mma16816(s[mw][2 * nb + 1], a[mw], bf[2], bf[3]);
        }
      }
    }

    if (n >= n_full) {
      const int col = n * FWD_BN + 2 * (lane & 3);
#pragma unroll
      for (int mw = 0; mw < FWD_MW; ++mw) {
#pragma unroll
        for (int nt = 0; nt < FWD_BN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = col + nt * 8 + (e & 1), row = row_g + mw * 16 + (e >> 1) * 8;
            if (key >= Lk || (p.causal && key > row + shift)) s[mw][nt][e] = -F_INF;
          }
        }
        softmax_tile<true>(s[mw], acc[mw], mrow[mw], lrow[mw], c);
      }
    } else {
#pragma unroll
      for (int mw = 0; mw < FWD_MW; ++mw)
        softmax_tile<false>(s[mw], acc[mw], mrow[mw], lrow[mw], c);
    }

    // O += P V; each V fragment serves the warp's FWD_MW m-tiles
#pragma unroll
    for (int kk = 0; kk < FWD_BN / 16; ++kk) {
      u32 a[FWD_MW][4];
#pragma unroll
      for (int mw = 0; mw < FWD_MW; ++mw) to_a(a[mw], s[mw], kk);
#pragma unroll
      for (int c2 = 0; c2 < D_V / 16; ++c2) {
        u32 bf[4];
        ldsm_x4_t(bf, at(fv, sv, kk * 16, c2));
#pragma unroll
        for (int mw = 0; mw < FWD_MW; ++mw) {
          mma16816(acc[mw][2 * c2], a[mw], bf[0], bf[1]);
          mma16816(acc[mw][2 * c2 + 1], a[mw], bf[2], bf[3]);
        }
      }
    }
  }

  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the K/V stages and Q: the Q tile takes the output
#pragma unroll
  for (int mw = 0; mw < FWD_MW; ++mw) {
    float inv[2], lse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = warp_sum4(lrow[mw][r]);
      // l == 0 exactly when the row saw no key
      inv[r] = l > 0.f ? 1.f / l : 0.f;
      lse[r] = l > 0.f ? (mrow[mw][r] * c + lg2_approx(l)) * LN2 : F_INF;
    }
    const int r0 = r_warp + mw * 16;
    u16* o = (u16*)p.o + (i64)(q0 + m0 + r0) * p.o_row + (i64)h * p.o_head;
    store_rows<CV, D_V / 8>(acc[mw], inv[0], inv[1], sq_ptr, r0, o, p.o_row, Lq - m0 - r0, lane);
    if ((lane & 3) == 0) {
      float* lp = (float*)p.lse;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row_g + mw * 16 + 8 * r;
        if (row < Lq) lp[(i64)(q0 + row) * p.lse_row + (i64)h * p.lse_head] = lse[r];
      }
    }
  }
}

static_assert(sizeof(MhaFwdParams) == 160, "mirrored by mha.py's FWD_PARAMS");

// ---------------------------------------------------------------------------------------------
// Backward: preprocessing

struct MhaPrepParams {
  u64 o, dout, lse, dlse, delta, lse2;  // dlse may be 0 (absent)
  i64 o_row, o_head, do_row, do_head, lse_row, lse_head, dlse_row, dlse_head;
  int total_q, h_q;
};

static_assert(sizeof(MhaPrepParams) == 120, "mirrored by mha.py's PREP_PARAMS");

constexpr int P_NT = 256, P_TPR = D_V / 8, P_RPB = P_NT / P_TPR;  // threads per row, rows per CTA

// delta[h, t] = rowsum(dO * O) - dlse (d lse / d S = P adds P * dlse to dS = P * (dP - delta)),
// lse2[h, t] = lse * log2(e) (+inf stays +inf): both [h_q, total_q] fp32.
extern "C" __global__ void __launch_bounds__(P_NT) mha_bwd_prep(const MhaPrepParams p) {
  const int tid = threadIdx.x, sub = tid % P_TPR;
  const i64 r = (i64)blockIdx.x * P_RPB + tid / P_TPR;
  const bool ok = r < (i64)p.total_q * p.h_q;
  const int h = ok ? (int)(r / p.total_q) : 0, t = ok ? (int)(r % p.total_q) : 0;
  float sum = 0.f;
  if (ok) {
    const U4 o = *(const U4*)((const u16*)p.o + (i64)t * p.o_row + (i64)h * p.o_head + sub * 8);
    const U4 d =
        *(const U4*)((const u16*)p.dout + (i64)t * p.do_row + (i64)h * p.do_head + sub * 8);
    const u32 ov[4] = {o.x, o.y, o.z, o.w}, dv[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sum += to_float((u16)(ov[i] & 0xffffu)) * to_float((u16)(dv[i] & 0xffffu));
      sum += to_float((u16)(ov[i] >> 16)) * to_float((u16)(dv[i] >> 16));
    }
  }
#pragma unroll
  for (int m = 1; m < P_TPR; m <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (ok && sub == 0) {
    if (p.dlse) sum -= ((const float*)p.dlse)[(i64)t * p.dlse_row + (i64)h * p.dlse_head];
    ((float*)p.delta)[r] = sum;
    ((float*)p.lse2)[r] = ((const float*)p.lse)[(i64)t * p.lse_row + (i64)h * p.lse_head] * LOG2E;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ and dK/dV

struct MhaBwdParams {
  u64 q, k, v, dout, lse2, delta, dq, dk, dv, cu_q, cu_k;
  i64 q_row, q_head, k_row, k_head, v_row, v_head, do_row, do_head, dq_row, dq_head, dk_row,
      dk_head, dv_row, dv_head;
  int total_q;  // row stride (per head) of lse2 and delta
  int group, causal, b0;
  float scale;       // softmax_scale (dQ, dK factor)
  float scale_log2;  // softmax_scale * log2(e): P = exp2(S * scale_log2 - lse2)
};

static_assert(sizeof(MhaBwdParams) == 224, "mirrored by mha.py's BWD_PARAMS");

constexpr int Q_NW = DQ_BM / 16, Q_NT = Q_NW * 32;
constexpr int Q_TILE_K = DQ_BN * D_QK, Q_STAGE = DQ_BN * (D_QK + D_V);
constexpr int Q_Q = DQ_BM * D_QK, Q_DO = DQ_BM * D_V;
// Q tile | dO tile | stage 0 | stage 1
constexpr int DQ_SMEM = 2 * (Q_Q + Q_DO + 2 * Q_STAGE);

extern "C" __global__ void __launch_bounds__(Q_NT) mha_bwd_dq(const MhaBwdParams p) {
  extern __shared__ __align__(128) u8 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z + p.b0;
  const int* cu_q = (const int*)p.cu_q;
  const int* cu_k = (const int*)p.cu_k;
  const int q0 = cu_q[b], Lq = cu_q[b + 1] - q0, m0 = mb * DQ_BM;
  if (m0 >= Lq) return;
  const int k0 = cu_k[b], Lk = cu_k[b + 1] - k0, shift = Lk - Lq;
  const int hk = h / p.group;
  int hi = Lk, full = Lk;
  if (p.causal) {
    hi = imax(0, imin(Lk, m0 + DQ_BM + shift));
    full = imax(0, imin(Lk, m0 + 1 + shift));
  }
  const int n_tiles = (hi + DQ_BN - 1) / DQ_BN, n_full = full / DQ_BN;

  const u16* qp = (const u16*)p.q + (i64)(q0 + m0) * p.q_row + (i64)h * p.q_head;
  const u16* dop = (const u16*)p.dout + (i64)(q0 + m0) * p.do_row + (i64)h * p.do_head;
  const u16* kp = (const u16*)p.k + (i64)k0 * p.k_row + (i64)hk * p.k_head;
  const u16* vp = (const u16*)p.v + (i64)k0 * p.v_row + (i64)hk * p.v_head;
  const u32 sq = smem_u32(smem), sdo = sq + 2 * Q_Q, st0 = sdo + 2 * Q_DO;
  auto load_kv = [&](int stage, int n) {
    const u32 sk = st0 + stage * 2 * Q_STAGE;
    const int key0 = n * DQ_BN;
    load_tile<DQ_BN, D_QK, Q_NT>(sk, kp + (i64)key0 * p.k_row, p.k_row, Lk - key0, tid);
    load_tile<DQ_BN, D_V, Q_NT>(sk + 2 * Q_TILE_K, vp + (i64)key0 * p.v_row, p.v_row, Lk - key0,
                                tid);
  };

  load_tile<DQ_BM, D_QK, Q_NT>(sq, qp, p.q_row, Lq - m0, tid);
  load_tile<DQ_BM, D_V, Q_NT>(sdo, dop, p.do_row, Lq - m0, tid);
  cp_async_commit();
  if (n_tiles > 0) load_kv(0, n_tiles - 1);
  cp_async_commit();

  // per-row lse (log2 units) and delta of rows g, g+8; rows past the end see P = 0
  const int row_g = m0 + warp * 16 + (lane >> 2);
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_g + 8 * r;
    const i64 at = (i64)h * p.total_q + q0 + row;
    lse2[r] = row < Lq ? ((const float*)p.lse2)[at] : F_INF;
    delta[r] = row < Lq ? ((const float*)p.delta)[at] : 0.f;
  }

  cp_async_wait<1>();
  __syncthreads();
  const Frag<CQ> fa_q = frag_a<CQ>(lane), fb_q = frag_b<CQ>(lane);
  const Frag<CV> fb_v = frag_b<CV>(lane);
  u32 dof[D_V / 16][4];
  {
    const Frag<CV> fa_v = frag_a<CV>(lane);
#pragma unroll
    for (int kk = 0; kk < D_V / 16; ++kk) ldsm_x4(dof[kk], at(fa_v, sdo, warp * 16, kk));
  }
#if DQ_QREG
  u32 qf[D_QK / 16][4];
#pragma unroll
  for (int kk = 0; kk < D_QK / 16; ++kk) ldsm_x4(qf[kk], at(fa_q, sq, warp * 16, kk));
#endif

  float dq[D_QK / 8][4];
#pragma unroll
  for (int dt = 0; dt < D_QK / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
  const float c = p.scale_log2;

  for (int j = 0; j < n_tiles; ++j) {
    const int n = n_tiles - 1 - j;
    cp_async_wait<0>();
    __syncthreads();
    if (n > 0) load_kv((j + 1) & 1, n - 1);
    cp_async_commit();
    const u32 sk = st0 + (j & 1) * 2 * Q_STAGE, sv = sk + 2 * Q_TILE_K;

    float s[DQ_BN / 8][4], dp[DQ_BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < DQ_BN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D_QK / 16; ++kk) {
#if DQ_QREG
      mma_col_tile(s, qf[kk], fb_q, sk, kk);
#else
      u32 a[4];
      ldsm_x4(a, at(fa_q, sq, warp * 16, kk));
      mma_col_tile(s, a, fb_q, sk, kk);
#endif
    }
#pragma unroll
    for (int kk = 0; kk < D_V / 16; ++kk) mma_col_tile(dp, dof[kk], fb_v, sv, kk);

    // dS = P * (dP - delta), P = exp2(S * c - lse2); masked entries 0
    const bool masked = n >= n_full;
    const int col = n * DQ_BN + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < DQ_BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pv = ex2_approx(fmaf(s[nt][e], c, -lse2[r]));
        if (masked) {
          const int key = col + nt * 8 + (e & 1), row = row_g + 8 * r;
          if (key >= Lk || (p.causal && key > row + shift)) pv = 0.f;
        }
        dp[nt][e] = pv * (dp[nt][e] - delta[r]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < DQ_BN / 16; ++kk) {
      u32 a[4];
      to_a(a, dp, kk);
      mma_row_tile(dq, a, fa_q, sk, kk * 16);
    }
  }

  cp_async_wait<0>();
  // each warp overwrites only its own rows of the Q tile (no other warp reads them)
  __syncwarp();
  u16* dqp = (u16*)p.dq + (i64)(q0 + m0 + warp * 16) * p.dq_row + (i64)h * p.dq_head;
  store_rows<CQ, D_QK / 8>(dq, p.scale, p.scale, (u16*)smem, warp * 16, dqp, p.dq_row,
                           Lq - m0 - warp * 16, lane);
}

constexpr int K_NW = KV_BN / 16, K_NT = K_NW * 32;
constexpr int K_K = KV_BN * D_QK, K_V = KV_BN * D_V;
constexpr int K_TILE_Q = KV_BM * D_QK, K_STAGE = KV_BM * (D_QK + D_V) + 2 * KV_BM * 2;
// K tile | V tile | stage 0 | stage 1; a stage: Q tile | dO tile | lse2 [KV_BM] | delta [KV_BM]
constexpr int KV_SMEM = 2 * (K_K + K_V + 2 * K_STAGE);
static_assert(2 * KV_BM <= K_NT, "one thread per lse2 / delta element");

extern "C" __global__ void __launch_bounds__(K_NT) mha_bwd_dkdv(const MhaBwdParams p) {
  extern __shared__ __align__(128) u8 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // first key blocks first: under causal masking they see the most queries
  const int nb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z + p.b0;
  const int* cu_q = (const int*)p.cu_q;
  const int* cu_k = (const int*)p.cu_k;
  const int k0 = cu_k[b], Lk = cu_k[b + 1] - k0, n0 = nb * KV_BN;
  if (n0 >= Lk) return;
  const int q0 = cu_q[b], Lq = cu_q[b + 1] - q0, shift = Lk - Lq;
  // queries >= lo see some key of the block; tiles starting before mid need the causal mask
  int lo = 0, mid = 0;
  if (p.causal) {
    lo = imin(imax(n0 - shift, 0), Lq);
    lo = lo / KV_BM * KV_BM;
    mid = imin(imax(n0 + KV_BN - 1 - shift, lo), Lq);
  }
  const int n_mt = (Lq - lo + KV_BM - 1) / KV_BM, total = p.group * n_mt;

  const u16* kp = (const u16*)p.k + (i64)(k0 + n0) * p.k_row + (i64)hk * p.k_head;
  const u16* vp = (const u16*)p.v + (i64)(k0 + n0) * p.v_row + (i64)hk * p.v_head;
  const u32 sk = smem_u32(smem), sv = sk + 2 * K_K, st0 = sv + 2 * K_V;
  // tiles in order: query heads hk * group + g (g = 0 .. group-1), each over queries lo .. Lq
  auto load_q = [&](int stage, int g, int m) {
    const int h = hk * p.group + g;
    const u32 s = st0 + stage * 2 * K_STAGE, sdo = s + 2 * K_TILE_Q, sl = sdo + 2 * KV_BM * D_V;
    load_tile<KV_BM, D_QK, K_NT>(
        s, (const u16*)p.q + (i64)(q0 + m) * p.q_row + (i64)h * p.q_head, p.q_row, Lq - m, tid);
    load_tile<KV_BM, D_V, K_NT>(sdo,
                                (const u16*)p.dout + (i64)(q0 + m) * p.do_row + (i64)h * p.do_head,
                                p.do_row, Lq - m, tid);
    if (tid < 2 * KV_BM) {  // lse2 then delta; rows past the end read 0 (their Q, dO are 0 too)
      const int i = tid % KV_BM;
      const float* src = (const float*)(tid < KV_BM ? p.lse2 : p.delta) + (i64)h * p.total_q + q0;
      const bool ok = m + i < Lq;
      cp_async4(sl + 4 * tid, src + (ok ? m + i : 0), ok);
    }
  };

  load_tile<KV_BN, D_QK, K_NT>(sk, kp, p.k_row, Lk - n0, tid);
  load_tile<KV_BN, D_V, K_NT>(sv, vp, p.v_row, Lk - n0, tid);
  cp_async_commit();
  int ld_g = 0, ld_m = lo;  // next tile to load
  if (total > 0) load_q(0, ld_g, ld_m);
  cp_async_commit();

  float dk[D_QK / 8][4], dv[D_V / 8][4];
#pragma unroll
  for (int dt = 0; dt < D_QK / 8; ++dt) dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
#pragma unroll
  for (int dt = 0; dt < D_V / 8; ++dt) dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
  const float c = p.scale_log2;
  const int key_g = n0 + warp * 16 + (lane >> 2);  // key of accumulator elements 0, 1
  const Frag<CQ> fa_q = frag_a<CQ>(lane), fb_q = frag_b<CQ>(lane);
  const Frag<CV> fa_v = frag_a<CV>(lane), fb_v = frag_b<CV>(lane);

  for (int t = 0; t < total; ++t) {
    cp_async_wait<0>();
    __syncthreads();
    const int m = ld_m;  // this tile's first query
    ld_m += KV_BM;
    if (ld_m >= Lq) {
      ld_m = lo;
      ++ld_g;
    }
    if (t + 1 < total) load_q((t + 1) & 1, ld_g, ld_m);
    cp_async_commit();
    const u32 sq = st0 + (t & 1) * 2 * K_STAGE, sdo = sq + 2 * K_TILE_Q;
    const float* sl = (const float*)(smem + (sdo - sk) + 2 * KV_BM * D_V);

    // dP^T = V dO^T and S^T = K Q^T: [16 keys, KV_BM queries] per warp
    float s[KV_BM / 8][4], dp[KV_BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < KV_BM / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D_V / 16; ++kk) {
      u32 a[4];
      ldsm_x4(a, at(fa_v, sv, warp * 16, kk));
      mma_col_tile(dp, a, fb_v, sdo, kk);
    }
#pragma unroll
    for (int kk = 0; kk < D_QK / 16; ++kk) {
      u32 a[4];
      ldsm_x4(a, at(fa_q, sk, warp * 16, kk));
      mma_col_tile(s, a, fb_q, sq, kk);
    }

    // P^T = exp2(S^T * c - lse2[query]), dS^T = P^T * (dP^T - delta[query])
    const bool masked = p.causal && m < mid;
#pragma unroll
    for (int nt = 0; nt < KV_BM / 8; ++nt) {
      const int col = nt * 8 + 2 * (lane & 3);
      const float l0 = sl[col], l1 = sl[col + 1], d0 = sl[KV_BM + col], d1 = sl[KV_BM + col + 1];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = ex2_approx(fmaf(s[nt][e], c, -((e & 1) ? l1 : l0)));
        if (masked && key_g + 8 * (e >> 1) > m + col + (e & 1) + shift) pv = 0.f;
        s[nt][e] = pv;
        dp[nt][e] = pv * (dp[nt][e] - ((e & 1) ? d1 : d0));
      }
    }

    // dV += P^T dO, dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < KV_BM / 16; ++kk) {
      u32 a[4];
      to_a(a, s, kk);
      mma_row_tile(dv, a, fa_v, sdo, kk * 16);
    }
#pragma unroll
    for (int kk = 0; kk < KV_BM / 16; ++kk) {
      u32 a[4];
      to_a(a, dp, kk);
      mma_row_tile(dk, a, fa_q, sq, kk * 16);
    }
  }

  cp_async_wait<0>();
  // all K/V copies landed (they are spread over every thread; with no query tile the loop's
  // barrier never ran); then each warp overwrites only its own rows of the K and V tiles
  __syncthreads();
  const int valid = Lk - n0 - warp * 16;
  u16* dkp = (u16*)p.dk + (i64)(k0 + n0 + warp * 16) * p.dk_row + (i64)hk * p.dk_head;
  u16* dvp = (u16*)p.dv + (i64)(k0 + n0 + warp * 16) * p.dv_row + (i64)hk * p.dv_head;
  store_rows<CQ, D_QK / 8>(dk, p.scale, p.scale, (u16*)smem, warp * 16, dkp, p.dk_row, valid,
                           lane);
  store_rows<CV, D_V / 8>(dv, 1.f, 1.f, (u16*)(smem + 2 * K_K), warp * 16, dvp, p.dv_row, valid,
                          lane);
}

#ifdef MHA_SMEM_FWD  // tests: the launcher's shared-memory sizes (mha.py MhaTiles) match
static_assert(F_SMEM == MHA_SMEM_FWD && DQ_SMEM == MHA_SMEM_DQ && KV_SMEM == MHA_SMEM_KV,
              "mha.py's shared-memory sizes disagree with the kernels'");
#endif
