#include "gpu-worker/backends/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/registry.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

using cuda::CudaModel;
using cuda::CudaStatus;
using cuda::DeviceMem;
using cuda::PinnedMem;

// Rows per step: bounds the device scratch and the pinned staging buffers.
constexpr int kChunkRows = 512;
// Bytes of fp32 logits per step (rows are reduced for large vocabularies).
constexpr int64_t kLogitsChunkBytes = int64_t{64} << 20;

// ModelBackend over a CudaModel: host fp32 buffers in and out through pinned staging, one
// synchronisation per call.
class CudaBackend final : public ModelBackend {
 public:
  explicit CudaBackend(std::unique_ptr<CudaModel> model)
      : model_(std::move(model)), config_(model_->config()), stream_(model_->stream()) {}

  absl::Status Init();

  const LlamaConfig& config() const override { return config_; }
  absl::Status Embed(absl::Span<const int32_t> tokens, float* x) override;
  absl::Status Qkv(int layer, const float* x, absl::Span<const int32_t> positions, float* q,
                   float* k, float* v) override;
  absl::Status FinishLayer(int layer, const float* attn, int n, float* x) override;
  absl::Status Logits(const float* x, int n, float* logits) override;

 private:
  // Copies x[rows][hidden] (host fp32) into d_x_ through the pinned stage.
  absl::Status UploadX(const float* x, int rows) {
    const size_t bytes = static_cast<size_t>(rows) * config_.hidden_size * sizeof(float);
    std::memcpy(stage_f32_.as<float>(), x, bytes);
    return CudaStatus(cudaMemcpyAsync(d_x_.as<float>(), stage_f32_.as<float>(), bytes,
                                      cudaMemcpyHostToDevice, stream_),
                      "upload of x");
  }
  absl::Status UploadInts(const int32_t* v, int n, absl::string_view what) {
    std::memcpy(stage_i32_.as<int32_t>(), v, n * sizeof(int32_t));
    return CudaStatus(cudaMemcpyAsync(d_ids_.as<int32_t>(), stage_i32_.as<int32_t>(),
                                      n * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                      what);
  }

  absl::Status Sync(absl::string_view what) {
    return CudaStatus(cudaStreamSynchronize(stream_), what);
  }

  const std::unique_ptr<CudaModel> model_;
  const LlamaConfig& config_;
  const cudaStream_t stream_;
  int logits_rows_ = 1;  // rows per Logits step

  // Device buffers, kChunkRows rows each.
  DeviceMem d_x_;       // [rows][hidden] fp32: the residual stream
  DeviceMem d_qkv_;     // [rows][qkv width] bf16
  DeviceMem d_attn_;    // [rows][q_dim] bf16
  DeviceMem d_ids_;     // [rows] int32: token ids or positions
  DeviceMem d_logits_;  // [logits_rows_][vocab] fp32
  // Pinned staging.
  PinnedMem stage_f32_;  // max(rows * hidden, logits_rows_ * vocab) fp32
  PinnedMem stage_b16_;  // rows * max(qkv width, q_dim) bf16
  PinnedMem stage_i32_;  // rows int32
};

absl::Status CudaBackend::Init() {
  const size_t rows = kChunkRows, h = config_.hidden_size, v = config_.vocab_size;
  const size_t width = model_->qkv_width(), qd = model_->q_dim();
  logits_rows_ = static_cast<int>(
      std::clamp<int64_t>(kLogitsChunkBytes / (v * int64_t{sizeof(float)}), 1, kChunkRows));
  RETURN_IF_ERROR(d_x_.Allocate(rows * h * sizeof(float), "x"));
  RETURN_IF_ERROR(d_qkv_.Allocate(rows * width * sizeof(uint16_t), "qkv"));
  RETURN_IF_ERROR(d_attn_.Allocate(rows * qd * sizeof(uint16_t), "attention output"));
  RETURN_IF_ERROR(d_ids_.Allocate(rows * sizeof(int32_t), "ids"));
  RETURN_IF_ERROR(
      d_logits_.Allocate(static_cast<size_t>(logits_rows_) * v * sizeof(float), "logits"));
  RETURN_IF_ERROR(stage_f32_.Allocate(
      std::max<size_t>(rows * h, static_cast<size_t>(logits_rows_) * v) * sizeof(float),
      "fp32 staging"));
  RETURN_IF_ERROR(
      stage_b16_.Allocate(rows * std::max({width, qd, h}) * sizeof(uint16_t), "bf16 staging"));
  return stage_i32_.Allocate(rows * sizeof(int32_t), "int32 staging");
}

absl::Status CudaBackend::Embed(absl::Span<const int32_t> tokens, float* x) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token ", tokens[i], " at index ", i,
                                                     " is outside [0, ", config_.vocab_size, ")"));
    }
  }
  const int n = static_cast<int>(tokens.size());
  const size_t hidden = config_.hidden_size;
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    RETURN_IF_ERROR(UploadInts(tokens.data() + start, m, "upload of token ids"));
    RETURN_IF_ERROR(model_->Embed(d_ids_.as<int32_t>(), m, d_x_.as<float>()));
    const size_t bytes = m * hidden * sizeof(float);
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(stage_f32_.as<float>(), d_x_.as<float>(), bytes,
                                               cudaMemcpyDeviceToHost, stream_),
                               "download of embeddings"));
    RETURN_IF_ERROR(Sync("Embed"));
    std::memcpy(x + start * hidden, stage_f32_.as<float>(), bytes);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Qkv(int layer, const float* x, absl::Span<const int32_t> positions,
                              float* q, float* k, float* v) {
  RETURN_IF_ERROR(CheckQkvArgs(config_, layer, positions));
  const int n = static_cast<int>(positions.size());
  const int hidden = config_.hidden_size;
  const int qd = model_->q_dim(), kvd = model_->kv_dim(), width = model_->qkv_width();
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    RETURN_IF_ERROR(UploadX(x + static_cast<size_t>(start) * hidden, m));
    RETURN_IF_ERROR(UploadInts(positions.data() + start, m, "upload of positions"));
    RETURN_IF_ERROR(
        model_->Qkv(layer, d_x_.as<float>(), m, d_ids_.as<int32_t>(), d_qkv_.as<uint16_t>()));
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(stage_b16_.as<uint16_t>(), d_qkv_.as<uint16_t>(),
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
  const int hidden = config_.hidden_size, qd = model_->q_dim();
  for (int start = 0; start < n; start += kChunkRows) {
    const int m = std::min(kChunkRows, n - start);
    float* xc = x + static_cast<size_t>(start) * hidden;
    const size_t acount = static_cast<size_t>(m) * qd;
    const float* ac = attn + static_cast<size_t>(start) * qd;
    uint16_t* sb = stage_b16_.as<uint16_t>();
    for (size_t i = 0; i < acount; ++i) sb[i] = F32ToBf16(ac[i]);
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(d_attn_.as<uint16_t>(), sb, acount * sizeof(uint16_t),
                                   cudaMemcpyHostToDevice, stream_),
                   "upload of attention output"));
    RETURN_IF_ERROR(UploadX(xc, m));
    RETURN_IF_ERROR(model_->FinishLayer(layer, d_attn_.as<uint16_t>(), m, d_x_.as<float>()));
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
  for (int start = 0; start < n; start += logits_rows_) {
    const int m = std::min(logits_rows_, n - start);
    RETURN_IF_ERROR(UploadX(x + static_cast<size_t>(start) * hidden, m));
    RETURN_IF_ERROR(model_->Logits(d_x_.as<float>(), m, d_logits_.as<float>()));
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
  if (absl::Status s = cuda::CheckCudaDevice("cuda backend"); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(s.message(), "; use --backend=cpu"));
  }
  ASSIGN_OR_RETURN(LlamaConfig config, LoadConfig(model_dir));
  ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<CudaModel> model, CudaModel::Load(config, *ckpt, kChunkRows));
  auto backend = std::make_unique<CudaBackend>(std::move(model));
  RETURN_IF_ERROR(backend->Init());
  return backend;
}

KVRECALL_REGISTER_BACKEND(cuda, "cuda", &CreateCudaBackend);

}  // namespace kvrecall::worker
