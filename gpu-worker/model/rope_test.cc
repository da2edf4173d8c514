#include "gpu-worker/model/rope.h"

#include <cmath>
#include <numbers>
#include <vector>

#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

TEST(RopeTest, InverseFrequenciesUnscaled) {
  // head_dim 4, theta 10000: [10000^0, 10000^(-2/4)] = [1, 0.01].
  const std::vector<double> inv = RopeInverseFrequencies(4, 10000.0, RopeScaling{});
  ASSERT_EQ(inv.size(), 2u);
  EXPECT_DOUBLE_EQ(inv[0], 1.0);
  EXPECT_DOUBLE_EQ(inv[1], 0.01);
}

TEST(RopeTest, RotatesHalvesAtPositionsOneAndTwo) {
  const std::vector<double> inv = RopeInverseFrequencies(4, 10000.0, RopeScaling{});
  // Pairs are (x0, x2) at angle pos * 1 and (x1, x3) at angle pos * 0.01.
  struct Case {
    int pos;
    double c0, s0, c1, s1;  // cos/sin of pos * 1 and pos * 0.01, by hand
  };
  const Case cases[] = {
      {1, 0.5403023058681398, 0.8414709848078965, 0.9999500004166653, 0.009999833334166664},
      {2, -0.4161468365471424, 0.9092974268256817, 0.9998000066665778, 0.01999866669333308},
  };
  for (const Case& c : cases) {
    float x[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    ApplyRope(x, 1, 4, inv, c.pos);
    EXPECT_NEAR(x[0], 1 * c.c0 - 3 * c.s0, 1e-6) << c.pos;
    EXPECT_NEAR(x[2], 3 * c.c0 + 1 * c.s0, 1e-6) << c.pos;
    EXPECT_NEAR(x[1], 2 * c.c1 - 4 * c.s1, 1e-6) << c.pos;
    EXPECT_NEAR(x[3], 4 * c.c1 + 2 * c.s1, 1e-6) << c.pos;
  }
  // Position 1 written out: [-1.98411065, 1.95990067, 2.46237790, 4.01979967].
  float x[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  ApplyRope(x, 1, 4, inv, 1);
  EXPECT_NEAR(x[0], -1.9841106485555497, 1e-6);
  EXPECT_NEAR(x[1], 1.959900667496664, 1e-6);
  EXPECT_NEAR(x[2], 2.4623779024123159, 1e-6);
  EXPECT_NEAR(x[3], 4.019799668334994, 1e-6);
}

TEST(RopeTest, AppliesSameRotationToEveryHeadAndPositionZeroIsIdentity) {
  const std::vector<double> inv = RopeInverseFrequencies(8, 500000.0, RopeScaling{});
  std::vector<float> x(3 * 8);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 8) - 3.5f;
  std::vector<float> y = x;
  ApplyRope(y.data(), 3, 8, inv, 0);
  EXPECT_EQ(x, y);
  ApplyRope(y.data(), 3, 8, inv, 77);
  for (int h = 1; h < 3; ++h) {
    for (int i = 0; i < 8; ++i) EXPECT_EQ(y[h * 8 + i], y[i]);
  }
}

TEST(RopeTest, Llama3ScaledInverseFrequencies) {
  // Llama-3.1: head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192.
  RopeScaling s;
  s.type = RopeScaling::Type::kLlama3;
  s.factor = 8;
  s.low_freq_factor = 1;
  s.high_freq_factor = 4;
  s.original_max_position_embeddings = 8192;
  const std::vector<double> inv = RopeInverseFrequencies(128, 500000.0, s);
  const std::vector<double> base = RopeInverseFrequencies(128, 500000.0, RopeScaling{});
  ASSERT_EQ(inv.size(), 64u);
  // Thresholds: low_freq_wavelen = 8192 / 1, high_freq_wavelen = 8192 / 4 = 2048.
  // i = 0: wavelen 2*pi < 2048 -> high frequency, unchanged.
  EXPECT_DOUBLE_EQ(inv[0], 1.0);
  // i = 20: base = 500000^(-40/128) = 0.016560440..., wavelen = 379.4 < 2048 -> unchanged.
  EXPECT_NEAR(base[20], 0.016560440080994446, 1e-15);
  EXPECT_DOUBLE_EQ(inv[20], base[20]);
  // i = 63: base = 500000^(-126/128) = 2.455140791e-6, wavelen 2.56e6 > 8192 -> divided by 8.
  EXPECT_NEAR(inv[63], 2.455140791131609e-06 / 8, 1e-20);
  // i = 30: base = 500000^(-60/128), wavelen = 2*pi/base in (2048, 8192] -> smoothed:
  //   smooth = (8192 / wavelen - 1) / (4 - 1); f = (1 - smooth) * base / 8 + smooth * base.
  const double b30 = std::pow(500000.0, -60.0 / 128);
  const double wl30 = 2 * std::numbers::pi / b30;
  ASSERT_GT(wl30, 2048.0);
  ASSERT_LT(wl30, 8192.0);
  const double smooth = (8192.0 / wl30 - 1.0) / 3.0;
  EXPECT_NEAR(inv[30], (1 - smooth) * b30 / 8 + smooth * b30, 1e-18);
  // Numerically: base 0.00213112, wavelen 2948.30, smooth 0.592849, f 0.00137189357.
  EXPECT_NEAR(b30, 0.0021311195369119653, 1e-15);
  EXPECT_NEAR(inv[30], 0.0013718935677611381, 1e-15);
  // Monotone non-increasing across the bands.
  for (int i = 1; i < 64; ++i) EXPECT_LE(inv[i], inv[i - 1]) << i;
}

TEST(RopeTest, CosSinAtLargePositionUsesDoubleAngles) {
  const std::vector<double> inv = {1.0};
  float c, s;
  RopeCosSin(inv, 100000, &c, &s);
  EXPECT_NEAR(c, std::cos(100000.0), 1e-7);
  EXPECT_NEAR(s, std::sin(100000.0), 1e-7);
}

}  // namespace
}  // namespace kvrecall::worker
