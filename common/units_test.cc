#include "common/units.h"

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(UnitsTest, ParsesSizes) {
  EXPECT_EQ(*ParseBytes("1024"), 1024);
  EXPECT_EQ(*ParseBytes("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*ParseBytes("8G"), int64_t{8} << 30);
  EXPECT_EQ(*ParseBytes(" 2gib "), int64_t{2} << 30);
  EXPECT_THAT(ParseBytes("0"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseBytes("12XB"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseBytes("-5"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseBytes("99999999999999999T"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
}

}  // namespace
}  // namespace kvrecall
