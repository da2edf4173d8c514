// nvcc-compiled kernels the cuda model (cuda_model.cc) needs beside kernels.h: the steps
// where the backend's fp32 residual stream meets bf16 activations. Internal: arguments are
// validated by the caller; each returns the launch's cudaError_t (cudaGetLastError).
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_BACKEND_OPS_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_BACKEND_OPS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvrecall::worker::cuda::internal {

// out[r][i] = bf16(w[i] * (x[r][i] * rsqrt(mean_i(x[r][i]^2) + eps))), fp32 arithmetic.
//   x: [rows][dim] fp32 (the residual stream); w: [dim] bf16; out: [rows][dim] bf16.
cudaError_t LaunchRmsNormF32(const float* x, const uint16_t* w, int rows, int dim, float eps,
                             uint16_t* out, cudaStream_t stream);

// out[r][i] = bf16(in[r][i] + bias[i]) (bias may be null: plain rounding).
//   in: [rows][cols] fp32; bias: [cols] fp32; out: [rows][cols] bf16.
cudaError_t LaunchBiasToBf16(const float* in, const float* bias, int rows, int cols, uint16_t* out,
                             cudaStream_t stream);

// out[i] = float(in[i]) (exact): embeddings into the fp32 residual stream.
//   in: [n] bf16; out: [n] fp32.
cudaError_t LaunchBf16ToF32(const uint16_t* in, int64_t n, float* out, cudaStream_t stream);

}  // namespace kvrecall::worker::cuda::internal

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_BACKEND_OPS_H_
