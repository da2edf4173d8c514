#include "gpu-worker/model/config.h"

#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/model_spec.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvrecall::worker {
namespace {

using json = nlohmann::json;

// Size bounds: a hostile config.json must not be able to make the loader allocate absurd
// amounts before the checkpoint is even looked at.
constexpr int64_t kMaxVocab = int64_t{1} << 22;         // 4M tokens
constexpr int64_t kMaxHidden = int64_t{1} << 16;        // 65536
constexpr int64_t kMaxIntermediate = int64_t{1} << 19;  // 524288
constexpr int64_t kMaxPositions = int64_t{1} << 24;     // 16M
constexpr size_t kMaxConfigBytes = size_t{1} << 22;     // 4 MiB of JSON

absl::Status Invalid(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: '", field, "' ", why));
}

// Reads an integer field in [lo, hi]. `required`: absent/null is an error; otherwise `*out` is
// left untouched.
absl::Status GetInt(const json& j, const char* key, int64_t lo, int64_t hi, bool required,
                    int* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return Invalid(key, "is required");
    return absl::OkStatus();
  }
  if (!it->is_number_integer()) return Invalid(key, "must be an integer");
  int64_t v = 0;
  if (it->is_number_unsigned()) {
    const uint64_t u = it->get<uint64_t>();
    if (u > static_cast<uint64_t>(hi)) return Invalid(key, absl::StrCat("must be <= ", hi));
    v = static_cast<int64_t>(u);
  } else {
    v = it->get<int64_t>();
  }
  if (v < lo || v > hi) return Invalid(key, absl::StrCat("must be in [", lo, ", ", hi, "]"));
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

absl::Status GetDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Invalid(key, "must be a number");
  const double v = it->get<double>();
  if (!std::isfinite(v)) return Invalid(key, "must be finite");
  *out = v;
  return absl::OkStatus();
}

absl::Status GetBool(const json& j, const char* key, bool* out, bool* present = nullptr) {
  auto it = j.find(key);
  if (present != nullptr) *present = false;
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return Invalid(key, "must be a boolean");
  *out = it->get<bool>();
  if (present != nullptr) *present = true;
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const json& rs, LlamaConfig* c) {
  if (rs.is_null()) return absl::OkStatus();
  if (!rs.is_object()) return Invalid("rope_scaling", "must be an object or null");
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto it = rs.find(key);
    if (it != rs.end() && !it->is_null()) {
      if (!it->is_string()) return Invalid("rope_scaling.rope_type", "must be a string");
      type = it->get<std::string>();
      break;
    }
  }
  if (type.empty() || type == "default") return absl::OkStatus();
  if (type != "llama3") {
    return Invalid("rope_scaling.rope_type",
                   absl::StrCat("'", type, "' is not supported (only 'llama3' and 'default')"));
  }
  RopeScaling s;
  s.type = RopeScaling::Type::kLlama3;
  RETURN_IF_ERROR(GetDouble(rs, "factor", &s.factor));
  RETURN_IF_ERROR(GetDouble(rs, "low_freq_factor", &s.low_freq_factor));
  RETURN_IF_ERROR(GetDouble(rs, "high_freq_factor", &s.high_freq_factor));
  RETURN_IF_ERROR(GetInt(rs, "original_max_position_embeddings", 1, kMaxPositions,
                         /*required=*/false, &s.original_max_position_embeddings));
  if (!(s.factor >= 1.0 && s.factor <= 1024.0)) {
    return Invalid("rope_scaling.factor", "must be in [1, 1024]");
  }
  if (!(s.low_freq_factor > 0.0)) return Invalid("rope_scaling.low_freq_factor", "must be > 0");
  if (!(s.high_freq_factor > s.low_freq_factor)) {
    return Invalid("rope_scaling.high_freq_factor", "must be > low_freq_factor");
  }
  c->rope_scaling = s;
  return absl::OkStatus();
}

absl::StatusOr<LlamaConfig> ParseImpl(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: not a JSON object");
  LlamaConfig c;

  // Architecture: "architectures"[0], else "model_type".
  std::string arch;
  if (auto it = j.find("architectures"); it != j.end() && !it->is_null()) {
    if (!it->is_array() || it->empty() || !(*it)[0].is_string()) {
      return Invalid("architectures", "must be a non-empty array of strings");
    }
    arch = (*it)[0].get<std::string>();
  } else if (auto mt = j.find("model_type"); mt != j.end() && mt->is_string()) {
    const std::string t = mt->get<std::string>();
    if (t == "llama") arch = "LlamaForCausalLM";
    if (t == "mistral") arch = "MistralForCausalLM";
    if (t == "qwen2") arch = "Qwen2ForCausalLM";
    if (arch.empty()) return Invalid("model_type", absl::StrCat("'", t, "' is not supported"));
  } else {
    return absl::InvalidArgumentError("config.json: neither 'architectures' nor 'model_type'");
  }
  if (arch != "LlamaForCausalLM" && arch != "MistralForCausalLM" && arch != "Qwen2ForCausalLM") {
    return Invalid("architectures", absl::StrCat("'", arch, "' is not supported"));
  }
  c.architecture = arch;
  const bool qwen2 = arch == "Qwen2ForCausalLM";

  RETURN_IF_ERROR(GetInt(j, "vocab_size", 1, kMaxVocab, true, &c.vocab_size));
  RETURN_IF_ERROR(GetInt(j, "hidden_size", 1, kMaxHidden, true, &c.hidden_size));
  RETURN_IF_ERROR(GetInt(j, "intermediate_size", 1, kMaxIntermediate, true, &c.intermediate_size));
  RETURN_IF_ERROR(GetInt(j, "num_hidden_layers", 1, kMaxLayers, true, &c.num_layers));
  RETURN_IF_ERROR(GetInt(j, "num_attention_heads", 1, kMaxHeads, true, &c.num_heads));
  c.num_kv_heads = c.num_heads;
  RETURN_IF_ERROR(GetInt(j, "num_key_value_heads", 1, kMaxHeads, false, &c.num_kv_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return Invalid("num_attention_heads",
                   absl::StrCat("(", c.num_heads, ") must be a multiple of num_key_value_heads (",
                                c.num_kv_heads, ")"));
  }
  c.head_dim = 0;
  RETURN_IF_ERROR(GetInt(j, "head_dim", 1, kMaxHeadDim, false, &c.head_dim));
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_heads != 0) {
      return Invalid("hidden_size", absl::StrCat("(", c.hidden_size,
                                                 ") is not a multiple of num_attention_heads (",
                                                 c.num_heads, ") and head_dim is absent"));
    }
    c.head_dim = c.hidden_size / c.num_heads;
    if (c.head_dim > kMaxHeadDim) return Invalid("head_dim", "(derived) is too large");
  }
  if (c.head_dim % 2 != 0) return Invalid("head_dim", "must be even (RoPE rotates pairs)");
  if (int64_t{c.num_heads} * c.head_dim > kMaxHidden) {
    return Invalid("num_attention_heads", "* head_dim is too large");
  }

  c.rms_norm_eps = 1e-6;  // Hugging Face's default for all three architectures
  RETURN_IF_ERROR(GetDouble(j, "rms_norm_eps", &c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0)) {
    return Invalid("rms_norm_eps", "must be in (0, 1)");
  }

  // Newer transformers nest RoPE settings in "rope_parameters"; older ones use top-level
  // "rope_theta" + "rope_scaling".
  const json* rope_params = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) rope_params = &*it;
  c.rope_theta = 10000.0;
  if (rope_params != nullptr) RETURN_IF_ERROR(GetDouble(*rope_params, "rope_theta", &c.rope_theta));
  RETURN_IF_ERROR(GetDouble(j, "rope_theta", &c.rope_theta));
  if (!(c.rope_theta > 1.0)) return Invalid("rope_theta", "must be > 1");
  if (auto it = j.find("rope_scaling"); it != j.end()) {
    RETURN_IF_ERROR(ParseRopeScaling(*it, &c));
  } else if (rope_params != nullptr) {
    RETURN_IF_ERROR(ParseRopeScaling(*rope_params, &c));
  }

  RETURN_IF_ERROR(
      GetInt(j, "max_position_embeddings", 1, kMaxPositions, false, &c.max_position_embeddings));
  c.tie_word_embeddings = false;
  RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", &c.tie_word_embeddings));

  // Qwen2's attention always has q/k/v bias (its modeling code hard-codes bias=True).
  bool bias_present = false;
  bool bias = false;
  RETURN_IF_ERROR(GetBool(j, "attention_bias", &bias, &bias_present));
  if (qwen2 && bias_present && !bias) {
    return Invalid("attention_bias", "is false, but Qwen2ForCausalLM always has q/k/v bias");
  }
  c.attention_bias = qwen2 || bias;

  bool mlp_bias = false;
  RETURN_IF_ERROR(GetBool(j, "mlp_bias", &mlp_bias));
  if (mlp_bias) return Invalid("mlp_bias", "= true is not supported");
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "silu") {
      return Invalid("hidden_act", "must be \"silu\"");
    }
  }
  bool sliding = false;
  RETURN_IF_ERROR(GetBool(j, "use_sliding_window", &sliding));
  if (sliding) return Invalid("use_sliding_window", "= true is not supported");

  // "torch_dtype" (older transformers) or "dtype" (newer).
  c.dtype = DType::kBF16;
  for (const char* key : {"torch_dtype", "dtype"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_string()) return Invalid(key, "must be a string");
    const std::string d = it->get<std::string>();
    if (d == "bfloat16") {
      c.dtype = DType::kBF16;
    } else if (d == "float16") {
      c.dtype = DType::kF16;
    } else if (d == "float32") {
      c.dtype = DType::kF32;
    } else {
      return Invalid(key, absl::StrCat("'", d, "' is not supported (bfloat16|float16|float32)"));
    }
    break;
  }
  return c;
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseConfigJson(absl::string_view text) {
  if (text.size() > kMaxConfigBytes) {
    return absl::InvalidArgumentError("config.json: larger than 4 MiB");
  }
  json j = json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json: malformed JSON");
  try {
    return ParseImpl(j);
  } catch (const json::exception& e) {  // defensive: every access above is type-checked
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", e.what()));
  }
}

absl::StatusOr<LlamaConfig> LoadConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text;
  char buf[65536];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    text.append(buf, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxConfigBytes) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": larger than 4 MiB"));
    }
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  auto config = ParseConfigJson(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

std::string ToConfigJson(const LlamaConfig& c) {
  json j = json::object();
  j["architectures"] = json::array({c.architecture});
  j["model_type"] = c.architecture == "Qwen2ForCausalLM"     ? "qwen2"
                    : c.architecture == "MistralForCausalLM" ? "mistral"
                                                             : "llama";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", c.rope_scaling.factor},
        {"low_freq_factor", c.rope_scaling.low_freq_factor},
        {"high_freq_factor", c.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["torch_dtype"] = c.dtype == DType::kF32   ? "float32"
                     : c.dtype == DType::kF16 ? "float16"
                                              : "bfloat16";
  return j.dump(2) + "\n";
}

ModelSpec SpecOf(const LlamaConfig& config, const std::string& model_id) {
  ModelSpec spec;
  spec.model_id = model_id;
  spec.num_layers = config.num_layers;
  spec.num_q_heads = config.num_heads;
  spec.num_kv_heads = config.num_kv_heads;
  spec.head_dim = config.head_dim;
  spec.kv_dtype = config.dtype;
  spec.vocab_size = config.vocab_size;
  spec.rope_theta = config.rope_theta;
  return spec;
}

absl::StatusOr<LlamaConfig> ShardConfig(const LlamaConfig& config, int world) {
  if (world < 1 || config.num_kv_heads % world != 0 || config.intermediate_size % world != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallelism over ", world, " GPUs needs num_key_value_heads (", config.num_kv_heads,
        ") and intermediate_size (", config.intermediate_size, ") to be multiples of it"));
  }
  LlamaConfig shard = config;
  shard.num_heads /= world;
  shard.num_kv_heads /= world;
  shard.intermediate_size /= world;
  return shard;
}

std::string ShardName(const std::string& name, int rank, int world) {
  if (world == 1) return name;
  return absl::StrCat(name, ".tp", rank, "of", world);
}

}  // namespace kvrecall::worker
