// CreateHostGroup (collectives.h): all-reduces that meet in host memory.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/collectives.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/cuda/internal/group_rank.h"

namespace kvrecall::worker::cuda {
namespace {

class HostGroup final : public CollectiveGroup {
 public:
  explicit HostGroup(int world) : staging_(world) {
    for (int r = 0; r < world; ++r)
      ranks_.push_back(std::make_unique<internal::GroupRank<HostGroup>>(this, r));
  }
  int world() const override { return static_cast<int>(ranks_.size()); }
  Collective* rank(int r) override { return ranks_[r].get(); }
  void Abort() override {
    absl::MutexLock lock(&mu_);
    aborted_ = true;
    cv_.SignalAll();
  }
  bool aborted() const override {
    absl::MutexLock lock(&mu_);
    return aborted_;
  }

  absl::Status AllReduceSum(int rank, float* data, size_t count, cudaStream_t stream) {
    std::vector<float>& mine = staging_[rank];
    mine.resize(count);
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(mine.data(), data, count * sizeof(float), cudaMemcpyDeviceToHost, stream),
        "all-reduce download"));
    RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "all-reduce download"));
    RETURN_IF_ERROR(Barrier());
    std::vector<float> sum(count, 0.0f);
    for (const std::vector<float>& part : staging_) {
      if (part.size() != count) {
        Abort();
        return absl::InternalError(
            absl::StrCat("all-reduce of ", count, " values met one of ", part.size()));
      }
      for (size_t i = 0; i < count; ++i) sum[i] += part[i];
    }
    RETURN_IF_ERROR(Barrier());  // every rank has read every part
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(data, sum.data(), count * sizeof(float), cudaMemcpyHostToDevice, stream),
        "all-reduce upload"));
    return CudaStatus(cudaStreamSynchronize(stream), "all-reduce upload");
  }

 private:
  // Waits until every rank arrived (or the group is aborted: FAILED_PRECONDITION).
  absl::Status Barrier() {
    absl::MutexLock lock(&mu_);
    if (aborted_) return internal::GroupAborted();
    const uint64_t generation = generation_;
    if (++arrived_ == world()) {
      arrived_ = 0;
      ++generation_;
      cv_.SignalAll();
      return absl::OkStatus();
    }
    while (!aborted_ && generation_ == generation) cv_.Wait(&mu_);
    return generation_ != generation ? absl::OkStatus() : internal::GroupAborted();
  }

  std::vector<std::unique_ptr<internal::GroupRank<HostGroup>>> ranks_;
  std::vector<std::vector<float>> staging_;  // [rank][count]
  mutable absl::Mutex mu_;
  bool aborted_ = false;
  int arrived_ = 0;
  uint64_t generation_ = 0;  // barriers passed
  absl::CondVar cv_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<CollectiveGroup>> CreateHostGroup(int world) {
  if (world < 1) return absl::InvalidArgumentError("a tensor-parallel group needs world >= 1");
  return std::make_unique<HostGroup>(world);
}

}  // namespace kvrecall::worker::cuda
