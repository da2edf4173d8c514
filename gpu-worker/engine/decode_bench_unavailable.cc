// RunDecodeBench of a build without CUDA.
#include "gpu-worker/engine/decode_bench.h"

namespace kvrecall::worker {

absl::Status RunDecodeBench(const DecodeBenchOptions&, nlohmann::json*) {
  return absl::FailedPreconditionError(
      "kvrecall-worker was built without CUDA: bench needs the GPU engine");
}

}  // namespace kvrecall::worker
