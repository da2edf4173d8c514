// Synthetic checkpoints for tests, demos and benchmarks: a Hugging Face-layout model directory
// (config.json + model.safetensors) filled with deterministic pseudo-random weights.
#ifndef KVRECALL_GPU_WORKER_MODEL_MAKE_MODEL_H_
#define KVRECALL_GPU_WORKER_MODEL_MAKE_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gpu-worker/model/config.h"

namespace kvrecall::worker {

// Standard deviations of the random weights. Linear layers are ~N(0, 0.02) like a freshly
// initialised HF model, except q_proj/k_proj: with N(0, 0.02), q.k/sqrt(head_dim) has a std of
// ~0.03 and attention over 8K tokens is flat (every key ~1/8192). With 0.12 (hidden 256), q and k
// entries have std ~1.9 and the logits std ~3.7, so a few keys per query carry most of the mass
// and sparse retrieval has something to find. Embeddings are N(0, 1) (so that tied lm_heads give
// non-trivial logits); norm weights are 1; Qwen2 biases are N(0, 0.02).
inline constexpr double kRandomLinearStd = 0.02;
inline constexpr double kRandomQkStd = 0.12;
inline constexpr double kRandomEmbedStd = 1.0;

// Writes `dir`/config.json and `dir`/model.safetensors (tensors in config.dtype) for `config`,
// creating `dir` if needed. The same (config, seed) give byte-identical files on every machine:
// the generator is splitmix64 and the normals are Irwin-Hall sums of 4 uniforms (integer and
// IEEE +,* arithmetic only, no libm), seeded per tensor by (seed, tensor name).
// INVALID_ARGUMENT when the config is inconsistent or the model would exceed 2^31 parameters.
[[nodiscard]] absl::Status WriteRandomModel(const std::string& dir, const LlamaConfig& config,
                                            uint64_t seed);

// Named configurations: "tiny" (Llama-3 style, 4 layers, hidden 256, untied, bf16),
// "tiny-qwen2" (same shapes, Qwen2 with q/k/v bias, tied embeddings), "small" (8 layers,
// hidden 512, 8 heads). NOT_FOUND for another name.
absl::StatusOr<LlamaConfig> PresetConfig(absl::string_view name);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_MODEL_MAKE_MODEL_H_
