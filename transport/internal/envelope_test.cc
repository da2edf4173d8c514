#include "transport/internal/envelope.h"

#include <string>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::transport::internal {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(EnvelopeTest, RoundTrip) {
  const std::string sealed = SealBlob(BlobKind::kRkey, "payload", 42);
  EXPECT_EQ(sealed.size(), kEnvelopeHeaderBytes + 7);
  ASSERT_OK_AND_ASSIGN(absl::string_view payload, OpenBlob(BlobKind::kRkey, sealed, 42));
  EXPECT_EQ(payload, "payload");
}

TEST(EnvelopeTest, RejectsDamage) {
  const std::string sealed = SealBlob(BlobKind::kWorkerAddress, "0123456789", 0);
  for (size_t i = 0; i < sealed.size(); ++i) {
    std::string damaged = sealed;
    damaged[i] ^= 0x10;
    EXPECT_THAT(OpenBlob(BlobKind::kWorkerAddress, damaged, 0),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "byte " << i;
  }
  for (size_t n = 0; n < sealed.size(); ++n) {
    EXPECT_THAT(OpenBlob(BlobKind::kWorkerAddress, sealed.substr(0, n), 0),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "length " << n;
  }
  EXPECT_THAT(OpenBlob(BlobKind::kWorkerAddress, sealed + "x", 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(OpenBlob(BlobKind::kRkey, sealed, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(OpenBlob(BlobKind::kWorkerAddress, sealed, 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(EnvelopeTest, BindingTiesRkeyToRegion) {
  EXPECT_NE(RegionBinding(4096, 100), RegionBinding(4096, 101));
  EXPECT_NE(RegionBinding(4096, 100), RegionBinding(8192, 100));
}

}  // namespace
}  // namespace kvrecall::transport::internal
