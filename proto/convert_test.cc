#include "proto/convert.h"

#include <bit>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::proto {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

TEST(ConvertTest, SlotsAndIdsRoundTrip) {
  std::string packed;
  PackSlots({0, 1, 255, 256, 65535}, &packed);
  EXPECT_EQ(packed.size(), 10u);
  std::vector<int32_t> slots;
  ASSERT_OK(UnpackSlots(packed, &slots));
  EXPECT_THAT(slots, ElementsAre(0, 1, 255, 256, 65535));
  PackInt32s({-1, 7, 1 << 30}, &packed);
  std::vector<int32_t> ids;
  ASSERT_OK(UnpackInt32s(packed, &ids));
  EXPECT_THAT(ids, ElementsAre(-1, 7, 1 << 30));
  EXPECT_THAT(UnpackSlots("abc", &slots), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(UnpackInt32s("abcdef", &ids), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(ConvertTest, ExactBf16QueriesTravelAsBf16AndComeBackBitExact) {
  const std::vector<float> exact = {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, std::bit_cast<float>(uint32_t{0x7f7f0000}),
                                    std::numeric_limits<float>::infinity(),
                                    std::bit_cast<float>(uint32_t{0x3f810000})};
  std::string packed;
  ASSERT_TRUE(PackExactBf16(exact, &packed));
  EXPECT_EQ(packed.size(), 2 * exact.size());
  std::vector<float> back = {42.0f};  // appended to
  ASSERT_OK(AppendBf16AsF32(packed, &back));
  ASSERT_EQ(back.size(), exact.size() + 1);
  EXPECT_EQ(back[0], 42.0f);
  for (size_t i = 0; i < exact.size(); ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(back[i + 1]), std::bit_cast<uint32_t>(exact[i])) << i;
  }
  // One value that bf16 cannot hold exactly keeps the whole entry in fp32.
  EXPECT_FALSE(PackExactBf16({1.0f, 0.1f}, &packed));
  EXPECT_FALSE(PackExactBf16({std::bit_cast<float>(uint32_t{0x3f800001})}, &packed));
  EXPECT_TRUE(PackExactBf16({}, &packed));
  EXPECT_TRUE(packed.empty());
  EXPECT_THAT(AppendBf16AsF32("abc", &back), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ConvertTest, LongBf16ArraysRoundTripAndOneInexactValueAnywhereKeepsFp32) {
  // Lengths around vector widths, with a tail; a query block is [group][head_dim].
  for (size_t n : {size_t{15}, size_t{16}, size_t{17}, size_t{512}, size_t{1031}}) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i)
      v[i] = std::bit_cast<float>(static_cast<uint32_t>(0x3c000000u + i * 0x10000u));
    std::string packed;
    ASSERT_TRUE(PackExactBf16(v, &packed)) << n;
    std::vector<float> back;
    ASSERT_OK(AppendBf16AsF32(packed, &back));
    ASSERT_EQ(back.size(), n);
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(back[i]), std::bit_cast<uint32_t>(v[i])) << i;
    for (size_t at : {size_t{0}, n / 2, n - 1}) {
      std::vector<float> w = v;
      w[at] = std::bit_cast<float>(std::bit_cast<uint32_t>(w[at]) | 1u);
      EXPECT_FALSE(PackExactBf16(w, &packed)) << n << " " << at;
    }
  }
}

}  // namespace
}  // namespace kvrecall::proto
