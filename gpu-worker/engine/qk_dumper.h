// Records the post-RoPE q, k and v of one sequence as the engine runs it, and writes them in the
// indexer's Q/K dump format (indexer/qk_dump.h) — the real traces `kvrecall-bench index` reads.
#ifndef KVRECALL_GPU_WORKER_ENGINE_QK_DUMPER_H_
#define KVRECALL_GPU_WORKER_ENGINE_QK_DUMPER_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gpu-worker/engine/engine.h"
#include "gpu-worker/model/config.h"

namespace kvrecall::worker {

class QkDumper final : public QkvObserver {
 public:
  // Records prefill rows and decode rows of `sequence_id` (other sequences are ignored).
  QkDumper(const LlamaConfig& config, std::string sequence_id);

  void OnQkv(int layer, absl::Span<const std::string> ids, absl::Span<const int32_t> positions, const float* q,
             const float* k, const float* v) override;

  // Writes DIR (header.json + layer_<l>.{q,k,v}.bin for every layer) in `dtype`.
  // FAILED_PRECONDITION when positions were not recorded contiguously from 0.
  absl::Status Write(const std::string& dir, const std::string& model, int64_t prompt_tokens, DType dtype) const;

  int64_t tokens() const { return layers_.empty() ? 0 : static_cast<int64_t>(layers_[0].positions); }

 private:
  struct Layer {
    std::vector<float> q, k, v;  // [pos][heads][head_dim], appended in position order
    int64_t positions = 0;
    bool gap = false;
  };
  const LlamaConfig config_;
  const std::string sequence_id_;
  std::vector<Layer> layers_;
};

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_ENGINE_QK_DUMPER_H_
