// CreateGpuGenerator of a build without CUDA.
#include "gpu-worker/engine/gpu_generate.h"

namespace kvrecall::worker {

absl::StatusOr<std::unique_ptr<GpuGenerator>> CreateGpuGenerator(const std::string&,
                                                                 const ModelSpec&,
                                                                 const EngineOptions&, int,
                                                                 const GpuParallelism&) {
  return absl::FailedPreconditionError(
      "kvrecall-worker was built without CUDA: --engine=gpu needs the GPU engine");
}

}  // namespace kvrecall::worker
