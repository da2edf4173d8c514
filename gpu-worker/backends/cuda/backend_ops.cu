// Kernels of the cuda backend beside kernels.h (contracts in internal/backend_ops.h).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gpu-worker/backends/cuda/internal/backend_ops.h"

namespace kvrecall::worker::cuda::internal {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint16_t ToBf16(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// One block per row.
__global__ void __launch_bounds__(kThreads)
    RmsNormF32Kernel(const float* x, const uint16_t* w, int dim, float eps, uint16_t* out) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += kThreads) ss = fmaf(xr[i], xr[i], ss);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int k = 0; k < kThreads / 32; ++k) total += scratch[k];
  const float r = rsqrtf(total / dim + eps);
  uint16_t* orow = out + row * dim;
  for (int i = threadIdx.x; i < dim; i += kThreads) {
    orow[i] = ToBf16(__uint_as_float(uint32_t{w[i]} << 16) * (xr[i] * r));
  }
}

__global__ void BiasToBf16Kernel(const float* in, const float* bias, int64_t total, int cols,
                                 uint16_t* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float b = bias != nullptr ? bias[i % cols] : 0.0f;
    out[i] = ToBf16(in[i] + b);
  }
}

__global__ void Bf16ToF32Kernel(const uint16_t* in, int64_t total, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __uint_as_float(uint32_t{in[i]} << 16);
  }
}

}  // namespace

cudaError_t LaunchBf16ToF32(const uint16_t* in, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  Bf16ToF32Kernel<<<static_cast<int>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(in, n,
                                                                                            out);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNormF32(const float* x, const uint16_t* w, int rows, int dim, float eps,
                             uint16_t* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RmsNormF32Kernel<<<rows, kThreads, 0, stream>>>(x, w, dim, eps, out);
  return cudaGetLastError();
}

cudaError_t LaunchBiasToBf16(const float* in, const float* bias, int rows, int cols, uint16_t* out,
                             cudaStream_t stream) {
  const int64_t total = int64_t{rows} * cols;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  BiasToBf16Kernel<<<static_cast<int>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(
      in, bias, total, cols, out);
  return cudaGetLastError();
}

}  // namespace kvrecall::worker::cuda::internal
