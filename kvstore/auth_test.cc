#include "kvstore/auth.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr char kTokenA[] = "tok-a-0123456789abcdef";
constexpr char kTokenA2[] = "tok-a2-0123456789abcdef";
constexpr char kTokenB[] = "tok-b-0123456789abcdef";
constexpr char kAdmin[] = "admin-0123456789abcdef";

std::string Bearer(const std::string& t) { return "Bearer " + t; }

TEST(TokenTableTest, ParsesTenantsAdminsAndLimits) {
  ASSERT_OK_AND_ASSIGN(TokenTable t, ParseTokenTable(absl::StrCat(
                                         "# comment\n\ntenant a ", kTokenA, "  # trailing\n", "tenant a ", kTokenA2,
                                         "\n", "tenant\tb\t", kTokenB, "\r\n", "admin ", kAdmin, "\n",
                                         "limits a stored_bytes=1MiB sequences=3 requests_per_s=2.5 arena_ingest=true\n")));
  ASSERT_EQ(t.tokens.size(), 4u);
  EXPECT_EQ(t.tokens[0].principal.tenant, "a");
  EXPECT_EQ(t.tokens[1].principal.tenant, "a");
  EXPECT_EQ(t.tokens[2].principal.tenant, "b");
  EXPECT_TRUE(t.tokens[3].principal.admin);
  const TenantLimits& l = t.limits.at("a");
  EXPECT_EQ(l.stored_bytes, 1 << 20);
  EXPECT_EQ(l.sequences, 3);
  EXPECT_DOUBLE_EQ(l.requests_per_s, 2.5);
  EXPECT_TRUE(l.arena_ingest);
  EXPECT_EQ(t.limits.count("b"), 0u);
}

TEST(TokenTableTest, RejectsMalformedFilesNamingTheLine) {
  const std::string a = absl::StrCat("tenant a ", kTokenA, "\n");
  for (const std::string& bad : {
           std::string(""),                                         // no token at all
           std::string("# only a comment\n"),                       //
           std::string("tenant a short\n"),                         // token too short
           absl::StrCat("tenant a ", kTokenA, " extra\n"),          // extra field
           absl::StrCat("tenant a tok-with-a-\"quote\"-0123456\n"),  // bad token characters
           absl::StrCat(a, "tenant b ", kTokenA, "\n"),              // one token, two tenants
           absl::StrCat(a, "limits c sequences=1\n"),                // limits without a token
           absl::StrCat(a, "limits a sequences=0\n"),                // 0 is not a limit
           absl::StrCat(a, "limits a sequences=x\n"),                //
           absl::StrCat(a, "limits a stored_bytes=lots\n"),          //
           absl::StrCat(a, "limits a requests_per_s=nan\n"),         //
           absl::StrCat(a, "limits a colour=blue\n"),                // unknown key
           absl::StrCat(a, "limits a sequences\n"),                  // not KEY=VALUE
           absl::StrCat(a, "limits a sequences=1\nlimits a sequences=2\n"),
           absl::StrCat(a, "user a ", kTokenB, "\n"),                // unknown directive
       }) {
    EXPECT_THAT(ParseTokenTable(bad), StatusIs(absl::StatusCode::kInvalidArgument)) << bad;
  }
  EXPECT_THAT(ParseTokenTable(absl::StrCat(a, "limits a colour=blue\n")).status().message(), HasSubstr("line 2"));
}

class AuthenticatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ::testing::TempDir() + "/auth_test_" + std::to_string(::getpid()) + ".tokens";
    Write(absl::StrCat("tenant a ", kTokenA, "\ntenant b ", kTokenB, "\nadmin ", kAdmin,
                       "\nlimits b requests_per_s=5 sequences=2\n"));
  }
  void TearDown() override { std::filesystem::remove(path_); }
  void Write(const std::string& text) { std::ofstream(path_, std::ios::trunc) << text; }

  std::string path_;
  FakeClock clock_;
};

TEST_F(AuthenticatorTest, BearerTokensNameTheirTenantAndNothingElsePasses) {
  ASSERT_OK_AND_ASSIGN(auto auth, Authenticator::Open(path_, &clock_, absl::Seconds(10)));
  ASSERT_OK_AND_ASSIGN(Principal a, auth->Authenticate(Bearer(kTokenA)));
  EXPECT_EQ(a.tenant, "a");
  EXPECT_FALSE(a.admin);
  ASSERT_OK_AND_ASSIGN(Principal admin, auth->Authenticate(Bearer(kAdmin)));
  EXPECT_TRUE(admin.admin);
  for (const std::string& bad :
       {std::string(), std::string(kTokenA), std::string("Bearer "), std::string("Basic ") + kTokenA,
        Bearer(std::string(kTokenA) + "x"), Bearer(std::string(kTokenA).substr(1)), Bearer("tok-a-0123456789abcdeF"),
        std::string("bearer ") + kTokenA}) {
    EXPECT_THAT(auth->Authenticate(bad), StatusIs(absl::StatusCode::kUnauthenticated)) << bad;
  }
  EXPECT_EQ(auth->LimitsOf("b").sequences, 2);
  EXPECT_EQ(auth->LimitsOf("a").sequences, 0);
  EXPECT_EQ(auth->LimitsOf("nobody").stored_bytes, 0);
}

TEST_F(AuthenticatorTest, RateLimitTripsExactlyAtItsBudgetAndRefills) {
  ASSERT_OK_AND_ASSIGN(auto auth, Authenticator::Open(path_, &clock_, absl::Seconds(10)));
  for (int i = 0; i < 5; ++i) EXPECT_OK(auth->AdmitRequest("b")) << i;
  EXPECT_THAT(auth->AdmitRequest("b"), StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Milliseconds(199));
  EXPECT_THAT(auth->AdmitRequest("b"), StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Milliseconds(1));  // 0.2 s at 5/s: one request
  EXPECT_OK(auth->AdmitRequest("b"));
  EXPECT_THAT(auth->AdmitRequest("b"), StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Seconds(60));  // refills to the burst, not beyond
  for (int i = 0; i < 5; ++i) EXPECT_OK(auth->AdmitRequest("b")) << i;
  EXPECT_THAT(auth->AdmitRequest("b"), StatusIs(absl::StatusCode::kResourceExhausted));
  // Another tenant has its own budget (here: none).
  for (int i = 0; i < 100; ++i) ASSERT_OK(auth->AdmitRequest("a"));
}

TEST_F(AuthenticatorTest, ReloadsAChangedFileAndKeepsTheOldTableOnABadOne) {
  ASSERT_OK_AND_ASSIGN(auto auth, Authenticator::Open(path_, &clock_, absl::Seconds(10)));
  std::vector<std::string> revoked;
  auth->SetRevokeHook([&revoked](const std::string& t) { revoked.push_back(t); });
  // b's token rotates to a new one; a is removed.
  constexpr char kNewB[] = "tok-b-rotated-0123456789";
  Write(absl::StrCat("tenant b ", kNewB, "\nlimits b sequences=7\n"));
  clock_.Advance(absl::Seconds(9));
  EXPECT_OK(auth->Authenticate(Bearer(kTokenA)));  // not re-read yet
  clock_.Advance(absl::Seconds(1));
  EXPECT_THAT(auth->Authenticate(Bearer(kTokenA)), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(auth->Authenticate(Bearer(kTokenB)), StatusIs(absl::StatusCode::kUnauthenticated));
  ASSERT_OK_AND_ASSIGN(Principal b, auth->Authenticate(Bearer(kNewB)));
  EXPECT_EQ(b.tenant, "b");
  EXPECT_EQ(auth->LimitsOf("b").sequences, 7);
  EXPECT_EQ(auth->reloads(), 1);
  // a lost its only token: its sessions end; b only rotated its token.
  EXPECT_EQ(revoked, std::vector<std::string>{"a"});
  // A broken file is not applied: the previous tokens stay in force.
  Write("tenant b short\n");
  clock_.Advance(absl::Seconds(10));
  EXPECT_OK(auth->Authenticate(Bearer(kNewB)));
  EXPECT_THAT(auth->Reload(), StatusIs(absl::StatusCode::kInvalidArgument));
  std::filesystem::remove(path_);
  EXPECT_THAT(auth->Reload(), StatusIs(absl::StatusCode::kNotFound));
  clock_.Advance(absl::Seconds(10));
  EXPECT_OK(auth->Authenticate(Bearer(kNewB)));
  EXPECT_EQ(auth->reloads(), 1);
  EXPECT_EQ(revoked.size(), 1u);
}

TEST_F(AuthenticatorTest, OpenFailsOnAMissingOrMalformedFile) {
  EXPECT_THAT(Authenticator::Open(path_ + ".missing", &clock_, absl::Seconds(1)),
              StatusIs(absl::StatusCode::kNotFound));
  Write("tenant a\n");
  EXPECT_THAT(Authenticator::Open(path_, &clock_, absl::Seconds(1)), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::kvstore
