// Dense MLA decode for Hopper (sm_90a): wgmma for both products, the copy engine (TMA) feeding a
// two-stage shared-memory pipeline that completes on mbarriers, and warp specialization.
//
// One CTA = 384 threads = 3 warpgroups, persistent over its part of the split-KV schedule
// (flashmla.scheduler rows, the same as the portable kernel's):
//   WG0  producer (24 registers): one thread walks the schedule and issues, per 64-token block,
//        9 TMA boxes of 64 tokens x 64 dims into a free stage (the page table lookup is the
//        box's page coordinate; page ids out of range land as zeros);
//   WG1, WG2  consumers c = 0, 1 (240 registers): 64 query rows (the rows of one KV head, MTP
//        tokens stacked), O split by columns: consumer c owns O[:, 256c : 256c + 256] in
//        registers (128 fp32 per thread).
// Per block, consumer c computes S_c = Q K^T for the block's tokens [32c, 32c + 32) (36 wgmma
// m64n32k16 over 576 dims, Q and K from shared memory), the two consumers agree on each row's
// maximum through shared memory, write their half of P (16-bit) into a shared 64x64 tile, and
// each runs O_c += P V_c (4 wgmma m64n256k16, V = the key tile's first 512 dims read
// transposed), then releases the block's stage to the producer.
//
// Rows are (token, head) pairs as in the portable kernel; whole requests write the final
// output, pieces of split requests write fp32 partials for the combine kernel.
//
// Defines: DTYPE_FP16 (element type of q, cache and out).
#include "sm90.cuh"

namespace {

constexpr int D_QK = 576;
constexpr int D_V = 512;
constexpr int BLOCK = 64;                         // query rows per CTA, tokens per key block
constexpr int BOXES = D_QK / 64;                  // TMA boxes per key block (64 dims each)
constexpr int BOX_BYTES = BLOCK * 128;            // 64 rows of 64 16-bit values
constexpr int TILE_BYTES = BOXES * BOX_BYTES;     // one Q tile or one key block: 73728
constexpr int STAGES = 2;
constexpr int CONSUMERS = 256;                    // two consumer warpgroups
constexpr int THREADS = 128 + CONSUMERS;
constexpr u32 CONSUMER_BARRIER = 1;               // named barrier of the two consumer warpgroups

// Shared memory, from a 1024-byte aligned base (swizzle atoms must be aligned).
constexpr int SMEM_Q = 0;
constexpr int SMEM_K = SMEM_Q + TILE_BYTES;                 // [STAGES] key blocks
constexpr int SMEM_P = SMEM_K + STAGES * TILE_BYTES;        // P: 64 rows x 64 tokens, swizzled
constexpr int SMEM_MAX = SMEM_P + BOX_BYTES;                // [2 parity][2 consumer][64] row maxima
constexpr int SMEM_SUM = SMEM_MAX + 2 * 2 * BLOCK * 4;      // [2 consumer][64] row sums
constexpr int SMEM_BARS = SMEM_SUM + 2 * BLOCK * 4;         // full[STAGES], empty[STAGES]
constexpr int SMEM_END = SMEM_BARS + 2 * STAGES * 8;
constexpr int SMEM_BYTES = SMEM_END + 1024;                 // + alignment slack
static_assert(SMEM_BYTES <= 227 * 1024, "fits Hopper's 227 KB per block");

}  // namespace

struct DecodeParams {
  TensorMap kv;  // 4-D (dim, kv head, token within page, page) over the cache; box 64x1x64x1
  const u16* q;
  u16* out;
  float* lse;
  float* o_acc;  // [slots, s_q, h_q, 512] fp32 partials of split requests
  float* lse_acc;
  const int* block_table;
  const int* lengths;
  const int* metadata;
  const int* num_splits;
  i64 q_b, q_t, q_h;  // element strides
  i64 o_b, o_t, o_h;
  i64 l_b, l_t, l_h;
  i64 table_b;
  int num_pages, page, list_len, s_q, group, rows, h_q, causal;
  float scale_log2;
};

// One CTA's part of the schedule, and the key blocks [lo, hi) of request `req` in it.
struct Part {
  int begin_req, end_req, begin_blk, end_blk, begin_split, first_split, last_split;

  DEV static Part of(const DecodeParams& p, int part) {
    const int* md = p.metadata + part * 8;
    return {md[0], md[1], md[2], md[3], md[4], md[5], md[6]};
  }
  DEV int length(const DecodeParams& p, int req) const {
    return min(max(p.lengths[req], 0), p.list_len * p.page);
  }
  DEV int lo(int req) const { return req == begin_req ? begin_blk : 0; }
  DEV int hi(const DecodeParams& p, int req) const {
    const int blocks = (length(p, req) + BLOCK - 1) / BLOCK;
    return req == end_req ? min(end_blk, blocks) : blocks;
  }
};

DEV void producer(const DecodeParams& p, const Part& part, u32 k_smem, u32 full, u32 empty) {
  prefetch_tensor_map(&p.kv);
  const u64 policy = policy_evict_first();
  const int blocks_per_page = p.page / BLOCK;
  int it = 0;
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const int* table = p.block_table + req * p.table_b;
    for (int blk = part.lo(req), hi = part.hi(p, req); blk < hi; ++blk, ++it) {
      const int s = it % STAGES;
      const int page = table[blk / blocks_per_page];
      const int token = (blk % blocks_per_page) * BLOCK;
      mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
      mbar_arrive_expect(full + 8 * s, TILE_BYTES);
#pragma unroll
      for (int box = 0; box < BOXES; ++box)
        tma_load_4d(k_smem + s * TILE_BYTES + box * BOX_BYTES, &p.kv, box * 64, blockIdx.y,
                    token, page, full + 8 * s, policy);
    }
  }
}

DEV void consumer(const DecodeParams& p, const Part& part, u32 base, u8* generic_base,
                  u32 full, u32 empty) {
  const int tid = threadIdx.x - 128;  // 0..255 over both consumers
  // The consumer index through a shuffle: provably warp-uniform, so the operand descriptors
  // derived from it stay in uniform registers (no per-wgmma moves).
  const int c = __shfl_sync(0xffffffffu, tid / 128, 0), lane = tid % 32, warp = (tid % 128) / 32;
  const int t4 = lane % 4;
  const u32 q_smem = base + SMEM_Q, k_smem = base + SMEM_K, p_smem = base + SMEM_P;
  float* const red_max = reinterpret_cast<float*>(generic_base + SMEM_MAX);
  float* const red_sum = reinterpret_cast<float*>(generic_base + SMEM_SUM);

  // This thread's two rows (accumulator layout: warp w holds rows 16w..16w+15; lane / 4 and
  // lane / 4 + 8) and their (token, head).
  int row_local[2], row_t[2], row_h[2];
  bool row_ok[2];
  for (int i = 0; i < 2; ++i) {
    row_local[i] = 16 * warp + lane / 4 + 8 * i;
    const int r = blockIdx.x * BLOCK + row_local[i];
    row_ok[i] = r < p.rows;
    row_t[i] = r / p.group;
    row_h[i] = blockIdx.y * p.group + r % p.group;
  }

  float o[128];  // O[:, 256c + 8j + 2 t4 + {0,1}] at o[4j + {0,1}] (row 0), o[4j + {2,3}] (row 1)
  int it = 0;
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    named_barrier(CONSUMER_BARRIER, CONSUMERS);  // the previous request's Q readers are done
    for (int i = tid; i < BLOCK * BOXES * 8; i += CONSUMERS) {  // Q -> shared, swizzled
      const int r = i / (BOXES * 8), chunk = i % (BOXES * 8);
      const int row = blockIdx.x * BLOCK + r;
      const bool ok = row < p.rows;
      const int t = row / p.group, h = blockIdx.y * p.group + row % p.group;
      const u16* src = ok ? p.q + req * p.q_b + t * p.q_t + h * p.q_h + chunk * 8 : p.q;
      cp_async16(q_smem + (chunk / 8) * BOX_BYTES + r * 128 + (((chunk % 8) ^ (r % 8)) << 4), src,
                 ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    named_barrier(CONSUMER_BARRIER, CONSUMERS);

#pragma unroll
    for (int j = 0; j < 128; ++j) o[j] = 0.f;
    float m_i[2] = {-F_INF, -F_INF}, l_i[2] = {0.f, 0.f};
    const int length = part.length(p, req);
    const int causal_base = length - p.s_q;
    const int* table = p.block_table + req * p.table_b;
    const int blocks_per_page = p.page / BLOCK;

    for (int blk = part.lo(req), hi = part.hi(p, req); blk < hi; ++blk, ++it) {
      const int s = it % STAGES;
      const int page = table[blk / blocks_per_page];
      const bool page_ok = page >= 0 && page < p.num_pages;
      const int n_valid = min(BLOCK, length - blk * BLOCK);
      const u32 k_tile = k_smem + s * TILE_BYTES;
      mbar_wait(full + 8 * s, (it / STAGES) & 1);

      // S_c = Q K^T over the tokens [32c, 32c + 32) of the block.
      // Descriptors are linear in the address: one per operand, plus constants per k-step.
      float sc[16];
      const u64 q_desc = smem_desc(q_smem, 16, 1024);
      const u64 k_desc = smem_desc(k_tile + c * 32 * 128, 16, 1024);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < D_QK / 16; ++k) {
        const u32 off = ((k / 4) * BOX_BYTES + (k % 4) * 32) >> 4;
        wgmma_m64n32k16(sc, q_desc + off, k_desc + off, k > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(sc);

      // Scale, mask (length, invalid page, causal), row maxima of both halves.
      // Row i sees the tokens n < limit[i] of the block (this thread's columns: n = 32c + 8j +
      // 2 t4 + {0, 1}).
      float mx[2] = {-F_INF, -F_INF};
      int limit[2];
      for (int i = 0; i < 2; ++i) {
        limit[i] = page_ok ? n_valid : 0;
        if (p.causal) limit[i] = min(limit[i], causal_base + row_t[i] - blk * BLOCK + 1);
        limit[i] -= 32 * c + 2 * t4;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e / 2;
          const float v = 8 * j + (e & 1) < limit[i] ? sc[4 * j + e] * p.scale_log2 : -F_INF;
          sc[4 * j + e] = v;
          mx[i] = fmaxf(mx[i], v);
        }
      float* mine = red_max + (it & 1) * 2 * BLOCK;
      for (int i = 0; i < 2; ++i) {
        mx[i] = warp_max4(mx[i]);
        if (t4 == 0) mine[c * BLOCK + row_local[i]] = mx[i];
      }
      named_barrier(CONSUMER_BARRIER, CONSUMERS);
      float alpha[2], m_safe[2];
      for (int i = 0; i < 2; ++i) {
        const float m_new = fmaxf(m_i[i], fmaxf(mx[i], mine[(1 - c) * BLOCK + row_local[i]]));
        m_safe[i] = m_new == -F_INF ? 0.f : m_new;
        alpha[i] = exp2f(m_i[i] - m_safe[i]);
        m_i[i] = m_new;
        l_i[i] *= alpha[i];
      }
      if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j] *= alpha[0], o[4 * j + 1] *= alpha[0];
          o[4 * j + 2] *= alpha[1], o[4 * j + 3] *= alpha[1];
        }
      }

      // Tokens past the length hold whatever the page has there (possibly NaN): zero this
      // consumer's V columns of them (0 * NaN would poison P V). Both Q K^T are done reading.
      if (n_valid < BLOCK) {
        u8* tile = generic_base + SMEM_K + s * TILE_BYTES;
        for (int i = tid % 128; i < (BLOCK - n_valid) * 4 * 8; i += 128) {
          const int row = n_valid + i / 32, box = 4 * c + (i / 8) % 4, chunk = i % 8;
          *reinterpret_cast<uint4*>(tile + box * BOX_BYTES + row * 128 + chunk * 16) =
              make_uint4(0, 0, 0, 0);
        }
      }

      // P = exp2(S - m) -> the shared 64x64 tile (swizzled like a TMA box: the A operand).
      u8* p_tile = generic_base + SMEM_P;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = 32 * c + 8 * j + 2 * t4;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float p0 = exp2f(sc[4 * j + 2 * i] - m_safe[i]);
          const float p1 = exp2f(sc[4 * j + 2 * i + 1] - m_safe[i]);
          l_i[i] += p0 + p1;
          const int r = row_local[i];
          *reinterpret_cast<u32*>(p_tile + r * 128 + (((n / 8) ^ (r % 8)) << 4) + (n % 8) * 2) =
              pack2(p0, p1);
        }
      }
      fence_async_smem();
      named_barrier(CONSUMER_BARRIER, CONSUMERS);

      // O_c += P V_c: V_c = dims [256c, 256c + 256) of the block, read transposed (MN-major:
      // 64-dim column blocks one box apart, 8-token groups 1024 bytes apart).
      const u64 p_desc = smem_desc(p_smem, 16, 1024);
      const u64 v_desc = smem_desc(k_tile + 4 * c * BOX_BYTES, BOX_BYTES, 1024);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < BLOCK / 16; ++k)
        wgmma_m64n256k16(o, p_desc + ((k * 32) >> 4), v_desc + ((k * 16 * 128) >> 4), 1);
      wgmma_commit();
      // Release the stage as soon as P V is done: with two stages, the load of block it + 2
      // then overlaps all of block it + 1 (holding it through the next Q K^T would leave the
      // copy engine idle for that long).
      wgmma_wait<0>();
      fence_regs(o);
      if (lane == 0) mbar_arrive(empty + 8 * s);
    }

    // Row sums of both halves (the same order in both consumers), then the epilogue.
    for (int i = 0; i < 2; ++i) {
      l_i[i] = warp_sum4(l_i[i]);
      if (t4 == 0) red_sum[c * BLOCK + row_local[i]] = l_i[i];
    }
    named_barrier(CONSUMER_BARRIER, CONSUMERS);
    for (int i = 0; i < 2; ++i) l_i[i] = red_sum[row_local[i]] + red_sum[BLOCK + row_local[i]];

    const bool piece = (req == part.begin_req && part.first_split) ||
                       (req == part.end_req && part.last_split);
    const int slot = piece ? p.num_splits[req] + (req == part.begin_req ? part.begin_split : 0) : 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_ok[i]) continue;
      const bool empty_row = l_i[i] == 0.f;
      const float lse2 = m_i[i] + __log2f(empty_row ? 1.f : l_i[i]);
      const float f = empty_row ? 0.f : 1.f / l_i[i];
      const int t = row_t[i], h = row_h[i];
      if (c == 0 && t4 == 0) {
        if (piece) {
          p.lse_acc[((i64)slot * p.s_q + t) * p.h_q + h] = empty_row ? -F_INF : lse2;
        } else {
          p.lse[req * p.l_b + t * p.l_t + h * p.l_h] = empty_row ? F_INF : lse2 * LN2;
        }
      }
      if (piece) {
        float* dst = p.o_acc + (((i64)slot * p.s_q + t) * p.h_q + h) * D_V + 256 * c + 2 * t4;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) =
              make_float2(o[4 * j + 2 * i] * f, o[4 * j + 2 * i + 1] * f);
      } else {
        u16* dst = p.out + req * p.o_b + t * p.o_t + h * p.o_h + 256 * c + 2 * t4;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<u32*>(dst + 8 * j) = pack2(o[4 * j + 2 * i] * f, o[4 * j + 2 * i + 1] * f);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    mla_decode_sm90(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(1024) u8 smem[];
  const u32 base = (smem_u32(smem) + 1023) & ~1023u;
  {  // the launcher's size must cover the layout: trap rather than corrupt memory
    u32 given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < base - smem_u32(smem) + SMEM_END) __trap();
  }
  const u32 full = base + SMEM_BARS, empty = full + 8 * STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);      // the producer's arrive (plus the bytes it expects)
      mbar_init(empty + 8 * s, 8);     // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();
  const Part part = Part::of(p, blockIdx.z);
  if (threadIdx.x < 128) {
    regs_lower<24>();
    if (threadIdx.x == 0) producer(p, part, base + SMEM_K, full, empty);
  } else {
    regs_raise<240>();
    consumer(p, part, base, smem + (base - smem_u32(smem)), full, empty);
  }
}
