// What the CollectiveGroup implementations (collectives.h) share: the per-rank Collective, whose
// calls go to the group's AllReduceSum(r, ...), and the aborted group's answer.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_GROUP_RANK_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_GROUP_RANK_H_

#include <cstddef>

#include "absl/status/status.h"
#include "gpu-worker/backends/cuda/cuda_model.h"

namespace kvrecall::worker::cuda::internal {

// What a group's calls answer once it was aborted.
inline absl::Status GroupAborted() {
  return absl::FailedPreconditionError("the tensor-parallel group was aborted after a rank failed");
}

// Group: has absl::Status AllReduceSum(int rank, float* data, size_t count, cudaStream_t).
template <typename Group>
class GroupRank final : public Collective {
 public:
  GroupRank(Group* group, int rank) : group_(group), rank_(rank) {}
  absl::Status AllReduceSum(float* data, size_t count, cudaStream_t stream) override {
    return group_->AllReduceSum(rank_, data, count, stream);
  }

 private:
  Group* const group_;
  const int rank_;
};

}  // namespace kvrecall::worker::cuda::internal

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_GROUP_RANK_H_
