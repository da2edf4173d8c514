// A Llama-family model's configuration, read from a Hugging Face config.json.
//
// Supported: LlamaForCausalLM (Llama-2/3.x, Yi), MistralForCausalLM, Qwen2ForCausalLM (q/k/v bias).
#ifndef KVRECALL_GPU_WORKER_MODEL_CONFIG_H_
#define KVRECALL_GPU_WORKER_MODEL_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "common/model_spec.h"

namespace kvrecall::worker {

struct RopeScaling {
  enum class Type { kNone, kLlama3 };
  Type type = Type::kNone;
  // Llama-3 ("rope_type": "llama3") frequency scaling parameters.
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  std::string architecture = "LlamaForCausalLM";
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;    // num_hidden_layers
  int num_heads = 0;     // num_attention_heads
  int num_kv_heads = 0;  // num_key_value_heads (defaults to num_heads)
  int head_dim = 0;      // head_dim, or hidden_size / num_heads
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int max_position_embeddings = 8192;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // Qwen2: q/k/v projections carry a bias
  DType dtype = DType::kBF16;   // torch_dtype of the checkpoint

  int group_size() const { return num_heads / num_kv_heads; }
};

// Parses config.json text. INVALID_ARGUMENT for malformed JSON, missing or inconsistent fields
// (e.g. num_heads not a multiple of num_kv_heads), or an unsupported architecture.
absl::StatusOr<LlamaConfig> ParseConfigJson(absl::string_view json);
// Reads `dir`/config.json. NOT_FOUND when it does not exist.
absl::StatusOr<LlamaConfig> LoadConfig(const std::string& dir);
// Serialises to a Hugging Face-compatible config.json.
std::string ToConfigJson(const LlamaConfig& config);

// The tier's view of a model (what RegisterModel takes): its shape and KV dtype, under `model_id`.
ModelSpec SpecOf(const LlamaConfig& config, const std::string& model_id);

// Tensor parallelism over `world` GPUs (gpu-worker/engine/tp_engine.h): rank r holds q-heads
// [r * H / world, (r + 1) * H / world), the kv-heads they use and the same share of the MLP's
// intermediate columns. The shard's config is the model's with num_heads, num_kv_heads and
// intermediate_size divided by world. INVALID_ARGUMENT unless world >= 1 divides num_kv_heads
// (so each rank keeps whole GQA groups) and intermediate_size.
absl::StatusOr<LlamaConfig> ShardConfig(const LlamaConfig& config, int world);
// What rank `rank` of `world` registers and stores on the tier: its kv-heads only, as its own
// model "<model_id>.tp<rank>of<world>" and sequences "<sequence_id>.tp<rank>of<world>", so the
// ranks of one worker (and workers of different widths) never collide on a node. world 1
// leaves the names as they are.
std::string ShardName(const std::string& name, int rank, int world);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_MODEL_CONFIG_H_
