// Split-KV decode plumbing: the schedule (contract §6.1) and the combine of split requests (§6.3).
//
// schedule: FlashMLA's greedy split, one CTA. The threads compute every request's block count
// (and the total cost) in parallel and stage the counts in shared memory; then one thread walks
// the greedy, which is sequential by nature (each part starts where the previous one stopped),
// as FlashMLA's one-warp metadata kernel does. Lengths are read on the device, so a captured CUDA
// graph reschedules on replay. Output is bit-identical to flashmla.scheduler.split_kv_schedule.
//
// combine: W warps (piece_warps: 1, 2, 4 or 8) per (request, query token, head, quarter of the
// 512 output columns); a lane owns 4 columns, and each of the W warps sums every W-th group of 8
// pieces before they add up through shared memory. The quarters, the W warps and 8 pieces' loads
// in flight per warp keep enough bytes moving for one long request split over every SM (D7: 66
// pieces x 128 heads x 2 KiB), while short splits (W = 1) leave no warp idle.
// Requests done in one piece were written by the attention kernel and are skipped.
//
// Defines: DTYPE_FP16 (output element type of combine), SCHED_THREADS, SCHED_CHUNK.
#include "common.cuh"

#ifndef SCHED_THREADS
#define SCHED_THREADS 256
#endif
#ifndef SCHED_CHUNK
#define SCHED_CHUNK 8192  // requests staged in shared memory at a time (32 KiB)
#endif

constexpr int SCHED_BLOCK = 64;  // KV tokens (dense) or index entries (sparse) per block
constexpr int COMBINE_WARPS = 8;    // heads per CTA
constexpr int COMBINE_COLS = 128;   // output columns per warp (grid.z covers D_V)
constexpr int COMBINE_UNROLL = 8;   // pieces whose partials a warp loads at once
constexpr int D_V = 512;

// ---------------------------------------------------------------------------------------------
// Schedule

struct ScheduleParams {
  const int* lengths;        // dense: cache_seqlens [b]; sparse: topk_length [b] or null
  const int* extra_lengths;  // sparse: extra_topk_length [b] or null
  int* metadata;             // [num_parts, 8]
  int* num_splits;           // [b + 1]
  int b;
  int num_parts;
  int sparse;      // 0: lengths are cache_seqlens
  int topk;        // sparse without topk_length: every request's length
  int has_extra;   // sparse with an extra cache
  int extra_topk;  // extra cache without extra_topk_length: every request's extra length
  int overhead;    // fixed cost of a piece, in blocks
};

// Request r's block count (>= 1), negated when its scheduled length is 0: the row of a part
// that ends on an empty request differs (end_block 0, never "split").
DEV int sched_code(const ScheduleParams& p, int r) {
  long long n;
  if (!p.sparse) {
    n = p.lengths[r];
  } else {
    // As flashmla.scheduler.sparse_lengths: topk_length clamped to >= 1, topk as it is.
    n = p.lengths != nullptr ? max(p.lengths[r], 1) : p.topk;
    if (p.has_extra) {
      n = n >= 0 ? (n + 63) / 64 * 64 : -((-n) / 64 * 64);  // Python's (n + 63) // 64 * 64
      n += p.extra_lengths != nullptr ? p.extra_lengths[r] : p.extra_topk;
    }
  }
  const int blocks = (int)((n > 1 ? n - 1 : 0) / SCHED_BLOCK) + 1;
  return n == 0 ? -blocks : blocks;
}

extern "C" __global__ void __launch_bounds__(SCHED_THREADS) schedule(const ScheduleParams p) {
  __shared__ int codes[SCHED_CHUNK];
  __shared__ unsigned long long total_cost;
  __shared__ int more;
  const int tid = threadIdx.x;
  if (tid == 0) total_cost = 0;
  __syncthreads();

  // Pass 1: total cost = sum(blocks + overhead); the first chunk of codes is staged on the way.
  long long mine = 0;
  for (int r = tid; r < p.b; r += SCHED_THREADS) {
    const int c = sched_code(p, r);
    mine += (c < 0 ? -c : c) + p.overhead;
    if (r < SCHED_CHUNK) codes[r] = c;
  }
  atomicAdd(&total_cost, (unsigned long long)mine);
  __syncthreads();
  const long long payload =
      ((long long)total_cost + p.num_parts - 1) / p.num_parts + p.overhead;

  // Pass 2 (thread 0): the greedy fill, one part after another. The walk pauses when it needs
  // a request past the staged chunk; the block stages the next chunk and thread 0 resumes.
  int part = 0, req = 0, blk = 0, split = 0, done = 0;
  int begin_req = 0, begin_blk = 0, begin_split = 0;
  int end_blocks = 0;     // blocks of the request the part ends in (finished or cut)
  bool end_empty = true;  // ... and whether its length is 0
  bool open = false;      // the current part has started
  long long budget = 0;
  if (tid == 0) p.num_splits[0] = 0;
  for (int base = 0;; base += SCHED_CHUNK) {
    if (base > 0) {
      for (int r = tid; r < SCHED_CHUNK && base + r < p.b; r += SCHED_THREADS)
        codes[r] = sched_code(p, base + r);
      __syncthreads();
    }
    if (tid == 0) {
      while (part < p.num_parts) {
        if (!open) {
          open = true;
          begin_req = req, begin_blk = blk, begin_split = split;
          budget = payload, end_blocks = 0, end_empty = true;
        }
        bool close = true;
        if (req < p.b) {
          if (req >= base + SCHED_CHUNK) break;  // resume with the next chunk
          const int c = codes[req - base];
          const int blocks = c < 0 ? -c : c;
          const long long need = blocks - blk + p.overhead;
          if (budget >= need) {  // finish this request, go on with the next
            budget -= need;
            done += split + 1;
            p.num_splits[req + 1] = done;
            end_blocks = blocks, end_empty = c < 0;
            ++req, blk = 0, split = 0;
            close = false;
          } else if (budget - p.overhead > 0) {  // take what fits of it and stop
            blk += (int)(budget - p.overhead);
            ++split;
            end_blocks = blocks, end_empty = c < 0;
          }
        }
        if (close) {
          // A part that starts past the last request is idle: [b, b - 1, 0, ...].
          const bool idle = begin_req >= p.b;
          const int end_req = blk > 0 ? req : req - 1;
          const int end_blk = blk > 0 ? blk : (end_empty ? 0 : end_blocks);
          const bool first = begin_blk != 0;
          const bool last = end_blk != end_blocks && !end_empty;
          const bool single = begin_req == end_req;
          int* row = p.metadata + 8 * part;
          row[0] = begin_req;
          row[1] = idle ? p.b - 1 : end_req;
          row[2] = idle ? 0 : begin_blk;
          row[3] = idle ? 0 : end_blk;
          row[4] = idle ? 0 : begin_split;
          row[5] = idle ? 0 : (int)(single ? (first || last) : first);
          row[6] = idle ? 0 : (int)(single ? (first || last) : last);
          row[7] = 0;
          ++part;
          open = false;
        }
      }
      more = part < p.num_parts;
    }
    __syncthreads();  // thread 0 is done with the chunk; everyone reads `more`
    if (!more) break;
  }
}

// ---------------------------------------------------------------------------------------------
// Combine

struct CombineParams {
  const float* o_acc;    // [slots, s_q, h_q, 512] contiguous
  const float* lse_acc;  // [slots, s_q, h_q] contiguous, base 2, -inf for an empty piece
  const int* num_splits;  // [b + 1]
  u16* out;              // [b, s_q, h_q, 512], unit last stride
  float* lse;            // natural log
  const float* sink;     // [h_q] natural log, or null
  i64 out_sb, out_st, out_sh;  // element strides of out
  i64 lse_sb, lse_st, lse_sh;  // element strides of lse
  int s_q;
  int h_q;
  int piece_warps;  // W: warps sharing one head's pieces (divides COMBINE_WARPS)
};

DEV float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

DEV float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

extern "C" __global__ void __launch_bounds__(COMBINE_WARPS * 32) combine(const CombineParams p) {
#if __CUDA_ARCH__ >= 900
  // Launched with programmatic dependent launch, the accumulators are ready only after this
  // (a no-op otherwise).
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = p.piece_warps;
  const int h = blockIdx.y * (COMBINE_WARPS / W) + warp / W, sub = warp % W;
  const int i = blockIdx.x / p.s_q, t = blockIdx.x % p.s_q;
  const int begin = p.num_splits[i], end = p.num_splits[i + 1];
  if (end - begin <= 1) return;  // (the whole CTA: one request)
  const bool active = h < p.h_q;  // (inactive warps still meet the W > 1 barrier)

  const i64 slot_stride = (i64)p.s_q * p.h_q;  // rows per accumulator slot
  const i64 row = (i64)t * p.h_q + h;
  const float* lse_row = p.lse_acc + row;
  const int col = blockIdx.z * COMBINE_COLS + 4 * lane;  // lane owns columns col .. col+3
  float g = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (active) {
    // G = log2(sum_j 2^l_j), the max taken out first (0 when every piece is empty).
    float m = -F_INF;
    for (int j = begin + lane; j < end; j += 32) m = fmaxf(m, lse_row[j * slot_stride]);
    m = warp_max(m);
    const float m_safe = m == -F_INF ? 0.f : m;
    float s = 0.f;
    for (int j = begin + lane; j < end; j += 32) s += exp2f(lse_row[j * slot_stride] - m_safe);
    s = warp_sum(s);
    g = s > 0.f ? log2f(s) + m_safe : F_INF;

    // The sink joins the normaliser of the weights only; lse stays sink-free.
    float g_w = g;
    if (p.sink != nullptr) {
      const float sink2 = p.sink[h] * LOG2E;
      if (g != F_INF)
        g_w = g + log2f(1.f + exp2f(sink2 - g));
      else
        g_w = sink2 == -F_INF ? F_INF : sink2;
    }

    const float4* o_col = reinterpret_cast<const float4*>(p.o_acc + row * D_V + col);
    for (int j0 = begin + sub * COMBINE_UNROLL; j0 < end; j0 += W * COMBINE_UNROLL) {
      float w[COMBINE_UNROLL];
      float4 v[COMBINE_UNROLL];
#pragma unroll
      for (int u = 0; u < COMBINE_UNROLL; ++u) {
        const int j = j0 + u;
        w[u] = j < end ? exp2f(lse_row[j * slot_stride] - g_w) : 0.f;
        if (!(w[u] > 0.f)) w[u] = 0.f;  // empty pieces (and NaN weights): partials never read
      }
#pragma unroll
      for (int u = 0; u < COMBINE_UNROLL; ++u) {
        const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
        v[u] = w[u] > 0.f ? o_col[(j0 + u) * slot_stride * (D_V / 4)] : zero;
      }
#pragma unroll
      for (int u = 0; u < COMBINE_UNROLL; ++u) {
        acc.x += w[u] * v[u].x, acc.y += w[u] * v[u].y;
        acc.z += w[u] * v[u].z, acc.w += w[u] * v[u].w;
      }
    }
  }
  if (W > 1) {  // (W is the same for the whole grid) the first of each W warps adds the others'
    __shared__ float4 partial[COMBINE_WARPS][32];
    partial[warp][lane] = acc;
    __syncthreads();
    if (sub != 0) return;
    for (int k = 1; k < W; ++k) {
      const float4 o = partial[warp + k][lane];
      acc.x += o.x, acc.y += o.y, acc.z += o.z, acc.w += o.w;
    }
  }
  if (!active) return;

  u16* out = p.out + i * p.out_sb + t * p.out_st + h * p.out_sh + col;
  const u32 lo = pack2(acc.x, acc.y), hi = pack2(acc.z, acc.w);
  if ((reinterpret_cast<u64>(out) & 7) == 0) {
    *reinterpret_cast<uint2*>(out) = make_uint2(lo, hi);
  } else if ((reinterpret_cast<u64>(out) & 3) == 0) {
    reinterpret_cast<u32*>(out)[0] = lo;
    reinterpret_cast<u32*>(out)[1] = hi;
  } else {
    out[0] = (u16)lo, out[1] = (u16)(lo >> 16), out[2] = (u16)hi, out[3] = (u16)(hi >> 16);
  }
  if (lane == 0 && blockIdx.z == 0) p.lse[i * p.lse_sb + t * p.lse_st + h * p.lse_sh] = g * LN2;
}
