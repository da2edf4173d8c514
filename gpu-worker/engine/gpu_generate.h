// `kvrecall-worker generate --engine=gpu`: one prompt prefilled and decoded greedily by the
// GPU-resident engine (cuda_engine.h), its sparse layers through a Tier, and optionally a dense
// GPU engine alongside, teacher-forced on the same tokens, for the logits' difference. Built
// with CUDA only; elsewhere CreateGpuGenerator answers FAILED_PRECONDITION
// (gpu_generate_unavailable.cc).
#ifndef KVRECALL_GPU_WORKER_ENGINE_GPU_GENERATE_H_
#define KVRECALL_GPU_WORKER_ENGINE_GPU_GENERATE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/tier.h"
#include "common/model_spec.h"
#include "gpu-worker/engine/engine.h"

namespace kvrecall::worker {

// What a generate run measured; the host engine's loop fills the same.
struct GenerateRun {
  std::vector<int32_t> generated;  // greedy tokens; the first from the prompt's logits
  double prefill_seconds = 0;      // the prompt through the model (GPU: its push to the tier too)
  double push_seconds = 0;         // the prompt's K/V to the tier (host engine only)
  double decode_seconds = 0, dense_seconds = 0;
  int compared = 0, top1_match = 0;  // steps compared with dense, and whose argmax agreed
  double max_abs_dlogit = 0;
  std::vector<double> step_max_abs_dlogit;
  int64_t tier_appended_before_decode = 0;  // the tier's bytes_appended once the prompt was in
  EngineCounters counters;

  // Records one compared step: `next`, chosen from `logits`, against the dense engine's
  // `dense_logits` for the same position.
  void CompareWithDense(const std::vector<float>& logits, const std::vector<float>& dense_logits,
                        int32_t next) {
    ++compared;
    top1_match += static_cast<int32_t>(std::max_element(dense_logits.begin(), dense_logits.end()) -
                                       dense_logits.begin()) == next;
    double d = 0;
    for (size_t j = 0; j < logits.size(); ++j) {
      d = std::max(d, static_cast<double>(std::fabs(logits[j] - dense_logits[j])));
    }
    step_max_abs_dlogit.push_back(d);
    max_abs_dlogit = std::max(max_abs_dlogit, d);
  }
};

class GpuGenerator {
 public:
  virtual ~GpuGenerator() = default;
  // Tensor-parallel ranks (GPUs); Run takes one tier per rank.
  virtual int world() const = 0;
  // Sets the options' pin hooks so that the GPU reads the tier's recall buffer where it lies.
  // Create the tiers with them, after this call, and destroy them before the generator.
  virtual void PinRecallBuffer(client::TierOptions* options) = 0;
  // Prefills `prompt` as sequence `id` on the GPU (pushing it to the tiers in sparse mode;
  // tiers[r] is rank r's, world() of them, null in dense mode), then decodes `steps` greedy
  // tokens; with compare_dense a dense engine runs the same tokens. The sequence is removed
  // (and dropped on the tiers) at the end. The counters add up the ranks' retrieval and
  // appends. INVALID_ARGUMENT when tiers does not hold world() entries.
  virtual absl::StatusOr<GenerateRun> Run(absl::Span<client::Tier* const> tiers,
                                          const std::string& id, absl::Span<const int32_t> prompt,
                                          int steps, bool compare_dense) = 0;
};

// Tensor parallelism of a generator (tp_engine.h): `world` ranks, one per GPU, all-reducing
// through `collective` ("nccl", or "host": through host memory, ranks may share a GPU).
struct GpuParallelism {
  int world = 1;
  std::string collective = "nccl";
};

// Loads the checkpoint at `dir` on the GPU (split over `parallel.world` GPUs), for sequences of
// up to max_context tokens (prompt and generated together). FAILED_PRECONDITION without CUDA or
// a device (or without `world` devices for NCCL); the checkpoint's errors as CudaModel::Load
// gives them; TensorParallelModel::Load's for world > 1 (INVALID_ARGUMENT for a world that does
// not divide the heads).
absl::StatusOr<std::unique_ptr<GpuGenerator>> CreateGpuGenerator(
    const std::string& dir, const ModelSpec& spec, const EngineOptions& options, int max_context,
    const GpuParallelism& parallel = {});

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_ENGINE_GPU_GENERATE_H_
