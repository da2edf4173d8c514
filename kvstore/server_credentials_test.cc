#include "kvstore/server_credentials.h"

#include <fstream>
#include <string>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(ServerCredentialsTest, LoopbackAddresses) {
  EXPECT_TRUE(IsLoopbackListen("127.0.0.1:0"));
  EXPECT_TRUE(IsLoopbackListen("127.3.2.1:7070"));
  EXPECT_TRUE(IsLoopbackListen("localhost:7070"));
  EXPECT_TRUE(IsLoopbackListen("[::1]:7070"));
  EXPECT_FALSE(IsLoopbackListen("0.0.0.0:7070"));
  EXPECT_FALSE(IsLoopbackListen("[::]:7070"));
  EXPECT_FALSE(IsLoopbackListen("10.0.0.5:7070"));
  EXPECT_FALSE(IsLoopbackListen("kvrecall-0.kvrecall:7070"));
  EXPECT_FALSE(IsLoopbackListen("localhost.evil.example:7070"));
}

TEST(ServerCredentialsTest, PlaintextOnlyOnLoopbackOrWhenAllowed) {
  EXPECT_OK(MakeServerCredentials({}, "127.0.0.1:0").status());
  EXPECT_THAT(MakeServerCredentials({}, "0.0.0.0:7070"), StatusIs(absl::StatusCode::kFailedPrecondition));
  ServerTlsOptions allow;
  allow.allow_plaintext = true;
  EXPECT_OK(MakeServerCredentials(allow, "0.0.0.0:7070").status());
}

TEST(ServerCredentialsTest, BadFlagCombinationsAndFiles) {
  const std::string dir = ::testing::TempDir();
  const std::string junk = dir + "/junk.pem", pem = dir + "/fake.pem";
  std::ofstream(junk) << "not a certificate";
  std::ofstream(pem) << "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
  EXPECT_THAT(MakeServerCredentials({pem, "", "", false}, "127.0.0.1:0"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MakeServerCredentials({"", pem, "", false}, "127.0.0.1:0"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MakeServerCredentials({"", "", pem, true}, "127.0.0.1:0"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MakeServerCredentials({dir + "/missing.pem", pem, "", false}, "127.0.0.1:0"),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(MakeServerCredentials({junk, pem, "", false}, "127.0.0.1:0"),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(MakeServerCredentials({pem, pem, junk, false}, "127.0.0.1:0"),
              StatusIs(absl::StatusCode::kDataLoss));
}

}  // namespace
}  // namespace kvrecall::kvstore
