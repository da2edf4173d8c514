#include "gpu-worker/backends/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "gpu-worker/backends/cpu/internal/gemm.h"
#include "gpu-worker/model/rope.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

using internal::CpuIsa;
using internal::Gemm;
using internal::PackedWeight;

// Rows processed per step: bounds the scratch buffers (e.g. [512][2 * intermediate] fp32) while
// leaving enough row blocks to keep every thread busy.
constexpr int kChunkRows = 512;

struct Layer {
  std::vector<float> input_norm;  // [hidden]
  std::vector<float> post_norm;   // [hidden]
  PackedWeight qkv;               // [q_dim + 2 kv_dim][hidden]: q_proj, k_proj, v_proj stacked
  std::vector<float> qkv_bias;    // [q_dim + 2 kv_dim], empty without attention_bias
  PackedWeight o;                 // [hidden][q_dim]
  PackedWeight gate_up;           // [2 intermediate][hidden]: gate_proj, up_proj stacked
  PackedWeight down;              // [hidden][intermediate]
};

// Checkpoint tensors -> fp32, validating names and shapes.
class TensorSource {
 public:
  explicit TensorSource(const SafetensorsCheckpoint* ckpt) : ckpt_(ckpt) {}

  absl::StatusOr<const SafetensorsTensor*> Expect(const std::string& name,
                                                  std::vector<int64_t> shape) const {
    const SafetensorsTensor* t = ckpt_->Find(name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint lacks tensor '", name, "'"));
    }
    if (t->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape [",
                                                     absl::StrJoin(t->shape, ", "), "], expected [",
                                                     absl::StrJoin(shape, ", "), "]"));
    }
    return t;
  }

  // Appends the tensor's values as fp32 to *out.
  static void AppendF32(const SafetensorsTensor& t, std::vector<float>* out) {
    const size_t n = static_cast<size_t>(t.num_elements());
    const size_t old = out->size();
    out->resize(old + n);
    const size_t elem = DTypeSize(t.dtype);
    if (reinterpret_cast<uintptr_t>(t.data.data()) % elem == 0) {
      ToF32(t.dtype, t.data.data(), n, out->data() + old);
    } else {  // safetensors does not promise alignment
      std::vector<uint8_t> aligned(t.data.begin(), t.data.end());
      ToF32(t.dtype, aligned.data(), n, out->data() + old);
    }
  }

 private:
  const SafetensorsCheckpoint* ckpt_;
};

class CpuBackend final : public ModelBackend {
 public:
  CpuBackend(LlamaConfig config, int num_threads)
      : config_(std::move(config)), isa_(internal::DetectCpuIsa()) {
    if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
    // ParallelFor also runs work on the calling thread, so the pool gets one thread fewer.
    if (num_threads > 1) pool_ = std::make_unique<ThreadPool>(num_threads - 1);
    inv_freq_ = RopeInverseFrequencies(config_);
  }

  absl::Status Load(const SafetensorsCheckpoint& ckpt);

  const LlamaConfig& config() const override { return config_; }
  absl::Status Embed(absl::Span<const int32_t> tokens, float* x) override;
  absl::Status Qkv(int layer, const float* x, absl::Span<const int32_t> positions, float* q,
                   float* k, float* v) override;
  absl::Status FinishLayer(int layer, const float* attn, int n, float* x) override;
  absl::Status Logits(const float* x, int n, float* logits) override;

 private:
  int q_dim() const { return config_.num_heads * config_.head_dim; }
  int kv_dim() const { return config_.num_kv_heads * config_.head_dim; }

  // Calls fn(begin, end) over [0, n) in blocks of `grain` rows, in parallel.
  template <typename Fn>
  void ParallelRows(int n, int grain, const Fn& fn) {
    const int blocks = (n + grain - 1) / grain;
    auto body = [&](int64_t b) {
      const int begin = static_cast<int>(b) * grain;
      fn(begin, std::min(n, begin + grain));
    };
    if (pool_ == nullptr || blocks <= 1) {
      for (int b = 0; b < blocks; ++b) body(b);
    } else {
      pool_->ParallelFor(blocks, body);
    }
  }

  // out: [n][hidden] = RMSNorm(x: [n][hidden]) * w.
  void RmsNorm(const float* x, int n, const std::vector<float>& w, float* out) {
    const int h = config_.hidden_size;
    const float eps = static_cast<float>(config_.rms_norm_eps);
    ParallelRows(n, 16, [&](int begin, int end) {
      for (int i = begin; i < end; ++i) {
        const float* xr = x + static_cast<long>(i) * h;
        float* yr = out + static_cast<long>(i) * h;
        double ss = 0.0;
        for (int j = 0; j < h; ++j) ss += static_cast<double>(xr[j]) * xr[j];
        const float mean = static_cast<float>(ss / h);
        const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(mean + eps)));
        for (int j = 0; j < h; ++j) yr[j] = w[j] * (xr[j] * inv);
      }
    });
  }

  LlamaConfig config_;
  CpuIsa isa_;
  std::unique_ptr<ThreadPool> pool_;  // nullptr when single-threaded
  std::vector<double> inv_freq_;      // [head_dim / 2]
  std::vector<float> embed_;          // [vocab][hidden]
  std::vector<float> final_norm_;     // [hidden]
  PackedWeight lm_head_;              // [vocab][hidden] (a copy of embed_ when tied)
  std::vector<Layer> layers_;
  // Scratch, reused across calls (one engine thread at a time).
  std::vector<float> h_;    // [kChunkRows][hidden]
  std::vector<float> big_;  // [kChunkRows][max(q + 2 kv, 2 intermediate)]
  std::vector<float> act_;  // [kChunkRows][intermediate]
};

absl::Status CpuBackend::Load(const SafetensorsCheckpoint& ckpt) {
  const LlamaConfig& c = config_;
  const int64_t h = c.hidden_size, v = c.vocab_size, f = c.intermediate_size;
  const int64_t qd = q_dim(), kvd = kv_dim();
  TensorSource src(&ckpt);

  // Validate every expected tensor before allocating anything.
  struct LayerTensors {
    const SafetensorsTensor *in_norm, *post_norm, *q, *k, *v, *o, *gate, *up, *down;
    const SafetensorsTensor *qb = nullptr, *kb = nullptr, *vb = nullptr;
  };
  ASSIGN_OR_RETURN(const SafetensorsTensor* embed, src.Expect("model.embed_tokens.weight", {v, h}));
  ASSIGN_OR_RETURN(const SafetensorsTensor* norm, src.Expect("model.norm.weight", {h}));
  const SafetensorsTensor* head = embed;
  if (!c.tie_word_embeddings) {
    ASSIGN_OR_RETURN(head, src.Expect("lm_head.weight", {v, h}));
  }
  std::vector<LayerTensors> lt(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerTensors& t = lt[l];
    ASSIGN_OR_RETURN(t.in_norm, src.Expect(p + "input_layernorm.weight", {h}));
    ASSIGN_OR_RETURN(t.post_norm, src.Expect(p + "post_attention_layernorm.weight", {h}));
    ASSIGN_OR_RETURN(t.q, src.Expect(p + "self_attn.q_proj.weight", {qd, h}));
    ASSIGN_OR_RETURN(t.k, src.Expect(p + "self_attn.k_proj.weight", {kvd, h}));
    ASSIGN_OR_RETURN(t.v, src.Expect(p + "self_attn.v_proj.weight", {kvd, h}));
    ASSIGN_OR_RETURN(t.o, src.Expect(p + "self_attn.o_proj.weight", {h, qd}));
    ASSIGN_OR_RETURN(t.gate, src.Expect(p + "mlp.gate_proj.weight", {f, h}));
    ASSIGN_OR_RETURN(t.up, src.Expect(p + "mlp.up_proj.weight", {f, h}));
    ASSIGN_OR_RETURN(t.down, src.Expect(p + "mlp.down_proj.weight", {h, f}));
    if (c.attention_bias) {
      ASSIGN_OR_RETURN(t.qb, src.Expect(p + "self_attn.q_proj.bias", {qd}));
      ASSIGN_OR_RETURN(t.kb, src.Expect(p + "self_attn.k_proj.bias", {kvd}));
      ASSIGN_OR_RETURN(t.vb, src.Expect(p + "self_attn.v_proj.bias", {kvd}));
    }
  }

  std::vector<float> tmp;
  TensorSource::AppendF32(*embed, &embed_);
  TensorSource::AppendF32(*norm, &final_norm_);
  TensorSource::AppendF32(*head, &tmp);
  lm_head_ = PackedWeight(tmp.data(), static_cast<int>(v), static_cast<int>(h));

  layers_.resize(c.num_layers);
  auto load_layer = [&](int64_t l) {
    const LayerTensors& t = lt[l];
    Layer& layer = layers_[l];
    std::vector<float> w;
    TensorSource::AppendF32(*t.in_norm, &layer.input_norm);
    TensorSource::AppendF32(*t.post_norm, &layer.post_norm);
    for (const SafetensorsTensor* part : {t.q, t.k, t.v}) TensorSource::AppendF32(*part, &w);
    layer.qkv = PackedWeight(w.data(), static_cast<int>(qd + 2 * kvd), static_cast<int>(h));
    if (c.attention_bias) {
      for (const SafetensorsTensor* part : {t.qb, t.kb, t.vb}) {
        TensorSource::AppendF32(*part, &layer.qkv_bias);
      }
    }
    w.clear();
    TensorSource::AppendF32(*t.o, &w);
    layer.o = PackedWeight(w.data(), static_cast<int>(h), static_cast<int>(qd));
    w.clear();
    TensorSource::AppendF32(*t.gate, &w);
    TensorSource::AppendF32(*t.up, &w);
    layer.gate_up = PackedWeight(w.data(), static_cast<int>(2 * f), static_cast<int>(h));
    w.clear();
    TensorSource::AppendF32(*t.down, &w);
    layer.down = PackedWeight(w.data(), static_cast<int>(h), static_cast<int>(f));
  };
  if (pool_ != nullptr) {
    pool_->ParallelFor(c.num_layers, load_layer);
  } else {
    for (int l = 0; l < c.num_layers; ++l) load_layer(l);
  }
  KV_LOG(INFO) << "cpu backend: " << c.architecture << ", " << c.num_layers << " layers, hidden "
               << c.hidden_size << ", gemm " << internal::CpuIsaName(isa_) << ", "
               << (pool_ ? pool_->size() + 1 : 1) << " threads";
  return absl::OkStatus();
}

absl::Status CpuBackend::Embed(absl::Span<const int32_t> tokens, float* x) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token ", tokens[i], " at index ", i,
                                                     " is outside [0, ", config_.vocab_size, ")"));
    }
  }
  const size_t h = config_.hidden_size;
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::memcpy(x + i * h, embed_.data() + static_cast<size_t>(tokens[i]) * h, h * sizeof(float));
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Qkv(int layer, const float* x, absl::Span<const int32_t> positions,
                             float* q, float* k, float* v) {
  RETURN_IF_ERROR(CheckQkvArgs(config_, layer, positions));
  const Layer& L = layers_[layer];
  const int n = static_cast<int>(positions.size());
  const int hd = config_.head_dim, half = hd / 2;
  const int qd = q_dim(), kvd = kv_dim(), width = qd + 2 * kvd;
  const int hidden = config_.hidden_size;
  h_.resize(static_cast<size_t>(std::min(n, kChunkRows)) * hidden);
  big_.resize(std::max(big_.size(), static_cast<size_t>(std::min(n, kChunkRows)) * width));
  const float* bias = L.qkv_bias.empty() ? nullptr : L.qkv_bias.data();
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    RmsNorm(x + static_cast<long>(start) * hidden, m, L.input_norm, h_.data());
    Gemm(pool_.get(), isa_, h_.data(), m, hidden, L.qkv, bias, /*accumulate=*/false, big_.data(),
         width);
    ParallelRows(m, 32, [&](int begin, int end) {
      std::vector<float> cs(2 * half);
      for (int i = begin; i < end; ++i) {
        const long row = start + i;
        const float* y = big_.data() + static_cast<long>(i) * width;
        float* qr = q + row * qd;
        float* kr = k + row * kvd;
        std::memcpy(qr, y, qd * sizeof(float));
        std::memcpy(kr, y + qd, kvd * sizeof(float));
        std::memcpy(v + row * kvd, y + qd + kvd, kvd * sizeof(float));
        RopeCosSin(inv_freq_, positions[row], cs.data(), cs.data() + half);
        ApplyRope(qr, config_.num_heads, hd, cs.data(), cs.data() + half);
        ApplyRope(kr, config_.num_kv_heads, hd, cs.data(), cs.data() + half);
      }
    });
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::FinishLayer(int layer, const float* attn, int n, float* x) {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n < 0) return absl::InvalidArgumentError("negative row count");
  const Layer& L = layers_[layer];
  const int hidden = config_.hidden_size, f = config_.intermediate_size, qd = q_dim();
  const size_t rows = static_cast<size_t>(std::min(n, kChunkRows));
  h_.resize(rows * hidden);
  big_.resize(std::max(big_.size(), rows * 2 * f));
  act_.resize(rows * f);
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    float* xc = x + static_cast<long>(start) * hidden;
    Gemm(pool_.get(), isa_, attn + static_cast<long>(start) * qd, m, qd, L.o, nullptr,
         /*accumulate=*/true, xc, hidden);
    RmsNorm(xc, m, L.post_norm, h_.data());
    Gemm(pool_.get(), isa_, h_.data(), m, hidden, L.gate_up, nullptr, false, big_.data(), 2 * f);
    ParallelRows(m, 16, [&](int begin, int end) {
      for (int i = begin; i < end; ++i) {
        const float* g = big_.data() + static_cast<long>(i) * 2 * f;
        const float* u = g + f;
        float* a = act_.data() + static_cast<long>(i) * f;
        for (int j = 0; j < f; ++j) a[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
      }
    });
    Gemm(pool_.get(), isa_, act_.data(), m, f, L.down, nullptr, /*accumulate=*/true, xc, hidden);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Logits(const float* x, int n, float* logits) {
  if (n < 0) return absl::InvalidArgumentError("negative row count");
  const int hidden = config_.hidden_size, vocab = config_.vocab_size;
  h_.resize(static_cast<size_t>(std::min(n, kChunkRows)) * hidden);
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    RmsNorm(x + static_cast<long>(start) * hidden, m, final_norm_, h_.data());
    Gemm(pool_.get(), isa_, h_.data(), m, hidden, lm_head_, nullptr, false,
         logits + static_cast<long>(start) * vocab, vocab);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCpuBackend(const std::string& model_dir,
                                                               int num_threads) {
  ASSIGN_OR_RETURN(LlamaConfig config, LoadConfig(model_dir));
  ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(model_dir));
  auto backend = std::make_unique<CpuBackend>(std::move(config), num_threads);
  RETURN_IF_ERROR(backend->Load(*ckpt));
  return backend;
}

}  // namespace kvrecall::worker
