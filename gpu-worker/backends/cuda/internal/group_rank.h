// The per-rank Collective of a CollectiveGroup implementation (collectives.h): rank r's calls go
// to the group's AllReduceSum(r, ...), where the group keeps what the ranks share.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_GROUP_RANK_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_INTERNAL_GROUP_RANK_H_

#include <cstddef>

#include "absl/status/status.h"
#include "gpu-worker/backends/cuda/cuda_model.h"

namespace kvrecall::worker::cuda::internal {

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
