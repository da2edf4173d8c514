#include "gpu-worker/backends/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/cuda/internal/backend_ops.h"
#include "gpu-worker/backends/cuda/kernels.h"
#include "gpu-worker/backends/registry.h"
#include "gpu-worker/model/rope.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

using cuda::CudaStatus;

// The one converter of cublasStatus_t in the worker.
absl::Status CublasStatus(cublasStatus_t s, absl::string_view what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg =
      absl::StrCat(what, ": ", cublasGetStatusName(s), ": ", cublasGetStatusString(s));
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  if (s == CUBLAS_STATUS_NOT_INITIALIZED) return absl::FailedPreconditionError(msg);
  return absl::InternalError(msg);
}

// Rows per step: bounds the device scratch and the pinned staging buffers.
constexpr int kChunkRows = 512;
// Bytes of fp32 logits per step (rows are reduced for large vocabularies).
constexpr int64_t kLogitsChunkBytes = int64_t{64} << 20;

// Device memory freed on destruction.
class DeviceMem {
 public:
  DeviceMem() = default;
  ~DeviceMem() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  DeviceMem(DeviceMem&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}

  absl::Status Allocate(size_t bytes, absl::string_view what) {
    return CudaStatus(cudaMalloc(&p_, std::max<size_t>(bytes, 16)),
                      absl::StrCat("cudaMalloc ", bytes, " bytes for ", what));
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
};

// Page-locked host memory freed on destruction.
class PinnedMem {
 public:
  PinnedMem() = default;
  ~PinnedMem() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  PinnedMem(const PinnedMem&) = delete;
  PinnedMem& operator=(const PinnedMem&) = delete;

  absl::Status Allocate(size_t bytes, absl::string_view what) {
    return CudaStatus(cudaHostAlloc(&p_, std::max<size_t>(bytes, 16), cudaHostAllocDefault),
                      absl::StrCat("cudaHostAlloc ", bytes, " bytes for ", what));
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
};

struct Layer {
  DeviceMem input_norm;  // [hidden] bf16
  DeviceMem post_norm;   // [hidden] bf16
  DeviceMem qkv;         // [q_dim + 2 kv_dim][hidden] bf16: q_proj, k_proj, v_proj stacked
  DeviceMem qkv_bias;    // [q_dim + 2 kv_dim] fp32; allocated with attention_bias only
  DeviceMem o;           // [hidden][q_dim] bf16
  DeviceMem gate_up;     // [2 intermediate][hidden] bf16: gate_proj, up_proj stacked
  DeviceMem down;        // [hidden][intermediate] bf16
};

absl::StatusOr<const SafetensorsTensor*> Expect(const SafetensorsCheckpoint& ckpt,
                                                const std::string& name,
                                                const std::vector<int64_t>& shape) {
  const SafetensorsTensor* t = ckpt.Find(name);
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

// Appends the tensor's values to *out as bf16 bits (a bf16 checkpoint is copied unchanged).
void AppendBf16(const SafetensorsTensor& t, std::vector<uint16_t>* out) {
  const size_t n = static_cast<size_t>(t.num_elements());
  const size_t old = out->size();
  out->resize(old + n);
  if (t.dtype == DType::kBF16) {
    std::memcpy(out->data() + old, t.data.data(), n * sizeof(uint16_t));
    return;
  }
  std::vector<uint8_t> aligned(t.data.begin(), t.data.end());  // safetensors does not align
  std::vector<float> f(n);
  ToF32(t.dtype, aligned.data(), n, f.data());
  for (size_t i = 0; i < n; ++i) (*out)[old + i] = F32ToBf16(f[i]);
}

void AppendF32(const SafetensorsTensor& t, std::vector<float>* out) {
  const size_t n = static_cast<size_t>(t.num_elements());
  const size_t old = out->size();
  out->resize(old + n);
  std::vector<uint8_t> aligned(t.data.begin(), t.data.end());
  ToF32(t.dtype, aligned.data(), n, out->data() + old);
}

class CudaBackend final : public ModelBackend {
 public:
  explicit CudaBackend(LlamaConfig config) : config_(std::move(config)) {}
  ~CudaBackend() override {
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Init(const SafetensorsCheckpoint& ckpt);

  const LlamaConfig& config() const override { return config_; }
  absl::Status Embed(absl::Span<const int32_t> tokens, float* x) override;
  absl::Status Qkv(int layer, const float* x, absl::Span<const int32_t> positions, float* q,
                   float* k, float* v) override;
  absl::Status FinishLayer(int layer, const float* attn, int n, float* x) override;
  absl::Status Logits(const float* x, int n, float* logits) override;

 private:
  int q_dim() const { return config_.num_heads * config_.head_dim; }
  int kv_dim() const { return config_.num_kv_heads * config_.head_dim; }
  int qkv_width() const { return q_dim() + 2 * kv_dim(); }

  // Uploads a host bf16 / fp32 array into new device memory.
  template <typename T>
  absl::Status Upload(const std::vector<T>& h, DeviceMem* d, absl::string_view what) {
    RETURN_IF_ERROR(d->Allocate(h.size() * sizeof(T), what));
    return CudaStatus(
        cudaMemcpy(d->as<void>(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice),
        absl::StrCat("upload of ", what));
  }

  // c[rows][out] (fp32 or bf16, by c_type) = beta * c + a[rows][in] . w[out][in]^T (bf16).
  absl::Status Gemm(const uint16_t* w, int out, int in, const uint16_t* a, int rows, void* c,
                    cudaDataType_t c_type, float beta) {
    const float alpha = 1.0f;
    return CublasStatus(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w,
                                     CUDA_R_16BF, in, a, CUDA_R_16BF, in, &beta, c, c_type, out,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                        "cublasGemmEx");
  }

  // Copies x[rows][hidden] (host fp32) into d_x_ through the pinned stage.
  absl::Status UploadX(const float* x, int rows) {
    const size_t bytes = static_cast<size_t>(rows) * config_.hidden_size * sizeof(float);
    std::memcpy(stage_f32_.as<float>(), x, bytes);
    return CudaStatus(cudaMemcpyAsync(d_x_.as<float>(), stage_f32_.as<float>(), bytes,
                                      cudaMemcpyHostToDevice, stream_),
                      "upload of x");
  }

  absl::Status Sync(absl::string_view what) {
    return CudaStatus(cudaStreamSynchronize(stream_), what);
  }

  LlamaConfig config_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  int logits_rows_ = 1;  // rows per Logits step

  DeviceMem embed_;       // [vocab][hidden] bf16
  DeviceMem lm_head_;     // [vocab][hidden] bf16; unallocated when tied (embed_ is used)
  DeviceMem final_norm_;  // [hidden] bf16
  DeviceMem inv_freq_;    // [head_dim / 2] fp64 (Llama-3 scaling included)
  std::vector<Layer> layers_;

  // Device scratch, kChunkRows rows each.
  DeviceMem d_x_;       // [rows][hidden] fp32: the residual stream
  DeviceMem d_h_;       // [rows][hidden] bf16: normed x, embeddings
  DeviceMem d_f32_;     // [rows][max(qkv width, 2 intermediate)] fp32 GEMM output
  DeviceMem d_b16_;     // [rows][max(qkv width, 2 intermediate)] bf16
  DeviceMem d_act_;     // [rows][max(intermediate, q_dim)] bf16: attention input, SwiGLU out
  DeviceMem d_ids_;     // [rows] int32: token ids or positions
  DeviceMem d_logits_;  // [logits_rows_][vocab] fp32
  // Pinned staging.
  PinnedMem stage_f32_;  // max(rows * hidden, logits_rows_ * vocab) fp32
  PinnedMem stage_b16_;  // rows * max(qkv width, q_dim, hidden) bf16
  PinnedMem stage_i32_;  // rows int32
};

absl::Status CudaBackend::Init(const SafetensorsCheckpoint& ckpt) {
  const LlamaConfig& c = config_;
  if (c.hidden_size % 8 != 0 || c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: hidden_size ", c.hidden_size,
                                                   " must be a multiple of 8 and head_dim ",
                                                   c.head_dim, " even"));
  }
  const int64_t h = c.hidden_size, v = c.vocab_size, f = c.intermediate_size;
  const int64_t qd = q_dim(), kvd = kv_dim();

  // Validate every expected tensor before touching the device.
  struct LayerTensors {
    const SafetensorsTensor *in_norm, *post_norm, *q, *k, *v, *o, *gate, *up, *down;
    const SafetensorsTensor *qb = nullptr, *kb = nullptr, *vb = nullptr;
  };
  ASSIGN_OR_RETURN(const SafetensorsTensor* embed,
                   Expect(ckpt, "model.embed_tokens.weight", {v, h}));
  ASSIGN_OR_RETURN(const SafetensorsTensor* norm, Expect(ckpt, "model.norm.weight", {h}));
  const SafetensorsTensor* head = nullptr;
  if (!c.tie_word_embeddings) {
    ASSIGN_OR_RETURN(head, Expect(ckpt, "lm_head.weight", {v, h}));
  }
  std::vector<LayerTensors> lt(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerTensors& t = lt[l];
    ASSIGN_OR_RETURN(t.in_norm, Expect(ckpt, p + "input_layernorm.weight", {h}));
    ASSIGN_OR_RETURN(t.post_norm, Expect(ckpt, p + "post_attention_layernorm.weight", {h}));
    ASSIGN_OR_RETURN(t.q, Expect(ckpt, p + "self_attn.q_proj.weight", {qd, h}));
    ASSIGN_OR_RETURN(t.k, Expect(ckpt, p + "self_attn.k_proj.weight", {kvd, h}));
    ASSIGN_OR_RETURN(t.v, Expect(ckpt, p + "self_attn.v_proj.weight", {kvd, h}));
    ASSIGN_OR_RETURN(t.o, Expect(ckpt, p + "self_attn.o_proj.weight", {h, qd}));
    ASSIGN_OR_RETURN(t.gate, Expect(ckpt, p + "mlp.gate_proj.weight", {f, h}));
    ASSIGN_OR_RETURN(t.up, Expect(ckpt, p + "mlp.up_proj.weight", {f, h}));
    ASSIGN_OR_RETURN(t.down, Expect(ckpt, p + "mlp.down_proj.weight", {h, f}));
    if (c.attention_bias) {
      ASSIGN_OR_RETURN(t.qb, Expect(ckpt, p + "self_attn.q_proj.bias", {qd}));
      ASSIGN_OR_RETURN(t.kb, Expect(ckpt, p + "self_attn.k_proj.bias", {kvd}));
      ASSIGN_OR_RETURN(t.vb, Expect(ckpt, p + "self_attn.v_proj.bias", {kvd}));
    }
  }

  RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&cublas_), "cublasCreate"));
  RETURN_IF_ERROR(CublasStatus(cublasSetStream(cublas_, stream_), "cublasSetStream"));

  std::vector<uint16_t> w;
  auto upload_bf16 = [&](std::initializer_list<const SafetensorsTensor*> parts, DeviceMem* d,
                         absl::string_view what) -> absl::Status {
    w.clear();
    for (const SafetensorsTensor* t : parts) AppendBf16(*t, &w);
    return Upload(w, d, what);
  };
  RETURN_IF_ERROR(upload_bf16({embed}, &embed_, "embed_tokens"));
  RETURN_IF_ERROR(upload_bf16({norm}, &final_norm_, "norm"));
  if (head != nullptr) RETURN_IF_ERROR(upload_bf16({head}, &lm_head_, "lm_head"));
  RETURN_IF_ERROR(Upload(RopeInverseFrequencies(c), &inv_freq_, "inv_freq"));
  layers_.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerTensors& t = lt[l];
    Layer& L = layers_[l];
    const std::string p = absl::StrCat("layer ", l, " ");
    RETURN_IF_ERROR(upload_bf16({t.in_norm}, &L.input_norm, p + "input_layernorm"));
    RETURN_IF_ERROR(upload_bf16({t.post_norm}, &L.post_norm, p + "post_attention_layernorm"));
    RETURN_IF_ERROR(upload_bf16({t.q, t.k, t.v}, &L.qkv, p + "qkv"));
    RETURN_IF_ERROR(upload_bf16({t.o}, &L.o, p + "o_proj"));
    RETURN_IF_ERROR(upload_bf16({t.gate, t.up}, &L.gate_up, p + "gate_up"));
    RETURN_IF_ERROR(upload_bf16({t.down}, &L.down, p + "down_proj"));
    if (c.attention_bias) {
      std::vector<float> b;
      for (const SafetensorsTensor* part : {t.qb, t.kb, t.vb}) AppendF32(*part, &b);
      RETURN_IF_ERROR(Upload(b, &L.qkv_bias, p + "qkv bias"));
    }
  }

  const size_t rows = kChunkRows;
  const size_t wide = std::max<size_t>(qkv_width(), 2 * f);
  logits_rows_ = static_cast<int>(
      std::clamp<int64_t>(kLogitsChunkBytes / (v * int64_t{sizeof(float)}), 1, kChunkRows));
  RETURN_IF_ERROR(d_x_.Allocate(rows * h * sizeof(float), "x"));
  RETURN_IF_ERROR(d_h_.Allocate(rows * h * sizeof(uint16_t), "h"));
  RETURN_IF_ERROR(d_f32_.Allocate(rows * wide * sizeof(float), "gemm output"));
  RETURN_IF_ERROR(d_b16_.Allocate(rows * wide * sizeof(uint16_t), "bf16 gemm output"));
  RETURN_IF_ERROR(d_act_.Allocate(rows * std::max<size_t>(f, qd) * sizeof(uint16_t), "act"));
  RETURN_IF_ERROR(d_ids_.Allocate(rows * sizeof(int32_t), "ids"));
  RETURN_IF_ERROR(
      d_logits_.Allocate(static_cast<size_t>(logits_rows_) * v * sizeof(float), "logits"));
  RETURN_IF_ERROR(stage_f32_.Allocate(
      std::max<size_t>(rows * h, static_cast<size_t>(logits_rows_) * v) * sizeof(float),
      "fp32 staging"));
  RETURN_IF_ERROR(
      stage_b16_.Allocate(rows *
                              std::max<size_t>({static_cast<size_t>(qkv_width()),
                                                static_cast<size_t>(qd), static_cast<size_t>(h)}) *
                              sizeof(uint16_t),
                          "bf16 staging"));
  RETURN_IF_ERROR(stage_i32_.Allocate(rows * sizeof(int32_t), "int32 staging"));
  RETURN_IF_ERROR(Sync("weight upload"));

  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
    KV_LOG(INFO) << "cuda backend: " << c.architecture << ", " << c.num_layers << " layers, hidden "
                 << c.hidden_size << ", bf16 weights on device " << device << " (" << prop.name
                 << ")";
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Embed(absl::Span<const int32_t> tokens, float* x) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token ", tokens[i], " at index ", i,
                                                     " is outside [0, ", config_.vocab_size, ")"));
    }
  }
  const int n = static_cast<int>(tokens.size());
  const int hidden = config_.hidden_size;
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    std::memcpy(stage_i32_.as<int32_t>(), tokens.data() + start, m * sizeof(int32_t));
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(d_ids_.as<int32_t>(), stage_i32_.as<int32_t>(),
                                   m * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                   "upload of token ids"));
    RETURN_IF_ERROR(cuda::EmbeddingGather(embed_.as<uint16_t>(), config_.vocab_size, hidden,
                                          d_ids_.as<int32_t>(), m, d_h_.as<uint16_t>(), stream_));
    const size_t count = static_cast<size_t>(m) * hidden;
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(stage_b16_.as<uint16_t>(), d_h_.as<uint16_t>(),
                                   count * sizeof(uint16_t), cudaMemcpyDeviceToHost, stream_),
                   "download of embeddings"));
    RETURN_IF_ERROR(Sync("Embed"));
    float* out = x + static_cast<size_t>(start) * hidden;
    const uint16_t* src = stage_b16_.as<uint16_t>();
    for (size_t i = 0; i < count; ++i) out[i] = Bf16ToF32(src[i]);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Qkv(int layer, const float* x, absl::Span<const int32_t> positions,
                              float* q, float* k, float* v) {
  RETURN_IF_ERROR(CheckQkvArgs(config_, layer, positions));
  const Layer& L = layers_[layer];
  const int n = static_cast<int>(positions.size());
  const int hidden = config_.hidden_size, hd = config_.head_dim;
  const int qd = q_dim(), kvd = kv_dim(), width = qkv_width();
  const float eps = static_cast<float>(config_.rms_norm_eps);
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    RETURN_IF_ERROR(UploadX(x + static_cast<size_t>(start) * hidden, m));
    std::memcpy(stage_i32_.as<int32_t>(), positions.data() + start, m * sizeof(int32_t));
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(d_ids_.as<int32_t>(), stage_i32_.as<int32_t>(),
                                   m * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                   "upload of positions"));
    RETURN_IF_ERROR(
        CudaStatus(cuda::internal::LaunchRmsNormF32(d_x_.as<float>(), L.input_norm.as<uint16_t>(),
                                                    m, hidden, eps, d_h_.as<uint16_t>(), stream_),
                   "RmsNormF32"));
    RETURN_IF_ERROR(Gemm(L.qkv.as<uint16_t>(), width, hidden, d_h_.as<uint16_t>(), m,
                         d_f32_.as<float>(), CUDA_R_32F, 0.0f));
    const float* bias = config_.attention_bias ? L.qkv_bias.as<float>() : nullptr;
    uint16_t* qkv = d_b16_.as<uint16_t>();
    RETURN_IF_ERROR(CudaStatus(
        cuda::internal::LaunchBiasToBf16(d_f32_.as<float>(), bias, m, width, qkv, stream_),
        "BiasToBf16"));
    RETURN_IF_ERROR(cuda::Rope(qkv, m, config_.num_heads, hd, width, d_ids_.as<int32_t>(),
                               inv_freq_.as<double>(), stream_));
    RETURN_IF_ERROR(cuda::Rope(qkv + qd, m, config_.num_kv_heads, hd, width, d_ids_.as<int32_t>(),
                               inv_freq_.as<double>(), stream_));
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(stage_b16_.as<uint16_t>(), qkv,
                                               static_cast<size_t>(m) * width * sizeof(uint16_t),
                                               cudaMemcpyDeviceToHost, stream_),
                               "download of q/k/v"));
    RETURN_IF_ERROR(Sync("Qkv"));
    for (int i = 0; i < m; ++i) {
      const uint16_t* y = stage_b16_.as<uint16_t>() + static_cast<size_t>(i) * width;
      const size_t row = static_cast<size_t>(start) + i;
      float* qr = q + row * qd;
      float* kr = k + row * kvd;
      float* vr = v + row * kvd;
      for (int j = 0; j < qd; ++j) qr[j] = Bf16ToF32(y[j]);
      for (int j = 0; j < kvd; ++j) kr[j] = Bf16ToF32(y[qd + j]);
      for (int j = 0; j < kvd; ++j) vr[j] = Bf16ToF32(y[qd + kvd + j]);
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::FinishLayer(int layer, const float* attn, int n, float* x) {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n < 0) return absl::InvalidArgumentError("negative row count");
  const Layer& L = layers_[layer];
  const int hidden = config_.hidden_size, f = config_.intermediate_size, qd = q_dim();
  const float eps = static_cast<float>(config_.rms_norm_eps);
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    float* xc = x + static_cast<size_t>(start) * hidden;
    const size_t acount = static_cast<size_t>(m) * qd;
    const float* ac = attn + static_cast<size_t>(start) * qd;
    uint16_t* sb = stage_b16_.as<uint16_t>();
    for (size_t i = 0; i < acount; ++i) sb[i] = F32ToBf16(ac[i]);
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(d_act_.as<uint16_t>(), sb, acount * sizeof(uint16_t),
                                               cudaMemcpyHostToDevice, stream_),
                               "upload of attention output"));
    RETURN_IF_ERROR(UploadX(xc, m));
    // x += o_proj(attn)
    RETURN_IF_ERROR(Gemm(L.o.as<uint16_t>(), hidden, qd, d_act_.as<uint16_t>(), m, d_x_.as<float>(),
                         CUDA_R_32F, 1.0f));
    RETURN_IF_ERROR(
        CudaStatus(cuda::internal::LaunchRmsNormF32(d_x_.as<float>(), L.post_norm.as<uint16_t>(), m,
                                                    hidden, eps, d_h_.as<uint16_t>(), stream_),
                   "RmsNormF32"));
    uint16_t* gu = d_b16_.as<uint16_t>();
    RETURN_IF_ERROR(Gemm(L.gate_up.as<uint16_t>(), 2 * f, hidden, d_h_.as<uint16_t>(), m, gu,
                         CUDA_R_16BF, 0.0f));
    RETURN_IF_ERROR(cuda::SwiGlu(gu, gu + f, m, f, 2 * static_cast<int64_t>(f),
                                 d_act_.as<uint16_t>(), stream_));
    // x += down(silu(gate) * up)
    RETURN_IF_ERROR(Gemm(L.down.as<uint16_t>(), hidden, f, d_act_.as<uint16_t>(), m,
                         d_x_.as<float>(), CUDA_R_32F, 1.0f));
    const size_t bytes = static_cast<size_t>(m) * hidden * sizeof(float);
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(stage_f32_.as<float>(), d_x_.as<float>(), bytes,
                                               cudaMemcpyDeviceToHost, stream_),
                               "download of x"));
    RETURN_IF_ERROR(Sync("FinishLayer"));
    std::memcpy(xc, stage_f32_.as<float>(), bytes);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Logits(const float* x, int n, float* logits) {
  if (n < 0) return absl::InvalidArgumentError("negative row count");
  const int hidden = config_.hidden_size, vocab = config_.vocab_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const uint16_t* head =
      config_.tie_word_embeddings ? embed_.as<uint16_t>() : lm_head_.as<uint16_t>();
  for (int start = 0; start < n; start += logits_rows_) {
    const int m = std::min(logits_rows_, n - start);
    RETURN_IF_ERROR(UploadX(x + static_cast<size_t>(start) * hidden, m));
    RETURN_IF_ERROR(
        CudaStatus(cuda::internal::LaunchRmsNormF32(d_x_.as<float>(), final_norm_.as<uint16_t>(), m,
                                                    hidden, eps, d_h_.as<uint16_t>(), stream_),
                   "RmsNormF32"));
    RETURN_IF_ERROR(
        Gemm(head, vocab, hidden, d_h_.as<uint16_t>(), m, d_logits_.as<float>(), CUDA_R_32F, 0.0f));
    const size_t bytes = static_cast<size_t>(m) * vocab * sizeof(float);
    // The stage's x upload is complete once this download (later in the stream) is.
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(stage_f32_.as<float>(), d_logits_.as<float>(), bytes,
                                               cudaMemcpyDeviceToHost, stream_),
                               "download of logits"));
    RETURN_IF_ERROR(Sync("Logits"));
    std::memcpy(logits + static_cast<size_t>(start) * vocab, stage_f32_.as<float>(), bytes);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCudaBackend(const std::string& model_dir,
                                                                int /*num_threads*/) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaErrorDevicesUnavailable) {
    return absl::UnavailableError(absl::StrCat(
        "cuda backend: the CUDA device is busy or unavailable: ", cudaGetErrorString(e)));
  }
  if (e != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda backend: no usable CUDA device (cudaGetDeviceCount: ",
        e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), "); use --backend=cpu"));
  }
  ASSIGN_OR_RETURN(LlamaConfig config, LoadConfig(model_dir));
  ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(model_dir));
  auto backend = std::make_unique<CudaBackend>(std::move(config));
  RETURN_IF_ERROR(backend->Init(*ckpt));
  return backend;
}

KVRECALL_REGISTER_BACKEND(cuda, "cuda", &CreateCudaBackend);

}  // namespace kvrecall::worker
