#include "common/dtype.h"

#include <cmath>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(DTypeTest, Bf16RoundTripsExactValues) {
  for (float f : {0.0f, 1.0f, -2.0f, 0.5f, 3.0f, 1024.0f, -0.125f}) {
    EXPECT_EQ(Bf16ToF32(F32ToBf16(f)), f);
  }
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly half-way between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3*2^-8 is half-way between 1+2^-7 and 1+2^-6: ties to even (1 + 2^-6).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
}

TEST(DTypeTest, F16MatchesHandComputedBits) {
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F32ToF16(-2.0f), 0xc000);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x3555), 0.333251953125f);
  for (int i = 0; i < 0x7c00; i += 7) EXPECT_EQ(F32ToF16(F16ToF32(i)), i) << i;
}

TEST(DTypeTest, ParseNames) {
  EXPECT_EQ(*ParseDType("bf16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("float32"), DType::kF32);
  EXPECT_THAT(ParseDType("int8"), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall
