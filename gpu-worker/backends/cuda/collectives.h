// Groups of Collectives (cuda_model.h) for tensor parallelism on the GPUs of one host, one
// Collective per rank, all made by one process:
//   NCCL (CreateNcclGroup): ncclCommInitAll over devices 0..world-1; rank r runs on device r.
//   Host (CreateHostGroup): each all-reduce meets in host memory - every rank copies its data
//     down, waits for the others, sums all ranks' copies in rank order and copies the sum back.
//     Slow (two host waits per call) but needs no NCCL and lets ranks share a device: for tests
//     on machines with fewer GPUs than ranks, and as a reference for NCCL's results.
//
// Failure: a rank that fails between collectives leaves the others waiting (on the GPU, or at
// the host group's barrier) for a call that never comes. Abort ends those waits; the group is
// then unusable and a new one must be made. The NCCL group runs one all-reduce on every rank
// when it is made, so that NCCL's connections exist before any rank can fail and no later call
// blocks the host waiting for a peer.
//
// Built without NCCL (no libnccl beside the CUDA toolkit), CreateNcclGroup answers
// FAILED_PRECONDITION (nccl_collective_unavailable.cc).
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_COLLECTIVES_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_COLLECTIVES_H_

#include <memory>

#include "absl/status/statusor.h"
#include "gpu-worker/backends/cuda/cuda_model.h"

namespace kvrecall::worker::cuda {

class CollectiveGroup {
 public:
  virtual ~CollectiveGroup() = default;
  virtual int world() const = 0;
  // Rank r's collective, owned by the group. REQUIRES: 0 <= r < world().
  virtual Collective* rank(int r) = 0;
  // Ends every wait for a collective (results are garbage) and makes every later call answer
  // FAILED_PRECONDITION. Thread-safe and idempotent.
  virtual void Abort() = 0;
  virtual bool aborted() const = 0;
};

// INVALID_ARGUMENT for world < 1; FAILED_PRECONDITION without NCCL or with fewer than `world`
// devices; INTERNAL for NCCL's and CUDA's errors.
absl::StatusOr<std::unique_ptr<CollectiveGroup>> CreateNcclGroup(int world);
// INVALID_ARGUMENT for world < 1. Each call runs on the rank's thread with the device of its
// stream current.
absl::StatusOr<std::unique_ptr<CollectiveGroup>> CreateHostGroup(int world);

}  // namespace kvrecall::worker::cuda

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_COLLECTIVES_H_
