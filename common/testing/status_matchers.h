// gMock matchers for absl::Status / absl::StatusOr (Debian's Abseil lacks them).
//   EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(s, IsOk());
//   ASSERT_OK(s); ASSERT_OK_AND_ASSIGN(auto v, MakeV());
#ifndef KVRECALL_COMMON_TESTING_STATUS_MATCHERS_H_
#define KVRECALL_COMMON_TESTING_STATUS_MATCHERS_H_

#include <ostream>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER_P(StatusIs, code, "has status code " + absl::StatusCodeToString(code)) {
  const absl::Status& s = ::kvrecall::testing::GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code;
}

// The code and a matcher of the message: StatusIs(kInvalidArgument, HasSubstr("NaN")).
MATCHER_P2(StatusIs, code, message,
           "has status code " + absl::StatusCodeToString(code) + " and a matching message") {
  const absl::Status& s = ::kvrecall::testing::GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code && ::testing::Matches(message)(std::string(s.message()));
}

MATCHER(IsOk, "is OK") {
  const absl::Status& s = ::kvrecall::testing::GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.ok();
}

}  // namespace kvrecall::testing

#define ASSERT_OK(expr) ASSERT_THAT((expr), ::kvrecall::testing::IsOk())
#define EXPECT_OK(expr) EXPECT_THAT((expr), ::kvrecall::testing::IsOk())
#define ASSERT_OK_AND_ASSIGN(lhs, expr)                                         \
  auto KVRECALL_TEST_CONCAT_(_so_, __LINE__) = (expr);                           \
  ASSERT_THAT(KVRECALL_TEST_CONCAT_(_so_, __LINE__), ::kvrecall::testing::IsOk()); \
  lhs = std::move(KVRECALL_TEST_CONCAT_(_so_, __LINE__)).value()
#define KVRECALL_TEST_CONCAT_INNER_(a, b) a##b
#define KVRECALL_TEST_CONCAT_(a, b) KVRECALL_TEST_CONCAT_INNER_(a, b)

#endif  // KVRECALL_COMMON_TESTING_STATUS_MATCHERS_H_
