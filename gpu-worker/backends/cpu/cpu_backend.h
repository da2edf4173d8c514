// The CPU reference backend: fp32 weights (converted from bf16/f16/f32 checkpoints at load),
// cache-blocked multi-threaded GEMMs (AVX2+FMA when the CPU has them, portable code otherwise).
// Reached through CreateBackend("cpu", ...); declared here for the registry.
//
// Numerics: RMSNorm as Hugging Face in fp32 (x * rsqrt(mean(x^2) + eps) * w; the mean of squares
// is accumulated in double), SiLU-gated MLP, residual adds in fp32. Each output row depends only
// on its own input row (see internal/gemm.h), so results are bitwise independent of how tokens
// are batched and of the thread count, and identical run to run on one machine.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CPU_CPU_BACKEND_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CPU_CPU_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gpu-worker/backends/backend.h"

namespace kvrecall::worker {

// Loads `model_dir` (config.json + safetensors). NOT_FOUND for missing files; INVALID_ARGUMENT
// naming the tensor when an expected tensor is missing or has the wrong shape; DATA_LOSS for a
// corrupt file. `num_threads` <= 0 uses every core.
absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCpuBackend(const std::string& model_dir,
                                                               int num_threads);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CPU_CPU_BACKEND_H_
