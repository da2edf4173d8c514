#include "gpu-worker/backends/attention.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

std::vector<float> Random(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  for (auto& x : v) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = scale * static_cast<float>(static_cast<int64_t>(seed >> 40) - (1 << 23)) / (1 << 23);
  }
  return v;
}

TEST(AttentionTest, MatchesNaiveSoftmaxWithStrides) {
  const int num_q = 3, d = 20, m = 37;
  const long ks = 2 * d + 4, vs = d + 1;  // rows interleaved with other data
  const std::vector<float> q = Random(num_q * d, 1, 1.0f);
  const std::vector<float> keys = Random(m * ks, 2, 1.0f);
  const std::vector<float> values = Random(m * vs, 3, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> out(num_q * d);
  AttendRows(q.data(), num_q, d, keys.data(), ks, values.data(), vs, m, scale, out.data());
  for (int h = 0; h < num_q; ++h) {
    std::vector<double> s(m);
    double mx = -1e300, sum = 0;
    for (int i = 0; i < m; ++i) {
      double dot = 0;
      for (int j = 0; j < d; ++j) dot += double{q[h * d + j]} * keys[i * ks + j];
      s[i] = dot * scale;
      mx = std::max(mx, s[i]);
    }
    for (int i = 0; i < m; ++i) sum += (s[i] = std::exp(s[i] - mx));
    for (int j = 0; j < d; ++j) {
      double o = 0;
      for (int i = 0; i < m; ++i) o += s[i] / sum * values[i * vs + j];
      EXPECT_NEAR(out[h * d + j], o, 1e-5) << h << "," << j;
    }
  }
}

TEST(AttentionTest, SingleRowReturnsItsValueAndLargeScoresStayFinite) {
  const int d = 8;
  std::vector<float> q(2 * d, 1000.0f), k(d, 1000.0f), v(d);
  for (int j = 0; j < d; ++j) v[j] = j - 3.0f;
  std::vector<float> out(2 * d);
  AttendRows(q.data(), 2, d, k.data(), d, v.data(), d, 1, 1.0f, out.data());
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < d; ++j) EXPECT_EQ(out[h * d + j], v[j]);
  }
  // Scores around 8e6: the naive exp would overflow; the stable softmax picks the max row.
  std::vector<float> k2(2 * d, 1000.0f), v2(2 * d, 0.0f);
  k2[0] = 999.0f;
  for (int j = 0; j < d; ++j) v2[d + j] = 5.0f;
  AttendRows(q.data(), 1, d, k2.data(), d, v2.data(), d, 2, 1.0f, out.data());
  for (int j = 0; j < d; ++j) EXPECT_EQ(out[j], 5.0f);
}

TEST(AttentionTest, DeterministicRunToRun) {
  const int num_q = 4, d = 64, m = 1000;
  const std::vector<float> q = Random(num_q * d, 5, 2.0f);
  const std::vector<float> k = Random(m * d, 6, 2.0f);
  const std::vector<float> v = Random(m * d, 7, 1.0f);
  std::vector<float> a(num_q * d), b(num_q * d);
  AttendRows(q.data(), num_q, d, k.data(), d, v.data(), d, m, 0.125f, a.data());
  AttendRows(q.data(), num_q, d, k.data(), d, v.data(), d, m, 0.125f, b.data());
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace kvrecall::worker
