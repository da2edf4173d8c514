// The model math behind the decode engine, per layer, on a batch of token rows.
//
// The engine owns the KV cache and attention (dense for layers 0-1, sinks + window + recalled
// rows for the rest); a backend provides everything else. Backends register by name ("cpu",
// "cuda") so shared code never #ifdefs on CUDA.
//
// Buffers here are host fp32 arrays, row-major, shapes as commented. Activations stay fp32; K and
// V are returned in fp32 and rounded to the KV dtype by the engine when they are stored.
//
// Thread safety: one backend instance is used by one engine thread at a time; it may use its own
// thread pool internally.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_BACKEND_H_
#define KVRECALL_GPU_WORKER_BACKENDS_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gpu-worker/model/config.h"

namespace kvrecall::worker {

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;
  virtual const LlamaConfig& config() const = 0;

  // x: [n][hidden] <- embedding rows of `tokens` (n = tokens.size()).
  // INVALID_ARGUMENT when a token id is outside [0, vocab_size).
  virtual absl::Status Embed(absl::Span<const int32_t> tokens, float* x) = 0;

  // From the residual stream x [n][hidden] of layer `layer`: input RMSNorm, then
  //   q: [n][num_heads][head_dim], k, v: [n][num_kv_heads][head_dim],
  // with RoPE (incl. Llama-3 scaling) applied to q and k at positions[i] (n = positions.size()).
  virtual absl::Status Qkv(int layer, const float* x, absl::Span<const int32_t> positions, float* q,
                           float* k, float* v) = 0;

  // attn: [n][num_heads][head_dim] (attention output before o_proj). Updates x [n][hidden] in
  // place: x += o_proj(attn); x += down(silu(gate(h)) * up(h)) with h = post_attention_norm(x).
  virtual absl::Status FinishLayer(int layer, const float* attn, int n, float* x) = 0;

  // logits: [n][vocab_size] = lm_head(final_norm(x)) for x [n][hidden].
  virtual absl::Status Logits(const float* x, int n, float* logits) = 0;
};

// Qkv's argument checks, shared by the backends: INVALID_ARGUMENT for a layer outside the model
// or a negative position.
absl::Status CheckQkvArgs(const LlamaConfig& config, int layer, absl::Span<const int32_t> positions);

// Loads `model_dir` (config.json + *.safetensors, sharded or not) into the named backend.
// NOT_FOUND for an unknown backend name or missing files; INVALID_ARGUMENT / DATA_LOSS for a
// malformed checkpoint. `num_threads` <= 0 uses every core.
absl::StatusOr<std::unique_ptr<ModelBackend>> CreateBackend(const std::string& name,
                                                            const std::string& model_dir,
                                                            int num_threads = 0);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_BACKENDS_BACKEND_H_
