#include "gpu-worker/backends/cuda/cuda_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/cuda/internal/backend_ops.h"
#include "gpu-worker/backends/cuda/kernels.h"
#include "gpu-worker/model/rope.h"

namespace kvrecall::worker::cuda {
namespace {

// The one converter of cublasStatus_t in the worker.
absl::Status CublasStatus(cublasStatus_t s, absl::string_view what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg =
      absl::StrCat(what, ": ", cublasGetStatusName(s), ": ", cublasGetStatusString(s));
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  if (s == CUBLAS_STATUS_NOT_INITIALIZED) return absl::FailedPreconditionError(msg);
  return absl::InternalError(msg);
}

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

// Uploads a host array into new device memory.
template <typename T>
absl::Status Upload(const std::vector<T>& h, DeviceMem* d, absl::string_view what) {
  RETURN_IF_ERROR(d->Allocate(h.size() * sizeof(T), what));
  return CudaStatus(
      cudaMemcpy(d->as<void>(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice),
      absl::StrCat("upload of ", what));
}

// A rank's part of a full weight, as 2-D blocks of it (in elements: the first element's offset,
// the full tensor's row pitch, the block's width and height) laid one after another, each
// contiguous, into the shard's tensor.
struct Block {
  int64_t offset, pitch, width, height;
};
using Blocks = std::vector<Block>;

// Row ranges [begin, begin + count) of a [*][cols] tensor, stacked.
Blocks RowRanges(int64_t cols, std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
  Blocks b;
  for (auto [begin, count] : ranges) b.push_back({begin * cols, cols, cols, count});
  return b;
}
// Columns [begin, begin + count) of every row of a [rows][cols] tensor.
Blocks ColumnRange(int64_t rows, int64_t cols, int64_t begin, int64_t count) {
  return {{begin, cols, count, rows}};
}
int64_t BlocksElements(const Blocks& blocks) {
  int64_t n = 0;
  for (const Block& b : blocks) n += b.width * b.height;
  return n;
}

// Where rank r of `world` finds its weights in the full model (cuda_model.h: heads and MLP
// columns split by rank).
struct ShardPlan {
  Blocks qkv, qkv_bias, o, gate_up, down;
};
ShardPlan PlanShard(const LlamaConfig& full, int rank, int world) {
  const int64_t h = full.hidden_size, f = full.intermediate_size;
  const int64_t qd = int64_t{full.num_heads} * full.head_dim;
  const int64_t kvd = int64_t{full.num_kv_heads} * full.head_dim;
  const int64_t qs = qd / world, ks = kvd / world, fs = f / world;
  const auto qkv_rows = [&](int64_t cols) {
    return RowRanges(cols, {{rank * qs, qs}, {qd + rank * ks, ks}, {qd + kvd + rank * ks, ks}});
  };
  return {qkv_rows(h), qkv_rows(1), ColumnRange(h, qd, rank * qs, qs),
          RowRanges(h, {{rank * fs, fs}, {f + rank * fs, fs}}), ColumnRange(h, f, rank * fs, fs)};
}

// The blocks of `full`, one after another.
template <typename T>
std::vector<T> Gather(const std::vector<T>& full, const Blocks& blocks) {
  std::vector<T> out;
  out.reserve(static_cast<size_t>(BlocksElements(blocks)));
  for (const Block& b : blocks) {
    for (int64_t y = 0; y < b.height; ++y) {
      const auto row = full.begin() + b.offset + y * b.pitch;
      out.insert(out.end(), row, row + b.width);
    }
  }
  return out;
}

absl::Status CheckShape(const LlamaConfig& c) {
  if (c.hidden_size % 8 != 0 || c.head_dim % 2 != 0 || c.num_layers < 1 || c.vocab_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("cuda model: hidden_size ", c.hidden_size,
                                                   " must be a multiple of 8 and head_dim ",
                                                   c.head_dim, " even"));
  }
  return absl::OkStatus();
}

}  // namespace

DeviceMem::~DeviceMem() {
  if (p_ != nullptr) cudaFree(p_);
}

absl::Status DeviceMem::Allocate(size_t bytes, absl::string_view what) {
  if (p_ != nullptr) cudaFree(p_);
  p_ = nullptr;
  bytes_ = bytes;
  return CudaStatus(cudaMalloc(&p_, std::max<size_t>(bytes, 16)),
                    absl::StrCat("cudaMalloc ", bytes, " bytes for ", what));
}

ScopedDevice::ScopedDevice(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  status_ = CudaStatus(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")"));
}

ScopedDevice::~ScopedDevice() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

PinnedMem::~PinnedMem() {
  if (p_ != nullptr) cudaFreeHost(p_);
}

absl::Status PinnedMem::Allocate(size_t bytes, absl::string_view what) {
  if (p_ != nullptr) cudaFreeHost(p_);
  p_ = nullptr;
  bytes_ = bytes;
  return CudaStatus(cudaHostAlloc(&p_, std::max<size_t>(bytes, 16),
                                  cudaHostAllocPortable | cudaHostAllocMapped),
                    absl::StrCat("cudaHostAlloc ", bytes, " bytes for ", what));
}

PinnedHostRanges::~PinnedHostRanges() {
  for (const auto& [start, bytes] : ranges_) cudaHostUnregister(reinterpret_cast<void*>(start));
}

absl::Status PinnedHostRanges::Pin(void* data, size_t bytes) {
  if (data == nullptr || bytes == 0) return absl::InvalidArgumentError("pin: null or empty range");
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  std::lock_guard<std::mutex> lock(mu_);
  auto next = ranges_.lower_bound(start);
  if ((next != ranges_.end() && next->first < start + bytes) ||
      (next != ranges_.begin() && std::prev(next)->first + std::prev(next)->second > start)) {
    return absl::InvalidArgumentError("pin: the range overlaps a pinned range");
  }
  RETURN_IF_ERROR(CudaStatus(cudaHostRegister(data, bytes, cudaHostRegisterPortable |
                                                               cudaHostRegisterMapped),
                             absl::StrCat("cudaHostRegister of ", bytes, " bytes")));
  void* device = nullptr;
  const cudaError_t e = cudaHostGetDevicePointer(&device, data, 0);
  if (e != cudaSuccess || device != data) {
    cudaHostUnregister(data);
    return absl::FailedPreconditionError(absl::StrCat(
        "pin: the device reads registered host memory at another address than the host's (",
        e == cudaSuccess ? "no shared address" : cudaGetErrorString(e), ")"));
  }
  ranges_.emplace(start, bytes);
  return absl::OkStatus();
}

void PinnedHostRanges::Unpin(void* data) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ranges_.find(reinterpret_cast<uintptr_t>(data));
  if (it == ranges_.end()) return;
  cudaHostUnregister(data);
  ranges_.erase(it);
}

bool PinnedHostRanges::Contains(const void* data, size_t bytes) const {
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ranges_.upper_bound(start);
  if (it == ranges_.begin()) return false;
  --it;
  return start >= it->first && start + bytes <= it->first + it->second && start + bytes >= start;
}

absl::Status CheckCudaDevice(absl::string_view who) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaErrorDevicesUnavailable) {
    return absl::UnavailableError(
        absl::StrCat(who, ": the CUDA device is busy or unavailable: ", cudaGetErrorString(e)));
  }
  if (e != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(who, ": no usable CUDA device (cudaGetDeviceCount: ",
                     e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), ")"));
  }
  return absl::OkStatus();
}

CudaModel::~CudaModel() {
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Make(const LlamaConfig& config, int max_rows,
                                                           const TensorParallel& tp) {
  RETURN_IF_ERROR(CheckShape(config));
  if (max_rows < 1) return absl::InvalidArgumentError("max_rows must be >= 1");
  if (tp.rank < 0 || tp.rank >= tp.world || (tp.world > 1 && tp.collective == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor-parallel rank ", tp.rank, " of ",
                                                   tp.world, " (a collective is needed above 1)"));
  }
  ASSIGN_OR_RETURN(LlamaConfig shard, ShardConfig(config, tp.world));
  std::unique_ptr<CudaModel> m(new CudaModel(config, std::move(shard), max_rows, tp));
  RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&m->device_), "cudaGetDevice"));
  return m;
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Load(const LlamaConfig& config,
                                                           const SafetensorsCheckpoint& ckpt,
                                                           int max_rows, const TensorParallel& tp) {
  ASSIGN_OR_RETURN(std::unique_ptr<CudaModel> m, Make(config, max_rows, tp));
  RETURN_IF_ERROR(m->LoadWeights(ckpt));
  RETURN_IF_ERROR(m->AllocateScratch());
  return m;
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Random(const LlamaConfig& config,
                                                             uint64_t seed, int max_rows,
                                                             const TensorParallel& tp) {
  ASSIGN_OR_RETURN(std::unique_ptr<CudaModel> m, Make(config, max_rows, tp));
  RETURN_IF_ERROR(m->RandomWeights(seed));
  RETURN_IF_ERROR(m->AllocateScratch());
  return m;
}

absl::Status CudaModel::CreateStream() {
  RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&cublas_), "cublasCreate"));
  return CublasStatus(cublasSetStream(cublas_, stream_), "cublasSetStream");
}

absl::Status CudaModel::LoadWeights(const SafetensorsCheckpoint& ckpt) {
  const LlamaConfig& c = full_;  // the checkpoint's tensors are whole
  const int64_t h = c.hidden_size, v = c.vocab_size, f = c.intermediate_size;
  const int64_t qd = int64_t{c.num_heads} * c.head_dim, kvd = int64_t{c.num_kv_heads} * c.head_dim;
  const ShardPlan plan = PlanShard(c, tp_.rank, tp_.world);

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
  RETURN_IF_ERROR(CreateStream());

  std::vector<uint16_t> w;
  // The parts stacked, or this rank's `shard` of them.
  auto upload_bf16 = [&](std::initializer_list<const SafetensorsTensor*> parts, DeviceMem* d,
                         absl::string_view what, const Blocks* shard = nullptr) -> absl::Status {
    w.clear();
    for (const SafetensorsTensor* t : parts) AppendBf16(*t, &w);
    if (shard != nullptr && tp_.world > 1) w = Gather(w, *shard);
    weight_bytes_ += static_cast<int64_t>(w.size() * sizeof(uint16_t));
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
    RETURN_IF_ERROR(upload_bf16({t.q, t.k, t.v}, &L.qkv, p + "qkv", &plan.qkv));
    RETURN_IF_ERROR(upload_bf16({t.o}, &L.o, p + "o_proj", &plan.o));
    RETURN_IF_ERROR(upload_bf16({t.gate, t.up}, &L.gate_up, p + "gate_up", &plan.gate_up));
    RETURN_IF_ERROR(upload_bf16({t.down}, &L.down, p + "down_proj", &plan.down));
    if (c.attention_bias) {
      std::vector<float> b;
      for (const SafetensorsTensor* part : {t.qb, t.kb, t.vb}) AppendF32(*part, &b);
      if (tp_.world > 1) b = Gather(b, plan.qkv_bias);
      RETURN_IF_ERROR(Upload(b, &L.qkv_bias, p + "qkv bias"));
    }
  }
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
    KV_LOG(INFO) << "cuda model: " << c.architecture << ", " << c.num_layers << " layers, hidden "
                 << c.hidden_size << ", bf16 weights on device " << device << " (" << prop.name
                 << ")"
                 << (tp_.world > 1
                         ? absl::StrCat(", tensor-parallel rank ", tp_.rank, " of ", tp_.world)
                         : std::string());
  }
  return absl::OkStatus();
}

absl::Status CudaModel::RandomWeights(uint64_t seed) {
  const LlamaConfig& c = full_;  // the whole model's weights are generated, then sliced
  const int64_t h = c.hidden_size, v = c.vocab_size, f = c.intermediate_size;
  const int64_t qd = int64_t{c.num_heads} * c.head_dim, kvd = int64_t{c.num_kv_heads} * c.head_dim;
  const ShardPlan plan = PlanShard(c, tp_.rank, tp_.world);
  RETURN_IF_ERROR(CreateStream());
  uint64_t stream_id = 0;
  DeviceMem whole;  // a sharded weight generated whole, before its slices are copied out
  // Fills a weight of n elements, uniform in [-a, a) (standard deviation a / sqrt(3)), or this
  // rank's `shard` of it.
  auto fill = [&](DeviceMem* d, int64_t n, double stddev, absl::string_view what,
                  const Blocks* shard = nullptr) -> absl::Status {
    const uint64_t id = seed * 1000003 + ++stream_id;
    const float scale = static_cast<float>(stddev * std::sqrt(3.0));
    if (shard == nullptr || tp_.world == 1) {
      RETURN_IF_ERROR(d->Allocate(static_cast<size_t>(n) * sizeof(uint16_t), what));
      weight_bytes_ += n * static_cast<int64_t>(sizeof(uint16_t));
      return FillRandomBf16(d->as<uint16_t>(), n, id, 0, scale, stream_);
    }
    if (whole.bytes() < static_cast<size_t>(n) * sizeof(uint16_t)) {
      RETURN_IF_ERROR(whole.Allocate(static_cast<size_t>(n) * sizeof(uint16_t), "whole weight"));
    }
    RETURN_IF_ERROR(FillRandomBf16(whole.as<uint16_t>(), n, id, 0, scale, stream_));
    const int64_t kept = BlocksElements(*shard);
    RETURN_IF_ERROR(d->Allocate(static_cast<size_t>(kept) * sizeof(uint16_t), what));
    weight_bytes_ += kept * static_cast<int64_t>(sizeof(uint16_t));
    uint16_t* dst = d->as<uint16_t>();
    for (const Block& b : *shard) {
      RETURN_IF_ERROR(CudaStatus(
          cudaMemcpy2DAsync(dst, b.width * 2, whole.as<uint16_t>() + b.offset, b.pitch * 2,
                            b.width * 2, b.height, cudaMemcpyDeviceToDevice, stream_),
          absl::StrCat("slice of ", what)));
      dst += b.width * b.height;
    }
    return absl::OkStatus();
  };
  const std::vector<uint16_t> ones(static_cast<size_t>(h), F32ToBf16(1.0f));
  auto norm = [&](DeviceMem* d, absl::string_view what) {
    weight_bytes_ += h * static_cast<int64_t>(sizeof(uint16_t));
    return Upload(ones, d, what);
  };
  RETURN_IF_ERROR(fill(&embed_, v * h, 1.0, "embed_tokens"));
  RETURN_IF_ERROR(norm(&final_norm_, "norm"));
  if (!c.tie_word_embeddings) {
    RETURN_IF_ERROR(fill(&lm_head_, v * h, 1.0 / std::sqrt(double(h)), "lm_head"));
  }
  RETURN_IF_ERROR(Upload(RopeInverseFrequencies(c), &inv_freq_, "inv_freq"));
  layers_.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    Layer& L = layers_[l];
    const std::string p = absl::StrCat("layer ", l, " ");
    RETURN_IF_ERROR(norm(&L.input_norm, p + "input_layernorm"));
    RETURN_IF_ERROR(norm(&L.post_norm, p + "post_attention_layernorm"));
    RETURN_IF_ERROR(
        fill(&L.qkv, (qd + 2 * kvd) * h, 1.0 / std::sqrt(double(h)), p + "qkv", &plan.qkv));
    RETURN_IF_ERROR(fill(&L.o, h * qd, 1.0 / std::sqrt(double(qd)), p + "o_proj", &plan.o));
    RETURN_IF_ERROR(
        fill(&L.gate_up, 2 * f * h, 1.0 / std::sqrt(double(h)), p + "gate_up", &plan.gate_up));
    RETURN_IF_ERROR(fill(&L.down, h * f, 1.0 / std::sqrt(double(f)), p + "down_proj", &plan.down));
    if (c.attention_bias) {
      RETURN_IF_ERROR(Upload(std::vector<float>(qkv_width(), 0.0f), &L.qkv_bias, p + "qkv bias"));
    }
  }
  return CudaStatus(cudaStreamSynchronize(stream_), "random weights");
}

absl::Status CudaModel::AllocateScratch() {
  const size_t rows = static_cast<size_t>(max_rows_);
  const size_t h = config_.hidden_size, f = config_.intermediate_size;
  RETURN_IF_ERROR(h_.Allocate(rows * h * sizeof(uint16_t), "h"));
  RETURN_IF_ERROR(f32_.Allocate(rows * qkv_width() * sizeof(float), "qkv gemm output"));
  RETURN_IF_ERROR(gu_.Allocate(rows * 2 * f * sizeof(uint16_t), "gate|up"));
  RETURN_IF_ERROR(act_.Allocate(rows * f * sizeof(uint16_t), "swiglu"));
  return CudaStatus(cudaStreamSynchronize(stream_), "weight upload");
}

absl::Status CudaModel::CheckRows(int n) const {
  if (n < 0 || n > max_rows_) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda model: ", n, " rows, outside [0, ", max_rows_, "]"));
  }
  return absl::OkStatus();
}

absl::Status CudaModel::CheckLayer(int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  return absl::OkStatus();
}

absl::Status CudaModel::Gemm(const uint16_t* w, int out, int in, const uint16_t* a, int rows,
                             void* c, cudaDataType_t c_type, float beta) {
  const float alpha = 1.0f;
  return CublasStatus(
      cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16BF, in, a,
                   CUDA_R_16BF, in, &beta, c, c_type, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

absl::Status CudaModel::Embed(const int32_t* ids, int n, float* x) {
  RETURN_IF_ERROR(CheckRows(n));
  const int hidden = config_.hidden_size;
  RETURN_IF_ERROR(EmbeddingGather(embed_.as<uint16_t>(), config_.vocab_size, hidden, ids, n,
                                  h_.as<uint16_t>(), stream_));
  return CudaStatus(internal::LaunchBf16ToF32(h_.as<uint16_t>(), int64_t{n} * hidden, x, stream_),
                    "Bf16ToF32");
}

absl::Status CudaModel::Qkv(int layer, const float* x, int n, const int32_t* positions,
                            uint16_t* qkv) {
  RETURN_IF_ERROR(CheckLayer(layer));
  RETURN_IF_ERROR(CheckRows(n));
  if (n == 0) return absl::OkStatus();
  const Layer& L = layers_[layer];
  const int hidden = config_.hidden_size, hd = config_.head_dim, width = qkv_width();
  const float eps = static_cast<float>(config_.rms_norm_eps);
  RETURN_IF_ERROR(CudaStatus(internal::LaunchRmsNormF32(x, L.input_norm.as<uint16_t>(), n, hidden,
                                                        eps, h_.as<uint16_t>(), stream_),
                             "RmsNormF32"));
  RETURN_IF_ERROR(Gemm(L.qkv.as<uint16_t>(), width, hidden, h_.as<uint16_t>(), n, f32_.as<float>(),
                       CUDA_R_32F, 0.0f));
  const float* bias = config_.attention_bias ? L.qkv_bias.as<float>() : nullptr;
  RETURN_IF_ERROR(CudaStatus(
      internal::LaunchBiasToBf16(f32_.as<float>(), bias, n, width, qkv, stream_), "BiasToBf16"));
  RETURN_IF_ERROR(
      Rope(qkv, n, config_.num_heads, hd, width, positions, inv_freq_.as<double>(), stream_));
  return Rope(qkv + q_dim(), n, config_.num_kv_heads, hd, width, positions, inv_freq_.as<double>(),
              stream_);
}

absl::Status CudaModel::FinishLayer(int layer, const uint16_t* attn, int n, float* x) {
  RETURN_IF_ERROR(CheckLayer(layer));
  RETURN_IF_ERROR(CheckRows(n));
  if (n == 0) return absl::OkStatus();
  const Layer& L = layers_[layer];
  const int hidden = config_.hidden_size, f = config_.intermediate_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  // x += o_proj(attn), over the group
  RETURN_IF_ERROR(
      Gemm(L.o.as<uint16_t>(), hidden, q_dim(), attn, n, x, CUDA_R_32F, ResidualBeta()));
  RETURN_IF_ERROR(ReduceResidual(x, n));
  RETURN_IF_ERROR(CudaStatus(internal::LaunchRmsNormF32(x, L.post_norm.as<uint16_t>(), n, hidden,
                                                        eps, h_.as<uint16_t>(), stream_),
                             "RmsNormF32"));
  uint16_t* gu = gu_.as<uint16_t>();
  RETURN_IF_ERROR(
      Gemm(L.gate_up.as<uint16_t>(), 2 * f, hidden, h_.as<uint16_t>(), n, gu, CUDA_R_16BF, 0.0f));
  RETURN_IF_ERROR(
      SwiGlu(gu, gu + f, n, f, 2 * static_cast<int64_t>(f), act_.as<uint16_t>(), stream_));
  // x += down(silu(gate) * up), over the group
  RETURN_IF_ERROR(Gemm(L.down.as<uint16_t>(), hidden, f, act_.as<uint16_t>(), n, x, CUDA_R_32F,
                       ResidualBeta()));
  return ReduceResidual(x, n);
}

absl::Status CudaModel::ReduceResidual(float* x, int n) {
  if (tp_.world == 1) return absl::OkStatus();
  return tp_.collective->AllReduceSum(x, static_cast<size_t>(n) * config_.hidden_size, stream_);
}

absl::Status CudaModel::Logits(const float* x, int n, float* logits) {
  RETURN_IF_ERROR(CheckRows(n));
  if (n == 0) return absl::OkStatus();
  const int hidden = config_.hidden_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const uint16_t* head =
      config_.tie_word_embeddings ? embed_.as<uint16_t>() : lm_head_.as<uint16_t>();
  RETURN_IF_ERROR(CudaStatus(internal::LaunchRmsNormF32(x, final_norm_.as<uint16_t>(), n, hidden,
                                                        eps, h_.as<uint16_t>(), stream_),
                             "RmsNormF32"));
  return Gemm(head, config_.vocab_size, hidden, h_.as<uint16_t>(), n, logits, CUDA_R_32F, 0.0f);
}

}  // namespace kvrecall::worker::cuda
