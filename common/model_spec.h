// The shape of a model's KV cache: what the tier checks every write and query against.
#ifndef KVRECALL_COMMON_MODEL_SPEC_H_
#define KVRECALL_COMMON_MODEL_SPEC_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "common/dtype.h"

namespace kvrecall {

// Hard limits that bound every allocation a request can cause.
inline constexpr int kMaxLayers = 512;
inline constexpr int kMaxHeads = 1024;
inline constexpr int kMaxHeadDim = 1024;

struct ModelSpec {
  std::string model_id;     // operator-chosen name, e.g. "llama-3-8b"
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;     // num_q_heads % num_kv_heads == 0 (GQA group = q / kv)
  int head_dim = 0;
  DType kv_dtype = DType::kBF16;
  int vocab_size = 0;       // token ids must be in [0, vocab_size)
  double rope_theta = 10000.0;

  int group_size() const { return num_kv_heads ? num_q_heads / num_kv_heads : 0; }
  // Bytes of one K (or one V) row: one token of one kv-head.
  size_t row_bytes() const { return static_cast<size_t>(head_dim) * DTypeSize(kv_dtype); }
  // K+V bytes of one token over every layer and kv-head.
  int64_t token_kv_bytes() const {
    return int64_t{2} * num_layers * num_kv_heads * static_cast<int64_t>(row_bytes());
  }

  // OK iff every field is within the limits above and consistent.
  absl::Status Validate() const;
  bool operator==(const ModelSpec&) const = default;
};

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_MODEL_SPEC_H_
