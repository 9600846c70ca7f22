// MLA attention over a paged cache with warp-level tensor cores (mma.sync; SM80 and newer):
// dense decode, sparse decode and sparse prefill in one kernel.
//
// MLA's key fact drives the layout: K and V share the latent row (V = its first 512 dims) and all
// query rows of a *group* use the same keys, so a CTA stacks a group's query rows (dense: the
// s_q * h_q / h_kv rows of one KV head; sparse: the h_q heads of one query token) as the M
// dimension and reads each key tile from memory once for all of them:
//
//     S = Q K^T        [BLOCK_M, BLOCK_N]  over D_QK (576, or 512)
//     O += P V         [BLOCK_M, 512]      V = K[:, :512], the same shared-memory tile
//
// Warps split both products without computing anything twice. Q K^T: RB = BLOCK_M / 16 row
// blocks times CS column splits; warp (rb, cs) scores its 16 rows against tokens
// [cs * SC, (cs + 1) * SC) of the tile, and the CS warps of a row block agree on the row maximum
// through shared memory. P V: warp w accumulates output columns [w * OC, (w + 1) * OC) of all
// BLOCK_M rows, so each V element is read from shared memory once per tile and every P fragment
// serves OC / 8 MMAs. P and the softmax rescale factors travel through shared memory.
//
// Grid (m_tiles, groups, parts). With a schedule (`metadata` non-null) each CTA walks its part of
// the split-KV schedule (flashmla.scheduler rows): whole requests write the final output, pieces
// write fp32 partials (normalised, base-2 lse) for the combine kernel. Without one, CTA `part`
// does all of request `part` (sparse prefill: one "request" per query token).
//
// Key tiles stream through a STAGES-deep cp.async pipeline. Invalid tokens (past the length,
// page id or index out of range, -1) are zero-filled copies that read nothing, and -inf scores.
// FP8 records are copied raw and dequantized into the bf16 tile in shared memory.
//
// Defines: BLOCK_M, BLOCK_N, WARPS, STAGES, FMT (0 plain, 1 FP8 V3.2, 2 FP8 MODEL1), D_QK,
// SPARSE, DTYPE_FP16, CTAS_PER_SM, QREG.
#include "common.cuh"

#ifndef BLOCK_M
#define BLOCK_M 64
#endif
#ifndef BLOCK_N
#define BLOCK_N 32
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef FMT
#define FMT 0
#endif
#ifndef D_QK
#define D_QK 576
#endif
#ifndef SPARSE
#define SPARSE 0
#endif
#ifndef CTAS_PER_SM
#define CTAS_PER_SM 1
#endif

constexpr int D_V = 512;
constexpr int THREADS = WARPS * 32;
constexpr int RB = BLOCK_M / 16;  // row blocks
constexpr int CS = WARPS / RB;    // column splits
constexpr int SC = BLOCK_N / CS;  // score columns per warp
constexpr int MT = BLOCK_M / 16;  // row tiles (of the P V product, per warp)
constexpr int OC = D_V / WARPS;   // output columns per warp
constexpr int KCH = D_QK / 8;     // 16-byte chunks per key row in shared memory
// Independent accumulator sets for S: one warp's Q K^T is a chain of D_QK / 16 dependent MMAs
// per n-tile; with few n-tiles, alternate sets keep several MMAs in flight (64-row tiles have
// no registers to spare and more warps to hide the latency).
constexpr int KSETS = SC >= 32 ? 1 : SC == 8 ? 4 : 2;
constexpr int P_STRIDE = BLOCK_N + 8;
// 16-row tiles (memory-bound shapes) split Q K^T over the head dim instead: each warp keeps the
// queries of its dims in registers and scores every token of the tile against them, so K is read
// from shared memory once per tile (not once per warp); the partial scores are summed through
// shared memory (rows padded to 40 floats: conflict-free float2 accesses).
#ifndef QREG
#define QREG 0
#endif
static_assert(!QREG || BLOCK_M == 16, "queries in registers: 16-row tiles only");
constexpr int KW = D_QK / 16 / WARPS;  // k-steps per warp when QREG
constexpr int SRED = BLOCK_N + 8;
static_assert(!QREG || (D_QK / 16) % WARPS == 0, "head dim split");  // padded: conflict-free ldmatrix without a swizzle
constexpr int TPT = 8;                  // threads per token when copying a tile
static_assert(RB * CS == WARPS && SC % 8 == 0 && OC % 64 == 0 && BLOCK_N % 16 == 0, "tiling");
static_assert(THREADS % TPT == 0 && BLOCK_N % (THREADS / TPT) == 0 || THREADS / TPT > BLOCK_N,
              "token copy split");
static_assert(STAGES >= 2, "the pipeline prefetches into the stage read one tile earlier");

// Raw FP8 record staged per token (bytes, 16-aligned), its 16-byte chunks, and the NoPE values.
constexpr int RAW = FMT == 1 ? 656 : FMT == 2 ? 576 + 16 : 0;
constexpr int RAW_CH = FMT == 1 ? 41 : 36;
constexpr int NOPE = FMT == 1 ? 512 : 448;
static_assert(FMT == 0 || D_QK == (FMT == 1 ? 576 : 512), "FP8 layouts fix the head dim");

struct MlaParams {
  const u16* q;
  u16* out;
  float* lse;
  float* max_logits;  // sparse prefill only (null otherwise)
  float* o_acc;       // [slots, s_q, h_q, 512] fp32 partials
  float* lse_acc;     // [slots, s_q, h_q]
  const u8* cache;
  const int* slots;    // block table [b, max_blocks] or indices [b, s_q, topk]
  const int* lengths;  // cache_seqlens / topk_length (null: list_len)
  const u8* cache2;    // extra cache (sparse decode)
  const int* slots2;
  const int* lengths2;
  const float* sink;
  const int* metadata;  // split-KV schedule (null: one request per CTA)
  const int* num_splits;
  i64 q_b, q_t, q_h;  // element strides
  i64 o_b, o_t, o_h;
  i64 l_b, l_t, l_h;
  i64 page_stride, row_stride, head_stride;  // byte strides of the cache
  i64 page_stride2, row_stride2;
  i64 slot_b, slot_t;  // element strides of the slot lists
  i64 slot2_b, slot2_t;
  int num_pages, page, list_len, page_shift;  // page_shift: log2(page), or -1
  int num_pages2, page2, list_len2, page2_shift;
  int s_q, group, rows, h_q;
  int causal;
  int copy8;  // the cache's records are only 8-byte aligned: copy in 8-byte pieces
  float scale_log2;  // softmax scale * log2(e)
};

struct TokenList {  // one list of positions a request attends to
  const u8* cache;
  const int* slots;
  i64 page_stride, row_stride;
  int num_pages, page, shift;  // shift: log2(page) when a power of two (no division), else -1
  int lo, hi;         // positions [lo, hi) of this CTA's piece
  int causal_base;    // dense: length - s_q (query token t sees positions <= base + t)
};

// Where the record of position `pos` lives (null when the position is invalid); for MODEL1 also
// its 8-byte scale record.
DEV const u8* locate(const TokenList& L, int pos, i64 head_off, const u8** scales) {
  if (pos >= L.hi) return nullptr;
  int page, row;
  if (SPARSE) {
    const int slot = L.slots[pos];
    if (slot < 0 || slot >= L.num_pages * L.page) return nullptr;
    page = L.shift >= 0 ? slot >> L.shift : slot / L.page;
    row = slot - page * L.page;
  } else {
    const int idx = L.shift >= 0 ? pos >> L.shift : pos / L.page;
    page = L.slots[idx];
    if (page < 0 || page >= L.num_pages) return nullptr;
    row = pos - idx * L.page;
  }
  const u8* base = L.cache + (i64)page * L.page_stride;
  if (FMT == 2) {
    *scales = base + (i64)L.page * 576 + (i64)row * 8;
    return base + (i64)row * 576;
  }
  return base + (i64)row * L.row_stride + head_off;
}

// Issue the copies of the tile at positions [start, start + BLOCK_N) of list L into `stage`.
DEV void load_tile(const TokenList& L, int start, i64 head_off, u16* k_tiles, u8* raw_tiles,
                   unsigned char* valid, int stage, int tid, bool copy8) {
  for (int n = tid / TPT; n < BLOCK_N; n += THREADS / TPT) {
    const u8* scales = nullptr;
    const u8* src = locate(L, start + n, head_off, &scales);
    const bool ok = src != nullptr;
    if (tid % TPT == 0) valid[stage * BLOCK_N + n] = ok;
    const u8* safe = ok ? src : L.cache;  // never dereferenced when !ok
    if (FMT == 0) {
      u16* dst = k_tiles + (i64)stage * BLOCK_N * D_QK;
      for (int c = tid % TPT; c < KCH; c += TPT) {
        const u32 d = smem_u32(dst + swz<KCH>(n, c));
        if (copy8) {
          cp_async8(d, safe + c * 16, ok);
          cp_async8(d + 8, safe + c * 16 + 8, ok);
        } else {
          cp_async16(d, safe + c * 16, ok);
        }
      }
    } else {
      u8* dst = raw_tiles + ((i64)stage * BLOCK_N + n) * RAW;
      for (int c = tid % TPT; c < RAW_CH; c += TPT) {
        if (copy8) {
          cp_async8(smem_u32(dst + c * 16), safe + c * 16, ok);
          cp_async8(smem_u32(dst + c * 16 + 8), safe + c * 16 + 8, ok);
        } else {
          cp_async16(smem_u32(dst + c * 16), safe + c * 16, ok);
        }
      }
      if (FMT == 2 && tid % TPT == TPT - 1)
        cp_async8(smem_u32(dst + 576), ok ? scales : L.cache, ok);
    }
  }
}

// FP8 records of `stage` -> the bf16/fp16 key tile (dequantized as bf16(e4m3) * bf16(scale),
// which is exact for the power-of-two scales the formats store).
DEV void dequantize_tile(const u8* raw_tiles, u16* k_tile, int stage, int tid) {
  for (int i = tid; i < BLOCK_N * KCH; i += THREADS) {
    const int n = i / KCH, c = i % KCH;
    const u8* rec = raw_tiles + ((i64)stage * BLOCK_N + n) * RAW;
    u32 w[4];
    if (c < NOPE / 8) {
      float scale;
      if (FMT == 1) {
        scale = round_bf16(*reinterpret_cast<const float*>(rec + 512 + 4 * (c / 16)));
      } else {
        scale = __uint_as_float((u32)rec[576 + c / 8] << 23);  // UE8M0: 2^(e - 127)
      }
      const uint2 bytes = *reinterpret_cast<const uint2*>(rec + c * 8);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u32 word = j < 2 ? bytes.x : bytes.y;
        const float2 f = e4m3x2_to_float2(word >> ((j & 1) * 16));
        w[j] = pack2(f.x * scale, f.y * scale);
      }
    } else {  // RoPE part: bf16 values stored after the FP8 ones
      const uint4 r =
          *reinterpret_cast<const uint4*>(rec + (FMT == 1 ? 528 : 448) + (c - NOPE / 8) * 16);
      w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
#if DTYPE_FP16
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w[j] = pack2(bf16_to_float(w[j] & 0xffff), bf16_to_float(w[j] >> 16));
#endif
    }
    const uint4 v = make_uint4(w[0], w[1], w[2], w[3]);
    *reinterpret_cast<uint4*>(k_tile + swz<KCH>(n, c)) = v;
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, CTAS_PER_SM) mla_attention(const MlaParams p) {
  extern __shared__ __align__(128) u8 smem[];
  u16* q_s = reinterpret_cast<u16*>(smem);                         // [BLOCK_M][D_QK] swizzled
  u16* k_s = q_s + BLOCK_M * D_QK;                                  // [STAGES or 1][BLOCK_N][D_QK]
  u8* raw_s = reinterpret_cast<u8*>(k_s + (FMT == 0 ? STAGES : 1) * BLOCK_N * D_QK);
  u16* p_s = reinterpret_cast<u16*>(raw_s + (FMT == 0 ? 0 : STAGES * BLOCK_N * RAW));
  float* red_s = reinterpret_cast<float*>(p_s + BLOCK_M * P_STRIDE);  // [CS][BLOCK_M]
  float* row_s = red_s + CS * BLOCK_M;  // [BLOCK_M]: per tile alpha, at the end the out factor
  float* part_s = row_s + BLOCK_M;      // QREG: [WARPS][16][SRED] partial scores
  unsigned char* valid_s = reinterpret_cast<unsigned char*>(part_s + (QREG ? WARPS * 16 * SRED : 0));

  {  // the launcher's size of this layout must cover it: trap rather than corrupt memory
    u32 given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < (u32)(reinterpret_cast<u8*>(valid_s + STAGES * BLOCK_N) - smem)) __trap();
  }
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int rb = warp % RB, cs = warp / RB;
  const int g = lane / 4, t4 = lane % 4;  // mma fragment coordinates
  const int m_tile = blockIdx.x, grp = blockIdx.y, part = blockIdx.z;

  int begin_req = part, end_req = part, begin_blk = 0, end_blk = 1 << 24, begin_split = 0;
  int first_split = 0, last_split = 0;
  if (p.metadata) {
    const int* md = p.metadata + part * 8;
    begin_req = md[0], end_req = md[1], begin_blk = md[2], end_blk = md[3];
    begin_split = md[4], first_split = md[5], last_split = md[6];
  }
  const i64 head_off = SPARSE ? 0 : (i64)grp * p.head_stride;

  // The two query rows this thread's fragments hold (local row in the tile: rb*16 + g (+8)).
  int row_t[2], row_h[2];
  bool row_ok[2];
  for (int i = 0; i < 2; ++i) {
    const int r = m_tile * BLOCK_M + rb * 16 + g + 8 * i;
    row_ok[i] = r < p.rows;
    row_t[i] = SPARSE ? grp : r / p.group;
    row_h[i] = SPARSE ? r : grp * p.group + r % p.group;
  }

  // ldmatrix addressing. Every row a thread addresses is = lane % 8 (mod 8), so the swizzle of a
  // chunk depends only on the chunk's position within its 8-chunk period: four patterns.
  const int x = lane % 8;
  u32 sw_a[4], sw_b[4];  // Q/P rows and V (chunk 2k + lane/16), K rows (chunk 2k + bit 3 of lane)
  for (int k = 0; k < 4; ++k) {
    sw_a[k] = (2 * k + lane / 16) ^ x;
    sw_b[k] = (2 * k + (lane / 8) % 2) ^ x;
  }
  const u32 q_addr = smem_u32(q_s) + 2 * (rb * 16 + lane % 16) * KCH * 8;
  const u32 s_row = 2 * (cs * SC + lane % 8 + (lane / 16) * 8) * KCH * 8;
  const u32 v_row = 2 * ((lane % 8 + ((lane / 8) % 2) * 8) * KCH * 8 + warp * OC);
  const u32 p_addr = smem_u32(p_s) + 2 * ((lane % 16) * P_STRIDE + (lane / 16) * 8);

  for (int req = begin_req; req <= end_req; ++req) {
    __syncthreads();  // the previous request's readers of q_s / red_s are done
    // Queries of this request -> q_s (rows past the group are zeros).
    for (int i = tid; i < BLOCK_M * KCH; i += THREADS) {
      const int r_local = i / KCH, c = i % KCH, r = m_tile * BLOCK_M + r_local;
      const bool ok = r < p.rows;
      const int t = SPARSE ? grp : r / p.group, h = SPARSE ? r : grp * p.group + r % p.group;
      const u16* src = ok ? p.q + req * p.q_b + t * p.q_t + h * p.q_h + c * 8 : p.q;
      cp_async16(smem_u32(q_s + swz<KCH>(r_local, c)), src, ok);
    }
    cp_async_commit();

    // The lists this piece covers: positions in 64-token blocks [blk_lo, blk_hi).
    const int blk_lo = req == begin_req ? begin_blk : 0;
    const int blk_hi = req == end_req ? end_blk : 1 << 24;
    TokenList l0, l1;
    int n_lists = 1;
    int length = p.list_len;
    if (p.lengths) length = min(max(p.lengths[req], 0), SPARSE ? p.list_len : p.list_len * p.page);
    l0 = {p.cache, p.slots + req * p.slot_b + (SPARSE ? grp * p.slot_t : 0),
                p.page_stride, p.row_stride, p.num_pages, p.page, p.page_shift, blk_lo * 64, 0,
                length - p.s_q};
    if (SPARSE) {
      const int main_blocks = (max(length, 1) + 63) / 64;
      l0.hi = min(min(blk_hi, main_blocks) * 64, length);
      if (p.cache2) {
        int length2 = p.list_len2;
        if (p.lengths2) length2 = min(max(p.lengths2[req], 0), p.list_len2);
        l1 = {p.cache2, p.slots2 + req * p.slot2_b + grp * p.slot2_t, p.page_stride2,
                    p.row_stride2, p.num_pages2, p.page2, p.page2_shift,
                    max(blk_lo - main_blocks, 0) * 64,
                    min((blk_hi - main_blocks) * 64, length2), 0};
        n_lists = 2;
      }
    } else {
      l0.hi = min(blk_hi * 64, length);
    }
    int tiles0 = l0.hi > l0.lo ? (l0.hi - l0.lo + BLOCK_N - 1) / BLOCK_N : 0;
    int tiles = tiles0;
    if (n_lists == 2 && l1.hi > l1.lo)
      tiles += (l1.hi - l1.lo + BLOCK_N - 1) / BLOCK_N;

    // Tile i: of the main list, then of the extra one (fields picked by value: no local memory).
    auto list_of = [&](int i) -> TokenList { return i < tiles0 ? l0 : l1; };
    auto tile_start = [&](int i) -> int {
      return i < tiles0 ? l0.lo + i * BLOCK_N : l1.lo + (i - tiles0) * BLOCK_N;
    };
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < tiles) load_tile(list_of(i), tile_start(i), head_off, k_s, raw_s, valid_s, i, tid, p.copy8);
      cp_async_commit();
    }

    float acc[MT][OC / 8][4];  // rows mt * 16 + g (+8), columns warp * OC + j * 8 + 2 * t4 (+1)
    for (int mt = 0; mt < MT; ++mt)
      for (int j = 0; j < OC / 8; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
    float m_i[2] = {-F_INF, -F_INF}, l_i[2] = {0.f, 0.f};
    u32 qa[QREG ? KW : 1][4];  // QREG: this warp's query fragments (loaded with the first tile)

    for (int it = 0; it < tiles; ++it) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile `it` (and the queries) landed; tile it-1's readers are done
      {
        const int nxt = it + STAGES - 1;
        if (nxt < tiles)
          load_tile(list_of(nxt), tile_start(nxt), head_off, k_s, raw_s, valid_s,
                    nxt % STAGES, tid, p.copy8);
        cp_async_commit();
      }
      const int stage = it % STAGES;
      const u16* k_tile = k_s;
      if (FMT == 0) {
        k_tile = k_s + (i64)stage * BLOCK_N * D_QK;
      } else {
        dequantize_tile(raw_s, k_s, stage, tid);
        __syncthreads();
      }
      const int causal_base = l0.causal_base;
      const int start = tile_start(it);

      // S = Q K^T for 16 rows x SC tokens.
      float s[SC / 8][4];
      const u32 k_base = smem_u32(k_tile);
      if constexpr (QREG) {
        if (it == 0) {
#pragma unroll
          for (int kk = 0; kk < KW; ++kk)
            ldsm_x4(qa[kk], smem_u32(q_s) + 2 * swz<KCH>(lane % 16, 2 * (warp * KW + kk) + lane / 16));
        }
        float sp[BLOCK_N / 8][4];
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) sp[j][0] = sp[j][1] = sp[j][2] = sp[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KW; ++kk) {
          const u32 chunk = (2 * (warp * KW + kk) + (lane / 8) % 2) ^ x;
#pragma unroll
          for (int j = 0; j < BLOCK_N / 16; ++j) {
            u32 b[4];
            ldsm_x4(b, k_base + 2 * ((j * 16 + lane % 8 + (lane / 16) * 8) * KCH * 8 + chunk * 8));
            mma16816(sp[2 * j], qa[kk], b[0], b[1]);
            mma16816(sp[2 * j + 1], qa[kk], b[2], b[3]);
          }
        }
        float* mine = part_s + warp * 16 * SRED;
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
          *reinterpret_cast<float2*>(mine + g * SRED + j * 8 + 2 * t4) = make_float2(sp[j][0], sp[j][1]);
          *reinterpret_cast<float2*>(mine + (g + 8) * SRED + j * 8 + 2 * t4) =
              make_float2(sp[j][2], sp[j][3]);
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < SC / 8; ++j) {
          s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
          for (int w = 0; w < WARPS; ++w) {
            const float* src = part_s + w * 16 * SRED + cs * SC + j * 8 + 2 * t4;
            const float2 lo = *reinterpret_cast<const float2*>(src + g * SRED);
            const float2 hi = *reinterpret_cast<const float2*>(src + (g + 8) * SRED);
            s[j][0] += lo.x, s[j][1] += lo.y, s[j][2] += hi.x, s[j][3] += hi.y;
          }
        }
      } else {
        float s_k[KSETS][SC / 8][4];
        for (int u = 0; u < KSETS; ++u)
          for (int j = 0; j < SC / 8; ++j) s_k[u][j][0] = s_k[u][j][1] = s_k[u][j][2] = s_k[u][j][3] = 0.f;
#pragma unroll
        for (int kq = 0; kq < D_QK / 64; ++kq) {  // 64 dims (8 chunks: one swizzle period) a step
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            u32 a[4];
            ldsm_x4(a, q_addr + 2 * 8 * (kq * 8 + sw_a[k]));
#pragma unroll
            for (int j = 0; j < SC / 16; ++j) {
              u32 b[4];
              ldsm_x4(b, k_base + s_row + 2 * (j * 16 * KCH * 8 + 8 * (kq * 8 + sw_b[k])));
              mma16816(s_k[k % KSETS][2 * j], a, b[0], b[1]);
              mma16816(s_k[k % KSETS][2 * j + 1], a, b[2], b[3]);
            }
            if (SC % 16) {
              u32 b[2];
              ldsm_x2(b, k_base + s_row + 2 * ((SC / 16) * 16 * KCH * 8 + 8 * (kq * 8 + sw_b[k])));
              mma16816(s_k[k % KSETS][SC / 8 - 1], a, b[0], b[1]);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < SC / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[j][e] = s_k[0][j][e];
#pragma unroll
            for (int u = 1; u < KSETS; ++u) s[j][e] += s_k[u][j][e];
          }
      }

      // Scale, mask, and this warp's row maxima.
      float mx[2] = {-F_INF, -F_INF};
#pragma unroll
      for (int j = 0; j < SC / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = cs * SC + j * 8 + 2 * t4 + (e & 1), i = e / 2;
          bool sees = valid_s[stage * BLOCK_N + n];
          if (!SPARSE && p.causal) sees = sees && start + n <= causal_base + row_t[i];
          const float v = sees ? s[j][e] * p.scale_log2 : -F_INF;
          s[j][e] = v;
          mx[i] = fmaxf(mx[i], v);
        }
      for (int i = 0; i < 2; ++i) {
        mx[i] = warp_max4(mx[i]);
        if (t4 == 0) red_s[cs * BLOCK_M + rb * 16 + g + 8 * i] = mx[i];
      }
      __syncthreads();
      float alpha[2], m_safe[2];
      for (int i = 0; i < 2; ++i) {
        float m_new = m_i[i];
        for (int c = 0; c < CS; ++c) m_new = fmaxf(m_new, red_s[c * BLOCK_M + rb * 16 + g + 8 * i]);
        m_safe[i] = m_new == -F_INF ? 0.f : m_new;
        alpha[i] = exp2f(m_i[i] - m_safe[i]);
        m_i[i] = m_new;
        l_i[i] *= alpha[i];
        if (cs == 0 && t4 == 0) row_s[rb * 16 + g + 8 * i] = alpha[i];
      }
      // P = exp2(S - m) -> shared memory (16-bit, the PV product's A operand).
#pragma unroll
      for (int j = 0; j < SC / 8; ++j) {
        const float p0 = exp2f(s[j][0] - m_safe[0]), p1 = exp2f(s[j][1] - m_safe[0]);
        const float p2 = exp2f(s[j][2] - m_safe[1]), p3 = exp2f(s[j][3] - m_safe[1]);
        l_i[0] += p0 + p1;
        l_i[1] += p2 + p3;
        const int col = cs * SC + j * 8 + 2 * t4, row = rb * 16 + g;
        *reinterpret_cast<u32*>(p_s + row * P_STRIDE + col) = pack2(p0, p1);
        *reinterpret_cast<u32*>(p_s + (row + 8) * P_STRIDE + col) = pack2(p2, p3);
      }
      __syncthreads();

      // O = alpha * O + P V for all rows x OC columns; V = the key tile's first 512 columns.
      {
        float a0[MT], a1[MT];
        bool unchanged = true;  // no row maximum moved: nothing to rescale (the common case)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a0[mt] = row_s[mt * 16 + g], a1[mt] = row_s[mt * 16 + g + 8];
          unchanged = unchanged && a0[mt] == 1.f && a1[mt] == 1.f;
        }
        if (!__all_sync(0xffffffffu, unchanged)) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < OC / 8; ++j) {
              acc[mt][j][0] *= a0[mt], acc[mt][j][1] *= a0[mt];
              acc[mt][j][2] *= a1[mt], acc[mt][j][3] *= a1[mt];
            }
        }
      }
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], p_addr + 2 * (mt * 16 * P_STRIDE + kk * 16));
#pragma unroll
        for (int j = 0; j < OC / 16; ++j) {
          u32 b[4];
          // chunk warp*OC/8 + 2j + lane/16: whole swizzle periods plus pattern sw_a[j % 4]
          ldsm_x4_t(b, k_base + v_row + 2 * (kk * 16 * KCH * 8 + 8 * ((j / 4) * 8 + sw_a[j % 4])));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816(acc[mt][2 * j], a[mt], b[0], b[1]);
            mma16816(acc[mt][2 * j + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }

    // Row sums: quad, then across the column splits (red_s is free: the last tile's readers
    // passed the barrier before its PV product).
    for (int i = 0; i < 2; ++i) {
      l_i[i] = warp_sum4(l_i[i]);
      if (t4 == 0) red_s[cs * BLOCK_M + rb * 16 + g + 8 * i] = l_i[i];
    }
    __syncthreads();
    for (int i = 0; i < 2; ++i) {
      float total = 0.f;
      for (int c = 0; c < CS; ++c) total += red_s[c * BLOCK_M + rb * 16 + g + 8 * i];
      l_i[i] = total;
    }

    // Epilogue: the whole request, or one piece of a split request. The score warps (which
    // own the row statistics) write lse and each row's output factor; then every warp scales
    // and stores its column slice.
    const bool piece =
        p.metadata && ((req == begin_req && first_split) || (req == end_req && last_split));
    const int slot = piece ? p.num_splits[req] + (req == begin_req ? begin_split : 0) : 0;
    for (int i = 0; i < 2; ++i) {
      const bool empty = l_i[i] == 0.f;
      const float lse2 = m_i[i] + __log2f(empty ? 1.f : l_i[i]);
      float f = empty ? 0.f : 1.f / l_i[i];
      const int t = row_t[i], h = row_h[i];
      if (!piece && p.sink && !empty && row_ok[i]) f /= 1.f + exp2f(p.sink[h] * LOG2E - lse2);
      if (cs == 0 && t4 == 0) {
        row_s[rb * 16 + g + 8 * i] = f;
        if (!row_ok[i]) continue;
        if (piece) {
          p.lse_acc[((i64)slot * p.s_q + t) * p.h_q + h] = empty ? -F_INF : lse2;
        } else {
          const i64 at = req * p.l_b + t * p.l_t + h * p.l_h;
          p.lse[at] = empty ? F_INF : lse2 * LN2;
          if (p.max_logits) p.max_logits[at] = empty ? -F_INF : m_i[i] * LN2;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int local = mt * 16 + g + 8 * i, r = m_tile * BLOCK_M + local;
        if (r >= p.rows) continue;
        const int t = SPARSE ? grp : r / p.group, h = SPARSE ? r : grp * p.group + r % p.group;
        const float f = row_s[local];
        if (piece) {
          float* o = p.o_acc + (((i64)slot * p.s_q + t) * p.h_q + h) * D_V + warp * OC + 2 * t4;
#pragma unroll
          for (int j = 0; j < OC / 8; ++j)
            *reinterpret_cast<float2*>(o + j * 8) =
                make_float2(acc[mt][j][2 * i] * f, acc[mt][j][2 * i + 1] * f);
        } else {
          u16* o = p.out + req * p.o_b + t * p.o_t + h * p.o_h + warp * OC + 2 * t4;
#pragma unroll
          for (int j = 0; j < OC / 8; ++j)
            *reinterpret_cast<u32*>(o + j * 8) =
                pack2(acc[mt][j][2 * i] * f, acc[mt][j][2 * i + 1] * f);
        }
      }
  }
}
