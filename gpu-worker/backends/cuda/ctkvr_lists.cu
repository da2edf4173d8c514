// CTKVR inverted lists of one layer (kernels.h CtkvrLists; what is computed: kernel_params.h
// CtkvrListsParams). This file assumes kernels.cc validated the arguments. Four kernels:
//   1. partials: one block of 4 warps per (tile of 512 positions, kv-head, chunk of 16 or 32
//      query rows). The rows' A fragments stay in registers; each warp reads two 8-key tiles
//      at a time straight from global memory (16-byte loads, four lanes per 64-byte run of a
//      row) as B fragments and multiplies them on the tensor cores (mma.sync m16n8k16, bf16
//      in, fp32 out). A row's 16 logits of a step live in one quad of lanes; each lane keeps
//      an online (max, sum of exp) per row, merged over the quad and the block, written per
//      tile to the workspace.
//   2. lse: one warp per (kv-head, row) merges its tiles' pairs into lse (written to p.lse).
//   3. scores: the logits again (the same code, so bit-identical), minus the rows' lse, staged
//      per 64-position step in shared memory; the block then takes the max over each
//      centroid's rows (a centroid split across row chunks is merged through the scores
//      already written) and writes score[h][c][t] to the workspace.
//   4. select: one block of 1024 threads per (kv-head, centroid). Radix select on the
//      order-preserving uint32 image of the scores (-0 taken as +0), four passes of 8 bits with
//      shared-memory histograms (warp-aggregated increments, since the first pass puts nearly
//      every score in one or two bins), finds the list_len-th largest key T and how many of
//      its ties to take; a last pass in position order with a block-wide scan writes every
//      position above T and the lowest-position ties at T, ascending. Output indices are
//      bounded by list_len whatever the scores hold.
// The key permutation trick of kernel 1 and 3: a dot product does not care which k slot of the
// mma holds which dimension, only that A and B agree. Lane (g, t) of a warp loads dims
// [32 s + 8 t, 32 s + 8 t + 8) of its key (and of its two query rows) as one uint4 {x, y, z, w}
// and feeds (x, y) to one mma and (z, w) to the next, so no shuffle or shared staging is needed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "gpu-worker/backends/cuda/internal/launch.h"

namespace kvrecall::worker::cuda::internal {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStepPositions = kWarps * 16;  // each warp: two 8-key tiles per step
constexpr int kTileSteps = 8;
constexpr int kTilePositions = kStepPositions * kTileSteps;  // positions per block
constexpr int kStageStride = kStepPositions + 8;             // floats per staged row (banks)
constexpr int kLseWarps = 8;
constexpr int kSelectThreads = 1024;
constexpr int kSelectItems = 4;  // consecutive positions per thread in the final pass
constexpr int kScoreAlign = 64;  // score rows start 256-byte aligned

// d += a (16x16, row-major) * b (16x8, column-major), bf16 in, fp32 accumulate.
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 Load16(const uint16_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The A fragments of query rows [r0, r0 + 16 MT) of kv-head h (rows >= rows are zero):
// q[mt][s][half] holds row r0 + 16 mt + 8 half + g, dims [32 s + 8 t, +8).
template <int D, int MT>
__device__ __forceinline__ void LoadQueries(const CtkvrListsParams& p, const CtkvrPlan& plan, int h,
                                            int r0, uint4 (&q)[MT][D / 32][2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r0 + 16 * mt + 8 * half + g;
      const uint16_t* row = nullptr;
      if (r < plan.rows) {
        const int c = r / plan.group, j = r % plan.group;
        row =
            p.queries + c * p.query_stride + (static_cast<int64_t>(h) * plan.group + j) * D + 8 * t;
      }
#pragma unroll
      for (int s = 0; s < D / 32; ++s) {
        q[mt][s][half] = row != nullptr ? Load16(row + 32 * s) : make_uint4(0, 0, 0, 0);
      }
    }
  }
}

// Raw dot products q . k of the warp's two key tiles at positions [base, base + 16) of the
// range (keys at or past n read nothing and give 0): acc[nt][mt][e] is row 16 mt + g + 8 (e / 2)
// of the chunk, position base + 8 nt + 2 t + e % 2.
template <int D, int MT>
__device__ __forceinline__ void Logits(const CtkvrListsParams& p, const CtkvrPlan& plan, int h,
                                       int64_t base, const uint4 (&q)[MT][D / 32][2],
                                       float (&acc)[2][MT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint4 k[2][D / 32];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int64_t i = base + 8 * nt + g;
    const uint16_t* row =
        i < plan.n ? p.keys + (p.begin + i) * p.token_stride + h * p.head_stride + 8 * t : nullptr;
#pragma unroll
    for (int s = 0; s < D / 32; ++s) {
      k[nt][s] = row != nullptr ? Load16(row + 32 * s) : make_uint4(0, 0, 0, 0);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][mt][e] = 0.0f;
#pragma unroll
      for (int s = 0; s < D / 32; ++s) {
        const uint4& a = q[mt][s][0];
        const uint4& b = q[mt][s][1];
        Mma(acc[nt][mt], a.x, b.x, a.y, b.y, k[nt][s].x, k[nt][s].y);
        Mma(acc[nt][mt], a.z, b.z, a.w, b.w, k[nt][s].z, k[nt][s].w);
      }
    }
  }
}

// Online log-sum-exp state: m = max, s = sum exp(x - m); (-inf, 0) is empty.
__device__ __forceinline__ void LseAdd(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void LseMerge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

template <int D, int MT>
__global__ void __launch_bounds__(kThreads)
    CtkvrPartialKernel(CtkvrListsParams p, CtkvrPlan plan, float2* partials) {
  __shared__ float2 reduce[kWarps][16 * MT];
  const int tile = blockIdx.x, h = blockIdx.y, r0 = blockIdx.z * 16 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint4 q[MT][D / 32][2];
  LoadQueries<D, MT>(p, plan, h, r0, q);
  float m[MT][2], s[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    s[mt][0] = s[mt][1] = 0.0f;
  }
  const int64_t tile_base = static_cast<int64_t>(tile) * kTilePositions;
  for (int step = 0; step < kTileSteps; ++step) {
    const int64_t base = tile_base + step * kStepPositions + 16 * warp;
    if (base >= plan.n) break;
    float acc[2][MT][4];
    Logits<D, MT>(p, plan, h, base, q, acc);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t i = base + 8 * nt + 2 * t;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (i + (e & 1) < plan.n) LseAdd(m[mt][e >> 1], s[mt][e >> 1], acc[nt][mt][e] * p.scale);
        }
      }
    }
  }
  // The quad of lanes (same g) holds the same rows.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[mt][half], o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s[mt][half], o);
        LseMerge(m[mt][half], s[mt][half], m2, s2);
      }
      if (t == 0) reduce[warp][16 * mt + 8 * half + g] = make_float2(m[mt][half], s[mt][half]);
    }
  }
  __syncthreads();
  if (threadIdx.x < 16 * MT && r0 + static_cast<int>(threadIdx.x) < plan.rows) {
    float mm = -INFINITY, ss = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      LseMerge(mm, ss, reduce[w][threadIdx.x].x, reduce[w][threadIdx.x].y);
    const int64_t row = static_cast<int64_t>(h) * plan.rows + r0 + threadIdx.x;
    partials[row * plan.tiles + tile] = make_float2(mm, ss);
  }
}

// One warp per (kv-head, row) = lse index h * rows + r, which is p.lse's [h][c][j].
__global__ void __launch_bounds__(kLseWarps * 32)
    CtkvrLseKernel(const float2* partials, int tiles, int64_t total_rows, float* lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLseWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= total_rows) return;
  float m = -INFINITY, s = 0.0f;
  for (int i = lane; i < tiles; i += 32) {
    const float2 v = partials[row * tiles + i];
    LseMerge(m, s, v.x, v.y);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    LseMerge(m, s, m2, s2);
  }
  if (lane == 0) lse[row] = m + logf(s);
}

template <int D, int MT>
__global__ void __launch_bounds__(kThreads)
    CtkvrScoreKernel(CtkvrListsParams p, CtkvrPlan plan, float* scores) {
  constexpr int kRows = 16 * MT;
  __shared__ __align__(16) float stage[kRows][kStageStride];
  const int tile = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int group = plan.group;
  const int64_t tile_base = static_cast<int64_t>(tile) * kTilePositions;
  float* head_scores = scores + static_cast<int64_t>(h) * p.num_centroids * plan.score_stride;
  for (int r0 = 0; r0 < plan.rows; r0 += kRows) {
    uint4 q[MT][D / 32][2];
    LoadQueries<D, MT>(p, plan, h, r0, q);
    float lse[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = r0 + 16 * mt + 8 * half + g;
        lse[mt][half] = r < plan.rows ? p.lse[static_cast<int64_t>(h) * plan.rows + r] : 0.0f;
      }
    }
    const int r_end = min(r0 + kRows, plan.rows);
    const int c_lo = r0 / group, c_hi = (r_end - 1) / group;
    const int items = (c_hi - c_lo + 1) * kStepPositions;
    for (int step = 0; step < kTileSteps; ++step) {
      const int64_t step_base = tile_base + step * kStepPositions;
      if (step_base >= plan.n) break;  // uniform over the block
      float acc[2][MT][4];
      Logits<D, MT>(p, plan, h, step_base + 16 * warp, q, acc);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = 16 * warp + 8 * nt + 2 * t;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float l = lse[mt][half];
            *reinterpret_cast<float2*>(&stage[16 * mt + 8 * half + g][col]) = make_float2(
                acc[nt][mt][2 * half] * p.scale - l, acc[nt][mt][2 * half + 1] * p.scale - l);
          }
        }
      }
      __syncthreads();
      for (int it = threadIdx.x; it < items; it += kThreads) {
        const int c = c_lo + it / kStepPositions, col = it % kStepPositions;
        const int64_t i = step_base + col;
        if (i >= plan.n) continue;
        const int rb = max(c * group, r0), re = min(c * group + group, r_end);
        float v = -INFINITY;
        for (int r = rb; r < re; ++r) v = fmaxf(v, stage[r - r0][col]);
        float* dst = head_scores + static_cast<int64_t>(c) * plan.score_stride + i;
        // The centroid's first rows were in an earlier chunk: this block wrote them there
        // (ordered before this read by the __syncthreads between).
        if (c * group < r0) v = fmaxf(v, *dst);
        *dst = v;
      }
      __syncthreads();
    }
  }
}

// Order-preserving image of a float (larger float, larger key); -0 maps as +0.
__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// hist[bin] += 1 for each lane with bin < 256; the whole warp calls it (bin 256 = none).
__device__ __forceinline__ void CountBin(uint32_t* hist, uint32_t bin) {
  const uint32_t peers = __match_any_sync(0xffffffffu, bin);
  if (bin < 256 && (threadIdx.x & 31) == static_cast<uint32_t>(__ffs(peers) - 1)) {
    atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
  }
}

__global__ void __launch_bounds__(kSelectThreads)
    CtkvrSelectKernel(const float* scores, int64_t score_stride, int n, int list_len, int32_t begin,
                      int32_t* tokens) {
  using Scan = cub::BlockScan<uint32_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t found_prefix, found_k;
  const int64_t list = blockIdx.x;  // h * num_centroids + c
  const float* s = scores + list * score_stride;
  int32_t* out = tokens + list * list_len;
  const int tid = threadIdx.x, lane = tid & 31;
  if (list_len >= n) {
    for (int i = tid; i < n; i += kSelectThreads) out[i] = begin + i;
    return;
  }

  // Radix select, most significant digit first: after the pass of `shift`, prefix holds the
  // top bits of the list_len-th largest key and k its rank among the keys with that prefix.
  uint32_t prefix = 0, mask = 0, k = static_cast<uint32_t>(list_len);
  const int n4 = n / 4;
  const float4* s4 = reinterpret_cast<const float4*>(s);
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
    // Trip counts uniform over each warp (CountBin needs the full warp).
    for (int base = 0; base < n4; base += kSelectThreads) {
      const int i = base + tid;
      const float4 v = i < n4 ? s4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t u = OrderKey(vs[e]);
        CountBin(hist, i < n4 && (u & mask) == prefix ? (u >> shift) & 255u : 256u);
      }
    }
    if (tid < 32) {  // n - 4 n4 < 4 tail keys
      const int i = 4 * n4 + tid;
      const uint32_t u = i < n ? OrderKey(s[i]) : 0;
      CountBin(hist, i < n && (u & mask) == prefix ? (u >> shift) & 255u : 256u);
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 255 - 8 l - e, e < 8, from the top down.
      uint32_t cnt[8], total = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) total += cnt[e] = hist[255 - 8 * lane - e];
      uint32_t incl = total;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      uint32_t above = incl - total;  // keys with this prefix in higher bins
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (above < k && above + cnt[e] >= k) {
          found_prefix = prefix | (static_cast<uint32_t>(255 - 8 * lane - e) << shift);
          found_k = k - above;
        }
        above += cnt[e];
      }
    }
    __syncthreads();
    prefix = found_prefix;
    k = found_k;
    mask |= 255u << shift;
  }
  // prefix = T, the list_len-th largest key; list_len - k keys are above it and the first k
  // keys equal to it (in position order) complete the list.
  const uint32_t threshold = prefix, ties = k;
  uint32_t above_run = 0, ties_run = 0;  // over the positions before the current chunk
  for (int64_t base = 0; base < n; base += kSelectThreads * kSelectItems) {
    const int64_t i0 = base + static_cast<int64_t>(tid) * kSelectItems;
    uint32_t keys[kSelectItems];
    if (i0 + kSelectItems <= n) {
      const float4 v = *reinterpret_cast<const float4*>(s + i0);
      keys[0] = OrderKey(v.x);
      keys[1] = OrderKey(v.y);
      keys[2] = OrderKey(v.z);
      keys[3] = OrderKey(v.w);
    } else {
#pragma unroll
      for (int e = 0; e < kSelectItems; ++e) keys[e] = i0 + e < n ? OrderKey(s[i0 + e]) : 0;
    }
    uint32_t n_above = 0, n_ties = 0;
#pragma unroll
    for (int e = 0; e < kSelectItems; ++e) {
      const bool valid = i0 + e < n;
      n_above += valid && keys[e] > threshold;
      n_ties += valid && keys[e] == threshold;
    }
    // Both counts of a chunk fit in 16 bits (at most kSelectThreads * kSelectItems).
    uint32_t before, chunk;
    Scan(scan_storage).ExclusiveSum((n_above << 16) | n_ties, before, chunk);
    uint32_t a = above_run + (before >> 16), q = ties_run + (before & 0xffffu);
#pragma unroll
    for (int e = 0; e < kSelectItems; ++e) {
      if (i0 + e >= n) break;
      const int32_t position = begin + static_cast<int32_t>(i0 + e);
      if (keys[e] > threshold) {
        const uint32_t at = a + min(q, ties);
        if (at < static_cast<uint32_t>(list_len)) out[at] = position;
        ++a;
      } else if (keys[e] == threshold) {
        if (q < ties && a + q < static_cast<uint32_t>(list_len)) out[a + q] = position;
        ++q;
      }
    }
    above_run += chunk >> 16;
    ties_run += chunk & 0xffffu;
    if (above_run + min(ties_run, ties) >= static_cast<uint32_t>(list_len)) break;
    __syncthreads();  // scan_storage is reused
  }
}

template <int D, int MT>
cudaError_t LaunchLogitKernels(const CtkvrListsParams& p, const CtkvrPlan& plan, float2* partials,
                               float* scores, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(plan.chunks));
  CtkvrPartialKernel<D, MT><<<grid, kThreads, 0, stream>>>(p, plan, partials);
  const int64_t total_rows = static_cast<int64_t>(p.num_kv_heads) * plan.rows;
  CtkvrLseKernel<<<static_cast<unsigned>((total_rows + kLseWarps - 1) / kLseWarps), kLseWarps * 32,
                   0, stream>>>(partials, plan.tiles, total_rows, p.lse);
  // Whole-range lists need no scores.
  if (plan.list_len < plan.n) {
    const dim3 score_grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(p.num_kv_heads));
    CtkvrScoreKernel<D, MT><<<score_grid, kThreads, 0, stream>>>(p, plan, scores);
  }
  return cudaGetLastError();
}

// a * b, false on overflow of int64.
bool MulInt64(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0 || (b != 0 && a > INT64_MAX / b)) return false;
  *out = a * b;
  return true;
}

}  // namespace

bool PlanCtkvrLists(const CtkvrListsParams& p, CtkvrPlan* plan) {
  const int64_t n = p.end - p.begin;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t rows = static_cast<int64_t>(p.num_centroids) * group;
  const int64_t lists = static_cast<int64_t>(p.num_kv_heads) * p.num_centroids;
  if (n < 1 || n > INT32_MAX || rows > INT32_MAX || lists > INT32_MAX || p.num_kv_heads > 65535) {
    return false;
  }
  CtkvrPlan r;
  r.n = static_cast<int>(n);
  r.list_len = static_cast<int>(std::min<int64_t>(p.list_size, n));
  r.group = group;
  r.rows = static_cast<int>(rows);
  r.m_tiles = rows <= 16 ? 1 : 2;
  const int64_t chunks = (rows + 16 * r.m_tiles - 1) / (16 * r.m_tiles);
  if (chunks > 65535) return false;
  r.chunks = static_cast<int>(chunks);
  r.tiles = static_cast<int>((n + kTilePositions - 1) / kTilePositions);
  r.score_stride = (n + kScoreAlign - 1) / kScoreAlign * kScoreAlign;
  int64_t partial_pairs, score_floats;
  if (!MulInt64(static_cast<int64_t>(p.num_kv_heads) * rows, r.tiles, &partial_pairs) ||
      !MulInt64(lists, r.score_stride, &score_floats) ||
      (static_cast<int64_t>(p.num_kv_heads) * rows + kLseWarps - 1) / kLseWarps > INT32_MAX ||
      partial_pairs > (INT64_MAX >> 5) || score_floats > (INT64_MAX >> 4)) {
    return false;
  }
  const size_t partial_bytes = static_cast<size_t>(partial_pairs) * sizeof(float2);
  r.scores_offset = (partial_bytes + 255) / 256 * 256;
  // Whole-range lists (list_len == n) never use the scores, but the size does not depend on
  // list_size, so that a caller can size the workspace once for its longest range.
  r.workspace_bytes = r.scores_offset + static_cast<size_t>(score_floats) * sizeof(float);
  *plan = r;
  return true;
}

cudaError_t LaunchCtkvrLists(const CtkvrListsParams& p, const CtkvrPlan& plan, void* workspace,
                             cudaStream_t stream) {
  auto* partials = static_cast<float2*>(workspace);
  auto* scores = reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.scores_offset);
  cudaError_t e;
  if (p.head_dim == 64) {
    e = plan.m_tiles == 1 ? LaunchLogitKernels<64, 1>(p, plan, partials, scores, stream)
                          : LaunchLogitKernels<64, 2>(p, plan, partials, scores, stream);
  } else {
    e = plan.m_tiles == 1 ? LaunchLogitKernels<128, 1>(p, plan, partials, scores, stream)
                          : LaunchLogitKernels<128, 2>(p, plan, partials, scores, stream);
  }
  if (e != cudaSuccess) return e;
  const int64_t lists = static_cast<int64_t>(p.num_kv_heads) * p.num_centroids;
  CtkvrSelectKernel<<<static_cast<unsigned>(lists), kSelectThreads, 0, stream>>>(
      scores, plan.score_stride, plan.n, plan.list_len, static_cast<int32_t>(p.begin), p.tokens);
  return cudaGetLastError();
}

}  // namespace kvrecall::worker::cuda::internal
