// The one converter from cudaError_t to absl::Status in the worker.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_STATUS_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvrecall::worker::cuda {

// OK for cudaSuccess; otherwise INTERNAL: "<what>: <cudaGetErrorName>: <cudaGetErrorString>".
// cudaErrorMemoryAllocation maps to RESOURCE_EXHAUSTED (the caller may retry smaller).
[[nodiscard]] absl::Status CudaStatus(cudaError_t e, absl::string_view what);

}  // namespace kvrecall::worker::cuda

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_STATUS_H_
