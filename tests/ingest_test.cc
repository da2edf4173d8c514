// Bulk ingest over UCX against a real kvrecall-server: RemoteTier puts K/V rows straight into the
// node's arena (AllocateBlocks / CommitBlocks), the rows read back bit-exact and equal to what the
// AppendKV fallback stores, and a durable node killed with SIGKILL after the acknowledgement
// still has them when it comes back.
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "client/tier.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

constexpr int kLayers = 3, kKvHeads = 2, kHeadDim = 16;
constexpr size_t kRow = kHeadDim * 2;  // bf16

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "ingest-model";
  s.num_layers = kLayers;
  s.num_q_heads = 4;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kHeadDim;
  s.kv_dtype = DType::kBF16;
  s.vocab_size = 1000;
  return s;
}

client::AppendBatch RandomBatch(int64_t start, int64_t n, uint32_t seed, bool with_ids) {
  std::mt19937 rng(seed);
  client::AppendBatch b;
  b.token_start = start;
  b.num_tokens = n;
  if (with_ids) {
    for (int64_t i = 0; i < n; ++i) b.token_ids.push_back(static_cast<int32_t>(rng() % 1000));
  }
  for (int l = 0; l < kLayers; ++l) {
    std::string k(static_cast<size_t>(kKvHeads * n) * kRow, '\0'), v = k;
    for (char& c : k) c = static_cast<char>(rng());
    for (char& c : v) c = static_cast<char>(rng());
    b.keys.push_back(std::move(k));
    b.values.push_back(std::move(v));
  }
  return b;
}

// Every stored row of (layer, head) over FetchKV, as [tokens][head_dim] keys then values.
std::pair<std::string, std::string> FetchAll(const std::string& target, const std::string& id, int layer, int head,
                                             int64_t tokens) {
  auto stub = v1::KvRecall::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  v1::FetchKVRequest req;
  req.set_tenant("default");
  req.set_sequence_id(id);
  req.set_layer(layer);
  req.set_kv_head(head);
  req.set_token_begin(0);
  req.set_token_end(tokens);
  grpc::ClientContext ctx;
  auto reader = stub->FetchKV(&ctx, req);
  v1::FetchKVResponse chunk;
  std::pair<std::string, std::string> out;
  while (reader->Read(&chunk)) {
    out.first += chunk.keys();
    out.second += chunk.values();
  }
  EXPECT_TRUE(reader->Finish().ok());
  return out;
}

// The rows of `batches` (consecutive appends) for (layer, head), as FetchAll returns them.
std::pair<std::string, std::string> Expected(const std::vector<client::AppendBatch>& batches, int layer, int head) {
  std::pair<std::string, std::string> out;
  for (const client::AppendBatch& b : batches) {
    const size_t off = static_cast<size_t>(head * b.num_tokens) * kRow, len = static_cast<size_t>(b.num_tokens) * kRow;
    out.first += b.keys[layer].substr(off, len);
    out.second += b.values[layer].substr(off, len);
  }
  return out;
}

class RemoteIngestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = absl::StrCat(::testing::TempDir(), "/ingest_test.", getpid(), ".",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  absl::StatusOr<std::unique_ptr<client::Tier>> Connect(const ServerProcess& s, const std::string& ingest) {
    client::RemoteTierOptions r;
    r.target = s.address();
    r.ucx_tls = "tcp";
    r.ingest = ingest;
    r.ingest_min_bytes = 0;          // the test's batches are small
    r.ingest_bytes_per_lane = 1024;  // and are still put by several threads
    client::TierOptions o;
    o.recall_buffer_bytes = 1 << 20;
    o.deadline = absl::Seconds(30);
    return client::CreateRemoteTier(r, o);
  }

  std::string dir_;
};

TEST_F(RemoteIngestTest, UcxIngestStoresWhatAppendKVStores) {
  auto server = StartServer(dir_, {"--memory=16MiB", "--block-tokens=16", "--auto-index=none"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto ucx = Connect(*server, "auto");
  ASSERT_TRUE(ucx.ok()) << ucx.status();
  auto grpc_tier = Connect(*server, "grpc");
  ASSERT_TRUE(grpc_tier.ok()) << grpc_tier.status();

  // A 70-token prompt (4 whole blocks and a partial one), then decode tokens one and three at a
  // time, continuing the partial block.
  const std::vector<client::AppendBatch> batches = {RandomBatch(0, 70, 1, false), RandomBatch(70, 1, 2, true),
                                                    RandomBatch(71, 3, 3, true)};
  std::vector<int32_t> prompt(70);
  for (int i = 0; i < 70; ++i) prompt[static_cast<size_t>(i)] = 100 + i;
  for (auto* tier : {ucx->get(), grpc_tier->get()}) {
    const std::string id = tier == ucx->get() ? "over-ucx" : "over-grpc";
    ASSERT_TRUE(tier->RegisterModel(Spec()).ok());
    // Different prompts so that the second sequence shares no block with the first.
    std::vector<int32_t> ids = prompt;
    if (tier == grpc_tier->get()) ids[0] = 7;
    ASSERT_TRUE(tier->OpenSequence(id, Spec().model_id, ids).ok());
    for (const client::AppendBatch& b : batches) {
      const absl::Status s = tier->AppendKV(id, b);
      ASSERT_TRUE(s.ok()) << id << ": " << s;
    }
  }
  EXPECT_EQ((*ucx)->counters().ingests, 3);
  EXPECT_EQ((*grpc_tier)->counters().ingests, 0);
  EXPECT_EQ((*ucx)->counters().bytes_appended, (*grpc_tier)->counters().bytes_appended);
  auto stats = (*ucx)->Stats(false);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->ingests, 3);
  EXPECT_EQ(stats->ingest_bytes, (*ucx)->counters().bytes_appended);
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kKvHeads; ++h) {
      const auto want = Expected(batches, l, h);
      EXPECT_EQ(FetchAll(server->address(), "over-ucx", l, h, 74), want) << "layer " << l << " head " << h;
      EXPECT_EQ(FetchAll(server->address(), "over-grpc", l, h, 74), want) << "layer " << l << " head " << h;
    }
  }
  // A batch of the wrong shape never reaches the node.
  client::AppendBatch bad = RandomBatch(74, 2, 4, true);
  bad.keys[1].pop_back();
  EXPECT_EQ((*ucx)->AppendKV("over-ucx", bad).code(), absl::StatusCode::kInvalidArgument);
  // A batch that does not continue the sequence: FAILED_PRECONDITION, nothing kept.
  EXPECT_EQ((*ucx)->AppendKV("over-ucx", RandomBatch(80, 2, 5, true)).code(), absl::StatusCode::kFailedPrecondition);
  stats = (*ucx)->Stats(true);
  ASSERT_TRUE(stats.ok());
  for (const auto& q : stats->sequences) EXPECT_EQ(q.stored_tokens, 74) << q.sequence_id;
}

TEST_F(RemoteIngestTest, AcknowledgedIngestSurvivesSigkillOfADurableNode) {
  const std::vector<std::string> flags = {"--memory=16MiB", "--block-tokens=16", "--auto-index=none",
                                          "--data-dir=" + dir_ + "/data", "--durable"};
  const std::vector<client::AppendBatch> batches = {RandomBatch(0, 40, 11, false), RandomBatch(40, 5, 12, true)};
  {
    auto server = StartServer(dir_, flags);
    ASSERT_TRUE(server.ok()) << server.status();
    auto tier = Connect(*server, "auto");
    ASSERT_TRUE(tier.ok()) << tier.status();
    ASSERT_TRUE((*tier)->RegisterModel(Spec()).ok());
    ASSERT_TRUE((*tier)->OpenSequence("kept", Spec().model_id, std::vector<int32_t>(40, 9)).ok());
    for (const client::AppendBatch& b : batches) ASSERT_TRUE((*tier)->AppendKV("kept", b).ok());
    EXPECT_EQ((*tier)->counters().ingests, 2);
    kill(server->process.pid(), SIGKILL);
    ASSERT_TRUE(server->process.Wait(absl::Seconds(10)).ok());
  }
  auto again = StartServer(dir_, flags);
  ASSERT_TRUE(again.ok()) << again.status();
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kKvHeads; ++h) {
      EXPECT_EQ(FetchAll(again->address(), "kept", l, h, 45), Expected(batches, l, h)) << l << " " << h;
    }
  }
}

}  // namespace
}  // namespace kvrecall::testing
