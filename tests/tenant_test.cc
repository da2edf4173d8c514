// Tenants against a real kvrecall-server run with --tenant-tokens (issue 9 item 2): clients without
// a token, with a wrong one or with another tenant's get UNAUTHENTICATED / NOT_FOUND and nothing
// else; quotas trip exactly at their limits; a rotated token file applies without a restart;
// prefix sharing is invisible across tenants; kvrecallctl shows a tenant only its own usage and
// drains only with an admin token; the arena's transport key goes only to trusted tenants.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tier.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

constexpr char kTokenA[] = "tenant-a-token-0123456789";
constexpr char kTokenB[] = "tenant-b-token-0123456789";
constexpr char kTokenC[] = "tenant-c-token-0123456789";
constexpr char kAdmin[] = "operator-token-0123456789";
constexpr int kLayers = 2, kKvHeads = 1, kHeadDim = 8;
// Logical bytes per token of Spec(): layers x (K + V) x kv-heads x head_dim x 2 (bf16).
constexpr int64_t kTokenBytes = kLayers * 2 * kKvHeads * kHeadDim * 2;

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "tenant-model";
  s.num_layers = kLayers;
  s.num_q_heads = 2;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kHeadDim;
  s.kv_dtype = DType::kBF16;
  s.vocab_size = 1000;
  return s;
}

client::AppendBatch Batch(int64_t start, int64_t n, bool with_ids) {
  std::mt19937 rng(static_cast<uint32_t>(start * 7 + n));
  client::AppendBatch b;
  b.token_start = start;
  b.num_tokens = n;
  if (with_ids) {
    for (int64_t i = 0; i < n; ++i) b.token_ids.push_back(static_cast<int32_t>(start + i + 1));
  }
  for (int l = 0; l < kLayers; ++l) {
    std::string k(static_cast<size_t>(kKvHeads * n * kHeadDim * 2), '\0'), v = k;
    for (char& c : k) c = static_cast<char>(rng() & 0x3f);  // small finite bf16 values
    for (char& c : v) c = static_cast<char>(rng() & 0x3f);
    b.keys.push_back(std::move(k));
    b.values.push_back(std::move(v));
  }
  return b;
}

std::vector<int32_t> Prompt(int n, int32_t first = 1) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) p[static_cast<size_t>(i)] = first + i;
  return p;
}

class TenantTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = absl::StrCat(::testing::TempDir(), "/tenant_test.", getpid(), ".",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    WriteTokens(absl::StrCat("tenant a ", kTokenA, "\ntenant b ", kTokenB, "\ntenant c ", kTokenC, "\nadmin ",
                             kAdmin, "\nlimits b sequences=2 stored_bytes=", 40 * kTokenBytes,
                             "\nlimits c requests_per_s=0.5\nlimits a arena_ingest=true\n"));
    for (const auto& [name, token] : std::vector<std::pair<std::string, std::string>>{
             {"a", kTokenA}, {"b", kTokenB}, {"c", kTokenC}, {"admin", kAdmin}, {"wrong", "not-a-token-0123456789"}}) {
      std::ofstream(F(name + ".token")) << token << "\n";
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string F(const std::string& name) const { return dir_ + "/" + name; }
  void WriteTokens(const std::string& text) {
    std::ofstream(F("tokens.tmp")) << text;
    std::filesystem::rename(F("tokens.tmp"), F("tokens"));  // atomically, as a Secret update
  }
  absl::StatusOr<ServerProcess> Start() {
    return StartServer(dir_, {"--memory=16MiB", "--block-tokens=16", "--auto-index=none",
                              "--tenant-tokens=" + F("tokens"), "--tenant-tokens-reload=100ms"});
  }

  // A tier acting for `tenant` with the token in `token_file` (empty: none); over UCX (TCP)
  // when `ucx`, else gRPC only.
  absl::StatusOr<std::unique_ptr<client::Tier>> Connect(const ServerProcess& s, const std::string& tenant,
                                                        const std::string& token_file, bool ucx = false) {
    client::RemoteTierOptions r;
    r.target = s.address();
    r.transport = ucx ? "ucx" : "grpc";
    r.ucx_tls = "tcp";
    r.ingest_min_bytes = 0;
    if (!token_file.empty()) r.tls.token_file = F(token_file);
    client::TierOptions o;
    o.tenant = tenant;
    o.recall_buffer_bytes = 1 << 20;
    o.deadline = absl::Seconds(20);
    return client::CreateRemoteTier(r, o);
  }

  int Ctl(const ServerProcess& s, const std::vector<std::string>& flags, const std::string& command,
          std::string* out = nullptr) {
    std::vector<std::string> argv = {BinDir() + "/kvrecallctl", "--server=" + s.address(), "--timeout-seconds=10"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    argv.push_back(command);
    std::filesystem::remove(F("ctl.log"));
    auto p = Process::Start(argv, F("ctl.log"));
    if (!p.ok()) return -1;
    auto code = p->Wait(absl::Seconds(30));
    if (out != nullptr) *out = ReadFile(F("ctl.log"));
    return code.ok() ? *code : -1;
  }

  std::string dir_;
};

TEST_F(TenantTest, OnlyAValidTokenGetsInAndOnlyToItsOwnSequences) {
  ASSERT_OK_AND_ASSIGN(ServerProcess s, Start());
  ASSERT_OK_AND_ASSIGN(auto a, Connect(s, "a", "a.token"));
  ASSERT_OK(a->RegisterModel(Spec()));
  ASSERT_OK(a->OpenSequence("secret", Spec().model_id, Prompt(40)).status());
  ASSERT_OK(a->AppendKV("secret", Batch(0, 40, false)));

  // No token, a wrong token: every call is UNAUTHENTICATED.
  for (const char* token : {"", "wrong.token"}) {
    ASSERT_OK_AND_ASSIGN(auto t, Connect(s, "a", token));
    EXPECT_THAT(t->RegisterModel(Spec()), StatusIs(absl::StatusCode::kUnauthenticated)) << token;
    EXPECT_THAT(t->CloseSequence("secret", true), StatusIs(absl::StatusCode::kUnauthenticated));
    EXPECT_THAT(t->Stats(true), StatusIs(absl::StatusCode::kUnauthenticated));
  }
  // A UCX worker without a valid token is not even attached (no region, no keys exchanged).
  EXPECT_THAT(Connect(s, "a", "", /*ucx=*/true), StatusIs(absl::StatusCode::kUnauthenticated));

  // b's token claiming to be a: UNAUTHENTICATED. As itself, a's sequence is not there, exactly
  // like a sequence that does not exist.
  ASSERT_OK_AND_ASSIGN(auto b_as_a, Connect(s, "a", "b.token"));
  EXPECT_THAT(b_as_a->CloseSequence("secret", true), StatusIs(absl::StatusCode::kUnauthenticated));
  ASSERT_OK_AND_ASSIGN(auto b, Connect(s, "b", "b.token"));
  ASSERT_OK(b->RegisterModel(Spec()));
  const absl::Status foreign = b->CloseSequence("secret", true);
  const absl::Status unknown = b->CloseSequence("no-such-sequence", true);
  EXPECT_THAT(foreign, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(unknown, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(std::string(foreign.message()).find("secret") != std::string::npos,
            std::string(unknown.message()).find("no-such-sequence") != std::string::npos);
  EXPECT_EQ(foreign.message().size() - std::string("secret").size(),
            unknown.message().size() - std::string("no-such-sequence").size())
      << "the two answers differ only in the id asked for: " << foreign << " / " << unknown;
  kvstore::BuildIndexArgs args;
  args.method = kvstore::Method::kCluster;
  EXPECT_THAT(b->BuildIndex("secret", args), StatusIs(absl::StatusCode::kNotFound));

  // Prefix sharing is per tenant: b opening a's exact prompt matches nothing, as for a prompt
  // nobody stored; a's own second sequence shares it.
  ASSERT_OK_AND_ASSIGN(client::OpenResult rb, b->OpenSequence("mine", Spec().model_id, Prompt(40)));
  ASSERT_OK_AND_ASSIGN(client::OpenResult rb2, b->OpenSequence("fresh", Spec().model_id, Prompt(40, 500)));
  EXPECT_EQ(rb.matched_tokens, 0);
  EXPECT_EQ(rb.matched_tokens, rb2.matched_tokens);
  EXPECT_EQ(rb.stored_tokens, rb2.stored_tokens);
  ASSERT_OK_AND_ASSIGN(client::OpenResult ra, a->OpenSequence("again", Spec().model_id, Prompt(40)));
  EXPECT_EQ(ra.matched_tokens, 32);

  // Stats: a tenant sees itself only; kvrecallctl likewise, and drains only as admin.
  ASSERT_OK_AND_ASSIGN(kvstore::NodeStats bs, b->Stats(true));
  ASSERT_EQ(bs.tenants.size(), 1u);
  EXPECT_EQ(bs.tenants[0].tenant, "b");
  for (const auto& q : bs.sequences) EXPECT_EQ(q.tenant, "b");
  EXPECT_EQ(bs.sequences.size(), 2u);
  EXPECT_EQ(bs.stored_bytes, 0) << "node totals would show other tenants' activity";
  std::string out;
  ASSERT_EQ(Ctl(s, {"--token-file=" + F("b.token"), "--json"}, "sequences", &out), 0) << out;
  EXPECT_EQ(out.find("secret"), std::string::npos) << out;
  EXPECT_NE(out.find("mine"), std::string::npos) << out;
  ASSERT_EQ(Ctl(s, {"--token-file=" + F("admin.token"), "--json"}, "sequences", &out), 0) << out;
  EXPECT_NE(out.find("secret"), std::string::npos) << out;
  EXPECT_NE(Ctl(s, {}, "stats", &out), 0) << out;
  EXPECT_NE(Ctl(s, {"--token-file=" + F("b.token")}, "drain", &out), 0) << out;
  EXPECT_NE(out.find("PERMISSION_DENIED"), std::string::npos) << out;
  EXPECT_EQ(Ctl(s, {"--token-file=" + F("admin.token")}, "drain", &out), 0) << out;
  EXPECT_EQ(Ctl(s, {"--token-file=" + F("admin.token")}, "undrain", &out), 0) << out;
}

TEST_F(TenantTest, QuotasTripExactlyAtTheirLimits) {
  ASSERT_OK_AND_ASSIGN(ServerProcess s, Start());
  ASSERT_OK_AND_ASSIGN(auto b, Connect(s, "b", "b.token"));
  ASSERT_OK(b->RegisterModel(Spec()));
  // sequences=2
  ASSERT_OK(b->OpenSequence("s1", Spec().model_id, Prompt(24)).status());
  ASSERT_OK(b->OpenSequence("s2", Spec().model_id, Prompt(8, 100)).status());
  EXPECT_THAT(b->OpenSequence("s3", Spec().model_id, Prompt(8)), StatusIs(absl::StatusCode::kResourceExhausted));
  // stored_bytes = 40 tokens: 24 + 16 fit exactly, the 41st token does not (nothing stored).
  ASSERT_OK(b->AppendKV("s1", Batch(0, 24, false)));
  ASSERT_OK(b->AppendKV("s2", Batch(0, 8, false)));
  ASSERT_OK(b->AppendKV("s2", Batch(8, 8, true)));
  EXPECT_THAT(b->AppendKV("s2", Batch(16, 1, true)), StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_OK_AND_ASSIGN(kvstore::NodeStats st, b->Stats(true));
  ASSERT_EQ(st.tenants.size(), 1u);
  EXPECT_EQ(st.tenants[0].quota_charged_bytes, 40 * kTokenBytes);
  EXPECT_EQ(st.tenants[0].quota_stored_bytes, 40 * kTokenBytes);
  EXPECT_EQ(st.tenants[0].quota_sequences, 2);
  EXPECT_EQ(st.tenants[0].tokens, 40);
  // Dropping gives both back.
  ASSERT_OK(b->CloseSequence("s1", /*drop=*/true));
  ASSERT_OK(b->AppendKV("s2", Batch(16, 1, true)));
  ASSERT_OK(b->OpenSequence("s3", Spec().model_id, Prompt(8)).status());
  // Another tenant is not limited by b's quotas.
  ASSERT_OK_AND_ASSIGN(auto a, Connect(s, "a", "a.token"));
  ASSERT_OK(a->RegisterModel(Spec()));
  for (int i = 0; i < 4; ++i) ASSERT_OK(a->OpenSequence(absl::StrCat("a", i), Spec().model_id, Prompt(8)).status());

  // requests_per_s=0.5: a burst of one call, then one every 2 s (exact bursts on a fake clock
  // are in kvstore/auth_test.cc; real time here only needs calls much faster than 2 s).
  ASSERT_OK_AND_ASSIGN(auto c, Connect(s, "c", "c.token"));
  EXPECT_OK(c->Stats(false).status());
  EXPECT_THAT(c->Stats(false), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(c->Stats(false), StatusIs(absl::StatusCode::kResourceExhausted));
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  EXPECT_OK(c->Stats(false).status());
}

TEST_F(TenantTest, RotatedTokenFileAppliesWithoutARestart) {
  ASSERT_OK_AND_ASSIGN(ServerProcess s, Start());
  ASSERT_OK_AND_ASSIGN(auto b, Connect(s, "b", "b.token"));
  ASSERT_OK(b->RegisterModel(Spec()));
  // c has a worker attached over UCX; the new file drops c altogether, which ends its session.
  ASSERT_OK_AND_ASSIGN(auto c, Connect(s, "c", "c.token", /*ucx=*/true));
  // b's token is replaced by a new one; the old one stops working, the new one works.
  constexpr char kNewB[] = "tenant-b-rotated-0123456789";
  std::ofstream(F("newb.token")) << kNewB << "\n";
  WriteTokens(absl::StrCat("tenant a ", kTokenA, "\ntenant b ", kNewB, "\n"));
  absl::Status old = absl::OkStatus();
  for (int i = 0; i < 100 && old.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    old = b->Stats(false).status();
  }
  EXPECT_THAT(old, StatusIs(absl::StatusCode::kUnauthenticated));
  ASSERT_OK_AND_ASSIGN(auto nb, Connect(s, "b", "newb.token"));
  EXPECT_OK(nb->Stats(false).status());
  EXPECT_THAT(c->Stats(false), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_NE(ReadFile(F("server.log")).find("tenant 'c' revoked: 1 workers detached"), std::string::npos)
      << ReadFile(F("server.log"));
  // A broken file is ignored: the rotated tokens stay in force.
  WriteTokens("tenant b too-short\n");
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_OK(nb->Stats(false).status());
  EXPECT_NE(ReadFile(F("server.log")).find("not reloaded"), std::string::npos);
}

TEST_F(TenantTest, ArenaIngestOnlyForTrustedTenantsOthersFallBackToAppendKV) {
  ASSERT_OK_AND_ASSIGN(ServerProcess s, Start());
  ASSERT_OK_AND_ASSIGN(auto a, Connect(s, "a", "a.token", /*ucx=*/true));
  ASSERT_OK_AND_ASSIGN(auto b, Connect(s, "b", "b.token", /*ucx=*/true));
  for (client::Tier* t : {a.get(), b.get()}) {
    ASSERT_OK(t->RegisterModel(Spec()));
    ASSERT_OK(t->OpenSequence("s", Spec().model_id, Prompt(20)).status());
    ASSERT_OK(t->AppendKV("s", Batch(0, 20, false)));
  }
  EXPECT_EQ(a->counters().ingests, 1) << "a (arena_ingest=true) puts rows into the arena";
  EXPECT_EQ(b->counters().ingests, 0) << "b never receives the arena's key";
  // Both read back through retrieval over UCX, each its own rows.
  for (client::Tier* t : {a.get(), b.get()}) {
    std::vector<float> q(2 * kHeadDim, 0.5f);
    client::RetrieveBatch batch;
    batch.layer = 1;
    batch.budget = 4;
    batch.method = kvstore::Method::kExact;
    batch.entries.push_back({"s", 0, q, 0, 20, 0});
    std::vector<client::Recalled> out;
    ASSERT_OK(t->Retrieve(batch, &out));
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].token_ids.size(), 4u);
  }
}

}  // namespace
}  // namespace kvrecall::testing
