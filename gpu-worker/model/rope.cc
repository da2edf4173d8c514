#include "gpu-worker/model/rope.h"

#include <cmath>
#include <numbers>

namespace kvrecall::worker {

std::vector<double> RopeInverseFrequencies(int head_dim, double theta, const RopeScaling& scaling) {
  const int half = head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) {
    inv[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / head_dim);
  }
  if (scaling.type != RopeScaling::Type::kLlama3) return inv;
  // transformers' _compute_llama3_parameters, element-wise.
  const double factor = scaling.factor;
  const double low = scaling.low_freq_factor;
  const double high = scaling.high_freq_factor;
  const double old_context_len = scaling.original_max_position_embeddings;
  const double low_freq_wavelen = old_context_len / low;
  const double high_freq_wavelen = old_context_len / high;
  for (int i = 0; i < half; ++i) {
    const double wavelen = 2.0 * std::numbers::pi / inv[i];
    // Long wavelengths (low frequencies) are slowed down by `factor`; short ones kept.
    double f = wavelen > low_freq_wavelen ? inv[i] / factor : inv[i];
    const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    if (medium) {
      const double smooth = (old_context_len / wavelen - low) / (high - low);
      f = (1.0 - smooth) * f / factor + smooth * f;
    }
    inv[i] = f;
  }
  return inv;
}

std::vector<double> RopeInverseFrequencies(const LlamaConfig& config) {
  return RopeInverseFrequencies(config.head_dim, config.rope_theta, config.rope_scaling);
}

void RopeCosSin(absl::Span<const double> inv_freq, int64_t position, float* cos, float* sin) {
  const double p = static_cast<double>(position);
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double a = p * inv_freq[i];
    cos[i] = static_cast<float>(std::cos(a));
    sin[i] = static_cast<float>(std::sin(a));
  }
}

void ApplyRope(float* x, int n_heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* a = x + static_cast<long>(h) * head_dim;
    float* b = a + half;
    for (int i = 0; i < half; ++i) {
      const float x0 = a[i];
      const float x1 = b[i];
      a[i] = x0 * cos[i] - x1 * sin[i];
      b[i] = x1 * cos[i] + x0 * sin[i];
    }
  }
}

void ApplyRope(float* x, int n_heads, int head_dim, absl::Span<const double> inv_freq,
               int64_t position) {
  std::vector<float> cs(inv_freq.size() * 2);
  RopeCosSin(inv_freq, position, cs.data(), cs.data() + inv_freq.size());
  ApplyRope(x, n_heads, head_dim, cs.data(), cs.data() + inv_freq.size());
}

}  // namespace kvrecall::worker
