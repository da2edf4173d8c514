// Rotary position embeddings (RoPE) as in Hugging Face transformers' Llama family, including
// Llama-3 frequency scaling (`_compute_llama3_parameters`) and the `rotate_half` pairing:
// element i is rotated together with element i + head_dim/2.
//
// Precision: inverse frequencies and angles (position * inv_freq) are computed in double and
// only cos/sin are rounded to fp32. Hugging Face computes inv_freq and the angle in fp32, so at
// large positions (angle ~ 1e5 rad) its fp32 angle is off by up to ~4e-3 rad; ours is exact to
// fp32 rounding of cos/sin. The two agree to ~1e-7 at small positions.
#ifndef KVRECALL_GPU_WORKER_MODEL_ROPE_H_
#define KVRECALL_GPU_WORKER_MODEL_ROPE_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "gpu-worker/model/config.h"

namespace kvrecall::worker {

// inv_freq: [head_dim / 2], inv_freq[i] = theta^(-2i / head_dim), then Llama-3 scaled when
// `scaling` says so. REQUIRES: head_dim even and > 0, theta > 1.
std::vector<double> RopeInverseFrequencies(int head_dim, double theta, const RopeScaling& scaling);
// The same for a model's config.
std::vector<double> RopeInverseFrequencies(const LlamaConfig& config);

// cos, sin: [inv_freq.size()] fp32 at `position`: cos(position * inv_freq[i]) etc.
void RopeCosSin(absl::Span<const double> inv_freq, int64_t position, float* cos, float* sin);

// Rotates x: [n_heads][head_dim] fp32 in place with cos, sin: [head_dim / 2] (from RopeCosSin):
//   x'[i]       = x[i] * cos[i] - x[i + d/2] * sin[i]
//   x'[i + d/2] = x[i + d/2] * cos[i] + x[i] * sin[i]        for i < d/2.
void ApplyRope(float* x, int n_heads, int head_dim, const float* cos, const float* sin);

// Convenience: RopeCosSin + ApplyRope at `position`. REQUIRES: inv_freq.size() == head_dim / 2.
void ApplyRope(float* x, int n_heads, int head_dim, absl::Span<const double> inv_freq,
               int64_t position);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_MODEL_ROPE_H_
