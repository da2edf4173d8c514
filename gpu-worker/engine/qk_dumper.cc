#include "gpu-worker/engine/qk_dumper.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "indexer/qk_dump.h"

namespace kvrecall::worker {

QkDumper::QkDumper(const LlamaConfig& config, std::string sequence_id)
    : config_(config), sequence_id_(std::move(sequence_id)), layers_(config.num_layers) {}

void QkDumper::OnQkv(int layer, absl::Span<const std::string> ids, absl::Span<const int32_t> positions,
                     const float* q, const float* k, const float* v) {
  const size_t qrow = static_cast<size_t>(config_.num_heads) * config_.head_dim;
  const size_t kvrow = static_cast<size_t>(config_.num_kv_heads) * config_.head_dim;
  Layer& L = layers_[layer];
  for (size_t i = 0; i < positions.size(); ++i) {
    if (!ids.empty() && ids[i] != sequence_id_) continue;
    if (positions[i] != L.positions) L.gap = true;
    L.q.insert(L.q.end(), q + i * qrow, q + (i + 1) * qrow);
    L.k.insert(L.k.end(), k + i * kvrow, k + (i + 1) * kvrow);
    L.v.insert(L.v.end(), v + i * kvrow, v + (i + 1) * kvrow);
    ++L.positions;
  }
}

absl::Status QkDumper::Write(const std::string& dir, const std::string& model, int64_t prompt_tokens,
                             DType dtype) const {
  indexer::QkDumpHeader h;
  h.dtype = dtype;
  h.head_dim = config_.head_dim;
  h.num_q_heads = config_.num_heads;
  h.num_kv_heads = config_.num_kv_heads;
  h.tokens = tokens();
  h.prompt_tokens = prompt_tokens;
  for (int l = 0; l < config_.num_layers; ++l) h.layers.push_back(l);
  h.has_values = true;
  h.rope_theta = config_.rope_theta;
  h.model = model;
  for (const Layer& L : layers_) {
    if (L.gap || L.positions != h.tokens) {
      return absl::FailedPreconditionError("Q/K rows were not recorded contiguously from position 0");
    }
  }
  RETURN_IF_ERROR(indexer::WriteQkDumpHeader(dir, h));
  const int64_t n = h.tokens;
  const int d = config_.head_dim;
  // [pos][heads][d] -> [heads][pos][d]
  auto transpose = [&](const std::vector<float>& src, int heads) {
    std::vector<float> out(src.size());
    for (int64_t p = 0; p < n; ++p)
      for (int hh = 0; hh < heads; ++hh)
        std::copy_n(src.begin() + (p * heads + hh) * d, d, out.begin() + (static_cast<int64_t>(hh) * n + p) * d);
    return out;
  };
  for (int l = 0; l < config_.num_layers; ++l) {
    const Layer& L = layers_[l];
    RETURN_IF_ERROR(indexer::WriteQkDumpLayer(dir, h, l, transpose(L.q, config_.num_heads),
                                              transpose(L.k, config_.num_kv_heads),
                                              transpose(L.v, config_.num_kv_heads)));
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::worker
