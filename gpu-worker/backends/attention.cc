#include "gpu-worker/backends/attention.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace kvrecall::worker {
namespace {

// Both kernels work row by row over all `m` rows, so the function-pointer dispatch happens once
// per AttendRows call. Dot products use 8 lanes (a vector register, or 8 scalars on the portable
// path) reduced in a fixed order, so results are deterministic on one machine; the two paths may
// differ in the last bits.

// s: [num_q][m] = scale * q . keys[i].
using ScoresFn = void (*)(const float* q, int num_q, int d, const float* keys, long stride, int m,
                          float scale, float* s);
// acc: [num_q][d] += p[h][i] * values[i] for i = 0 .. m-1 in order.
using AccumulateFn = void (*)(const float* p, int num_q, int d, const float* values, long stride,
                              int m, float* acc);

float DotPortable(const float* a, const float* b, int d) {
  float lane[8] = {};
  int i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < d; ++i, ++j) lane[j] += a[i] * b[i];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

void ScoresPortable(const float* q, int num_q, int d, const float* keys, long stride, int m,
                    float scale, float* s) {
  for (int i = 0; i < m; ++i) {
    const float* k = keys + i * stride;
    for (int h = 0; h < num_q; ++h)
      s[static_cast<long>(h) * m + i] = scale * DotPortable(q + h * d, k, d);
  }
}

void AccumulatePortable(const float* p, int num_q, int d, const float* values, long stride, int m,
                        float* acc) {
  for (int i = 0; i < m; ++i) {
    const float* v = values + i * stride;
    for (int h = 0; h < num_q; ++h) {
      const float w = p[static_cast<long>(h) * m + i];
      float* a = acc + h * d;
      for (int j = 0; j < d; ++j) a[j] += w * v[j];
    }
  }
}

__attribute__((target("avx2,fma"))) inline float DotAvx2(const float* a, const float* b, int d) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= d; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float lane[8];
  _mm256_store_ps(lane, acc);
  for (int j = 0; i < d; ++i, ++j) lane[j] += a[i] * b[i];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

__attribute__((target("avx2,fma"))) void ScoresAvx2(const float* q, int num_q, int d,
                                                    const float* keys, long stride, int m,
                                                    float scale, float* s) {
  for (int i = 0; i < m; ++i) {
    const float* k = keys + i * stride;
    for (int h = 0; h < num_q; ++h)
      s[static_cast<long>(h) * m + i] = scale * DotAvx2(q + h * d, k, d);
  }
}

__attribute__((target("avx2,fma"))) void AccumulateAvx2(const float* p, int num_q, int d,
                                                        const float* values, long stride, int m,
                                                        float* acc) {
  for (int i = 0; i < m; ++i) {
    const float* v = values + i * stride;
    for (int h = 0; h < num_q; ++h) {
      const float w = p[static_cast<long>(h) * m + i];
      const __m256 wv = _mm256_set1_ps(w);
      float* a = acc + h * d;
      int j = 0;
      for (; j + 8 <= d; j += 8) {
        _mm256_storeu_ps(a + j,
                         _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + j), _mm256_loadu_ps(a + j)));
      }
      for (; j < d; ++j) a[j] += w * v[j];
    }
  }
}

struct Kernels {
  ScoresFn scores;
  AccumulateFn accumulate;
};

const Kernels& GetKernels() {
  static const Kernels k = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Kernels{&ScoresAvx2, &AccumulateAvx2};
    }
    return Kernels{&ScoresPortable, &AccumulatePortable};
  }();
  return k;
}

}  // namespace

void AttendRows(const float* q, int num_q, int head_dim, const float* keys, long key_stride,
                const float* values, long value_stride, int m, float scale, float* out) {
  const Kernels& k = GetKernels();
  // Per-thread scratch: AttendRows may run on many threads at once and allocates nothing once
  // warm.
  thread_local std::vector<float> scratch;
  const size_t s_size = static_cast<size_t>(num_q) * m;
  const size_t acc_size = static_cast<size_t>(num_q) * head_dim;
  if (scratch.size() < s_size + acc_size + num_q) scratch.resize(s_size + acc_size + num_q);
  float* s = scratch.data();
  float* acc = s + s_size;
  float* sum = acc + acc_size;  // [num_q]

  // Pass 1: scores.
  k.scores(q, num_q, head_dim, keys, key_stride, m, scale, s);
  // Pass 2 (per head): max, then exponentials and their sum in row order.
  for (int h = 0; h < num_q; ++h) {
    float* sh = s + static_cast<long>(h) * m;
    float mx = sh[0];
    for (int i = 1; i < m; ++i) mx = std::fmax(mx, sh[i]);
    float total = 0.0f;
    for (int i = 0; i < m; ++i) {
      sh[i] = std::exp(sh[i] - mx);
      total += sh[i];
    }
    sum[h] = total;
  }
  // Weighted sum of values in row order, then normalise.
  std::memset(acc, 0, acc_size * sizeof(float));
  k.accumulate(s, num_q, head_dim, values, value_stride, m, acc);
  for (int h = 0; h < num_q; ++h) {
    for (int j = 0; j < head_dim; ++j) {
      out[static_cast<long>(h) * head_dim + j] = acc[static_cast<long>(h) * head_dim + j] / sum[h];
    }
  }
}

}  // namespace kvrecall::worker
