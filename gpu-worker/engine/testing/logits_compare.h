// Logits of the GPU engines against a reference, within bf16 tolerance: what the engine tests
// (cuda_engine_test, tp_engine_test) share.
#ifndef KVRECALL_GPU_WORKER_ENGINE_TESTING_LOGITS_COMPARE_H_
#define KVRECALL_GPU_WORKER_ENGINE_TESTING_LOGITS_COMPARE_H_

#include <algorithm>
#include <cmath>
#include <cstddef>

namespace kvrecall::worker::testing {

struct Diff {
  double rel_l2 = 0;
  double worst = 0;  // max |a - r| / (4u |r| + 0.05 rms(r)); <= 1 passes
};

inline Diff Compare(const float* a, const float* r, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (double{a[i]} - r[i]) * (double{a[i]} - r[i]);
    den += double{r[i]} * r[i];
  }
  const double rms = std::sqrt(den / std::max<size_t>(n, 1));
  Diff d;
  d.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
  for (size_t i = 0; i < n; ++i) {
    const double tol = 4.0 / 256 * std::fabs(r[i]) + 0.05 * rms;
    d.worst = std::max(d.worst, std::fabs(double{a[i]} - r[i]) / tol);
  }
  return d;
}

inline int Argmax(const float* x, int n) {
  return static_cast<int>(std::max_element(x, x + n) - x);
}

// Whether the greedy choice of reference logits r survives the tolerance of Compare: the top-2
// margin exceeds the sum of the two logits' tolerances.
inline bool Decisive(const float* r, int n) {
  double den = 0;
  for (int i = 0; i < n; ++i) den += double{r[i]} * r[i];
  const double rms = std::sqrt(den / n);
  const int top = Argmax(r, n);
  int second = top == 0 ? 1 : 0;
  for (int i = 0; i < n; ++i) {
    if (i != top && r[i] > r[second]) second = i;
  }
  auto tol = [&](int i) { return 4.0 / 256 * std::fabs(r[i]) + 0.05 * rms; };
  return double{r[top]} - r[second] > tol(top) + tol(second);
}

}  // namespace kvrecall::worker::testing

#endif  // KVRECALL_GPU_WORKER_ENGINE_TESTING_LOGITS_COMPARE_H_
