#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <memory>
#include <numeric>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/collectives.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/cuda/internal/group_rank.h"

namespace kvrecall::worker::cuda {
namespace {

absl::Status NcclStatus(ncclResult_t r, absl::string_view what) {
  if (r == ncclSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(r)));
}

class Group final : public CollectiveGroup {
 public:
  explicit Group(int world) : comms_(world, nullptr) {
    for (int r = 0; r < world; ++r)
      ranks_.push_back(std::make_unique<internal::GroupRank<Group>>(this, r));
  }
  ~Group() override {
    for (size_t r = 0; r < comms_.size(); ++r) {
      if (comms_[r] == nullptr) continue;
      ScopedDevice device(static_cast<int>(r));
      if (aborted_) continue;  // ncclCommAbort freed them
      ncclCommDestroy(comms_[r]);
    }
  }

  absl::Status Init() {
    std::vector<int> devices(comms_.size());
    std::iota(devices.begin(), devices.end(), 0);
    RETURN_IF_ERROR(
        NcclStatus(ncclCommInitAll(comms_.data(), static_cast<int>(comms_.size()), devices.data()),
                   "ncclCommInitAll"));
    // One all-reduce on every rank, from this thread: NCCL connects its peers now.
    std::vector<float*> one(comms_.size(), nullptr);
    std::vector<cudaStream_t> streams(comms_.size(), nullptr);
    absl::Status status;
    RETURN_IF_ERROR(NcclStatus(ncclGroupStart(), "ncclGroupStart"));
    for (size_t r = 0; r < comms_.size() && status.ok(); ++r) {
      ScopedDevice device(static_cast<int>(r));
      status = device.status();
      if (status.ok()) status = CudaStatus(cudaMalloc(&one[r], sizeof(float)), "warm-up buffer");
      if (status.ok()) status = CudaStatus(cudaMemset(one[r], 0, sizeof(float)), "warm-up buffer");
      if (status.ok()) status = CudaStatus(cudaStreamCreate(&streams[r]), "warm-up stream");
      if (status.ok()) {
        status =
            NcclStatus(ncclAllReduce(one[r], one[r], 1, ncclFloat, ncclSum, comms_[r], streams[r]),
                       "warm-up all-reduce");
      }
    }
    const absl::Status ended = NcclStatus(ncclGroupEnd(), "ncclGroupEnd");
    if (status.ok()) status = ended;
    for (size_t r = 0; r < comms_.size(); ++r) {
      ScopedDevice device(static_cast<int>(r));
      if (streams[r] != nullptr) {
        if (status.ok()) status = CudaStatus(cudaStreamSynchronize(streams[r]), "warm-up");
        cudaStreamDestroy(streams[r]);
      }
      if (one[r] != nullptr) cudaFree(one[r]);
    }
    return status;
  }

  int world() const override { return static_cast<int>(comms_.size()); }
  Collective* rank(int r) override { return ranks_[r].get(); }
  bool aborted() const override { return aborted_; }

  void Abort() override {
    std::unique_lock lock(mu_);  // waits out calls being enqueued
    if (aborted_.exchange(true)) return;
    KV_LOG(WARNING) << "aborting the tensor-parallel group's " << comms_.size()
                    << " NCCL communicators";
    for (size_t r = 0; r < comms_.size(); ++r) {
      if (comms_[r] == nullptr) continue;
      ScopedDevice device(static_cast<int>(r));
      ncclCommAbort(comms_[r]);
    }
  }

  absl::Status AllReduceSum(int rank, float* data, size_t count, cudaStream_t stream) {
    std::shared_lock lock(mu_);
    if (aborted_) return internal::GroupAborted();
    return NcclStatus(ncclAllReduce(data, data, count, ncclFloat, ncclSum, comms_[rank], stream),
                      absl::StrCat("ncclAllReduce on rank ", rank));
  }

 private:
  std::vector<ncclComm_t> comms_;
  std::vector<std::unique_ptr<internal::GroupRank<Group>>> ranks_;
  std::shared_mutex mu_;  // held shared while a call is enqueued, exclusively by Abort
  std::atomic<bool> aborted_{false};
};

}  // namespace

absl::StatusOr<std::unique_ptr<CollectiveGroup>> CreateNcclGroup(int world) {
  if (world < 1) return absl::InvalidArgumentError("a tensor-parallel group needs world >= 1");
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (devices < world) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor parallelism over ", world, " GPUs, but ", devices, " are present"));
  }
  auto group = std::make_unique<Group>(world);
  RETURN_IF_ERROR(group->Init());
  int version = 0;
  ncclGetVersion(&version);
  KV_LOG(INFO) << "NCCL " << version << ": tensor-parallel group over " << world << " GPUs";
  return group;
}

}  // namespace kvrecall::worker::cuda
