// CreateNcclGroup where the build found no NCCL (collectives.h).
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gpu-worker/backends/cuda/collectives.h"

namespace kvrecall::worker::cuda {

absl::StatusOr<std::unique_ptr<CollectiveGroup>> CreateNcclGroup(int world) {
  return absl::FailedPreconditionError(absl::StrCat(
      "a tensor-parallel group over ", world, " GPUs needs NCCL, which this build did not find"));
}

}  // namespace kvrecall::worker::cuda
