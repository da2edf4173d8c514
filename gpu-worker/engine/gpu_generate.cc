#include "gpu-worker/engine/gpu_generate.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/engine/cuda_engine.h"
#include "gpu-worker/engine/tp_engine.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

int32_t Argmax(const std::vector<float>& x) {
  return static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
}

double Seconds(absl::Time since) { return absl::ToDoubleSeconds(absl::Now() - since); }

// The loop of a run on `engine` (a CudaEngine or a TensorParallelEngine), with `dense` (may be
// null) teacher-forced on the same tokens. run->counters is the caller's.
template <typename E>
absl::Status Decode(E* engine, E* dense, absl::Span<client::Tier* const> tiers,
                    const std::string& id, absl::Span<const int32_t> prompt, int steps,
                    GenerateRun* run) {
  std::vector<float> logits, dense_logits;
  const absl::Time t_prefill = absl::Now();
  RETURN_IF_ERROR(engine->PrefillSequence(id, prompt, {}, &logits));
  run->prefill_seconds = Seconds(t_prefill);
  for (client::Tier* tier : tiers) {
    if (tier != nullptr) run->tier_appended_before_decode += tier->counters().bytes_appended;
  }
  if (dense != nullptr) RETURN_IF_ERROR(dense->PrefillSequence(id, prompt, {}, &dense_logits));
  std::vector<int32_t> next_ids;
  int32_t next = Argmax(logits);
  for (int s = 0; s < steps; ++s) {
    // The distributions that chose this token: the prompt's first, then each step's.
    if (dense != nullptr) run->CompareWithDense(logits, dense_logits, next);
    run->generated.push_back(next);
    const absl::Time t0 = absl::Now();
    RETURN_IF_ERROR(engine->Step({&id, 1}, {&next, 1}, &next_ids, &logits));
    run->decode_seconds += Seconds(t0);
    if (dense != nullptr) {
      const absl::Time t1 = absl::Now();
      RETURN_IF_ERROR(dense->Step({&id, 1}, {&next, 1}, &next_ids, &dense_logits));
      run->dense_seconds += Seconds(t1);
    }
    next = Argmax(logits);
  }
  if (dense != nullptr) RETURN_IF_ERROR(dense->RemoveSequence(id));
  return engine->RemoveSequence(id);
}

absl::Status CheckTiers(absl::Span<client::Tier* const> tiers, int world) {
  if (static_cast<int>(tiers.size()) != world) {
    return absl::InvalidArgumentError(
        absl::StrCat("a run on ", world, " GPU(s) needs one tier per GPU, got ", tiers.size()));
  }
  return absl::OkStatus();
}

class CudaGenerator final : public GpuGenerator {
 public:
  CudaGenerator(std::unique_ptr<cuda::CudaModel> model, ModelSpec spec, EngineOptions options,
                int max_context)
      : model_(std::move(model)),
        spec_(std::move(spec)),
        options_(options),
        max_context_(max_context) {}

  int world() const override { return 1; }

  void PinRecallBuffer(client::TierOptions* options) override {
    worker::PinRecallBuffer(&pinned_, options);
  }

  absl::StatusOr<GenerateRun> Run(absl::Span<client::Tier* const> tiers, const std::string& id,
                                  absl::Span<const int32_t> prompt, int steps,
                                  bool compare_dense) override {
    RETURN_IF_ERROR(CheckTiers(tiers, 1));
    const CudaEngineLimits limits{1, max_context_};
    ASSIGN_OR_RETURN(std::unique_ptr<CudaEngine> engine,
                     CudaEngine::Create(model_.get(), tiers[0], spec_, options_, limits, &pinned_));
    std::unique_ptr<CudaEngine> dense;
    if (compare_dense) {
      EngineOptions d = options_;
      d.sparse = false;
      ASSIGN_OR_RETURN(dense, CudaEngine::Create(model_.get(), nullptr, spec_, d, limits));
    }
    GenerateRun run;
    RETURN_IF_ERROR(Decode(engine.get(), dense.get(), tiers, id, prompt, steps, &run));
    run.counters = engine->counters();
    return run;
  }

 private:
  std::unique_ptr<cuda::CudaModel> model_;
  ModelSpec spec_;
  EngineOptions options_;
  int max_context_;
  // The recall buffer's pins: the tier made with PinRecallBuffer must go before this generator.
  cuda::PinnedHostRanges pinned_;
};

// The same over a model split across GPUs (TensorParallelEngine); each rank retrieves its own
// kv-heads through its tier.
class TensorParallelGenerator final : public GpuGenerator {
 public:
  TensorParallelGenerator(std::unique_ptr<TensorParallelModel> model, ModelSpec spec,
                          EngineOptions options, int max_context)
      : model_(std::move(model)),
        spec_(std::move(spec)),
        options_(options),
        max_context_(max_context) {}

  int world() const override { return model_->world(); }

  void PinRecallBuffer(client::TierOptions* options) override {
    worker::PinRecallBuffer(&pinned_, options);
  }

  absl::StatusOr<GenerateRun> Run(absl::Span<client::Tier* const> tiers, const std::string& id,
                                  absl::Span<const int32_t> prompt, int steps,
                                  bool compare_dense) override {
    RETURN_IF_ERROR(CheckTiers(tiers, world()));
    const CudaEngineLimits limits{1, max_context_};
    ASSIGN_OR_RETURN(
        std::unique_ptr<TensorParallelEngine> engine,
        TensorParallelEngine::Create(model_.get(), tiers, spec_, options_, limits, &pinned_));
    std::unique_ptr<TensorParallelEngine> dense;
    if (compare_dense) {
      EngineOptions d = options_;
      d.sparse = false;
      const std::vector<client::Tier*> none(static_cast<size_t>(world()), nullptr);
      ASSIGN_OR_RETURN(dense, TensorParallelEngine::Create(model_.get(), none, spec_, d, limits));
    }
    GenerateRun run;
    RETURN_IF_ERROR(Decode(engine.get(), dense.get(), tiers, id, prompt, steps, &run));
    // Steps and tokens as rank 0 counts them; retrieval, appends and index builds of every rank.
    run.counters = engine->rank(0).counters();
    for (int r = 1; r < world(); ++r) {
      const EngineCounters& c = engine->rank(r).counters();
      run.counters.retrieve_calls += c.retrieve_calls;
      run.counters.recalled_rows += c.recalled_rows;
      run.counters.streamed_rows += c.streamed_rows;
      run.counters.fallback_layers += c.fallback_layers;
      run.counters.retrieve_seconds += c.retrieve_seconds;
      run.counters.append_seconds += c.append_seconds;
      run.counters.index_build_seconds += c.index_build_seconds;
    }
    return run;
  }

 private:
  std::unique_ptr<TensorParallelModel> model_;
  ModelSpec spec_;
  EngineOptions options_;
  int max_context_;
  cuda::PinnedHostRanges pinned_;  // every rank's tier's recall buffer
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuGenerator>> CreateGpuGenerator(const std::string& dir,
                                                                 const ModelSpec& spec,
                                                                 const EngineOptions& options,
                                                                 int max_context,
                                                                 const GpuParallelism& parallel) {
  if (parallel.world < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor parallelism needs at least 1 GPU, not ", parallel.world));
  }
  RETURN_IF_ERROR(cuda::CheckCudaDevice("--engine=gpu"));
  ASSIGN_OR_RETURN(const LlamaConfig config, LoadConfig(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCheckpoint> ckpt, SafetensorsCheckpoint::Open(dir));
  const int max_rows = std::max(1, options.prefill_chunk);
  if (parallel.world > 1) {
    ASSIGN_OR_RETURN(
        std::unique_ptr<TensorParallelModel> model,
        TensorParallelModel::Load(config, *ckpt, {parallel.world, parallel.collective}, max_rows));
    return std::make_unique<TensorParallelGenerator>(std::move(model), spec, options, max_context);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaModel> model,
                   cuda::CudaModel::Load(config, *ckpt, max_rows));
  return std::make_unique<CudaGenerator>(std::move(model), spec, options, max_context);
}

}  // namespace kvrecall::worker
