// Per-token kernels of the decode worker: RMSNorm, RoPE, SwiGLU, embedding gather, argmax and
// temperature + top-p sampling. Contracts in kernels.h; arguments validated by kernels.cc.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "gpu-worker/backends/cuda/internal/launch.h"

namespace kvrecall::worker::cuda::internal {
namespace {

__device__ __forceinline__ float Bf16(uint16_t h) { return __uint_as_float(uint32_t{h} << 16); }
__device__ __forceinline__ uint16_t ToBf16(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float BlockSum(float v, float* scratch /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

__device__ float BlockMax(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

// (value, index) with the larger value winning and the lower index breaking ties; NaN loses.
__device__ __forceinline__ void ArgmaxMerge(float& v, int& i, float v2, int i2) {
  const bool take =
      (v2 > v) || (v2 == v && i2 < i) || (v != v && v2 == v2) || (v != v && v2 != v2 && i2 < i);
  if (take) {
    v = v2;
    i = i2;
  }
}

__device__ int BlockArgmax(const float* x, int n, float* fscratch, int* iscratch) {
  float v = NAN;
  int idx = n;  // NaN at index n: loses to every element
  for (int i = threadIdx.x; i < n; i += blockDim.x) ArgmaxMerge(v, idx, x[i], i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
    ArgmaxMerge(v, idx, v2, i2);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    fscratch[warp] = v;
    iscratch[warp] = idx;
  }
  __syncthreads();
  v = lane < nw ? fscratch[lane] : NAN;
  idx = lane < nw ? iscratch[lane] : n;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
    ArgmaxMerge(v, idx, v2, i2);
  }
  return idx >= n ? 0 : idx;
}

constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const uint16_t* x, const uint16_t* w, int dim, float eps, uint16_t* out) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * dim);
  const int n8 = dim / 8;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n8; i += blockDim.x) {
    const uint4 u = xr[i];
    const uint32_t wd[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float a = __uint_as_float(wd[k] << 16), b = __uint_as_float(wd[k] & 0xffff0000u);
      ss = fmaf(a, a, ss);
      ss = fmaf(b, b, ss);
    }
  }
  const float r = rsqrtf(BlockSum(ss, scratch) / dim + eps);
  // Each thread rewrites only the chunks it reads itself, so out may alias x.
  const uint4* wr = reinterpret_cast<const uint4*>(w);
  uint4* orow = reinterpret_cast<uint4*>(out + row * dim);
  for (int i = threadIdx.x; i < n8; i += blockDim.x) {
    const uint4 u = xr[i], g = wr[i];
    const uint32_t xd[4] = {u.x, u.y, u.z, u.w}, gd[4] = {g.x, g.y, g.z, g.w};
    uint32_t od[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float lo = __uint_as_float(xd[k] << 16) * r * __uint_as_float(gd[k] << 16);
      const float hi =
          __uint_as_float(xd[k] & 0xffff0000u) * r * __uint_as_float(gd[k] & 0xffff0000u);
      od[k] = uint32_t{ToBf16(lo)} | (uint32_t{ToBf16(hi)} << 16);
    }
    orow[i] = make_uint4(od[0], od[1], od[2], od[3]);
  }
}

// One thread per (token, head, pair). Multiplies and adds are explicitly rounded (no FMA
// contraction) so the result matches the CPU reference (rope.cc) bit for bit in fp32.
__global__ void RopeKernel(uint16_t* x, int tokens, int num_heads, int half, int64_t token_stride,
                           const int32_t* positions, const double* inv_freq) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(tokens) * num_heads * half;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  const int64_t th = idx / half;
  const int h = static_cast<int>(th % num_heads);
  const int64_t t = th / num_heads;
  double sd, cd;
  sincos(static_cast<double>(positions[t]) * inv_freq[i], &sd, &cd);
  const float c = static_cast<float>(cd), s = static_cast<float>(sd);
  uint16_t* a = x + t * token_stride + static_cast<int64_t>(h) * 2 * half;
  const float x0 = Bf16(a[i]), x1 = Bf16(a[i + half]);
  a[i] = ToBf16(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
  a[i + half] = ToBf16(__fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
}

__global__ void SwiGluKernel(const uint16_t* gate, const uint16_t* up, int rows, int dim,
                             int64_t in_stride, uint16_t* out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(rows) * dim) return;
  const int64_t r = idx / dim;
  const int i = static_cast<int>(idx % dim);
  const float g = Bf16(gate[r * in_stride + i]), u = Bf16(up[r * in_stride + i]);
  out[idx] = ToBf16(g / (1.0f + expf(-g)) * u);
}

__global__ void EmbeddingKernel(const uint16_t* table, int vocab, int dim, const int32_t* ids,
                                uint16_t* out) {
  const int64_t row = blockIdx.x;
  const int id = ids[row];
  uint4* o = reinterpret_cast<uint4*>(out + row * dim);
  const bool ok = id >= 0 && id < vocab;
  const uint4* src =
      reinterpret_cast<const uint4*>(table + (ok ? static_cast<int64_t>(id) : 0) * dim);
  for (int i = threadIdx.x; i < dim / 8; i += blockDim.x)
    o[i] = ok ? src[i] : make_uint4(0, 0, 0, 0);
}

constexpr int kRowThreads = 512;

__global__ void __launch_bounds__(kRowThreads)
    ArgmaxKernel(const float* logits, int vocab, int32_t* out) {
  __shared__ float fs[32];
  __shared__ int is[32];
  const int64_t row = blockIdx.x;
  const int i = BlockArgmax(logits + row * vocab, vocab, fs, is);
  if (threadIdx.x == 0) out[row] = i;
}

// Inclusive prefix sum over the block; *total gets the block's sum.
__device__ float BlockInclusiveScan(float v, float* scratch, float* total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  float w = lane < nw ? scratch[lane] : 0.0f;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) w += t;
  }
  const float before = warp == 0 ? 0.0f : __shfl_sync(0xffffffffu, w, warp - 1);
  *total = __shfl_sync(0xffffffffu, w, 31);
  return v + before;
}

__global__ void __launch_bounds__(kRowThreads)
    SampleTopPKernel(const float* logits, int vocab, const float* temperature, const float* top_p,
                     const float* uniform, int32_t* out) {
  __shared__ float fs[32];
  __shared__ int is[32];
  __shared__ int s_pick;
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  const float temp = temperature[row];
  if (!(temp > 0.0f)) {
    const int i = BlockArgmax(x, vocab, fs, is);
    if (threadIdx.x == 0) out[row] = i;
    return;
  }
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
  mx = BlockMax(mx, fs);
  const float inv_t = 1.0f / temp;
  float z = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += expf((x[i] - mx) * inv_t);
  z = BlockSum(z, fs);
  // Threshold tau (as fp32 bits; e is in (0, 1], so bit order is value order): the largest with
  // kept mass >= top_p * z.
  uint32_t lo = 0;
  float kept = z;
  const float p = top_p[row];
  if (p < 1.0f) {
    const float target = p * z;
    uint32_t hi = __float_as_uint(1.0f) + 1;
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      const float tau = __uint_as_float(mid);
      float m = 0.0f;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float e = expf((x[i] - mx) * inv_t);
        if (e >= tau) m += e;
      }
      m = BlockSum(m, fs);
      if (m >= target) {
        lo = mid;
        kept = m;
      } else {
        hi = mid;
      }
    }
  }
  const float tau = __uint_as_float(lo);
  const float thr = uniform[row] * kept;
  if (threadIdx.x == 0) s_pick = INT_MAX;
  float running = 0.0f;
  int last_kept = -1;
  for (int base = 0; base < vocab; base += blockDim.x) {
    const int i = base + threadIdx.x;
    float e = 0.0f;
    if (i < vocab) {
      e = expf((x[i] - mx) * inv_t);
      if (e < tau) e = 0.0f;
    }
    if (e > 0.0f) last_kept = i;
    float total;
    const float incl = BlockInclusiveScan(e, fs, &total);
    if (e > 0.0f && running + incl > thr) atomicMin(&s_pick, i);  // lowest i wins
    __syncthreads();
    if (s_pick != INT_MAX) break;
    running += total;
  }
  __syncthreads();
  int pick = s_pick;
  if (pick == INT_MAX) {
    // Rounding left thr above the scanned mass: the last kept token.
    for (int o = 16; o > 0; o >>= 1)
      last_kept = max(last_kept, __shfl_xor_sync(0xffffffffu, last_kept, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) is[threadIdx.x >> 5] = last_kept;
    __syncthreads();
    if (threadIdx.x == 0) {
      int m = -1;
      for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) m = max(m, is[w]);
      out[row] = max(m, 0);
    }
    return;
  }
  if (threadIdx.x == 0) out[row] = pick;
}

int Blocks(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

__global__ void FillRandomKernel(uint16_t* out, int64_t n, uint64_t seed, int64_t first,
                                 float scale) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t x = seed + static_cast<uint64_t>(first + j) * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    const float u = __fmul_rn(static_cast<float>(x >> 40), 1.0f / 8388608.0f) - 1.0f;
    out[j] = ToBf16(__fmul_rn(scale, u));
  }
}

}  // namespace

cudaError_t LaunchFillRandomBf16(uint16_t* out, int64_t n, uint64_t seed, int64_t first,
                                 float scale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 132 * 16);
  FillRandomKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(out, n, seed, first, scale);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const uint16_t* x, const uint16_t* weight, int rows, int dim, float eps,
                          uint16_t* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<<<rows, kNormThreads, 0, stream>>>(x, weight, dim, eps, out);
  return cudaGetLastError();
}

cudaError_t LaunchRope(uint16_t* x, int tokens, int num_heads, int head_dim, int64_t token_stride,
                       const int32_t* positions, const double* inv_freq, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(tokens) * num_heads * (head_dim / 2);
  if (total == 0) return cudaSuccess;
  RopeKernel<<<Blocks(total, 256), 256, 0, stream>>>(x, tokens, num_heads, head_dim / 2,
                                                     token_stride, positions, inv_freq);
  return cudaGetLastError();
}

cudaError_t LaunchSwiGlu(const uint16_t* gate, const uint16_t* up, int rows, int dim,
                         int64_t in_stride, uint16_t* out, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(rows) * dim;
  if (total == 0) return cudaSuccess;
  SwiGluKernel<<<Blocks(total, 256), 256, 0, stream>>>(gate, up, rows, dim, in_stride, out);
  return cudaGetLastError();
}

cudaError_t LaunchEmbeddingGather(const uint16_t* table, int vocab, int dim, const int32_t* ids,
                                  int n, uint16_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  EmbeddingKernel<<<n, 128, 0, stream>>>(table, vocab, dim, ids, out);
  return cudaGetLastError();
}

cudaError_t LaunchArgmax(const float* logits, int rows, int vocab, int32_t* out,
                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ArgmaxKernel<<<rows, kRowThreads, 0, stream>>>(logits, vocab, out);
  return cudaGetLastError();
}

cudaError_t LaunchSampleTopP(const float* logits, int rows, int vocab, const float* temperature,
                             const float* top_p, const float* uniform, int32_t* out,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  SampleTopPKernel<<<rows, kRowThreads, 0, stream>>>(logits, vocab, temperature, top_p, uniform,
                                                     out);
  return cudaGetLastError();
}

}  // namespace kvrecall::worker::cuda::internal
