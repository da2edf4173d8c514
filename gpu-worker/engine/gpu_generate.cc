#include "gpu-worker/engine/gpu_generate.h"

#include <algorithm>
#include <utility>

#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/engine/cuda_engine.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

int32_t Argmax(const std::vector<float>& x) {
  return static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
}

double Seconds(absl::Time since) { return absl::ToDoubleSeconds(absl::Now() - since); }

class CudaGenerator final : public GpuGenerator {
 public:
  CudaGenerator(std::unique_ptr<cuda::CudaModel> model, ModelSpec spec, EngineOptions options,
                int max_context)
      : model_(std::move(model)),
        spec_(std::move(spec)),
        options_(options),
        max_context_(max_context) {}

  void PinRecallBuffer(client::TierOptions* options) override {
    worker::PinRecallBuffer(&pinned_, options);
  }

  absl::StatusOr<GenerateRun> Run(client::Tier* tier, const std::string& id,
                                  absl::Span<const int32_t> prompt, int steps,
                                  bool compare_dense) override {
    const CudaEngineLimits limits{1, max_context_};
    ASSIGN_OR_RETURN(std::unique_ptr<CudaEngine> engine,
                     CudaEngine::Create(model_.get(), tier, spec_, options_, limits, &pinned_));
    std::unique_ptr<CudaEngine> dense;
    if (compare_dense) {
      EngineOptions d = options_;
      d.sparse = false;
      ASSIGN_OR_RETURN(dense, CudaEngine::Create(model_.get(), nullptr, spec_, d, limits));
    }
    GenerateRun run;
    std::vector<float> logits, dense_logits;
    const absl::Time t_prefill = absl::Now();
    RETURN_IF_ERROR(engine->PrefillSequence(id, prompt, {}, &logits));
    run.prefill_seconds = Seconds(t_prefill);
    if (tier != nullptr) run.tier_appended_before_decode = tier->counters().bytes_appended;
    if (dense != nullptr) RETURN_IF_ERROR(dense->PrefillSequence(id, prompt, {}, &dense_logits));
    std::vector<int32_t> next_ids;
    int32_t next = Argmax(logits);
    for (int s = 0; s < steps; ++s) {
      // The distributions that chose this token: the prompt's first, then each step's.
      if (dense != nullptr) run.CompareWithDense(logits, dense_logits, next);
      run.generated.push_back(next);
      const absl::Time t0 = absl::Now();
      RETURN_IF_ERROR(engine->Step({&id, 1}, {&next, 1}, &next_ids, &logits));
      run.decode_seconds += Seconds(t0);
      if (dense != nullptr) {
        const absl::Time t1 = absl::Now();
        RETURN_IF_ERROR(dense->Step({&id, 1}, {&next, 1}, &next_ids, &dense_logits));
        run.dense_seconds += Seconds(t1);
      }
      next = Argmax(logits);
    }
    run.counters = engine->counters();
    if (dense != nullptr) RETURN_IF_ERROR(dense->RemoveSequence(id));
    RETURN_IF_ERROR(engine->RemoveSequence(id));
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

}  // namespace

absl::StatusOr<std::unique_ptr<GpuGenerator>> CreateGpuGenerator(const std::string& dir,
                                                                 const ModelSpec& spec,
                                                                 const EngineOptions& options,
                                                                 int max_context) {
  RETURN_IF_ERROR(cuda::CheckCudaDevice("--engine=gpu"));
  ASSIGN_OR_RETURN(const LlamaConfig config, LoadConfig(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCheckpoint> ckpt, SafetensorsCheckpoint::Open(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaModel> model,
                   cuda::CudaModel::Load(config, *ckpt, std::max(1, options.prefill_chunk)));
  return std::make_unique<CudaGenerator>(std::move(model), spec, options, max_context);
}

}  // namespace kvrecall::worker
