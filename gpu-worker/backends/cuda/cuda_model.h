// A Llama-family model's bf16 weights on one GPU and the per-layer math of a forward pass on
// device buffers: what the cuda ModelBackend (cuda_backend.cc, host buffers, staged copies) and
// the GPU-resident decode engine (gpu-worker/engine/cuda_engine.h, device buffers throughout)
// share. cuBLAS GEMMs (bf16 inputs, fp32 accumulate) and the kernels of kernels.h.
//
// Numerics (see cuda_backend.h): the residual stream x is fp32 and o_proj / down_proj accumulate
// into it (beta = 1); RMSNorm reads fp32 x and writes bf16; q/k/v (Qwen2 bias added in fp32
// first), gate/up and the SwiGLU product are rounded to bf16; RoPE is the kernels.h kernel;
// logits come out of the lm_head GEMM in fp32.
//
// Every call enqueues on stream() and returns without synchronising: outputs are ready once the
// stream is. All pointers taken by the calls are device pointers. Errors: RESOURCE_EXHAUSTED when
// device memory runs out, INVALID_ARGUMENT for n outside [0, max_rows] or a bad layer, INTERNAL
// for a CUDA or cuBLAS error (the model is then unusable).
//
// Tensor parallelism (TensorParallel; gpu-worker/engine/tp_engine.h): a model may be one rank's
// shard of a model split over `world` GPUs. It then holds only its rank's slice of the weights
// - q/k/v rows of its heads (ShardConfig: whole GQA groups), o_proj's columns of those heads,
// gate/up rows and down_proj columns of its share of the MLP - and the whole embedding, norms
// and lm_head; config() is the shard's. x stays replicated: FinishLayer sums the ranks'
// o_proj (then down_proj) outputs over the group (Collective::AllReduceSum) into every rank's
// x, so all ranks hold the same x, and the same logits, after every layer.
//
// Thread safety: one thread at a time; the instance owns its stream, cuBLAS handle and scratch
// on the device that was current when it was created (device()); call it with that device
// current.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_MODEL_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_MODEL_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker::cuda {

// Device memory (cudaMalloc) freed on destruction.
class DeviceMem {
 public:
  DeviceMem() = default;
  ~DeviceMem();
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  DeviceMem(DeviceMem&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(o.bytes_) {}

  // RESOURCE_EXHAUSTED (naming `what`) when the device is out of memory.
  [[nodiscard]] absl::Status Allocate(size_t bytes, absl::string_view what);
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Makes `device` current on the calling thread (cudaSetDevice) and restores the previous one on
// destruction; status() says whether the switch worked.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ~ScopedDevice();
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  const absl::Status& status() const { return status_; }

 private:
  int previous_ = -1;
  absl::Status status_;
};

// Page-locked host memory (cudaHostAlloc, portable and mapped: kernels may read it at its host
// address) freed on destruction.
class PinnedMem {
 public:
  PinnedMem() = default;
  ~PinnedMem();
  PinnedMem(const PinnedMem&) = delete;
  PinnedMem& operator=(const PinnedMem&) = delete;

  [[nodiscard]] absl::Status Allocate(size_t bytes, absl::string_view what);
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Host ranges page-locked for the devices (cudaHostRegister, portable and mapped) that kernels read
// at their host addresses: the tier's recall regions, so that SlotScatter reads streamed rows
// where they landed instead of after a staging copy. Pin and Unpin are the tier's region hooks
// (client::TierOptions). Thread-safe; unpins whatever is left on destruction.
class PinnedHostRanges {
 public:
  PinnedHostRanges() = default;
  ~PinnedHostRanges();
  PinnedHostRanges(const PinnedHostRanges&) = delete;
  PinnedHostRanges& operator=(const PinnedHostRanges&) = delete;

  // INVALID_ARGUMENT for a null or empty range or one overlapping a pinned range;
  // FAILED_PRECONDITION when the device would read it at another address than the host's;
  // RESOURCE_EXHAUSTED / INTERNAL for cudaHostRegister's errors.
  [[nodiscard]] absl::Status Pin(void* data, size_t bytes);
  // Unpins the range that starts at `data` (nothing when none does).
  void Unpin(void* data);
  // True when [data, data + bytes) lies inside one pinned range.
  bool Contains(const void* data, size_t bytes) const;

 private:
  mutable std::mutex mu_;
  std::map<uintptr_t, size_t> ranges_;  // start -> bytes
};

// Collective communication among the ranks of a tensor-parallel group, one instance per rank
// (NCCL, or host memory: gpu-worker/backends/cuda/collectives.h). Every rank must make the same
// calls in the same order; a call waits (on the GPU) for the other ranks' matching calls.
class Collective {
 public:
  virtual ~Collective() = default;
  // Sums data[0, count) (device memory, fp32) over the ranks, in place, enqueued on `stream`:
  // once the stream reaches it, every rank holds the same sum, bit for bit.
  [[nodiscard]] virtual absl::Status AllReduceSum(float* data, size_t count,
                                                  cudaStream_t stream) = 0;
};

// Which shard of a model a CudaModel holds (class comment).
struct TensorParallel {
  int rank = 0;
  int world = 1;
  Collective* collective = nullptr;  // not owned, outlives the model; required when world > 1
};

// OK when a usable CUDA device is present; FAILED_PRECONDITION when none (or no driver),
// UNAVAILABLE when it is busy. `who` prefixes the message.
[[nodiscard]] absl::Status CheckCudaDevice(absl::string_view who);

class CudaModel {
 public:
  // Loads the checkpoint's tensors (validated first: INVALID_ARGUMENT for a missing tensor or a
  // wrong shape), or `tp`'s shard of them. max_rows: the largest n any call below will be given
  // (sizes the scratch). INVALID_ARGUMENT for a `tp` that does not fit the model (ShardConfig,
  // a rank outside [0, world), no collective with world > 1).
  static absl::StatusOr<std::unique_ptr<CudaModel>> Load(const LlamaConfig& config,
                                                         const SafetensorsCheckpoint& ckpt,
                                                         int max_rows,
                                                         const TensorParallel& tp = {});
  // Random weights generated on the device (FillRandomBf16; no file): projections uniform with
  // standard deviation 1/sqrt(fan in), embeddings with 1, norm weights 1, biases 0. For
  // benchmarks of model shapes no checkpoint is at hand for. A shard (`tp`) holds the slices of
  // the same weights world 1 generates from `seed`.
  static absl::StatusOr<std::unique_ptr<CudaModel>> Random(const LlamaConfig& config, uint64_t seed,
                                                           int max_rows,
                                                           const TensorParallel& tp = {});
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const LlamaConfig& config() const { return config_; }  // the shard's (ShardConfig)
  const TensorParallel& tensor_parallel() const { return tp_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  int max_rows() const { return max_rows_; }
  int q_dim() const { return config_.num_heads * config_.head_dim; }
  int kv_dim() const { return config_.num_kv_heads * config_.head_dim; }
  int qkv_width() const { return q_dim() + 2 * kv_dim(); }
  int64_t weight_bytes() const { return weight_bytes_; }  // device bytes of the weights

  // x: [n][hidden] fp32 <- the embedding rows of ids: [n] int32 (an id outside the vocabulary
  // gives a row of zeros; callers check ids on the host).
  [[nodiscard]] absl::Status Embed(const int32_t* ids, int n, float* x);
  // qkv: [n][qkv_width()] bf16 = q | k | v of input_norm(x) (x: [n][hidden] fp32), q and k
  // rotated by RoPE at positions: [n] int32.
  [[nodiscard]] absl::Status Qkv(int layer, const float* x, int n, const int32_t* positions,
                                 uint16_t* qkv);
  // x += o_proj(attn); x += down(silu(gate(h)) * up(h)), h = post_attention_norm(x).
  //   attn: [n][q_dim()] bf16; x: [n][hidden] fp32.
  // A shard adds every rank's o_proj (and down_proj) output, summed over the group, so each of
  // the two is a collective call (class comment).
  [[nodiscard]] absl::Status FinishLayer(int layer, const uint16_t* attn, int n, float* x);
  // logits: [n][vocab] fp32 = lm_head(final_norm(x)).
  [[nodiscard]] absl::Status Logits(const float* x, int n, float* logits);

 private:
  struct Layer {
    DeviceMem input_norm;  // [hidden] bf16
    DeviceMem post_norm;   // [hidden] bf16
    DeviceMem qkv;         // [q_dim + 2 kv_dim][hidden] bf16: q_proj, k_proj, v_proj stacked
    DeviceMem qkv_bias;    // [q_dim + 2 kv_dim] fp32; allocated with attention_bias only
    DeviceMem o;           // [hidden][q_dim] bf16
    DeviceMem gate_up;     // [2 intermediate][hidden] bf16: gate_proj, up_proj stacked
    DeviceMem down;        // [hidden][intermediate] bf16
  };

  CudaModel(LlamaConfig full, LlamaConfig shard, int max_rows, const TensorParallel& tp)
      : full_(std::move(full)), config_(std::move(shard)), max_rows_(max_rows), tp_(tp) {}
  // Checks the arguments shared by Load and Random and makes the (empty) model.
  static absl::StatusOr<std::unique_ptr<CudaModel>> Make(const LlamaConfig& config, int max_rows,
                                                         const TensorParallel& tp);
  // x += y summed over the group, where each rank's GEMM into x wrote y: rank 0 accumulated
  // into x (beta 1), the others overwrote it (beta 0, fine since x is replicated).
  float ResidualBeta() const { return tp_.rank == 0 ? 1.0f : 0.0f; }
  absl::Status ReduceResidual(float* x, int n);
  absl::Status CreateStream();
  absl::Status AllocateScratch();
  absl::Status LoadWeights(const SafetensorsCheckpoint& ckpt);
  absl::Status RandomWeights(uint64_t seed);
  absl::Status CheckRows(int n) const;
  absl::Status CheckLayer(int layer) const;
  // c[rows][out] (fp32 or bf16, by c_type) = beta * c + a[rows][in] . w[out][in]^T (bf16).
  absl::Status Gemm(const uint16_t* w, int out, int in, const uint16_t* a, int rows, void* c,
                    cudaDataType_t c_type, float beta);

  const LlamaConfig full_;    // the whole model's config
  const LlamaConfig config_;  // this shard's (full_ when world is 1)
  const int max_rows_;
  const TensorParallel tp_;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  int64_t weight_bytes_ = 0;

  DeviceMem embed_;       // [vocab][hidden] bf16
  DeviceMem lm_head_;     // [vocab][hidden] bf16; unallocated when tied (embed_ is used)
  DeviceMem final_norm_;  // [hidden] bf16
  DeviceMem inv_freq_;    // [head_dim / 2] fp64 (Llama-3 scaling included)
  std::vector<Layer> layers_;

  // Scratch, max_rows rows each.
  DeviceMem h_;    // [rows][hidden] bf16: normed x, embeddings
  DeviceMem f32_;  // [rows][qkv width] fp32: the q/k/v GEMM's output
  DeviceMem gu_;   // [rows][2 intermediate] bf16: gate | up
  DeviceMem act_;  // [rows][intermediate] bf16: the SwiGLU product
};

}  // namespace kvrecall::worker::cuda

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_MODEL_H_
