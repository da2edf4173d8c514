// Split-K decode attention (dense and sparse) and the slot scatter. See kernels.h for the
// contracts; this file assumes kernels.cc validated the arguments.
//
// Layout of one attention block (128 threads) for one (sequence, kv-head, split):
//   thread t owns 8 consecutive head_dim elements (chunk t % kLanes, kLanes = head_dim / 8) of
//   the rows t / kLanes, t / kLanes + kGroups, ... of each tile (kGroups = 128 / kLanes), so a
//   row is read with kLanes coalesced 16-byte loads. Per tile of kTile rows:
//     A. load the tile's K and V rows (all loads in flight at once), dot K with every q-head of
//        the group held in registers, reduce over the kLanes lanes of a row, scores -> smem;
//     B. one warp per q-head: online-softmax update of the running max / sum, p -> smem;
//     C. acc[h][8] = acc * alpha + sum over own rows of p * V.
//   At the end the row groups' accumulators are reduced (shuffles, then smem) and written as
//   the split's normalized partial output + log2-sum-exp, or as the final bf16 output.
// Scores are kept in the log2 domain (q is pre-scaled by scale * log2(e)) so exp is exp2f.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gpu-worker/backends/cuda/internal/kv_cache.cuh"
#include "gpu-worker/backends/cuda/internal/launch.h"

namespace kvrecall::worker::cuda::internal {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 1024;
// Fixed cost of one attention block, in tiles of work (split heuristic in PlanAttention).
constexpr int kBlockCostTiles = 2;
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int GMAX>
struct Shape {
  static constexpr int kLanes = D / 8;               // threads per row
  static constexpr int kGroups = kThreads / kLanes;  // rows read at once by the block
  static constexpr int kRowsPerThread = GMAX >= 8 ? 4 : 8;
  static constexpr int kTile = kGroups * kRowsPerThread;
};

__device__ __forceinline__ void Unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint16_t ToBf16Bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Row sources: which K/V rows a (sequence, kv-head) attends to. Begin() sets up a block's
// sequence; Row() gives row r's K/V pointers or false when the row is masked out.
struct DenseSource {
  KvCacheView cache;
  const int32_t* lengths;
  int max_len;
  int page_shift;
  int b, h, len;

  __device__ int Begin(int b_, int h_) {
    b = b_;
    h = h_;
    len = min(max(lengths[b], 0), max_len);
    return len;
  }
  __device__ bool Row(int r, const uint16_t** k, const uint16_t** v) const {
    const int64_t off = CacheOffset(cache, page_shift, b, r, h);
    *k = cache.k + off;
    *v = cache.v + off;
    return true;
  }
};

struct SparseSource {
  KvCacheView cache;
  SlotCacheView slots;
  const int32_t* lengths;
  int max_len, page_shift, num_sinks, window, num_kv_heads;
  int b, h, ns, w0, nw, count;
  const int32_t* ids;
  int64_t entry;

  __device__ int Begin(int b_, int h_) {
    b = b_;
    h = h_;
    const int len = min(max(lengths[b], 0), max_len);
    ns = min(num_sinks, len);
    w0 = max(ns, len - window);
    nw = len - w0;
    entry = static_cast<int64_t>(b) * num_kv_heads + h;
    count = slots.budget > 0 ? min(max(slots.counts[entry], 0), slots.budget) : 0;
    ids = slots.token_ids + entry * slots.budget;
    return ns + nw + count;
  }
  __device__ bool Row(int r, const uint16_t** k, const uint16_t** v) const {
    if (r < ns + nw) {
      const int t = r < ns ? r : w0 + (r - ns);
      const int64_t off = CacheOffset(cache, page_shift, b, t, h);
      *k = cache.k + off;
      *v = cache.v + off;
      return true;
    }
    const int s = r - ns - nw;
    const int t = ids[s];
    if (t < ns || t >= w0) return false;  // empty slot, or a sink / window token already counted
    const int64_t off = entry * slots.entry_stride + static_cast<int64_t>(s) * slots.row_stride;
    *k = slots.k + off;
    *v = slots.v + off;
    return true;
  }
};

struct AttnArgs {
  const uint16_t* q;
  uint16_t* out;
  float* ws_o;    // [batch][num_q_heads][splits][D] normalized partial outputs
  float* ws_lse;  // [batch][num_q_heads][splits] log2-sum-exp of the partial scores
  int num_q_heads, num_kv_heads, group, head_chunks, splits, rows_per_split;
  float qscale;  // scale * log2(e)
};

// Loads this thread's rows t0 + rg + j * NG (< end) of a tile; masked rows read as zeros.
template <int RPT, int NG, class Source>
__device__ __forceinline__ void LoadTile(const Source& src, int t0, int end, int rg, int c,
                                         uint4 (&k)[RPT], uint4 (&v)[RPT], bool (&valid)[RPT]) {
#pragma unroll
  for (int j = 0; j < RPT; ++j) {
    const int r = t0 + rg + j * NG;
    const uint16_t *kp, *vp;
    valid[j] = r < end && src.Row(r, &kp, &vp);
    if (valid[j]) {
      k[j] = __ldg(reinterpret_cast<const uint4*>(kp + c * 8));
      v[j] = __ldg(reinterpret_cast<const uint4*>(vp + c * 8));
    } else {
      k[j] = make_uint4(0, 0, 0, 0);
      v[j] = make_uint4(0, 0, 0, 0);
    }
  }
}

template <int D, int GMAX, class Source>
__global__ void __launch_bounds__(kThreads) AttendSplitKernel(AttnArgs a, Source src) {
  using S = Shape<D, GMAX>;
  constexpr int L = S::kLanes, NG = S::kGroups, RPT = S::kRowsPerThread, TILE = S::kTile;
  __shared__ float s_p[GMAX][TILE];
  __shared__ float s_alpha[GMAX];
  __shared__ float s_m[GMAX], s_l[GMAX];
  __shared__ __align__(16) float s_red[kWarps][GMAX][D];

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / a.head_chunks;
  const int chunk = blockIdx.y % a.head_chunks;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = tid % L, rg = tid / L;
  const int h0 = kvh * a.group + chunk * GMAX;
  const int g = min(GMAX, a.group - chunk * GMAX);

  const int n_rows = src.Begin(b, kvh);
  const int start = split * a.rows_per_split;
  const int end = min(start + a.rows_per_split, n_rows);

  float q[GMAX][8];
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    if (h < g) {
      const uint4 u = *reinterpret_cast<const uint4*>(
          a.q + (static_cast<int64_t>(b) * a.num_q_heads + h0 + h) * D + c * 8);
      Unpack8(u, q[h]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[h][e] *= a.qscale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[h][e] = 0.0f;
    }
  }
  float acc[GMAX][8];
#pragma unroll
  for (int h = 0; h < GMAX; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.0f;
  // Running max / sum of the heads this warp updates in phase B (heads warp, warp + kWarps).
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  // The tile being computed (kr, vr) and the next one, whose loads are issued before the
  // current tile's compute so that memory stays busy through the barriers.
  uint4 kr[RPT], vr[RPT], kn[RPT], vn[RPT];
  bool valid[RPT], valid_n[RPT];
  LoadTile<RPT, NG>(src, start, end, rg, c, kr, vr, valid);
  for (int t0 = start; t0 < end; t0 += TILE) {
    LoadTile<RPT, NG>(src, t0 + TILE, end, rg, c, kn, vn, valid_n);
    // A: scores.
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      float kf[8];
      Unpack8(kr[j], kf);
#pragma unroll
      for (int h = 0; h < GMAX; ++h) {
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s = fmaf(q[h][e], kf[e], s);
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (c == 0) s_p[h][rg + j * NG] = valid[j] ? s : -INFINITY;
      }
    }
    __syncthreads();
    // B: online softmax, one warp per head.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int h = warp + i * kWarps;
      if (h < GMAX) {
        float mx = -INFINITY;
        for (int k = lane; k < TILE; k += 32) mx = fmaxf(mx, s_p[h][k]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_new = fmaxf(m_run[i], mx);
        float sum = 0.0f;
        if (m_new == -INFINITY) {
          for (int k = lane; k < TILE; k += 32) s_p[h][k] = 0.0f;
        } else {
          for (int k = lane; k < TILE; k += 32) {
            const float p = exp2f(s_p[h][k] - m_new);
            s_p[h][k] = p;
            sum += p;
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_run[i] - m_new);
        l_run[i] = l_run[i] * alpha + sum;
        m_run[i] = m_new;
        if (lane == 0) s_alpha[h] = alpha;
      }
    }
    __syncthreads();
    // C: weighted values.
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
      const float al = s_alpha[h];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] *= al;
    }
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      float vf[8];
      Unpack8(vr[j], vf);
#pragma unroll
      for (int h = 0; h < GMAX; ++h) {
        const float p = s_p[h][rg + j * NG];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      kr[j] = kn[j];
      vr[j] = vn[j];
      valid[j] = valid_n[j];
    }
  }

  // Reduce the row groups: first inside the warp, then across warps through smem.
#pragma unroll
  for (int h = 0; h < GMAX; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e)
#pragma unroll
      for (int o = 16; o >= L; o >>= 1) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], o);
  if (lane < L) {
#pragma unroll
    for (int h = 0; h < GMAX; ++h)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_red[warp][h][c * 8 + e] = acc[h][e];
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = warp + i * kWarps;
    if (h < GMAX && lane == 0) {
      s_m[h] = m_run[i];
      s_l[h] = l_run[i];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < g * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_red[w][h][d];
    const float l = s_l[h];
    o = l > 0.0f ? o / l : 0.0f;
    const int64_t qh = static_cast<int64_t>(b) * a.num_q_heads + h0 + h;
    if (a.splits == 1) {
      a.out[qh * D + d] = ToBf16Bits(o);
    } else {
      a.ws_o[(qh * a.splits + split) * D + d] = o;
      if (d == 0) a.ws_lse[qh * a.splits + split] = l > 0.0f ? s_m[h] + log2f(l) : -INFINITY;
    }
  }
}

// One block per (sequence, q-head): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
template <int D>
__global__ void __launch_bounds__(D)
    CombineKernel(const float* ws_o, const float* ws_lse, int splits, uint16_t* out) {
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[D / 32];
  const int64_t qh = blockIdx.x;
  const int tid = threadIdx.x;
  const float* lse = ws_lse + qh * splits;
  float mx = -INFINITY;
  for (int s = tid; s < splits; s += D) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0) s_red[tid >> 5] = mx;
  __syncthreads();
  mx = s_red[0];
#pragma unroll
  for (int w = 1; w < D / 32; ++w) mx = fmaxf(mx, s_red[w]);
  for (int s = tid; s < splits; s += D) s_w[s] = mx == -INFINITY ? 0.0f : exp2f(lse[s] - mx);
  __syncthreads();
  float num = 0.0f, den = 0.0f;
  const float* o = ws_o + qh * splits * D + tid;
  for (int s = 0; s < splits; ++s) {
    const float w = s_w[s];
    den += w;
    if (w != 0.0f) num = fmaf(w, o[static_cast<int64_t>(s) * D], num);
  }
  out[qh * D + tid] = ToBf16Bits(den > 0.0f ? num / den : 0.0f);
}

template <int D, int GMAX>
int Tile() {
  return Shape<D, GMAX>::kTile;
}

template <int D, int GMAX>
int Resident() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, AttendSplitKernel<D, GMAX, DenseSource>,
                                                    kThreads, 0) != cudaSuccess ||
      n < 1) {
    return 2;
  }
  return n;
}

// Blocks of the attention kernel resident on one SM (registers are the limit).
int ResidentBlocks(int head_dim, int gmax) {
  if (head_dim == 64) {
    return gmax == 1 ? Resident<64, 1>() : gmax == 4 ? Resident<64, 4>() : Resident<64, 8>();
  }
  return gmax == 1 ? Resident<128, 1>() : gmax == 4 ? Resident<128, 4>() : Resident<128, 8>();
}

int GmaxFor(int group) { return group == 1 ? 1 : group <= 4 ? 4 : 8; }

int TileFor(int head_dim, int gmax) {
  if (head_dim == 64) return gmax == 1 ? Tile<64, 1>() : gmax == 4 ? Tile<64, 4>() : Tile<64, 8>();
  return gmax == 1 ? Tile<128, 1>() : gmax == 4 ? Tile<128, 4>() : Tile<128, 8>();
}

template <int D, class Source>
cudaError_t LaunchAttend(const AttnArgs& a, const Source& src, int batch, int gmax,
                         cudaStream_t stream) {
  const dim3 grid(a.splits, a.num_kv_heads * a.head_chunks, batch);
  switch (gmax) {
    case 1:
      AttendSplitKernel<D, 1, Source><<<grid, kThreads, 0, stream>>>(a, src);
      break;
    case 4:
      AttendSplitKernel<D, 4, Source><<<grid, kThreads, 0, stream>>>(a, src);
      break;
    default:
      AttendSplitKernel<D, 8, Source><<<grid, kThreads, 0, stream>>>(a, src);
      break;
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || a.splits == 1) return e;
  CombineKernel<D><<<batch * a.num_q_heads, D, 0, stream>>>(a.ws_o, a.ws_lse, a.splits, a.out);
  return cudaGetLastError();
}

template <class Source>
cudaError_t Run(int batch, int num_q_heads, int num_kv_heads, int head_dim, const uint16_t* q,
                float scale, uint16_t* out, const AttentionPlan& plan, void* workspace,
                const Source& src, cudaStream_t stream) {
  const int group = num_q_heads / num_kv_heads;
  const int gmax = GmaxFor(group);
  AttnArgs a;
  a.q = q;
  a.out = out;
  const int64_t nqh = static_cast<int64_t>(batch) * num_q_heads;
  a.ws_o = static_cast<float*>(workspace);
  a.ws_lse = a.ws_o == nullptr ? nullptr : a.ws_o + nqh * plan.num_splits * head_dim;
  a.num_q_heads = num_q_heads;
  a.num_kv_heads = num_kv_heads;
  a.group = group;
  a.head_chunks = (group + gmax - 1) / gmax;
  a.splits = plan.num_splits;
  a.rows_per_split = plan.rows_per_split;
  a.qscale = scale * kLog2e;
  return head_dim == 64 ? LaunchAttend<64>(a, src, batch, gmax, stream)
                        : LaunchAttend<128>(a, src, batch, gmax, stream);
}

}  // namespace

cudaError_t PlanAttention(int batch, int num_q_heads, int num_kv_heads, int head_dim, int rows,
                          int requested_splits, AttentionPlan* plan) {
  const int group = num_q_heads / num_kv_heads;
  const int gmax = GmaxFor(group);
  const int tile = TileFor(head_dim, gmax);
  const int tiles = std::max(1, (rows + tile - 1) / tile);
  const int64_t blocks = static_cast<int64_t>(batch) * num_kv_heads * ((group + gmax - 1) / gmax);
  int splits = requested_splits;
  if (splits <= 0) {
    const int per_sm = ResidentBlocks(head_dim, gmax);
    const int64_t slots = static_cast<int64_t>(SmCount()) * per_sm;
    // Estimated time in tiles: waves of resident blocks, each wave as long as one split's
    // tiles plus a fixed cost per block (prologue, reduction, the combine's share). The
    // smallest split count that reaches the minimum wins.
    int64_t best = INT64_MAX;
    splits = 1;
    const int max_splits = std::min(tiles, kMaxSplits);
    for (int s = 1; s <= max_splits; ++s) {
      const int64_t waves = (blocks * s + slots - 1) / slots;
      const int64_t cost = waves * ((tiles + s - 1) / s + kBlockCostTiles);
      if (cost < best) {
        best = cost;
        splits = s;
      }
    }
  }
  splits = std::max(1, std::min({splits, tiles, kMaxSplits}));
  const int tiles_per_split = (tiles + splits - 1) / splits;
  plan->rows_per_split = tiles_per_split * tile;
  plan->num_splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  plan->workspace_bytes = plan->num_splits == 1
                              ? 0
                              : static_cast<size_t>(batch) * num_q_heads * plan->num_splits *
                                    (head_dim + 1) * sizeof(float);
  return cudaSuccess;
}

cudaError_t LaunchDecodeAttention(const DecodeAttentionParams& p, const AttentionPlan& plan,
                                  void* workspace, cudaStream_t stream) {
  DenseSource src{};
  src.cache = p.cache;
  src.lengths = p.lengths;
  src.max_len = p.max_len;
  src.page_shift = PageShift(p.cache);
  return Run(p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, p.q, p.scale, p.out, plan,
             workspace, src, stream);
}

cudaError_t LaunchSparseAttention(const SparseAttentionParams& p, const AttentionPlan& plan,
                                  void* workspace, cudaStream_t stream) {
  SparseSource src{};
  src.cache = p.cache;
  src.slots = p.slots;
  src.lengths = p.lengths;
  src.max_len = p.max_len;
  src.page_shift = PageShift(p.cache);
  src.num_sinks = p.num_sinks;
  src.window = p.window;
  src.num_kv_heads = p.num_kv_heads;
  return Run(p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim, p.q, p.scale, p.out, plan,
             workspace, src, stream);
}

namespace {

// One block per entry, one warp per row: the row's K | V (2 * head_dim bf16) read with 16-byte
// accesses, so a warp moves 512 bytes of a head_dim 128 row at once (over PCIe when the rows are
// in page-locked host memory: many warps in flight keep the link busy).
__global__ void SlotScatterKernel(SlotScatterParams p) {
  const SlotFill f = p.entries[blockIdx.x];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
  const bool by_address = f.row_addresses != nullptr;
  const bool bad_entry = f.seq < 0 || f.seq >= p.batch || f.kv_head < 0 ||
                         f.kv_head >= p.num_kv_heads || f.num_rows < 0 || f.first < 0 ||
                         static_cast<int64_t>(f.first) + f.num_rows > p.num_fill_slots ||
                         (by_address ? (reinterpret_cast<uintptr_t>(f.row_addresses) & 7) != 0
                                     : (reinterpret_cast<uintptr_t>(f.rows) & 15) != 0 ||
                                           (f.rows == nullptr && f.num_rows > 0));
  if (bad_entry) {
    if (threadIdx.x == 0 && p.num_rejected != nullptr) atomicAdd(p.num_rejected, max(f.num_rows, 1));
    return;
  }
  const int64_t entry = static_cast<int64_t>(f.seq) * p.num_kv_heads + f.kv_head;
  const int chunks = p.head_dim / 8;  // 16-byte chunks of K (and of V)
  if (!by_address) {
    for (int j = warp; j < f.num_rows; j += warps) {
      const int slot = p.fill_slots[f.first + j];
      if (slot < 0 || slot >= p.budget) {
        if (lane == 0 && p.num_rejected != nullptr) atomicAdd(p.num_rejected, 1);
        continue;
      }
      const int64_t dst = entry * p.entry_stride + static_cast<int64_t>(slot) * p.row_stride;
      const uint4* src =
          reinterpret_cast<const uint4*>(f.rows + static_cast<int64_t>(j) * 2 * p.head_dim);
      for (int c = lane; c < 2 * chunks; c += 32) {
        const uint4 x = src[c];
        if (c < chunks) {
          reinterpret_cast<uint4*>(p.k_slots + dst)[c] = x;
        } else {
          reinterpret_cast<uint4*>(p.v_slots + dst)[c - chunks] = x;
        }
      }
    }
    return;
  }
  // Gathered rows (each a bus round trip when they lie in host memory): a warp takes 16 rows,
  // reads their 32 addresses and slots with one load per lane, and keeps kRows rows' loads in
  // flight before it stores them.
  constexpr int kGroup = 16, kRows = 4;
  for (int j0 = warp * kGroup; j0 < f.num_rows; j0 += warps * kGroup) {
    const int count = min(kGroup, f.num_rows - j0);
    const uint16_t* mine = lane < 2 * count ? f.row_addresses[2 * j0 + lane] : nullptr;
    const int my_slot = lane < count ? p.fill_slots[f.first + j0 + lane] : -1;
    for (int r0 = 0; r0 < count; r0 += kRows) {
      const uint16_t* k[kRows];
      const uint16_t* v[kRows];
      int slot[kRows];
      bool ok[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int r = min(r0 + u, count - 1);  // shuffles need every lane: clamp, then mask
        k[u] = reinterpret_cast<const uint16_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(mine), 2 * r));
        v[u] = reinterpret_cast<const uint16_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(mine), 2 * r + 1));
        slot[u] = __shfl_sync(0xffffffffu, my_slot, r);
        const bool in_slots = slot[u] >= 0 && slot[u] < p.budget;
        const bool aligned =
            k[u] != nullptr && v[u] != nullptr &&
            ((reinterpret_cast<uintptr_t>(k[u]) | reinterpret_cast<uintptr_t>(v[u])) & 15) == 0;
        ok[u] = r0 + u < count && in_slots && aligned;
        if (r0 + u < count && !ok[u] && lane == 0 && p.num_rejected != nullptr) {
          atomicAdd(p.num_rejected, 1);
        }
      }
      for (int c = lane; c < 2 * chunks; c += 32) {
        uint4 x[kRows];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          if (ok[u]) {
            x[u] = c < chunks ? reinterpret_cast<const uint4*>(k[u])[c]
                              : reinterpret_cast<const uint4*>(v[u])[c - chunks];
          }
        }
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          if (!ok[u]) continue;
          const int64_t dst = entry * p.entry_stride + static_cast<int64_t>(slot[u]) * p.row_stride;
          if (c < chunks) {
            reinterpret_cast<uint4*>(p.k_slots + dst)[c] = x[u];
          } else {
            reinterpret_cast<uint4*>(p.v_slots + dst)[c - chunks] = x[u];
          }
        }
      }
    }
  }
}

// One warp per (token, kv-head) row.
__global__ void KvAppendKernel(KvAppendParams p, int page_shift) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= p.batch * p.num_kv_heads) return;
  const int b = row / p.num_kv_heads, h = row % p.num_kv_heads;
  const int t = p.positions[b];
  if (t < 0) return;
  int64_t page;
  int in_page;
  if (p.page_table != nullptr) {
    page = p.page_table[static_cast<int64_t>(b) * p.page_table_stride + (t >> page_shift)];
    in_page = t & ((1 << page_shift) - 1);
  } else {
    page = b;
    in_page = t;
  }
  const int64_t dst = page * p.page_stride + static_cast<int64_t>(in_page) * p.token_stride +
                      static_cast<int64_t>(h) * p.head_stride;
  const int64_t src = static_cast<int64_t>(b) * p.src_stride + static_cast<int64_t>(h) * p.head_dim;
  for (int i = lane; i < p.head_dim / 8; i += 32) {
    reinterpret_cast<uint4*>(p.cache_k + dst)[i] =
        __ldg(reinterpret_cast<const uint4*>(p.k + src) + i);
    reinterpret_cast<uint4*>(p.cache_v + dst)[i] =
        __ldg(reinterpret_cast<const uint4*>(p.v + src) + i);
  }
}

}  // namespace

cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream) {
  const int rows = p.batch * p.num_kv_heads;
  if (rows == 0) return cudaSuccess;
  int shift = 0;
  if (p.page_table != nullptr) {
    while ((1 << shift) < p.page_size) ++shift;
  }
  constexpr int kRowsPerBlock = 8;
  KvAppendKernel<<<(rows + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock * 32, 0, stream>>>(
      p, shift);
  return cudaGetLastError();
}

cudaError_t LaunchSlotScatter(const SlotScatterParams& p, cudaStream_t stream) {
  if (p.num_entries == 0) return cudaSuccess;
  constexpr int kWarpsPerBlock = 8;
  SlotScatterKernel<<<p.num_entries, kWarpsPerBlock * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kvrecall::worker::cuda::internal
