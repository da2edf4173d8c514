// Tensor parallelism with NCCL across the GPUs of one host (ARCHITECTURE.md §9): a Llama model
// split by heads over `world` GPUs, one rank per GPU, each rank decoding and retrieving for its
// own kv-heads.
//
// Split (cuda_model.h): rank r on device r holds q-heads [r H / world, (r + 1) H / world) and
// the kv-heads they use (whole GQA groups; ShardConfig), o_proj's columns of those heads and
// 1/world of the MLP (gate/up rows, down_proj columns); the embedding, norms and lm_head are
// whole on every rank. The residual stream is replicated: each layer ends in two all-reduces of
// [batch][hidden] fp32 (after o_proj and after down_proj), so every rank holds the same x and
// computes the same logits; the tokens come from rank 0.
//
// Each rank runs a CudaEngine over its shard: its KV cache, slot caches and sinks + window hold
// its kv-heads only, and in sparse mode it stores and retrieves them through a Tier of its own
// (tiers[r]; a Tier serves one thread), as its own model and sequences on the tier
// (ShardName: "<model>.tp<r>of<world>", "<sequence>.tp<r>of<world>"). So one step makes `world`
// Retrieve calls per sparse layer, each for 1/world of the heads, in parallel, and the ranks'
// tier traffic adds up to the single-GPU engine's. The tier can be any Tier (LocalTier,
// RemoteTier); the ranks' tiers may point at the same nodes.
//
// Failure. A rank that fails between collectives would leave the others waiting on the GPU, so
// TensorParallelModel::OnEveryRank aborts the collective group when a rank fails while others
// still run; the next call makes a new group. Calls are checked before any rank starts (the same
// checks each rank's engine makes), so a bad argument fails every rank alike and aborts nothing.
// A step that fails on some ranks only leaves the ranks at different positions: the engine then
// answers FAILED_PRECONDITION to Step and PrefillSequence until every sequence was removed.
//
// Thread safety: one thread drives a TensorParallelEngine; each call runs the ranks on threads
// of their own, each with its device current.
#ifndef KVRECALL_GPU_WORKER_ENGINE_TP_ENGINE_H_
#define KVRECALL_GPU_WORKER_ENGINE_TP_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/tier.h"
#include "common/model_spec.h"
#include "gpu-worker/backends/cuda/collectives.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/engine/cuda_engine.h"
#include "gpu-worker/engine/engine.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {

struct TensorParallelOptions {
  int world = 1;  // ranks
  // "nccl": rank r on device r, all-reduces through NCCL. "host": all-reduces through host
  // memory (cuda::CreateHostGroup), rank r on device r % devices - ranks may share a GPU; for
  // tests on fewer GPUs than ranks, and as a reference for NCCL. World 1 needs neither.
  std::string collective = "nccl";
};

// A model split over `world` ranks: rank r's shard (CudaModel, TensorParallel{r, world}) on
// its device, and the collective group that joins them. World 1 is the whole model on device 0.
class TensorParallelModel {
 public:
  // The shards load in parallel, one thread per rank. Errors: ShardConfig's and
  // CudaModel::Load's / Random's; INVALID_ARGUMENT for an unknown collective;
  // FAILED_PRECONDITION without a device, or for "nccl" with fewer than `world` devices or
  // without NCCL.
  static absl::StatusOr<std::unique_ptr<TensorParallelModel>> Load(
      const LlamaConfig& config, const SafetensorsCheckpoint& ckpt, const TensorParallelOptions& tp,
      int max_rows);
  static absl::StatusOr<std::unique_ptr<TensorParallelModel>> Random(
      const LlamaConfig& config, uint64_t seed, const TensorParallelOptions& tp, int max_rows);
  ~TensorParallelModel();  // frees each shard with its device current

  int world() const { return static_cast<int>(shards_.size()); }
  int device(int rank) const { return devices_[rank]; }
  const LlamaConfig& config() const { return config_; }  // the whole model's
  cuda::CudaModel* shard(int rank) const { return shards_[rank].get(); }

  // Runs fn(rank) for every rank at once, each on a thread of its own with the rank's device
  // current; OK when every call is, else the error of the rank that failed first, prefixed
  // with its rank. When a call fails while others have not returned, those may be waiting for a
  // collective the failed rank never makes: the group is aborted, which ends their waits
  // (with garbage), and the next call makes a new group (UNAVAILABLE when that fails).
  // `statuses` (when not null) gets every rank's own status.
  absl::Status OnEveryRank(absl::FunctionRef<absl::Status(int rank)> fn,
                           std::vector<absl::Status>* statuses = nullptr);
  // fn(rank) as OnEveryRank runs it, for work that makes no collective call (nothing is
  // aborted); errors as OnEveryRank's.
  absl::Status ForEachRank(absl::FunctionRef<absl::Status(int rank)> fn);

 private:
  class RankCollective;
  TensorParallelModel(LlamaConfig config, TensorParallelOptions tp, int devices);
  absl::StatusOr<std::unique_ptr<cuda::CollectiveGroup>> MakeGroup() const;
  static absl::StatusOr<std::unique_ptr<TensorParallelModel>> Make(
      const LlamaConfig& config, const TensorParallelOptions& tp,
      absl::FunctionRef<
          absl::StatusOr<std::unique_ptr<cuda::CudaModel>>(const cuda::TensorParallel&)>
          load);
  // fn(rank) on every rank's thread, each status in (*out)[rank]; with abort_on_failure, a
  // rank that fails while others run aborts the group. Returns the rank that failed first
  // (-1: none).
  int RunRanks(absl::FunctionRef<absl::Status(int rank)> fn, bool abort_on_failure,
               std::vector<absl::Status>* out);

  const LlamaConfig config_;
  const TensorParallelOptions tp_;
  std::vector<int> devices_;                                  // [rank]
  std::unique_ptr<cuda::CollectiveGroup> group_;              // null for world 1
  std::vector<std::unique_ptr<RankCollective>> collectives_;  // forward to group_'s ranks
  std::vector<std::unique_ptr<cuda::CudaModel>> shards_;
};

class TensorParallelEngine {
 public:
  // One CudaEngine per rank over model->shard(r), in sparse mode retrieving through tiers[r]
  // (tiers.size() == world; not owned; null entries in dense mode), each registered there as
  // the rank's model (ShardName of spec.model_id). spec: the whole model's (its heads are
  // divided here). `pinned`: the ranges every rank's tier pinned its recall buffer into
  // (PinRecallBuffer; page-locked for all devices). Errors as CudaEngine::Create, and the
  // tiers' RegisterModel's.
  static absl::StatusOr<std::unique_ptr<TensorParallelEngine>> Create(
      TensorParallelModel* model, absl::Span<client::Tier* const> tiers, const ModelSpec& spec,
      const EngineOptions& options, const CudaEngineLimits& limits,
      const cuda::PinnedHostRanges* pinned = nullptr);
  ~TensorParallelEngine();

  // As CudaEngine's, on every rank; *last_logits from rank 0. A failure on some ranks removes
  // the sequence from the others (and drops it on their tiers).
  absl::Status PrefillSequence(const std::string& id, absl::Span<const int32_t> tokens,
                               const CudaPrefillOptions& options = {},
                               std::vector<float>* last_logits = nullptr);
  // As CudaEngine::Step, on every rank; next and logits from rank 0 (every rank computes the
  // same). A step that fails on every rank can be retried, as on one GPU.
  absl::Status Step(absl::Span<const std::string> ids, absl::Span<const int32_t> tokens,
                    std::vector<int32_t>* next, std::vector<float>* logits = nullptr);
  absl::Status RemoveSequence(const std::string& id);

  int world() const { return static_cast<int>(engines_.size()); }
  int batch() const { return engines_[0]->batch(); }
  // Rank r's engine (its counters and times: retrieval and appends are per rank).
  const CudaEngine& rank(int r) const { return *engines_[r]; }

 private:
  TensorParallelEngine(TensorParallelModel* model, int world) : model_(model), engines_(world) {}
  // ids as rank r's engine names them.
  std::vector<std::string> RankIds(absl::Span<const std::string> ids, int r) const;

  TensorParallelModel* const model_;
  std::vector<std::unique_ptr<CudaEngine>> engines_;
  absl::Status diverged_;  // set when a step failed on some ranks only
};

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_ENGINE_TP_ENGINE_H_
