#include "common/model_spec.h"

#include "absl/strings/str_cat.h"

namespace kvrecall {

absl::Status ModelSpec::Validate() const {
  if (model_id.empty() || model_id.size() > 256) {
    return absl::InvalidArgumentError("model_id must be 1..256 characters");
  }
  if (num_layers <= 0 || num_layers > kMaxLayers) {
    return absl::InvalidArgumentError(absl::StrCat("num_layers ", num_layers, " not in [1, ", kMaxLayers, "]"));
  }
  if (num_q_heads <= 0 || num_q_heads > kMaxHeads || num_kv_heads <= 0 || num_kv_heads > num_q_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad head counts: q=", num_q_heads, " kv=", num_kv_heads));
  }
  if (num_q_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_q_heads ", num_q_heads, " is not a multiple of num_kv_heads ", num_kv_heads));
  }
  if (head_dim <= 0 || head_dim > kMaxHeadDim || head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim ", head_dim, " must be even and in [2, ", kMaxHeadDim, "]"));
  }
  if (vocab_size <= 0) return absl::InvalidArgumentError("vocab_size must be positive");
  return absl::OkStatus();
}

}  // namespace kvrecall
