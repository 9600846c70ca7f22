// Dense MLA decode for Hopper (sm_90a): wgmma for both products, the copy engine (TMA) feeding
// shared memory through mbarriers, warp specialization, and a two-block "seesaw" schedule that
// runs one consumer's softmax under the other's matrix products.
//
// One CTA = 384 threads = 3 warpgroups, persistent over its part of the split-KV schedule
// (flashmla.scheduler rows, the same as the portable kernel's). It stacks 64 query rows (the
// rows of one KV head, MTP tokens included) and walks the keys in pairs of 64-token blocks
// A (stage 0) and B (stage 1):
//   WG0  producer (24 registers): one thread issues 9 TMA boxes (64 tokens x 64 dims) per block
//        through a 4-D tensor map (dim, kv head, token in page, page), in two halves per stage
//        (boxes 0-3 = the left V columns, boxes 4-8) with a full and an empty mbarrier each, so
//        a half is refilled as soon as its last reader is done;
//   WG1  consumer "left"  (240 registers): owns O[:, 0:256]; scores block A;
//   WG2  consumer "right" (240 registers): owns O[:, 256:512]; scores block B.
// Per pair, with m the shared running row maximum (base 2):
//   left:  S_A = Q K_A^T; m_A = max(m, rowmax S_A); P_A = exp2(S_A - m_A);
//          O_L = O_L * exp2(m - m_A) + P_A V_A[:, left]        (P_A from registers)
//   right: (m_A from left) S_B = Q K_B^T; m_B = max(m_A, rowmax S_B); P_B = exp2(S_B - m_B);
//          O_R = O_R * exp2(m - m_B) + P_B V_B[:, right]       (P_B from registers; P_B also to
//          shared memory)
//   left:  (m_B from right) P_A * exp2(m_A - m_B) -> shared memory;
//          O_L = O_L * exp2(m_A - m_B) + P_B V_B[:, left]
//   right: O_R += P_A' V_A[:, right]
// which is online softmax over A then B. The right consumer's softmax of B runs while the left
// one multiplies P_A V_A (and vice versa for the hand-back), so most softmax work hides under
// tensor work. Each block is scored once, with N = 64 tokens per wgmma. The P tiles handed over
// (64 x 64, 16-bit) go into the block's RoPE box (dims 512-575), which nothing reads after
// Q K^T. Hand-offs are named barriers both consumers sync on. A pair without a B block (odd
// counts) runs the same steps with B empty. Measured costs: NOTES-sm90.md.
//
// Rows are (token, head) pairs as in the portable kernel; whole requests write the final output,
// pieces of split requests write fp32 partials for the combine kernel.
//
// SPARSE=1 builds the token-sparse decode over an FP8 cache with the same consumers. A CTA
// stacks 64 heads of one query token; a block is 64 entries of its index list. The copy engine
// cannot gather FP8 records and convert them, so the whole producer warpgroup does: the records'
// bytes land by cp.async inside the stage itself and are dequantized there into the swizzled
// bf16 rows (producer_sparse says in which order), then the producer arrives on the half's full
// barrier. Invalid entries (-1, out of range, past the length) become zero rows and a cleared
// valid flag, which the consumers' mask turns into -inf. Dequantization avoids the slow
// conversion units: an e4m3 byte moved into a bf16's bit positions is its value times 2^-120
// exactly (subnormals included), and one bf16x2 multiply by scale * 2^120 finishes it, rounding
// as the reference's bf16(fp8) * bf16(scale). The extra cache's blocks follow the main list's.
// The default layout is V3.2 (656-byte records); MODEL1=1 reads MODEL1's instead: d_qk 512 (448
// FP8 NoPE dims with a UE8M0 scale per 64, 64 bf16 RoPE dims, V = all 512), the scales after
// the page's records.
//
// SPARSE=2 is the same over bf16 rows of 576 (or, with D_QK_DIM=512, 512) values, copied into
// the stage by cp.async. It serves sparse decode over a bf16 cache and sparse prefill (each
// query token a one-token "request" over the kv rows, with max_logits written too).
//
// CLUSTER=1: the two CTAs of a cluster stack the two 64-row tiles of the same keys. Dense: each
// producer loads half the boxes of every block and multicasts them into both CTAs, so each SM
// pulls half the key bytes from L2. FP8 V3.2 sparse (h_q 128): each producer gathers and
// dequantizes half the tokens of every block into both CTAs (producer_sparse_cluster), so each
// token is dequantized once. Either way a stage is refilled once both CTAs' consumers released
// it.
//
// PIPE=1 (sparse): the seesaw holds both stages for a whole pair, so the producer refills
// them only between pairs and its chain (gather, dequantize) is exposed once a pair. With PIPE
// the blocks go through the stages one after another instead: the left consumer scores every
// block and multiplies the left V columns (P from registers), the right one multiplies the
// right columns with P from shared memory, and a stage is refilled while the other computes.
//
// Defines: DTYPE_FP16 (element type of q, cache and out), SPARSE (0 dense, 1 FP8 sparse,
// 2 bf16 sparse), MODEL1, D_QK_DIM, PREFETCH_Q, CLUSTER, PIPE, PAIR_LOADS, PREFETCH_L2,
// PREFETCH_IDX, FP8_PAIRS, REG_STAGE, DIAG (timing probes only).
#include "sm90.cuh"

#ifndef SPARSE
#define SPARSE 0
#endif
#ifndef PREFETCH_Q  // load the next request's Q during the last pair of the current one
#define PREFETCH_Q 0  // (off until measured on a GPU: NOTES-sm90.md)
#endif
#ifndef PREFETCH_L2  // sparse: the next pair's records prefetched into L2 (prefetch_next_pair)
#define PREFETCH_L2 0  // (off until measured on a GPU: NOTES-sm90.md)
#endif
#ifndef PIPE  // sparse: the blocks pipelined through the two stages (consumer's PIPE branch)
#define PIPE 0  // (off until measured on a GPU: NOTES-sm90.md)
#endif
static_assert(!PIPE || SPARSE, "the pipelined consumers are sparse only");
#ifndef PV_FIRST  // PIPE: the left consumer's P V of block k-1 before the Q K^T of block k
#define PV_FIRST 0  // (off until measured on a GPU: NOTES-sm90.md)
#endif
static_assert(!PV_FIRST || PIPE, "PV_FIRST orders the pipelined left consumer");
#ifndef PAIR_LOADS  // SPARSE=2: both blocks of a pair in flight at once (producer_rows; with
#define PAIR_LOADS (!PIPE)  // PIPE a block's copies would wait for the stage of the next)
#endif
#ifndef PREFETCH_IDX  // sparse: each producer thread's index of the next block loaded ahead
#define PREFETCH_IDX 0  // (EntryAhead; off until measured on a GPU: NOTES-sm90.md)
#endif
#ifndef REG_STAGE  // FP8 with PIPE: the next block's bytes loaded into
#define REG_STAGE 0  // registers before its stage is free (producer_fp8_regs; off until measured)
#endif
#ifndef DIAG  // sparse timing probes (wrong results, sm90_ab.py only), bits: 1 no
#define DIAG 0  // dequantization, 2 no NoPE (rows: no) gathers, 4 no gathers at all
#endif
#ifndef FP8_PAIRS  // SPARSE=1: producer_fp8_pairs (raw bytes dequantized in their own rows,
#define FP8_PAIRS 0  // both blocks of a pair in flight; the launcher's default for V3.2 at h_q 64)
#endif
#ifndef MODEL1  // SPARSE=1 over the MODEL1 layout (d_qk 512, 584-byte block-planar records)
#define MODEL1 0
#endif
static_assert(!MODEL1 || SPARSE == 1, "MODEL1 is an FP8 sparse layout");
#ifndef D_QK_DIM  // 512: MODEL1, or bf16 rows of 512 (SPARSE=2)
#define D_QK_DIM (MODEL1 ? 512 : 576)
#endif
static_assert(D_QK_DIM == 576 || (D_QK_DIM == 512 && SPARSE), "d_qk 512 is sparse only");
static_assert(!MODEL1 || D_QK_DIM == 512, "MODEL1 has d_qk 512");
#ifndef CLUSTER  // 2-CTA clusters over the two 64-row tiles of the same keys (grid.x even)
#define CLUSTER 0  // (off until measured on a GPU: NOTES-sm90.md)
#endif
static_assert(!CLUSTER || SPARSE == 0 || (SPARSE == 1 && !MODEL1),
              "clusters: the dense build and the FP8 V3.2 sparse one");
static_assert(!REG_STAGE || (PIPE && SPARSE == 1 && !FP8_PAIRS), "REG_STAGE: FP8, pipelined");

namespace {

constexpr int D_QK = D_QK_DIM;
constexpr int D_V = 512;
constexpr int BLOCK = 64;                      // query rows per CTA, tokens per key block
constexpr int BOXES = D_QK / 64;               // 64-dim boxes of a key row (9, MODEL1 8)
constexpr int BOX_BYTES = BLOCK * 128;         // 64 rows of 64 16-bit values
constexpr int TILE_BYTES = 9 * BOX_BYTES;      // one Q tile or one key block: 73728
constexpr int LEFT_BOXES = 4;                  // boxes [0, 4): V columns 0-255; [4, 9) the rest
constexpr int P_BOX = 8;  // the handed-over P tile: the RoPE box after Q K^T (MODEL1: spare)
constexpr int CONSUMERS = 256;                 // two consumer warpgroups
constexpr int THREADS = 128 + CONSUMERS;
// Registers per thread after the reallocation. The pool is what the launch allocated, 168 per
// thread (__launch_bounds__(384, 1)): 168 x 384 = 24 x 128 + 240 x 256. The consumers need 240
// (128 accumulators, the scores and P fragments), so the producer gets 24. With PIPE the right
// consumer holds only its accumulators (160), which leaves the producer 104: room for its
// dequantization's loads in flight. A larger sum makes setmaxnreg.inc wait forever for
// registers that never come (a hang, not an error).
// REG_STAGE: the left consumer needs 213 (SASS), so 216 leaves the producer 128 for a block's
// raw bytes (64) and scales (16) in flight.
constexpr u32 LEFT_REGS = REG_STAGE ? 216 : 240;
constexpr u32 RIGHT_REGS = PIPE ? 160 : 240;
constexpr u32 PRODUCER_REGS = REG_STAGE ? 128 : PIPE ? 104 : 24;
static_assert((PRODUCER_REGS + LEFT_REGS + RIGHT_REGS) * 128 <= (65536 / THREADS) / 8 * 8 * THREADS,
              "the register reallocation must fit the launch's pool");
// Dequantization steps unrolled (fewer registers at 24: MODEL1's longer scale and layout math,
// the cluster build's second stores).
constexpr int DEQUANT_UNROLL = (MODEL1 || CLUSTER) && !PIPE ? 1 : 4;

// Named barriers of the two consumers (0 is __syncthreads).
constexpr u32 BAR_BOTH = 1;  // both consumers (request start)
constexpr u32 BAR_MAX_A = 2;  // left -> right: m_A published
constexpr u32 BAR_P_B = 3;    // right -> left: m_B and P_B published
constexpr u32 BAR_P_A = 4;    // left -> right: P_A' published

// Shared memory, from a 1024-byte aligned base (swizzle atoms must be aligned).
constexpr int SMEM_Q = 0;
constexpr int SMEM_K = SMEM_Q + TILE_BYTES;         // stage 0 (block A), stage 1 (block B)
constexpr int SMEM_MAX = SMEM_K + 2 * TILE_BYTES;   // m_A[64], m_B[64]
constexpr int SMEM_SUM = SMEM_MAX + 2 * BLOCK * 4;  // row sums [2 consumers][64]
constexpr int SMEM_BARS = SMEM_SUM + 2 * BLOCK * 4;  // full[stage][half], empty[stage][half]
// Sparse only: a 4 KB raw FP8 staging slot per half of a stage, the valid flags [stage][64].
constexpr int SMEM_STAGING = SMEM_BARS + 8 * 8;
constexpr int STAGING_BYTES = BLOCK * 64;  // one 64-dim slice of the FP8 records of a block
constexpr int SMEM_VALID = SMEM_STAGING + (SPARSE == 1 ? 2 * STAGING_BYTES : 0);
constexpr int SMEM_END = SMEM_VALID + (SPARSE ? 2 * BLOCK : 0);
constexpr int SMEM_BYTES = SMEM_END + 1024;  // + alignment slack
static_assert(SMEM_BYTES <= 227 * 1024, "fits Hopper's 227 KB per block");

// Readers of each half (one arrive per warp of each reading consumer): A's left half only the
// left consumer (S_A, P_A V_A); A's right half and both of B's, both consumers. PIPE: the left
// half its left consumer, the right half its right one (which reads it after the left's Q K^T).
DEV u32 empty_count(int stage, int half) {
  return (PIPE || (stage == 0 && half == 0) ? 4 : 8) * (CLUSTER ? 2 : 1);  // (both CTAs')
}

DEV u32 half_boxes(int half) { return half == 0 ? LEFT_BOXES : BOXES - LEFT_BOXES; }

}  // namespace

struct DecodeParams {
  TensorMap kv;  // dense: 4-D (dim, kv head, token in page, page) over the cache; box 64x1x64x1
  const u16* q;
  u16* out;
  float* lse;
  float* o_acc;  // [slots, s_q, h_q, 512] fp32 partials of split requests
  float* lse_acc;
  const int* block_table;  // sparse: indices [b, s_q, topk] (flat slots)
  const int* lengths;      // dense: cache_seqlens; sparse: topk_length or null
  const int* metadata;
  const int* num_splits;
  const u8* cache;         // sparse: the cache's bytes
  const u8* cache2;        // sparse: the extra cache's bytes, or null
  const int* list2;        // sparse: extra indices [b, s_q, extra_topk]
  const int* lengths2;     // sparse: extra_topk_length [b] or null
  const float* sink;       // sparse: attn_sink [h_q] or null
  float* max_logits;       // sparse prefill: [s_q, h_q] (lse's strides), else null
  i64 q_b, q_t, q_h;  // element strides
  i64 o_b, o_t, o_h;
  i64 l_b, l_t, l_h;
  i64 table_b;            // sparse: indices' request stride
  i64 slot_t;             // sparse: indices' query-token stride
  i64 page_stride;        // sparse: bytes between pages of the cache
  i64 row_stride;         // sparse: bytes between the tokens of a page
  i64 slot2_b, slot2_t, page_stride2, row_stride2;  // the same for the extra cache
  int num_pages, page, list_len, s_q, group, rows, h_q, causal;  // list_len: sparse topk
  int num_pages2, page2, list_len2;                              // (the extra cache)
  float scale_log2;
};

// Query row r of this CTA: its (token, head), false past the rows. Dense: rows of one KV head
// (token-major, MTP included); sparse: the heads of query token blockIdx.y.
DEV bool query_row(const DecodeParams& p, int r, int& t, int& h) {
  const int row = blockIdx.x * BLOCK + r;
  if (SPARSE) {
    t = blockIdx.y, h = row;
  } else {
    t = row / p.group, h = blockIdx.y * p.group + row % p.group;
  }
  return row < p.rows;
}

// One CTA's part of the schedule, and the key blocks [lo, hi) of request `req` in it.
struct Part {
  int begin_req, end_req, begin_blk, end_blk, begin_split, first_split, last_split;

  DEV static Part of(const DecodeParams& p, int part) {
    const int* md = p.metadata + part * 8;
    return {md[0], md[1], md[2], md[3], md[4], md[5], md[6]};
  }
  // Dense: the request's tokens; sparse: the entries of its (main) index list.
  DEV int length(const DecodeParams& p, int req) const {
    if (SPARSE) return p.lengths ? min(max(p.lengths[req], 0), p.list_len) : p.list_len;
    return min(max(p.lengths[req], 0), p.list_len * p.page);
  }
  // Sparse with an extra cache: the blocks of the main list (at least one, as the schedule
  // counts them) and the entries of the extra list, whose blocks follow.
  DEV int main_blocks(const DecodeParams& p, int req) const {
    return (max(length(p, req), 1) + BLOCK - 1) / BLOCK;
  }
  DEV int extra_length(const DecodeParams& p, int req) const {
    return p.lengths2 ? min(max(p.lengths2[req], 0), p.list_len2) : p.list_len2;
  }
  DEV int lo(int req) const { return req == begin_req ? begin_blk : 0; }
  DEV int hi(const DecodeParams& p, int req) const {
    const int blocks = SPARSE && p.cache2
                           ? main_blocks(p, req) + (extra_length(p, req) + BLOCK - 1) / BLOCK
                           : (length(p, req) + BLOCK - 1) / BLOCK;
    return req == end_req ? min(end_blk, blocks) : blocks;
  }
};


// `x`, opaque to the compiler at this point: per-thread addresses derived from it are computed
// where they are used instead of being hoisted out of the pair loop (dozens of invariant
// addresses would not fit next to the 128 accumulators and spill).
DEV int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Barrier addresses: full / empty mbarrier of (stage, half).
struct Barriers {
  u32 base;
  DEV u32 full(int stage, int half) const { return base + 8 * (2 * stage + half); }
  DEV u32 empty(int stage, int half) const { return base + 32 + 8 * (2 * stage + half); }
};

// Walk the pairs (first block, whether a second one follows) of request `req` in this part.
template <typename F>
DEV void for_each_pair(const DecodeParams& p, const Part& part, int req, F&& f) {
  for (int a = part.lo(req), hi = part.hi(p, req); a < hi; a += 2) f(a, a + 1 < hi);
}

// The producer's walk: `load(req, blk, stage, fill)` for every block, A of a pair into stage 0
// and B into stage 1; `fill` counts the stage's fills so far (its barriers' phase).
template <typename F>
DEV void for_each_load(const DecodeParams& p, const Part& part, F&& load) {
  int uses[2] = {0, 0};
  for (int req = part.begin_req; req <= part.end_req; ++req)
    for_each_pair(p, part, req, [&](int a, bool has_b) {
      load(req, a, 0, uses[0]++);
      if (has_b) load(req, a + 1, 1, uses[1]++);
    });
}

DEV void producer(const DecodeParams& p, const Part& part, u32 k_smem, const Barriers& bars) {
  prefetch_tensor_map(&p.kv);
  const u64 policy = policy_evict_first();
  const int blocks_per_page = p.page / BLOCK;
  const int rank = CLUSTER ? cluster_rank() : 0;
  for_each_load(p, part, [&](int req, int blk, int stage, int fill) {
    const int page = p.block_table[req * p.table_b + blk / blocks_per_page];
    const int token = (blk % blocks_per_page) * BLOCK;
    for (int half = 0; half < 2; ++half) {
      mbar_wait(bars.empty(stage, half), (fill & 1) ^ 1);
      // (with clusters the half's bytes arrive from both producers: each expects them all)
      mbar_arrive_expect(bars.full(stage, half), half_boxes(half) * BOX_BYTES);
      const int first = half == 0 ? 0 : LEFT_BOXES;
      for (int box = first; box < first + (int)half_boxes(half); ++box) {
        const u32 dst = k_smem + stage * TILE_BYTES + box * BOX_BYTES;
        if (!CLUSTER)
          tma_load_4d(dst, &p.kv, box * 64, blockIdx.y, token, page, bars.full(stage, half), policy);
        else if (box % 2 == rank)  // this CTA's share, into both CTAs
          tma_load_4d_multicast(dst, &p.kv, box * 64, blockIdx.y, token, page,
                                bars.full(stage, half), 0x3, policy);
      }
    }
  });
}

// Sparse: the e4m3 bytes 0-1 (selector 0x1404) or 2-3 (0x3424) of `w` moved into the bit
// positions of a bf16x2 (sign to sign, exponent and mantissa to the low exponent and top
// mantissa bits): exactly 2^-120 times their values, subnormals included.
DEV u32 e4m3x2_bits(u32 w, u32 selector) {
  const u32 t = __byte_perm(w, 0, selector);
  return (t & 0x80008000u) | ((t >> 4) & 0x07f007f0u);
}

DEV u32 mul_bf16x2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

DEV void st_shared8(u32 addr, u32 v) {
  asm volatile("st.shared.u8 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

DEV void st_shared16(u32 addr, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

DEV void ld_shared16(u32 (&w)[4], u32 addr) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
               : "r"(addr));
}

// The same stores into the cluster CTA whose shared window holds `addr` (from mapa).
DEV void st_cluster8(u32 addr, u32 v) {
  asm volatile("st.shared::cluster.u8 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

DEV void st_cluster16(u32 addr, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b),
               "r"(c), "r"(d)
               : "memory");
}

// Sparse: the bf16 scale `s16` as the multiplier of e4m3 bytes moved into bf16 bit positions
// (e4m3x2_bits: 2^-120 times their values): s16 x 2^120, or s16 itself with a second multiply
// by 2^120 first where that would overflow bf16 (`big`).
struct Dequant {
  u32 c;
  bool big;
  DEV static Dequant of(u32 s16) {
    const float s = __uint_as_float(s16 << 16);
    const bool big = s > 128.f;
    return {big ? s16 * 0x10001u : pack2(s * 0x1p120f, s * 0x1p120f), big};
  }
  // e4m3 bytes 8q .. 8q + 7 of `w` -> 8 bf16 values (one 16-byte chunk) at `o`.
  DEV void convert8(const u32 (&w)[4], int q, u32 (&o)[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      o[e] = e4m3x2_bits(w[2 * q + e / 2], e % 2 ? 0x3424u : 0x1404u);
      if (big) o[e] = mul_bf16x2(o[e], 0x7b807b80u);  // (2^120 in both halves)
      o[e] = mul_bf16x2(o[e], c);
    }
  }
  // Chunk `o` to byte `at` of the row at `dst`, and of the peer's at dst + `to_peer` (CLUSTER).
  DEV static void store(u32 dst, u32 at, const u32 (&o)[4], u32 to_peer) {
    st_shared16(dst + at, o[0], o[1], o[2], o[3]);
    if (CLUSTER) st_cluster16(dst + to_peer + at, o[0], o[1], o[2], o[3]);
  }
  // 16 e4m3 bytes `w` (dims 16u .. 16u + 15 of a row) -> chunks 2u and 2u + 1 of the swizzled
  // bf16 row at `dst`, and of the peer's at dst + `to_peer` with CLUSTER.
  DEV void chunk(const u32 (&w)[4], int u, u32 dst, u32 swz, u32 to_peer) const {
#pragma unroll
    for (int q = 0; q < 2; ++q) {  // 8 dims (one 16-byte chunk) at a time
      u32 o[4];
      convert8(w, q, o);
      store(dst, ((2 * u + q) ^ swz) << 4, o, to_peer);
    }
  }
  // The same, both chunks converted first and stored in the other order where `flip` (selects,
  // not indexing: `flip` is per lane).
  DEV void chunk_pair(const u32 (&w)[4], int u, u32 dst, u32 swz, bool flip, u32 to_peer) const {
    u32 o[2][4];
    convert8(w, 0, o[0]);
    convert8(w, 1, o[1]);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      u32 v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = flip ? o[1 - q][e] : o[q][e];
      store(dst, ((2 * u + (flip ? 1 - q : q)) ^ swz) << 4, v, to_peer);
    }
  }
};

// Sparse: 64 e4m3 bytes at shared `raw` times the bf16 scale `s16` -> the swizzled 128-byte
// bf16 row at `dst` (swizzle `swz`), 16 dims per step; with CLUSTER the same row into the
// cluster peer too, at dst + `to_peer` (the peer's window, from mapa).
// PIPE (a producer of 104 registers): the four loads first, all in flight at once.
DEV void dequant_row(u32 raw, u32 dst, u32 swz, u32 s16, u32 to_peer = 0) {
  const Dequant d = Dequant::of(s16);
  if constexpr (PIPE) {
    u32 w[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u) ld_shared16(w[u], raw + u * 16);
#pragma unroll
    for (int u = 0; u < 4; ++u) d.chunk(w[u], u, dst, swz, to_peer);
  } else {
#pragma unroll DEQUANT_UNROLL
    for (int u = 0; u < 4; ++u) {
      u32 w[4];
      ld_shared16(w, raw + u * 16);
      d.chunk(w, u, dst, swz, to_peer);
    }
  }
}

// Sparse, FP8_PAIRS: the same, in place: the 64 e4m3 bytes sit in the second half of the row
// they expand into (bytes 64-127, unswizzled). Raw chunk u's output is the swizzled 32-byte pair
// k = u ^ (swz / 2) of the row; raw chunks 0-1 occupy pair 2 and 2-3 pair 3. Two raw chunks are
// read at a time, first those whose output lands in pairs 0-1 (no raw bytes), then the others,
// whose output covers only raw bytes already in registers: no byte is overwritten unread, and
// only this thread touches the row. With CLUSTER the row goes to the peer too (dequant_row).
DEV void dequant_in_row(u32 row, u32 swz, u32 s16, u32 to_peer = 0) {
  const Dequant d = Dequant::of(s16);
#pragma unroll 1
  for (int round = 0; round < 2; ++round) {
    const int u0 = (round == 0) == (swz < 4) ? 0 : 2;
    u32 w[2][4];
    ld_shared16(w[0], row + 64 + 16 * u0);
    ld_shared16(w[1], row + 80 + 16 * u0);
    d.chunk(w[0], u0, row, swz, to_peer);
    d.chunk(w[1], u0 + 1, row, swz, to_peer);
  }
}

// Sparse FP8: bf16(scale) of the record's box j, as the reference rounds it, from the scales
// a producer loaded (V3.2: fp32 x for boxes 0-1, y for 2-3; MODEL1: UE8M0 bytes, byte e being
// the bf16 exponent field).
DEV u32 box_scale16(uint2 scales, int j) {
  return MODEL1 ? ((scales.x >> (8 * j)) & 0xff) << 7
                : pack2(__uint_as_float(j < 2 ? scales.x : scales.y), 0.f);
}

// Sparse: the cache row of entry `pos` of request `req` (the cache's first row, and ok = false,
// for -1, out-of-range and past-the-length entries). PREFETCH_IDX / REG_STAGE: the list's
// entry is `ahead` (loaded a block earlier by EntryAhead), else it is loaded here. (Statement
// order as measured: factoring the list lookup out changes the default builds' SASS.)
DEV const u8* locate_entry(const DecodeParams& p, const Part& part, int req, int pos, int ahead,
                           bool& ok, const u8*& scales) {
  // (opaque: recomputed per block rather than kept across the pair in a spilled register)
  req = opaque(req);
  const bool extra = p.cache2 && pos >= part.main_blocks(p, req) * BLOCK;
  const int* list = extra ? p.list2 + req * p.slot2_b + blockIdx.y * p.slot2_t
                          : p.block_table + req * p.table_b + blockIdx.y * p.slot_t;
  if (extra) pos -= part.main_blocks(p, req) * BLOCK;
  const int page_size = extra ? p.page2 : p.page;
  const int length = extra ? part.extra_length(p, req) : part.length(p, req);
  const int slot = PREFETCH_IDX || REG_STAGE ? ahead : (pos < length ? list[pos] : -1);
  ok = slot >= 0 && (i64)slot < (i64)(extra ? p.num_pages2 : p.num_pages) * page_size;
  const int page = ok ? slot / page_size : 0, row = ok ? slot - page * page_size : 0;
  const i64 page_stride = extra ? p.page_stride2 : p.page_stride;
  const u8* page_base = (extra ? p.cache2 : p.cache) + page * page_stride;
  scales = page_base + page_size * 576 + row * 8;  // (MODEL1: the token's UE8M0 scales)
  return page_base + (i64)row * (extra ? p.row_stride2 : p.row_stride);
}

// Sparse: entry `pos` of request `req`'s index list (main or extra), -1 past its length: what
// locate_entry loads when it is not given the entry.
DEV int entry_slot(const DecodeParams& p, const Part& part, int req, int pos) {
  const bool extra = p.cache2 && pos >= part.main_blocks(p, req) * BLOCK;
  if (extra) pos -= part.main_blocks(p, req) * BLOCK;
  const int* list = extra ? p.list2 + req * p.slot2_b + blockIdx.y * p.slot2_t
                          : p.block_table + req * p.table_b + blockIdx.y * p.slot_t;
  const int length = extra ? part.extra_length(p, req) : part.length(p, req);
  return pos < length ? list[pos] : -1;
}

// Sparse producers: thread entry `n` of each block in the producer's walk order (request by
// request, block by block), its index loaded one block ahead of its use (PREFETCH_IDX), so
// that the index latency is not on the producer's chain (index -> gather -> dequantize) but
// under the previous block's. `locate` must be called once per block, in that order.
struct EntryAhead {
  int n, req, blk, slot;

  DEV EntryAhead(const DecodeParams& p, const Part& part, int n_)
      : n(n_), req(part.begin_req), blk(part.lo(part.begin_req) - 1), slot(-1) {
    if (PREFETCH_IDX || REG_STAGE) advance(p, part);
  }
  // The next block of the walk (past the part: req > end_req), and its index load issued.
  DEV void advance(const DecodeParams& p, const Part& part) {
    ++blk;
    while (req <= part.end_req && blk >= part.hi(p, req)) blk = part.lo(++req);
    slot = -1;
    if (req <= part.end_req) slot = entry_slot(p, part, req, blk * BLOCK + n);
  }
  DEV const u8* locate(const DecodeParams& p, const Part& part, int req_, int blk_, bool& ok,
                       const u8*& scales) {
    const int here = slot;
    if (PREFETCH_IDX || REG_STAGE) advance(p, part);
    return locate_entry(p, part, req_, blk_ * BLOCK + n, here, ok, scales);
  }
};

// Sparse: the bytes of a record the producer copies (FP8 V3.2 656, MODEL1's 576 before its
// scales, bf16 rows 2 d_qk).
constexpr u32 RECORD_BYTES = SPARSE == 2 ? 2 * D_QK : (MODEL1 ? 576 : 656);

// Sparse, PREFETCH_L2: called with block A of a pair, thread n of half h prefetches into L2 the
// record of main-list entry n of block A + 2 + h (the next pair of the same request), so that
// its gathers meet L2 rather than HBM latency (the index it reads is then warm too). A hint
// only: invalid entries, and the extra cache's, are skipped.
DEV void prefetch_next_pair(const DecodeParams& p, const Part& part, int req, int blk, int n,
                            int half) {
  const int pos = (blk + 2 + half) * BLOCK + n;
  if (pos >= part.length(p, req)) return;
  const int slot = p.block_table[req * p.table_b + blockIdx.y * p.slot_t + pos];
  if (slot < 0 || (i64)slot >= (i64)p.num_pages * p.page) return;
  const int page = slot / p.page;
  const u8* rec = p.cache + page * p.page_stride + (i64)(slot - page * p.page) * p.row_stride;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(rec), "r"(RECORD_BYTES));
}

// Sparse: cp.async of `bytes` (a multiple of 64) at offset `from` of each of the
// warp's 32 records (lane t's is `rec`, zero-filled unless `ok`) to shared `dst(t, o)` (byte o of
// token t's span). The lanes take turns: each instruction copies whole 64-byte runs of 8 records
// (4 lanes a run) instead of 16 bytes of each of 32 records, so it asks for 16 full sectors, not
// 32 half-used ones (S1 -17%, S3 -33% on an H100: NOTES-sm90.md). The caller syncs the warp (or
// more) before reading what others copied. ROLLED: a loop of copies per run of 8 records (fewer
// registers for long spans), else unrolled.
template <bool ROLLED = false, typename Dst>
DEV void gather_spans(const u8* rec, bool ok, int from, int bytes, Dst&& dst) {
  if (DIAG & 4) return;
  const int lane = threadIdx.x % 32;
  const u64 mine = reinterpret_cast<u64>(rec) | (ok ? 1u : 0u);  // (records are 16-aligned)
#pragma unroll 1
  for (int g = 0; g < 4; ++g) {  // tokens 8g .. 8g + 7
    const int t = 8 * g + lane / 4;
    const u64 theirs = __shfl_sync(0xffffffffu, mine, t);
    const u8* src = reinterpret_cast<const u8*>(theirs & ~u64(1)) + from;
    if (ROLLED) {
#pragma unroll 1
      for (int o = 16 * (lane % 4); o < bytes; o += 64) cp_async16(dst(t, o), src + o, theirs & 1);
    } else {
#pragma unroll
      for (int o = 16 * (lane % 4); o < bytes; o += 64) cp_async16(dst(t, o), src + o, theirs & 1);
    }
  }
}

// Sparse producer over bf16 rows (all 128 threads): warps 0-1 copy the boxes 0-3 of rows 0-63,
// warps 2-3 their boxes 4-8, straight into the swizzled stage by cp.async (each warp its 32
// rows, shared by its lanes: gather_spans). Both blocks of
// a pair are in flight before the producer waits for A's bytes (PAIR_LOADS; not across pairs:
// the consumers release A only once B has landed, so holding A's arrive for the next pair's
// copies would deadlock).
DEV void producer_rows(const DecodeParams& p, const Part& part, u32 base) {
  const u32 tiles = base + SMEM_K, valid = base + SMEM_VALID;
  const Barriers bars{base + SMEM_BARS};
  const int n = threadIdx.x % 64, half = threadIdx.x / 64;
  EntryAhead ahead(p, part, n);
  auto issue = [&](int req, int blk, int stage, int fill) {
    bool ok;
    const u8* scale_at;
    const u8* rec = ahead.locate(p, part, req, blk, ok, scale_at);
    mbar_wait(bars.empty(stage, half), (fill & 1) ^ 1);
    // The half's bytes of each row through the warp's shared gathers (P1 -20% on an H100
    // against a 16-byte copy of each of 32 rows per instruction: NOTES-sm90.md).
    const int from = half ? 128 * LEFT_BOXES : 0;
    const int bytes = half ? 2 * D_QK - from : 128 * LEFT_BOXES;
    const u32 tile = tiles + stage * TILE_BYTES;
    const int first = n - threadIdx.x % 32;  // the warp's first row
    // (rolled where the producer has 24 registers)
    gather_spans<!PIPE>(rec, ok && (DIAG & 2) == 0, from, bytes, [&](int t, int o) {
      const int m = first + t, i = (from + o) / 16;  // row m's 16-byte chunk i
      return tile + (i / 8) * BOX_BYTES + m * 128 + (((i % 8) ^ (m % 8)) << 4);
    });
    if (half == 0) st_shared8(valid + stage * BLOCK + n, ok);
    cp_async_commit();
    if (PREFETCH_L2 && stage == 0) prefetch_next_pair(p, part, req, blk, n, half);
  };
  auto land = [&](int stage) {  // (after the wait for the stage's copies)
    fence_async_smem();  // the copies, visible to the consumers' wgmma
    mbar_arrive(bars.full(stage, half));
  };
  int uses[2] = {0, 0};
  for (int req = part.begin_req; req <= part.end_req; ++req)
    for_each_pair(p, part, req, [&](int a, bool has_b) {
      issue(req, a, 0, uses[0]++);
      if (PAIR_LOADS && has_b) {
        issue(req, a + 1, 1, uses[1]++);
        cp_async_wait<1>();
        land(0);
        cp_async_wait<0>();
        land(1);
        return;
      }
      cp_async_wait<0>();
      land(0);
      if (has_b) {
        issue(req, a + 1, 1, uses[1]++);
        cp_async_wait<0>();
        land(1);
      }
    });
}

// Sparse producer (all 128 threads). Warps 0-1 fill stage half 0 (NoPE dims 0-255, boxes 0-3),
// warps 2-3 half 1 (V3.2: dims 256-511, boxes 4-7, and RoPE box 8; MODEL1: dims 256-447,
// boxes 4-6, and RoPE box 7); thread n of a half owns token n of each block. The FP8 bytes land
// by cp.async inside the stage itself (no registers held across the memory latency: the
// producer has 24, leaving 240 to the consumers). With S slices of 64 dims in a half: slices
// 0 and 1 of the records go to the region of the half's box S-1, slice 3 (S = 4) to the second
// half of box 2's region, slice 2 to a 4 KB staging slot. Dequantizing boxes 0 and 1, then box 3
// (S = 4), then box 2, with a barrier of the half's 64 threads between, no box is written before
// its raw bytes are read. The RoPE dims are copied straight into their box.
DEV void producer_sparse(const DecodeParams& p, const Part& part, u32 base) {
  // (every address from `base`: one register for all of them)
  const u32 tiles = base + SMEM_K, staging = base + SMEM_STAGING, valid = base + SMEM_VALID;
  const Barriers bars{base + SMEM_BARS};
  const int n = threadIdx.x % 64, half = threadIdx.x / 64;
  const int slices = MODEL1 && half == 1 ? 3 : 4;
  const u32 bar = 5 + half;  // named barrier of the half's two warps
  EntryAhead ahead(p, part, n);
  for_each_load(p, part, [&](int req, int blk, int stage, int fill) {
    bool ok;
    const u8* scale_at;
    const u8* rec = ahead.locate(p, part, req, blk, ok, scale_at);
    // Scales of the half's slices: V3.2 2 fp32 (one per 128 dims), MODEL1 UE8M0 bytes (one per
    // 64 dims) after the page's 576-byte token records.
    const uint2 scales =
        ok ? (MODEL1 ? make_uint2(*reinterpret_cast<const u32*>(scale_at + 4 * half), 0)
                     : *reinterpret_cast<const uint2*>(rec + D_V + 8 * half))
           : make_uint2(0, 0);
    const u32 boxes = tiles + stage * TILE_BYTES + 4 * half * BOX_BYTES;  // the half's box 0
    // (one slot per half: its threads finish a block before they start the next)
    const u32 stage_slot = staging + half * STAGING_BYTES;
    // Where 64-dim slice j of the records sits (token n at + 64 n).
    auto raw_at = [&](int j) -> u32 {
      return j < 2 ? boxes + (slices - 1) * BOX_BYTES + j * STAGING_BYTES
                   : (j == 3 ? boxes + 2 * BOX_BYTES + STAGING_BYTES : stage_slot);
    };
    mbar_wait(bars.empty(stage, half), (fill & 1) ^ 1);
    const u8* nope = rec + 256 * half;
    const int rope_from = MODEL1 ? 448 : D_V + 16;
    const u32 rope_box = tiles + stage * TILE_BYTES + (MODEL1 ? 7 : P_BOX) * BOX_BYTES;
    const int first = n - threadIdx.x % 32;  // the warp's first token
    gather_spans(nope, ok && (DIAG & 2) == 0, 0, 64 * slices,
                 [&](int t, int o) { return raw_at(o / 64) + (first + t) * 64 + o % 64; });
    if (half == 1)  // RoPE: 128 bytes straight into its box (swizzled)
      gather_spans(rec, ok, rope_from, 128, [&](int t, int o) {
        return rope_box + (first + t) * 128 + (((o / 16) ^ ((first + t) % 8)) << 4);
      });
    else
      st_shared8(valid + stage * BLOCK + n, ok);
    const u32 row = opaque(n) * 128, swz = n % 8;  // (opaque: fewer producer spills)
    cp_async_commit();
    if (PREFETCH_L2 && stage == 0) prefetch_next_pair(p, part, req, blk, n, half);
    cp_async_wait<0>();
    named_barrier(bar, 64);  // the whole half's bytes have landed
    if (PIPE) {  // (104 registers) the token's raw bytes all into registers, one barrier, out
      u32 w[4][4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (j < slices) ld_shared16(w[j][u], raw_at(j) + n * 64 + u * 16);
      named_barrier(bar, 64);  // every raw byte of the half read
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const Dequant d = Dequant::of(box_scale16(scales, j));
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (j < slices && (DIAG & 1) == 0) d.chunk(w[j][u], u, boxes + j * BOX_BYTES + row, swz, 0);
      }
      fence_async_smem();  // the stores (and copies), visible to the consumers' wgmma
      mbar_arrive(bars.full(stage, half));
      return;
    }
    // Slice j of token n -> row n of box j.
    auto dequantize = [&](int j) {
      if ((DIAG & 1) == 0)
        dequant_row(raw_at(j) + n * 64, boxes + j * BOX_BYTES + row, swz, box_scale16(scales, j));
    };
    dequantize(0);
    dequantize(1);
    named_barrier(bar, 64);  // box S-1's region (slices 0 and 1) read by all
    if (slices == 4) {
      dequantize(3);
      named_barrier(bar, 64);  // box 2's region (slice 3) read by all
    }
    dequantize(2);
    fence_async_smem();  // the stores (and copies), visible to the consumers' wgmma
    mbar_arrive(bars.full(stage, half));
  });
}

// Sparse FP8, FP8_PAIRS (all 128 threads; tokens and dims as in producer_sparse, or with CLUSTER
// as in producer_sparse_cluster): slice j of a token lands in the second half of the token's
// row of box j and is dequantized in place (dequant_in_row), so a block needs no staging slot
// and no barrier between boxes, and both blocks of a pair are in flight before the producer
// waits for A's bytes: B's gather latency hides behind A's, and A's dequantization behind B's
// copies. (Not across pairs: see producer_rows.) The scales (two registers a block) are loaded
// when the block is issued.
DEV void producer_fp8_pairs(const DecodeParams& p, const Part& part, u32 base) {
  const u32 tiles = base + SMEM_K, valid = base + SMEM_VALID;
  const Barriers bars{base + SMEM_BARS};
  // This thread's token n and boxes [box0, box0 + boxes); the full barrier it arrives on (half).
  // Cluster: warp q takes dims [128q, 128q + 128) (boxes 2q, 2q + 1, scale q) of the CTA's 32
  // tokens; else half h (warps 2h, 2h + 1) takes its boxes of all 64 tokens.
  const u32 rank = CLUSTER ? cluster_rank() : 0, peer = rank ^ 1;
  const u32 to_peer = CLUSTER ? map_shared(base, peer) - base : 0;
  const int q = threadIdx.x / 32;
  const int n = CLUSTER ? 32 * (int)rank + threadIdx.x % 32 : threadIdx.x % 64;
  const int half = CLUSTER ? q / 2 : threadIdx.x / 64;
  const int box0 = CLUSTER ? 2 * q : 4 * half;
  const int boxes = CLUSTER ? 2 : (MODEL1 && half == 1 ? 3 : 4);
  const int first = n - threadIdx.x % 32;  // the warp's first token
  // (warps 2-3) the RoPE bytes of each token they copy: all 128, or with CLUSTER their half
  const int rope_part = CLUSTER ? 64 * (q - 2) : 0, rope_bytes = CLUSTER ? 64 : 128;
  auto rope_box = [&](int stage) {
    return tiles + stage * TILE_BYTES + (MODEL1 ? 7 : P_BOX) * BOX_BYTES;
  };
  // Block `blk` of request `req` into `stage`: its copies issued and committed; returns the
  // scales of this thread's boxes (V3.2 fp32: two, or with CLUSTER one; MODEL1 UE8M0 bytes).
  EntryAhead ahead(p, part, n);
  auto issue = [&](int req, int blk, int stage, int fill) -> uint2 {
    bool ok;
    const u8* scale_at;
    const u8* rec = ahead.locate(p, part, req, blk, ok, scale_at);
    const uint2 scales =
        !ok       ? make_uint2(0, 0)
        : MODEL1  ? make_uint2(*reinterpret_cast<const u32*>(scale_at + 4 * half), 0)
        : CLUSTER ? make_uint2(*reinterpret_cast<const u32*>(rec + D_V + 4 * q), 0)
                  : *reinterpret_cast<const uint2*>(rec + D_V + 8 * half);
    mbar_wait(bars.empty(stage, half), (fill & 1) ^ 1);
    const u32 tile = tiles + stage * TILE_BYTES;
    gather_spans(rec + 64 * box0, ok && (DIAG & 2) == 0, 0, 64 * boxes, [&](int t, int o) {
      return tile + (box0 + o / 64) * BOX_BYTES + (first + t) * 128 + 64 + o % 64;
    });
    if (q >= 2 && (CLUSTER || half == 1))  // RoPE straight into its box (swizzled)
      gather_spans(rec, ok, (MODEL1 ? 448 : D_V + 16) + rope_part, rope_bytes,
                   [&](int t, int o) {
                     const int m = first + t;
                     return rope_box(stage) + m * 128 + ((((rope_part + o) / 16) ^ (m % 8)) << 4);
                   });
    if (q == 0 || (!CLUSTER && q == 1)) {
      const u32 flag = valid + stage * BLOCK + n;
      st_shared8(flag, ok);
      if (CLUSTER) st_cluster8(flag + to_peer, ok);
    }
    cp_async_commit();
    return scales;
  };
  // After the wait for the stage's copies: dequantize the token's row of each box (and with
  // CLUSTER pass the RoPE part on to the peer), then arrive.
  auto land = [&](int stage, uint2 scales) {
    __syncwarp();  // (the lanes copied for each other)
    const u32 swz = n % 8;
    if (CLUSTER && q >= 2) {
      const u32 rope = rope_box(stage) + opaque(n) * 128;
#pragma unroll 1
      for (int c = rope_part / 16; c < (rope_part + 64) / 16; ++c) {
        u32 w[4];
        ld_shared16(w, rope + ((c ^ swz) << 4));
        st_cluster16(rope + ((c ^ swz) << 4) + to_peer, w[0], w[1], w[2], w[3]);
      }
    }
    const u32 row = tiles + stage * TILE_BYTES + box0 * BOX_BYTES + opaque(n) * 128;
#pragma unroll 1
    for (int j = 0; j < boxes; ++j)  // (CLUSTER: boxes 0-1 of the thread, scale x)
      if ((DIAG & 1) == 0)
        dequant_in_row(row + j * BOX_BYTES, swz, box_scale16(scales, j), to_peer);
    fence_async_smem();  // the copies and stores, visible to the consumers' wgmma
    if (CLUSTER) {
      fence_async_cluster_smem();
      mbar_arrive_cluster(bars.full(stage, half), peer);
    }
    mbar_arrive(bars.full(stage, half));
  };
  int uses[2] = {0, 0};
  for (int req = part.begin_req; req <= part.end_req; ++req)
    for_each_pair(p, part, req, [&](int a, bool has_b) {
      const uint2 scales_a = issue(req, a, 0, uses[0]++);
      if (has_b) {
        const uint2 scales_b = issue(req, a + 1, 1, uses[1]++);
        cp_async_wait<1>();
        land(0, scales_a);
        cp_async_wait<0>();
        land(1, scales_b);
      } else {
        cp_async_wait<0>();
        land(0, scales_a);
      }
    });
}

// 16 bytes at `src` (global, read once: not kept in L1), or zeros where !ok.
DEV void ld_global16(u32 (&w)[4], const void* src, bool ok) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
      " mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
      : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
      : "l"(src), "r"((u32)ok));
}

// A 32-bit word at `src` (global, read-only), or 0 where !ok.
DEV u32 ld_global_u32(const void* src, bool ok) {
  u32 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, 0;\n"
      " @p ld.global.nc.u32 %0, [%1];\n}"
      : "=r"(v)
      : "l"(src), "r"((u32)ok));
  return v;
}

// Sparse FP8 (V3.2 or MODEL1), REG_STAGE (with PIPE): a block's NoPE bytes and scales are
// loaded into registers *before* the producer waits for the block's stage, as FlashMLA's
// producer does, so their latency hides behind the consumers' work on the blocks before rather
// than following the stage's release. Warp w owns T = 16 tokens of each block (with CLUSTER: 8
// of the CTA's 32, written into both CTAs), one load instruction per token covering all its
// NoPE bytes (lane l: 16-byte chunk c = 4 box + u, box = 2 (l / 8) + l % 2, u = (l % 8) / 2,
// in V3.2's scale group l / 8; MODEL1 has 7 NoPE boxes, one UE8M0 scale each, and the lanes of
// box 7 idle). Each lane writes the two bf16 chunks of its dims, odd lanes in the other order,
// so that the eight lanes of a quarter-warp store to eight different 16-byte bank groups. The
// RoPE bytes go by cp.async into their box once the stage is free (CLUSTER: through registers,
// loaded with the rest, into both CTAs).
DEV void producer_fp8_regs(const DecodeParams& p, const Part& part, u32 base) {
  constexpr int T = CLUSTER ? 8 : 16;
  const u32 tiles = base + SMEM_K, valid = base + SMEM_VALID;
  const Barriers bars{base + SMEM_BARS};
  const u32 rank = CLUSTER ? cluster_rank() : 0, peer = rank ^ 1;
  const u32 to_peer = CLUSTER ? map_shared(base, peer) - base : 0;
  const int lane = threadIdx.x % 32;
  const int first = 32 * (int)rank + T * (threadIdx.x / 32);  // the warp's first token
  const int box = 2 * (lane / 8) + lane % 2, u = (lane % 8) / 2;
  const bool nope = box < (MODEL1 ? 7 : 8);  // (MODEL1: dims 448-511 are the RoPE box)
  const u32 rope_box = (MODEL1 ? 7 : P_BOX) * BOX_BYTES;
  const int rope_from = MODEL1 ? 448 : D_V + 16;  // (the RoPE bytes of a record)
  EntryAhead ahead(p, part, first + lane % T);  // (lanes l and l + T: the same token)
  // RoPE (CLUSTER), lane l: chunk l % 8 of token R j + l / 8 (R = 4 tokens an instruction)
  constexpr int R = 4;
  const int rope_chunk = lane % 8;
  auto rope_token = [&](int j) { return R * j + lane / 8; };
  // One flat loop over the walk's blocks: with for_each_load's two call sites the staged
  // registers would be live across both copies of the body, and spill. Each block's loads are
  // issued at the top, after the previous block's arrive (a release: loads before it would hold
  // it back until they land) and before the empty wait, where ptxas keeps them (test_compile
  // checks that it does).
  u32 fills = 0;  // fills of stage 0 (low 16 bits) and stage 1 (high)
  while (ahead.req <= part.end_req) {
    const int stage = (ahead.blk - part.lo(ahead.req)) & 1;
    const u32 fill = (fills >> (16 * stage)) & 0xffff;
    fills += 1u << (16 * stage);
    bool ok;
    const u8* scale_at;
    const u8* rec = ahead.locate(p, part, ahead.req, ahead.blk, ok, scale_at);
    const u64 mine = reinterpret_cast<u64>(rec) | (ok ? 1u : 0u);  // (records are 16-aligned)
    auto record = [&](int t) {  // token first + t's record, its ok in bit 0
      return __shfl_sync(0xffffffffu, mine, t);
    };
    // MODEL1: this lane's token's 8 UE8M0 bytes (byte j: box j), shuffled out per token below
    const u32 own_lo = MODEL1 ? ld_global_u32(scale_at, ok) : 0;
    const u32 own_hi = MODEL1 ? ld_global_u32(scale_at + 4, ok) : 0;
    u32 raw[T][4];
    u32 scale[MODEL1 ? 1 : T];  // V3.2: the fp32 bits of token t's scale of group l / 8
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const u64 theirs = record(t);
      const u8* r = reinterpret_cast<const u8*>(theirs & ~u64(1));
      ld_global16(raw[t], r + 16 * (4 * box + u), nope && (theirs & 1) && (DIAG & 6) == 0);
      if constexpr (!MODEL1) scale[t] = ld_global_u32(r + D_V + 4 * (lane / 8), theirs & 1);
    }
    u32 rope[CLUSTER ? T / R : 1][4];
    if (CLUSTER) {
#pragma unroll
      for (int j = 0; j < T / R; ++j) {
        const u64 theirs = record(rope_token(j));
        const u8* r = reinterpret_cast<const u8*>(theirs & ~u64(1));
        ld_global16(rope[j], r + rope_from + 16 * rope_chunk, (theirs & 1) && (DIAG & 4) == 0);
      }
    }
    mbar_wait(bars.empty(stage, 0), (fill & 1) ^ 1);
    mbar_wait(bars.empty(stage, 1), (fill & 1) ^ 1);
    const u32 tile = tiles + stage * TILE_BYTES;
#pragma unroll
    for (int j = 0; j < T / R; ++j) {
      const int m = first + rope_token(j), c = rope_chunk;
      const u32 dst = tile + rope_box + m * 128 + ((c ^ (m % 8)) << 4);
      if (CLUSTER) {
        st_shared16(dst, rope[j][0], rope[j][1], rope[j][2], rope[j][3]);
        st_cluster16(dst + to_peer, rope[j][0], rope[j][1], rope[j][2], rope[j][3]);
      } else {
        const u64 theirs = record(rope_token(j));
        const u8* r = reinterpret_cast<const u8*>(theirs & ~u64(1));
        cp_async16(dst, r + rope_from + 16 * c, (theirs & 1) && (DIAG & 4) == 0);
      }
    }
    cp_async_commit();
    if (lane < T) {
      const u32 flag = valid + stage * BLOCK + first + lane;
      st_shared8(flag, ok);
      if (CLUSTER) st_cluster8(flag + to_peer, ok);
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const int m = first + t;
      u32 s16;  // bf16(scale), as box_scale16 makes it
      if constexpr (MODEL1) {
        const u32 lo = __shfl_sync(0xffffffffu, own_lo, t), hi = __shfl_sync(0xffffffffu, own_hi, t);
        s16 = box_scale16(make_uint2(box < 4 ? lo : hi, 0), box % 4);
      } else {
        s16 = pack2(__uint_as_float(scale[t]), 0.f);
      }
      if (nope && (DIAG & 1) == 0)
        Dequant::of(s16).chunk_pair(raw[t], u, tile + box * BOX_BYTES + m * 128, m % 8, lane % 2,
                                    to_peer);
    }
    cp_async_wait<0>();
    fence_async_smem();  // the stores and copies, visible to the consumers' wgmma
    if (CLUSTER) {
      fence_async_cluster_smem();
      mbar_arrive_cluster(bars.full(stage, 0), peer);
      mbar_arrive_cluster(bars.full(stage, 1), peer);
    }
    mbar_arrive(bars.full(stage, 0));
    mbar_arrive(bars.full(stage, 1));
  }
}

// Sparse FP8 (V3.2) over a 2-CTA cluster, CLUSTER=1: the two CTAs are the two 64-head tiles of
// one query token, and CTA r gathers and dequantizes tokens [32r, 32r + 32) of every block into
// both CTAs' stages, so each token is dequantized once instead of once per tile. Warp q owns
// the NoPE dims [128q, 128q + 128) (boxes 2q and 2q + 1, the record's scale q), lane t token
// 32r + t. The warp's lanes copy its records by cp.async for each other (gather_spans), to where
// after a warp sync only the token's thread reads them: dims 0-63 in its own row of box 2q + 1
// (which the peer never writes), dims 64-127 in its 64 bytes of the staging slots. Box 2q is
// written first, then box 2q + 1, so no thread overwrites bytes it has not read. Warps 2-3 also
// copy half of their tokens' RoPE rows each into box 8, then from there into the peer's. Each
// writer arrives on the half's full barrier of both CTAs (after a proxy fence for the cluster's
// shared memory); the consumers of both release every stage to both.
DEV void producer_sparse_cluster(const DecodeParams& p, const Part& part, u32 base) {
  const u32 tiles = base + SMEM_K, staging = base + SMEM_STAGING, valid = base + SMEM_VALID;
  const Barriers bars{base + SMEM_BARS};
  const u32 rank = cluster_rank(), peer = rank ^ 1;
  const u32 to_peer = map_shared(base, peer) - base;  // (the windows map linearly)
  const int q = threadIdx.x / 32, n = 32 * (int)rank + threadIdx.x % 32;
  const int half = q / 2;
  EntryAhead ahead(p, part, n);
  for_each_load(p, part, [&](int req, int blk, int stage, int fill) {
    bool ok;
    const u8* scale_at;
    const u8* rec = ahead.locate(p, part, req, blk, ok, scale_at);
    // bf16(scale q), as the reference rounds it
    const u32 s16 = ok ? pack2(*reinterpret_cast<const float*>(rec + D_V + 4 * q), 0.f) : 0u;
    mbar_wait(bars.empty(stage, half), (fill & 1) ^ 1);
    const u32 box_q = tiles + stage * TILE_BYTES + 2 * q * BOX_BYTES;  // box 2q
    const u32 row = box_q + opaque(n) * 128;
    const u32 raw_hi = staging + threadIdx.x * 64;
    const u8* nope = rec + 128 * q;
    const int first = n - threadIdx.x % 32;  // the warp's first token
    const u32 rope_box = tiles + stage * TILE_BYTES + P_BOX * BOX_BYTES;
    // dims 0-63 of token m into its row of box 2q + 1 (unswizzled), dims 64-127 into its
    // staging bytes
    gather_spans(nope, ok && (DIAG & 2) == 0, 0, 128, [&](int t, int o) {
      return o < 64 ? box_q + BOX_BYTES + (first + t) * 128 + o
                    : staging + (32 * q + t) * 64 + o - 64;
    });
    if (half == 1)  // (warps 2-3) half of each RoPE row, at its swizzled places
      gather_spans(rec, ok, D_V + 16 + 64 * (q - 2), 64, [&](int t, int o) {
        const int m = first + t;
        return rope_box + m * 128 + (((4 * (q - 2) + o / 16) ^ (m % 8)) << 4);
      });
    const u32 swz = n % 8;
    // RoPE chunks 4(q - 2) .. 4(q - 2) + 3 of token n
    const u32 rope = rope_box + opaque(n) * 128;
    auto rope_chunk = [&](int c) { return rope + (((4 * (q - 2) + c) ^ swz) << 4); };
    if (q == 0) {
      const u32 flag = valid + stage * BLOCK + n;
      st_shared8(flag, ok);
      st_cluster8(flag + to_peer, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();  // (the lanes copied for each other: all the warp's copies have landed)
    if (half == 1) {  // the RoPE chunks, on to the peer
#pragma unroll 1
      for (int c = 0; c < 4; ++c) {
        u32 w[4];
        ld_shared16(w, rope_chunk(c));
        st_cluster16(rope_chunk(c) + to_peer, w[0], w[1], w[2], w[3]);
      }
    }
    if ((DIAG & 1) == 0) {
      dequant_row(row + BOX_BYTES, row, swz, s16, to_peer);
      dequant_row(raw_hi, row + BOX_BYTES, swz, s16, to_peer);
    }
    fence_async_smem();  // the copies and stores, visible to both CTAs' wgmma
    fence_async_cluster_smem();
    mbar_arrive(bars.full(stage, half));
    mbar_arrive_cluster(bars.full(stage, half), peer);
  });
}

// The accumulator fragments of P as wgmma A operands (k-slice k: columns 16k .. 16k + 15).
DEV void to_frags(const float (&s)[32], u32 (&frag)[4][4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    frag[k][0] = pack2(s[8 * k], s[8 * k + 1]);
    frag[k][1] = pack2(s[8 * k + 2], s[8 * k + 3]);
    frag[k][2] = pack2(s[8 * k + 4], s[8 * k + 5]);
    frag[k][3] = pack2(s[8 * k + 6], s[8 * k + 7]);
  }
}

// What a consumer thread needs: its rows, shared-memory addresses, the row statistics.
struct Consumer {
  const DecodeParams& p;
  u32 q_smem, k_smem;
  u8* smem;  // generic address of the aligned base
  Barriers bars;
  int tid, lane, warp, t4;
  int row_local[2], row_t[2];
  int uses[2];  // fills of stage 0 and 1 consumed so far

  // S = Q K^T for the block in `stage`, both halves as they land (N = 64: all tokens).
  DEV void scores(float (&s)[32], int stage) const {
    scores_issue(s, stage, uses[stage] & 1);
    wgmma_wait<0>();
    fence_regs(s);
  }
  // (committed, not waited for; `parity`: of the stage's full barriers)
  // PIPE: both halves waited for first (wait_full). A wait loop between the wgmmas while the
  // previous block's P V may still run makes ptxas serialize every wgmma of the kernel.
  DEV void scores_issue(float (&s)[32], int stage, u32 parity) const {
    if (PIPE)
      wait_full(stage, parity);
    else
      mbar_wait<SPARSE && CLUSTER>(bars.full(stage, 0), parity);
    scores_issue_landed(s, stage, parity);
  }
  DEV void wait_full(int stage, u32 parity) const {
    mbar_wait<SPARSE && CLUSTER>(bars.full(stage, 0), parity);
    mbar_wait<SPARSE && CLUSTER>(bars.full(stage, 1), parity);
  }
  // (PIPE: both halves landed; else the right half waited for between its wgmmas)
  DEV void scores_issue_landed(float (&s)[32], int stage, u32 parity) const {
    const u64 q_desc = smem_desc(q_smem, 16, 1024);
    const u64 k_desc = smem_desc(k_smem + stage * TILE_BYTES, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < D_QK / 16; ++k) {
      if (!PIPE && k == LEFT_BOXES * 4) mbar_wait<SPARSE && CLUSTER>(bars.full(stage, 1), parity);
      const u32 off = ((k / 4) * BOX_BYTES + (k % 4) * 32) >> 4;
      wgmma_m64n64k16(s, q_desc + off, k_desc + off, k > 0);
    }
    wgmma_commit();
  }

  // Scale and mask block `blk` of a request in `stage` (dense: length, invalid page, causal;
  // sparse: the producer's valid flags); returns the quad-reduced row maxima of the masked
  // scores.
  DEV void mask(float (&s)[32], float (&mx)[2], int req_length, int blk, const int* table,
                int stage) const {
    const u8* valid = smem + SMEM_VALID + stage * BLOCK + 2 * t4;  // (sparse)
    const int page = SPARSE ? 0 : table[blk / (p.page / BLOCK)];
    const int n_valid = min(BLOCK, req_length - blk * BLOCK);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int limit = page >= 0 && page < p.num_pages ? n_valid : 0;  // (dense)
      if (p.causal) limit = min(limit, req_length - p.s_q + row_t[i] - blk * BLOCK + 1);
      limit -= 2 * t4;
      mx[i] = -F_INF;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& v = s[4 * j + 2 * i + e];
          const bool keep = SPARSE ? valid[8 * j + e] != 0 : 8 * j + e < limit;
          v = keep ? v * p.scale_log2 : -F_INF;
          mx[i] = fmaxf(mx[i], v);
        }
      mx[i] = warp_max4(mx[i]);
    }
  }

  // s <- exp2(s - m) per row; returns the thread's partial row sums.
  DEV void exponentiate(float (&s)[32], const float (&m)[2], float (&sum)[2]) const {
    for (int i = 0; i < 2; ++i) {
      const float m_safe = m[i] == -F_INF ? 0.f : m[i];
      sum[i] = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& v = s[4 * j + 2 * i + e];
          v = exp2f(v - m_safe);
          sum[i] += v;
        }
    }
  }

  // P (as A fragments, x factor per row) -> the RoPE box of `stage`, 128-byte swizzled: the
  // K-major A operand of the other consumer. Only reads `frag` (a wgmma may be reading it).
  DEV void store_p(const u32 (&frag)[4][4], const float (&f)[2], int stage) const {
    u8* box = smem + SMEM_K + stage * TILE_BYTES + P_BOX * BOX_BYTES + 4 * opaque(t4);
    const int g = opaque(row_local[0]) % 8;  // both rows: = lane / 4 (mod 8)
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // q: (row half i = q % 2, column chunk j = 2k + q / 2)
        const int i = q % 2, j = 2 * k + q / 2, r = row_local[0] + 8 * i;
        u32 v = frag[k][q];
        if (f[i] != 1.f) v = pack2(to_float((u16)(v & 0xffff)) * f[i], to_float((u16)(v >> 16)) * f[i]);
        *reinterpret_cast<u32*>(box + r * 128 + ((j ^ g) << 4)) = v;
      }
  }

  // Tokens past the length hold whatever their page has (NaN in the tests): zero their V rows
  // in `stage` (0 * NaN would poison P V); the block's owner does it after its Q K^T.
  DEV void zero_tail(int stage, int req_length, int blk) const {
    const int n_valid = min(BLOCK, req_length - blk * BLOCK);
    if (n_valid >= BLOCK) return;
    u8* tile = smem + SMEM_K + stage * TILE_BYTES;
    for (int i = opaque(tid) % 128; i < (BLOCK - n_valid) * P_BOX * 8; i += 128) {
      const int row = n_valid + i / (P_BOX * 8), box = (i / 8) % P_BOX, chunk = i % 8;
      *reinterpret_cast<uint4*>(tile + box * BOX_BYTES + row * 128 + chunk * 16) =
          make_uint4(0, 0, 0, 0);
    }
  }

  // O += P V over this consumer's 256 columns of `stage` (V boxes from `first_box`); P from
  // registers (`frag`) or from the RoPE box of `p_stage`.
  DEV void pv_regs(float (&o)[128], const u32 (&frag)[4][4], int stage, int first_box) const {
    const u64 v_desc = smem_desc(k_smem + stage * TILE_BYTES + first_box * BOX_BYTES, BOX_BYTES, 1024);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < BLOCK / 16; ++k) wgmma_m64n256k16_rs(o, frag[k], v_desc + k * 128, 1);
    wgmma_commit();
  }
  DEV void pv_smem(float (&o)[128], int p_stage, int stage, int first_box) const {
    const u64 p_desc = smem_desc(k_smem + p_stage * TILE_BYTES + P_BOX * BOX_BYTES, 16, 1024);
    const u64 v_desc = smem_desc(k_smem + stage * TILE_BYTES + first_box * BOX_BYTES, BOX_BYTES, 1024);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < BLOCK / 16; ++k) wgmma_m64n256k16(o, p_desc + k * 2, v_desc + k * 128, 1);
    wgmma_commit();
  }

  DEV void release(int stage, int half) const {
    if (lane != 0) return;
    mbar_arrive(bars.empty(stage, half));
    // the peer's producer multicasts into this CTA too
    if (CLUSTER) mbar_arrive_cluster(bars.empty(stage, half), cluster_rank() ^ 1);
  }
};

// O rows scaled by f (skipped when no factor in the warp differs from 1: the common case).
DEV void scale_rows(float (&o)[128], const float (&f)[2]) {
  if (__all_sync(0xffffffffu, f[0] == 1.f && f[1] == 1.f)) return;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j] *= f[0], o[4 * j + 1] *= f[0];
    o[4 * j + 2] *= f[1], o[4 * j + 3] *= f[1];
  }
}

// exp2(a - b) for a <= b, 0 when a = -inf (nothing was seen yet: what it scales is 0).
DEV float rescale(float a, float b) { return a == -F_INF ? 0.f : exp2f(a - b); }

// ROLE: PIPE compiles each consumer on its own (0 left, 1 right), each under its own register
// budget; the seesaw shares one body (-1).
template <int ROLE>
DEV void consumer(const DecodeParams& p, const Part& part, u32 base, u8* smem,
                  const Barriers& bars) {
  const int tid = threadIdx.x - 128;  // 0..255 over both consumers
  // The consumer index through a shuffle: provably warp-uniform, so the operand descriptors
  // derived from it stay in uniform registers.
  const int c = ROLE >= 0 ? ROLE : __shfl_sync(0xffffffffu, tid / 128, 0);
  Consumer self{p, base + SMEM_Q, base + SMEM_K, smem, bars, tid, tid % 32, (tid % 128) / 32,
                tid % 4, {0, 0}, {0, 0}, {0, 0}};
  int row_h[2];
  bool row_ok[2];
  for (int i = 0; i < 2; ++i) {
    self.row_local[i] = 16 * self.warp + self.lane / 4 + 8 * i;
    row_ok[i] = query_row(p, self.row_local[i], self.row_t[i], row_h[i]);
  }
  float* const max_a = reinterpret_cast<float*>(smem + SMEM_MAX);
  float* const max_b = max_a + BLOCK;
  float* const sums = reinterpret_cast<float*>(smem + SMEM_SUM);

  float o[128];  // O[:, 256c + 8j + 2 t4 + {0,1}] at o[4j + {0,1}] (row 0), o[4j + {2,3}] (row 1)
  float m[2], l[2];
  // Q of request `req` -> shared memory (cp.async; completed by start_request). Issued early,
  // in the previous request's last pair once both consumers' Q K^T are done, it loads under
  // that pair's P V and the epilogue.
  int q_issued = -1;
  auto issue_q = [&](int req) {
    if (!PIPE || c == 0) {  // (PIPE: the left consumer, Q's only reader, loads it)
      for (int i = opaque(tid); i < BLOCK * BOXES * 8; i += PIPE ? 128 : CONSUMERS) {
        const int r = i / (BOXES * 8), chunk = i % (BOXES * 8);
        int t, h;
        const bool ok = query_row(p, r, t, h);
        const u16* src = ok ? p.q + req * p.q_b + t * p.q_t + h * p.q_h + chunk * 8 : p.q;
        cp_async16(self.q_smem + (chunk / 8) * BOX_BYTES + r * 128 + (((chunk % 8) ^ (r % 8)) << 4),
                   src, ok);
      }
      cp_async_commit();
    }
    q_issued = req;
  };
  auto start_request = [&](int req) {  // Q in shared memory, statistics reset
    if (q_issued != req) {
      named_barrier(BAR_BOTH, CONSUMERS);  // the previous request's Q readers are done
      issue_q(req);
    }
    cp_async_wait<0>();
    fence_async_smem();
    named_barrier(BAR_BOTH, CONSUMERS);
#pragma unroll
    for (int j = 0; j < 128; ++j) o[j] = 0.f;
    m[0] = m[1] = -F_INF;
    l[0] = l[1] = 0.f;
  };
  auto finish_request = [&](int req) {
    for (int i = 0; i < 2; ++i) {
      l[i] = warp_sum4(l[i]);
      if (self.t4 == 0 && (!PIPE || c == 0)) {
        sums[c * BLOCK + self.row_local[i]] = l[i];
        if (PIPE) sums[BLOCK + self.row_local[i]] = m[i];  // (PIPE: the left keeps l and m)
      }
    }
    named_barrier(BAR_BOTH, CONSUMERS);
    for (int i = 0; i < 2; ++i) {
      const int r = self.row_local[i];
      if (PIPE) {
        l[i] = sums[r];
        m[i] = sums[BLOCK + r];
      } else {
        l[i] = sums[r] + sums[BLOCK + r];
      }
    }
    const bool piece = (req == part.begin_req && part.first_split) ||
                       (req == part.end_req && part.last_split);
    const int slot = piece ? p.num_splits[req] + (req == part.begin_req ? part.begin_split : 0) : 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_ok[i]) continue;
      const bool empty_row = l[i] == 0.f;
      const float lse2 = m[i] + __log2f(empty_row ? 1.f : l[i]);
      const int t = self.row_t[i], h = row_h[i];
      float f = empty_row ? 0.f : 1.f / l[i];
      // The sink joins the normaliser of whole requests (the combine adds it to split ones).
      if (SPARSE && !piece && !empty_row && p.sink) f /= 1.f + exp2f(p.sink[h] * LOG2E - lse2);
      if (c == 0 && self.t4 == 0) {
        if (piece) {
          p.lse_acc[((i64)slot * p.s_q + t) * p.h_q + h] = empty_row ? -F_INF : lse2;
        } else {
          const i64 at = req * p.l_b + t * p.l_t + h * p.l_h;
          p.lse[at] = empty_row ? F_INF : lse2 * LN2;
          if (SPARSE && p.max_logits) p.max_logits[at] = empty_row ? -F_INF : m[i] * LN2;
        }
      }
      if (piece) {
        float* dst = p.o_acc + (((i64)slot * p.s_q + t) * p.h_q + h) * D_V + 256 * c + 2 * self.t4;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) =
              make_float2(o[4 * j + 2 * i] * f, o[4 * j + 2 * i + 1] * f);
      } else {
        u16* dst = p.out + req * p.o_b + t * p.o_t + h * p.o_h + 256 * c + 2 * self.t4;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<u32*>(dst + 8 * j) = pack2(o[4 * j + 2 * i] * f, o[4 * j + 2 * i + 1] * f);
      }
    }
  };

  // PIPE, left consumer: block k's Q K^T is issued before block k-1's P V (P from registers),
  // and waited for while that P V still runs; then the P V is waited for, k-1's stage half
  // released and O rescaled for block k. (This order, flash-attention 3's, ptxas keeps
  // asynchronous; reading an accumulator of the previous iteration after a partial wait makes
  // it serialize every wgmma.) It releases k-1's stage only late in block k, which leaves the
  // producer about half a block to refill it; PV_FIRST issues the P V first instead, so the
  // stage frees early and the softmax no longer overlaps a P V.
  u32 frag_left[4][4];
  int p_stage = -1;  // the stage whose P (in frag_left) awaits its P V, or -1
  float* const alphas = max_a;  // PIPE: per stage, the left's rescale factors for the right
  auto left_block = [&](int req, int blk, int stage, u32 parity, bool last) {
    float s[32], mx[2], sum[2], alpha[2];
    if (PV_FIRST) {  // the previous block's P V, then this block's Q K^T
      self.wait_full(stage, parity);
      if (p_stage >= 0) self.pv_regs(o, frag_left, p_stage, 0);
      self.scores_issue_landed(s, stage, parity);
      wgmma_wait<1>();  // the P V done (no register of it read yet): its half is free
      if (p_stage >= 0) self.release(p_stage, 0);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(frag_left);
      p_stage = -1;
    } else {
      self.scores_issue(s, stage, parity);
      if (p_stage >= 0) {
        self.pv_regs(o, frag_left, p_stage, 0);  // O_L += P V[:, left] of the previous block
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
    }
    fence_regs(s);
    self.mask(s, mx, part.length(p, req), blk, nullptr, stage);
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m[i], mx[i]);
      alpha[i] = rescale(m[i], m_new);
      m[i] = m_new;
    }
    self.exponentiate(s, m, sum);
    for (int i = 0; i < 2; ++i) {
      l[i] = l[i] * alpha[i] + sum[i];
      if (self.t4 == 0) alphas[stage * BLOCK + self.row_local[i]] = alpha[i];
    }
    if (!PV_FIRST) {
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(frag_left);
      if (p_stage >= 0) self.release(p_stage, 0);
    }
    to_frags(s, frag_left);
    const float one[2] = {1.f, 1.f};
    self.store_p(frag_left, one, stage);
    fence_async_smem();
    named_barrier(BAR_P_A, CONSUMERS);  // P and the factors published
    if (PREFETCH_Q && last && req < part.end_req) issue_q(req + 1);  // (its Q K^T done)
    scale_rows(o, alpha);
    p_stage = stage;
  };
  auto finish_left = [&] {  // the last block's P V
    if (p_stage >= 0) self.pv_regs(o, frag_left, p_stage, 0);
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(frag_left);
    if (p_stage >= 0) self.release(p_stage, 0);
    p_stage = -1;
  };
  auto right_block = [&](int req, int stage, bool last) {
    named_barrier(BAR_P_A, CONSUMERS);
    float alpha[2];
    for (int i = 0; i < 2; ++i) alpha[i] = alphas[stage * BLOCK + self.row_local[i]];
    if (PREFETCH_Q && last && req < part.end_req) issue_q(req + 1);  // (the flag only)
    scale_rows(o, alpha);
    self.pv_smem(o, stage, stage, LEFT_BOXES);  // O_R = O_R alpha + P V[:, right]
    wgmma_wait<0>();
    fence_regs(o);
    self.release(stage, 1);
  };

  for (int req = part.begin_req; req <= part.end_req; ++req) {
  start_request(req);
  if (PIPE) {
    // Block k of the request is fill uses[k % 2] + k / 2 of stage k % 2. (One loop per
    // consumer, so that ptxas sees no wgmma of the left pending in the right's code; stages
    // and fills by value: an indexed `uses` would put the consumer's state on the stack.)
    const int lo = part.lo(req), hi = part.hi(p, req);
    const int u0 = self.uses[0], u1 = self.uses[1];
    if (c == 0) {
      for (int k = 0; k < hi - lo; ++k)
        left_block(req, lo + k, k % 2, ((k % 2 ? u1 : u0) + k / 2) & 1, lo + k + 1 >= hi);
      finish_left();
    } else {
      for (int k = 0; k < hi - lo; ++k) right_block(req, k % 2, lo + k + 1 >= hi);
    }
    self.uses[0] = u0 + (max(hi - lo, 0) + 1) / 2;
    self.uses[1] = u1 + max(hi - lo, 0) / 2;
    finish_request(req);
    continue;
  }
  for_each_pair(p, part, req, [&](int a, bool has_b) {
    const int length = part.length(p, req);
    const int* table = p.block_table + req * p.table_b;
    const bool prefetch_q = PREFETCH_Q && a + 2 >= part.hi(p, req) && req < part.end_req;
    float s[32], mx[2], sum[2];
    u32 frag[4][4];
    if (c == 0) {  // left: block A
      self.scores(s, 0);
      self.mask(s, mx, length, a, table, 0);
      float m_a[2], alpha[2];
      for (int i = 0; i < 2; ++i) {
        m_a[i] = fmaxf(m[i], mx[i]);
        alpha[i] = rescale(m[i], m_a[i]);
        if (self.t4 == 0) max_a[self.row_local[i]] = m_a[i];
      }
      named_barrier(BAR_MAX_A, CONSUMERS);
      if (!SPARSE) self.zero_tail(0, length, a);  // (sparse: the producer zeroes them)
      fence_async_smem();
      self.exponentiate(s, m_a, sum);
      scale_rows(o, alpha);
      to_frags(s, frag);
      self.pv_regs(o, frag, 0, 0);  // O_L += P_A V_A[:, left]
      named_barrier(BAR_P_B, CONSUMERS);
      float beta[2];
      for (int i = 0; i < 2; ++i) {
        const float m_b = max_b[self.row_local[i]];
        beta[i] = rescale(m_a[i], m_b);
        l[i] = (l[i] * alpha[i] + sum[i]) * beta[i];
        m[i] = m_b;
      }
      self.store_p(frag, beta, 0);  // P_A' = P_A exp2(m_A - m_B) for the right consumer
      fence_async_smem();
      named_barrier(BAR_P_A, CONSUMERS);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(frag);
      self.release(0, 0);
      self.release(0, 1);
      scale_rows(o, beta);
      if (has_b) self.pv_smem(o, 1, 1, 0);  // O_L += P_B V_B[:, left]
      // Past BAR_P_B both consumers' Q K^T are done: the next Q may load (under this P V).
      if (prefetch_q) issue_q(req + 1);
      if (has_b) {
        wgmma_wait<0>();
        fence_regs(o);
        self.release(1, 0);
        self.release(1, 1);
      }
    } else {  // right: block B
      if (has_b) {
        self.scores(s, 1);
        self.release(1, 0);  // its left half is the left consumer's now
      }
      named_barrier(BAR_MAX_A, CONSUMERS);
      float m_a[2], m_b[2], alpha[2];
      for (int i = 0; i < 2; ++i) m_a[i] = max_a[self.row_local[i]];
      if (has_b) {
        self.mask(s, mx, length, a + 1, table, 1);
      } else {
        mx[0] = mx[1] = -F_INF;
      }
      for (int i = 0; i < 2; ++i) {
        m_b[i] = fmaxf(m_a[i], mx[i]);
        alpha[i] = rescale(m[i], m_b[i]);  // = exp2(m - m_A) exp2(m_A - m_B)
        if (self.t4 == 0) max_b[self.row_local[i]] = m_b[i];
      }
      if (has_b) {
        self.exponentiate(s, m_b, sum);
        if (!SPARSE) self.zero_tail(1, length, a + 1);
        to_frags(s, frag);
        const float one[2] = {1.f, 1.f};
        self.store_p(frag, one, 1);
        fence_async_smem();
      } else {
        sum[0] = sum[1] = 0.f;
      }
      named_barrier(BAR_P_B, CONSUMERS);
      scale_rows(o, alpha);
      for (int i = 0; i < 2; ++i) {
        l[i] = l[i] * alpha[i] + sum[i];
        m[i] = m_b[i];
      }
      if (has_b) self.pv_regs(o, frag, 1, LEFT_BOXES);  // O_R += P_B V_B[:, right]
      named_barrier(BAR_P_A, CONSUMERS);
      self.pv_smem(o, 0, 0, LEFT_BOXES);  // O_R += P_A' V_A[:, right]
      if (prefetch_q) issue_q(req + 1);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(frag);
      self.release(0, 1);
      if (has_b) self.release(1, 1);
    }
    ++self.uses[0];
    if (has_b) ++self.uses[1];
  });
  finish_request(req);  // (requests with no blocks too: their rows are empty)
  }
}

#if CLUSTER
#define CLUSTER_DIMS __cluster_dims__(2, 1, 1)
#else
#define CLUSTER_DIMS
#endif

extern "C" __global__ void __launch_bounds__(THREADS, 1) CLUSTER_DIMS
    mla_decode_sm90(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(1024) u8 smem[];
  const u32 base = (smem_u32(smem) + 1023) & ~1023u;
  {  // the launcher's size must cover the layout: trap rather than corrupt memory
    u32 given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < base - smem_u32(smem) + SMEM_END) __trap();
  }
  const Barriers bars{base + SMEM_BARS};
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < 2; ++stage)
      for (int half = 0; half < 2; ++half) {
        // dense: the producer's arrive (plus its bytes); sparse: the half's 64 writers (with
        // clusters: of both CTAs; REG_STAGE: all 128 write both halves)
        mbar_init(bars.full(stage, half), SPARSE ? (REG_STAGE ? 128 : 64) * (CLUSTER ? 2 : 1) : 1);
        mbar_init(bars.empty(stage, half), empty_count(stage, half));
      }
    fence_barrier_init();
  }
  if (CLUSTER) {
    cluster_sync();  // the peer's barriers are initialised before anything lands or arrives
  } else {
    __syncthreads();
  }
  // (every value derived after the register reallocation: nothing lives across it)
  if (threadIdx.x < 128) {
    regs_lower<PRODUCER_REGS>();
#if SPARSE == 1
    if (REG_STAGE)  // (with or without the cluster)
      producer_fp8_regs(p, Part::of(p, blockIdx.z), base);
    else if (FP8_PAIRS)
      producer_fp8_pairs(p, Part::of(p, blockIdx.z), base);
    else if (CLUSTER)
      producer_sparse_cluster(p, Part::of(p, blockIdx.z), base);
    else
      producer_sparse(p, Part::of(p, blockIdx.z), base);
#elif SPARSE == 2
    producer_rows(p, Part::of(p, blockIdx.z), base);
#else
    if (threadIdx.x == 0) producer(p, Part::of(p, blockIdx.z), base + SMEM_K, bars);
#endif
  } else {
    auto aligned = [&] { return smem + (base - smem_u32(smem)); };
    if constexpr (!PIPE) {
      regs_raise<LEFT_REGS>();
      consumer<-1>(p, Part::of(p, blockIdx.z), base, aligned(), bars);
    } else if (threadIdx.x < 256) {
      regs_raise<LEFT_REGS>();
      consumer<0>(p, Part::of(p, blockIdx.z), base, aligned(), bars);
    } else {
      regs_lower<RIGHT_REGS>();
      consumer<1>(p, Part::of(p, blockIdx.z), base, aligned(), bars);
    }  // (if constexpr: the seesaw build does not even instantiate the PIPE consumers)
  }
  if (CLUSTER) cluster_sync();  // no CTA leaves while its peer may still write to it
}
