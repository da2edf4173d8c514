#include "gpu-worker/model/make_model.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t HashName(absl::string_view s) {  // FNV-1a
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return h;
}

// ~N(0, std): the sum of 4 uniforms on [0, 1) has mean 2 and variance 1/3.
std::vector<float> RandomNormal(uint64_t seed, absl::string_view name, size_t n, double std) {
  uint64_t state = seed ^ HashName(name);
  std::vector<float> out(n);
  const double scale = std * std::sqrt(3.0);
  for (size_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int k = 0; k < 4; ++k) s += static_cast<double>(SplitMix64(&state) >> 11) * 0x1p-53;
    out[i] = static_cast<float>((s - 2.0) * scale);
  }
  return out;
}

absl::Status MakeDirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::InternalError(absl::StrCat("mkdir ", prefix, ": ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteRandomModel(const std::string& dir, const LlamaConfig& config, uint64_t seed) {
  // Re-parse the serialised config: the same validation a loader applies.
  const std::string config_json = ToConfigJson(config);
  ASSIGN_OR_RETURN(const LlamaConfig c, ParseConfigJson(config_json));
  const int64_t h = c.hidden_size, v = c.vocab_size, f = c.intermediate_size;
  const int64_t qd = int64_t{c.num_heads} * c.head_dim, kvd = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t per_layer = h * (qd + 2 * kvd) + qd * h + 3 * h * f + 2 * h;
  const int64_t params = v * h * (c.tie_word_embeddings ? 1 : 2) + h + c.num_layers * per_layer;
  if (params > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(absl::StrCat("random model too large: ", params, " params"));
  }
  RETURN_IF_ERROR(MakeDirs(dir));

  struct Pending {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Pending> pending;
  auto add = [&](std::string name, std::vector<int64_t> shape, double std, bool ones) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<float> values =
        ones ? std::vector<float>(n, 1.0f) : RandomNormal(seed, name, n, std);
    Pending p{std::move(name), std::move(shape), std::vector<uint8_t>(n * DTypeSize(c.dtype))};
    FromF32(c.dtype, values.data(), n, p.bytes.data());
    pending.push_back(std::move(p));
  };
  add("model.embed_tokens.weight", {v, h}, kRandomEmbedStd, false);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {h}, 0, true);
    add(p + "self_attn.q_proj.weight", {qd, h}, kRandomQkStd, false);
    add(p + "self_attn.k_proj.weight", {kvd, h}, kRandomQkStd, false);
    add(p + "self_attn.v_proj.weight", {kvd, h}, kRandomLinearStd, false);
    if (c.attention_bias) {
      add(p + "self_attn.q_proj.bias", {qd}, kRandomLinearStd, false);
      add(p + "self_attn.k_proj.bias", {kvd}, kRandomLinearStd, false);
      add(p + "self_attn.v_proj.bias", {kvd}, kRandomLinearStd, false);
    }
    add(p + "self_attn.o_proj.weight", {h, qd}, kRandomLinearStd, false);
    add(p + "post_attention_layernorm.weight", {h}, 0, true);
    add(p + "mlp.gate_proj.weight", {f, h}, kRandomLinearStd, false);
    add(p + "mlp.up_proj.weight", {f, h}, kRandomLinearStd, false);
    add(p + "mlp.down_proj.weight", {h, f}, kRandomLinearStd, false);
  }
  add("model.norm.weight", {h}, 0, true);
  if (!c.tie_word_embeddings) add("lm_head.weight", {v, h}, kRandomLinearStd, false);

  std::vector<TensorToWrite> tensors;
  tensors.reserve(pending.size());
  for (const Pending& p : pending) {
    tensors.push_back({p.name, c.dtype, p.shape, absl::MakeConstSpan(p.bytes)});
  }
  RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", tensors));

  const std::string tmp = dir + "/config.json.tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << config_json;
    out.flush();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), (dir + "/config.json").c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<LlamaConfig> PresetConfig(absl::string_view name) {
  LlamaConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 512;
  c.hidden_size = 256;
  c.intermediate_size = 704;
  c.num_layers = 4;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.max_position_embeddings = 131072;
  c.tie_word_embeddings = false;
  c.attention_bias = false;
  c.dtype = DType::kBF16;
  if (name == "tiny") return c;
  if (name == "tiny-qwen2") {
    c.architecture = "Qwen2ForCausalLM";
    c.attention_bias = true;
    c.tie_word_embeddings = true;
    return c;
  }
  if (name == "small") {
    c.num_layers = 8;
    c.hidden_size = 512;
    c.num_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.intermediate_size = 1408;
    return c;
  }
  return absl::NotFoundError(absl::StrCat("unknown model preset '", name, "'"));
}

}  // namespace kvrecall::worker
