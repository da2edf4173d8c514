#include "gpu-worker/backends/cpu/internal/gemm.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/thread_pool.h"
#include "gtest/gtest.h"

namespace kvrecall::worker::internal {
namespace {

std::vector<float> Random(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (auto& x : v) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<float>(static_cast<int64_t>(seed >> 40) - (1 << 23)) / (1 << 23);
  }
  return v;
}

class GemmTest : public ::testing::TestWithParam<CpuIsa> {};

TEST_P(GemmTest, MatchesDoubleReferenceWithBiasAndAccumulate) {
  const CpuIsa isa = GetParam();
  if (isa == CpuIsa::kAvx2Fma && DetectCpuIsa() != CpuIsa::kAvx2Fma) GTEST_SKIP();
  ThreadPool pool(2);
  for (int n : {1, 5, 6, 7, 50, 97}) {
    for (int rows : {1, 16, 37}) {
      const int cols = 29;
      const long ldx = cols + 3, ldy = rows + 5;
      const std::vector<float> x = Random(n * ldx, 1 + n);
      const std::vector<float> w = Random(rows * cols, 2 + rows);
      const std::vector<float> bias = Random(rows, 3);
      const PackedWeight pw(w.data(), rows, cols);
      std::vector<float> y0 = Random(n * ldy, 4);
      std::vector<float> y = y0;
      Gemm(&pool, isa, x.data(), n, ldx, pw, bias.data(), /*accumulate=*/true, y.data(), ldy);
      std::vector<float> z(n * ldy, -7.0f);
      Gemm(nullptr, isa, x.data(), n, ldx, pw, nullptr, /*accumulate=*/false, z.data(), ldy);
      for (int i = 0; i < n; ++i) {
        for (int j = 0; j < ldy; ++j) {
          if (j >= rows) {  // untouched padding columns
            EXPECT_EQ(y[i * ldy + j], y0[i * ldy + j]);
            EXPECT_EQ(z[i * ldy + j], -7.0f);
            continue;
          }
          double ref = 0;
          for (int k = 0; k < cols; ++k) ref += double{x[i * ldx + k]} * w[j * cols + k];
          EXPECT_NEAR(z[i * ldy + j], ref, 1e-5);
          EXPECT_NEAR(y[i * ldy + j], ref + bias[j] + y0[i * ldy + j], 2e-5);
        }
      }
    }
  }
}

TEST_P(GemmTest, RowsAreBitwiseIndependentOfBatchAndThreads) {
  const CpuIsa isa = GetParam();
  if (isa == CpuIsa::kAvx2Fma && DetectCpuIsa() != CpuIsa::kAvx2Fma) GTEST_SKIP();
  const int n = 133, rows = 70, cols = 300;
  const std::vector<float> x = Random(n * cols, 11);
  const std::vector<float> w = Random(rows * cols, 12);
  const PackedWeight pw(w.data(), rows, cols);
  ThreadPool pool(3);
  std::vector<float> batch(n * rows), serial(n * rows), single(rows);
  Gemm(&pool, isa, x.data(), n, cols, pw, nullptr, false, batch.data(), rows);
  Gemm(nullptr, isa, x.data(), n, cols, pw, nullptr, false, serial.data(), rows);
  EXPECT_EQ(batch, serial);
  for (int i : {0, 5, 6, 47, 48, 132}) {
    Gemm(&pool, isa, x.data() + i * cols, 1, cols, pw, nullptr, false, single.data(), rows);
    for (int j = 0; j < rows; ++j) ASSERT_EQ(single[j], batch[i * rows + j]) << i << "," << j;
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, GemmTest, ::testing::Values(CpuIsa::kPortable, CpuIsa::kAvx2Fma),
                         [](const auto& info) {
                           return std::string(CpuIsaName(info.param)) == "portable" ? "Portable"
                                                                                    : "Avx2Fma";
                         });

}  // namespace
}  // namespace kvrecall::worker::internal
