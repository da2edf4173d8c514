// Prefix sharing, tenant isolation, memory accounting and concurrency of a Node.
#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <filesystem>
#include <unistd.h>

#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/node.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

constexpr int kBlock = 4;

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = 2;
  s.num_q_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 2;
  s.kv_dtype = DType::kF32;
  s.vocab_size = 1000;
  return s;
}
// One block of Spec(): 2 layers x (K + V) x 4 tokens x 8 B.
constexpr int64_t kBlockBytes = 2 * 2 * kBlock * 8;

// KV of token `pos` (id `id`) in `layer` depends only on (layer, pos, id), as real KV depends
// only on the prefix: K = (1000 * layer + pos, id), V = (-pos, layer).
std::vector<float> Rows(int layer, int64_t start, absl::Span<const int32_t> ids, bool values) {
  std::vector<float> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    const float pos = static_cast<float>(start + static_cast<int64_t>(i));
    if (values) {
      out.insert(out.end(), {-pos, static_cast<float>(layer)});
    } else {
      out.insert(out.end(), {1000.0f * layer + pos, static_cast<float>(ids[i])});
    }
  }
  return out;
}

absl::Status Append(Node* node, const std::string& tenant, const std::string& id, int64_t start,
                    const std::vector<int32_t>& all_ids) {
  if (start == static_cast<int64_t>(all_ids.size())) return absl::OkStatus();  // all shared
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, node->FindSequence(tenant, id));
  RETURN_IF_ERROR(seq->BeginAppend());
  absl::Status s = [&]() -> absl::Status {
    RETURN_IF_ERROR(seq->AddTokenIds(0, all_ids));
    const absl::Span<const int32_t> ids =
        absl::MakeConstSpan(all_ids).subspan(static_cast<size_t>(start));
    for (int l = 0; l < 2; ++l) {
      std::vector<float> k = Rows(l, start, ids, false), v = Rows(l, start, ids, true);
      RETURN_IF_ERROR(seq->AppendChunk(l, start, static_cast<int64_t>(ids.size()),
                                       {reinterpret_cast<uint8_t*>(k.data()), k.size() * 4},
                                       {reinterpret_cast<uint8_t*>(v.data()), v.size() * 4}));
    }
    return seq->CommitAppend().status();
  }();
  if (!s.ok()) seq->AbortAppend();
  return s;
}

// Checks every committed row of both layers against Rows().
void ExpectRows(Node* node, const std::string& tenant, const std::string& id,
                const std::vector<int32_t>& ids) {
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<Sequence> seq, node->FindSequence(tenant, id));
  const int64_t n = seq->committed_tokens();
  std::vector<int32_t> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  for (int l = 0; l < 2; ++l) {
    std::string k, v;
    ASSERT_OK(node->ReadRows(tenant, id, l, 0, all, &k, &v));
    const std::vector<float> want_k =
        Rows(l, 0, absl::MakeConstSpan(ids).subspan(0, static_cast<size_t>(n)), false);
    const std::vector<float> want_v =
        Rows(l, 0, absl::MakeConstSpan(ids).subspan(0, static_cast<size_t>(n)), true);
    ASSERT_EQ(k.size(), want_k.size() * 4);
    EXPECT_EQ(std::memcmp(k.data(), want_k.data(), k.size()), 0) << id << " layer " << l;
    EXPECT_EQ(std::memcmp(v.data(), want_v.data(), v.size()), 0) << id << " layer " << l;
  }
}

std::vector<int32_t> Tokens(int n, int32_t first = 1) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), first);
  return t;
}

NodeOptions Options(int64_t memory = 1 << 20) {
  NodeOptions o;
  o.memory_bytes = memory;
  o.block_tokens = kBlock;
  o.search_threads = 1;
  return o;
}

class SharingTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_OK(node_.RegisterModel(Spec()).status()); }
  FakeClock clock_;
  Node node_{Options(), nullptr, &clock_};
};

TEST_F(SharingTest, OnlyWholeBlocksOfTheSameTokensAreShared) {
  const std::vector<int32_t> a = Tokens(10);
  ASSERT_OK_AND_ASSIGN(auto ra, node_.OpenSequence({"t", "m", "a", a}));
  EXPECT_EQ(ra.matched_tokens, 0);
  ASSERT_OK(Append(&node_, "t", "a", 0, a));
  EXPECT_EQ(node_.Stats(false).stored_bytes, 3 * kBlockBytes);

  // Same 10 tokens: two full blocks match, the partial third block is not shared.
  ASSERT_OK_AND_ASSIGN(auto rb, node_.OpenSequence({"t", "m", "b", a}));
  EXPECT_EQ(rb.matched_tokens, 8);
  EXPECT_EQ(rb.stored_tokens, 8);
  EXPECT_EQ(node_.Stats(false).stored_bytes, 3 * kBlockBytes) << "adopting stores nothing";
  ExpectRows(&node_, "t", "b", a);
  ASSERT_OK(Append(&node_, "t", "b", 8, a));
  EXPECT_EQ(node_.Stats(false).stored_bytes, 4 * kBlockBytes);
  ExpectRows(&node_, "t", "b", a);

  // Prompt ends inside block 1: only block 0 matches. Exactly 8 tokens: both blocks match.
  ASSERT_OK_AND_ASSIGN(auto rc, node_.OpenSequence({"t", "m", "c", Tokens(7)}));
  EXPECT_EQ(rc.matched_tokens, 4);
  ASSERT_OK_AND_ASSIGN(auto rd, node_.OpenSequence({"t", "m", "d", Tokens(8)}));
  EXPECT_EQ(rd.matched_tokens, 8);
  // A difference in block 1 stops the match after block 0.
  std::vector<int32_t> e = a;
  e[5] = 999;
  ASSERT_OK_AND_ASSIGN(auto re, node_.OpenSequence({"t", "m", "e", e}));
  EXPECT_EQ(re.matched_tokens, 4);
  // A difference in block 0 matches nothing, even though block 1 is equal.
  std::vector<int32_t> f = a;
  f[0] = 999;
  ASSERT_OK_AND_ASSIGN(auto rf, node_.OpenSequence({"t", "m", "f", f}));
  EXPECT_EQ(rf.matched_tokens, 0);

  // Appending to the owner of shared blocks leaves the sharers' rows alone.
  std::vector<int32_t> a2 = Tokens(14);
  ASSERT_OK(Append(&node_, "t", "a", 10, a2));
  ExpectRows(&node_, "t", "a", a2);
  ExpectRows(&node_, "t", "b", a);
  ExpectRows(&node_, "t", "e", e);

  const NodeStats s = node_.Stats(true);
  EXPECT_EQ(s.shared_blocks, 2);
  EXPECT_EQ(s.prompt_tokens, 10 + 10 + 7 + 8 + 10 + 10);
  EXPECT_EQ(s.matched_tokens, 0 + 8 + 4 + 8 + 4 + 0);
  ASSERT_EQ(s.tenants.size(), 1u);
  EXPECT_EQ(s.tenants[0].bytes, s.stored_bytes)
      << "shared blocks are attributed in parts that add up";
  EXPECT_GT(s.tenants[0].logical_bytes, s.stored_bytes);
}

TEST_F(SharingTest, TenantsNeverShareUnlessConfigured) {
  const std::vector<int32_t> a = Tokens(8);
  ASSERT_OK(node_.OpenSequence({"x", "m", "s", a}).status());
  ASSERT_OK(Append(&node_, "x", "s", 0, a));
  ASSERT_OK_AND_ASSIGN(auto r, node_.OpenSequence({"y", "m", "s", a}));
  EXPECT_EQ(r.matched_tokens, 0);
  EXPECT_EQ(r.stored_tokens, 0);
  EXPECT_THAT(node_.ReadRows("y", "s", 0, 0, {0}, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(Append(&node_, "y", "s", 0, a));
  EXPECT_EQ(node_.Stats(false).stored_bytes, 4 * kBlockBytes) << "two copies";
  EXPECT_EQ(node_.Stats(false).shared_blocks, 0);

  // An operator-configured shared namespace lets x and y share, but not z.
  NodeOptions o = Options();
  o.shared_tenants = {"x", "y"};
  Node shared(o, nullptr, &clock_);
  ASSERT_OK(shared.RegisterModel(Spec()).status());
  ASSERT_OK(shared.OpenSequence({"x", "m", "s", a}).status());
  ASSERT_OK(Append(&shared, "x", "s", 0, a));
  ASSERT_OK_AND_ASSIGN(auto ry, shared.OpenSequence({"y", "m", "s", a}));
  EXPECT_EQ(ry.matched_tokens, 8);
  ExpectRows(&shared, "y", "s", a);
  ASSERT_OK_AND_ASSIGN(auto rz, shared.OpenSequence({"z", "m", "s", a}));
  EXPECT_EQ(rz.matched_tokens, 0);
}

TEST_F(SharingTest, DropReturnsMemoryExactly) {
  const int64_t before = node_.Stats(false).stored_bytes;
  const std::vector<int32_t> a = Tokens(10);
  ASSERT_OK(node_.OpenSequence({"t", "m", "a", a}).status());
  ASSERT_OK(Append(&node_, "t", "a", 0, a));
  ASSERT_OK(node_.OpenSequence({"t", "m", "b", a}).status());
  ASSERT_OK(Append(&node_, "t", "b", 8, a));
  EXPECT_EQ(node_.Stats(false).stored_bytes, before + 4 * kBlockBytes);
  // Dropping the first owner frees only its private block; b keeps the shared ones readable.
  ASSERT_OK(node_.CloseSequence("t", "a", /*drop=*/true));
  EXPECT_EQ(node_.Stats(false).stored_bytes, before + 3 * kBlockBytes);
  ExpectRows(&node_, "t", "b", a);
  // A new sequence still finds the prefix (now held by b alone).
  ASSERT_OK_AND_ASSIGN(auto rc, node_.OpenSequence({"t", "m", "c", a}));
  EXPECT_EQ(rc.matched_tokens, 8);
  ASSERT_OK(node_.CloseSequence("t", "c", true));
  ASSERT_OK(node_.CloseSequence("t", "b", true));
  const NodeStats s = node_.Stats(false);
  EXPECT_EQ(s.stored_bytes, before);
  EXPECT_EQ(s.blocks, 0);
  EXPECT_EQ(node_.arena().used_slots(), 0);
  // Nothing left to share.
  ASSERT_OK_AND_ASSIGN(auto rd, node_.OpenSequence({"t", "m", "d", a}));
  EXPECT_EQ(rd.matched_tokens, 0);
}

TEST_F(SharingTest, ArenaExhaustionIsResourceExhaustedAndTheNodeKeepsServing) {
  Node small(Options(5 * kBlockBytes), nullptr, &clock_);
  ASSERT_OK(small.RegisterModel(Spec()).status());
  const std::vector<int32_t> a = Tokens(12);
  ASSERT_OK(small.OpenSequence({"t", "m", "a", a}).status());
  ASSERT_OK(Append(&small, "t", "a", 0, a));  // 3 blocks
  const int64_t used = small.Stats(false).stored_bytes;
  const std::vector<int32_t> big = Tokens(12, 100);
  ASSERT_OK(small.OpenSequence({"t", "m", "big", big}).status());
  EXPECT_THAT(Append(&small, "t", "big", 0, big), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(small.Stats(false).stored_bytes, used) << "the failed append gave everything back";
  // Sharing needs no memory, a small append still fits, and reads keep working.
  ASSERT_OK_AND_ASSIGN(auto rb, small.OpenSequence({"t", "m", "b", a}));
  EXPECT_EQ(rb.matched_tokens, 12);
  ExpectRows(&small, "t", "a", a);
  ASSERT_OK(Append(&small, "t", "big", 0, Tokens(8, 100)));
  EXPECT_EQ(small.Stats(false).stored_bytes, 5 * kBlockBytes);
  // A model whose single block exceeds the arena is refused up front.
  ModelSpec huge = Spec();
  huge.model_id = "huge";
  huge.num_layers = 64;
  EXPECT_THAT(small.RegisterModel(huge), StatusIs(absl::StatusCode::kResourceExhausted));
  // A model whose layer block exceeds the arena's slots is refused.
  ModelSpec wide = Spec();
  wide.model_id = "wide";
  wide.head_dim = 4;
  EXPECT_THAT(small.RegisterModel(wide), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(SharingTest, ConcurrentOpenAppendRetrieveDrop) {
  constexpr int kThreads = 6;
  constexpr int kIterations = 40;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 rng(static_cast<uint32_t>(w));
      for (int it = 0; it < kIterations; ++it) {
        // Half the sessions share one of two prompts; the rest are unique.
        const int kind = static_cast<int>(rng() % 4);
        std::vector<int32_t> ids =
            Tokens(8 + static_cast<int>(rng() % 9), kind < 2 ? 1 + kind * 50 : 200 + w);
        const std::string tenant = (rng() % 2) ? "t1" : "t2";
        const std::string id = "w" + std::to_string(w) + "-" + std::to_string(it);
        auto open = node_.OpenSequence({tenant, "m", id, ids});
        if (!open.ok()) {
          failures++;
          continue;
        }
        if (absl::Status s = Append(&node_, tenant, id, open->stored_tokens, ids); !s.ok()) {
          ADD_FAILURE() << s;
          failures++;
        }
        std::vector<float> q = {1, 0, 0, 1};
        RetrieveArgs args;
        args.tenant = tenant;
        args.layer = 1;
        args.budget = 3;
        args.entries.push_back({id, 0, q, 0, static_cast<int64_t>(ids.size()), 0});
        auto r = node_.Retrieve(args);
        if (!r.ok() || r->token_ids[0].size() != 3) {
          ADD_FAILURE() << (r.ok() ? absl::OkStatus() : r.status());
          failures++;
        }
        // Rows are exactly what Rows() says, whether shared or not.
        std::string k, v;
        const int32_t last = static_cast<int32_t>(ids.size()) - 1;
        if (!node_.ReadRows(tenant, id, 1, 0, {0, last}, &k, &v).ok()) {
          failures++;
        } else {
          const float* kf = reinterpret_cast<const float*>(k.data());
          if (kf[0] != 1000.0f || kf[1] != static_cast<float>(ids[0]) || kf[2] != 1000.0f + last ||
              kf[3] != static_cast<float>(ids.back())) {
            failures++;
          }
        }
        node_.Stats(rng() % 2 == 0);
        if (rng() % 4 != 0 && !node_.CloseSequence(tenant, id, /*drop=*/true).ok()) failures++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  for (const SequenceStats& q : node_.Stats(true).sequences)
    ASSERT_OK(node_.CloseSequence(q.tenant, q.sequence_id, true));
  EXPECT_EQ(node_.Stats(false).stored_bytes, 0);
  EXPECT_EQ(node_.Stats(false).blocks, 0);
}

// Quotas (tenant_account.h): logical bytes (32 per token of Spec()) and sequences, per tenant,
// exactly at their limits; a refused commit leaves nothing behind.
TEST(QuotaTest, SequencesAndStoredBytesTripExactlyAtTheirLimits) {
  constexpr int64_t kTokenBytes = 32;
  FakeClock clock;
  NodeOptions o = Options();
  o.tenant_limits = [](const std::string& tenant) {
    TenantLimits l;
    if (tenant == "q") {
      l.sequences = 2;
      l.stored_bytes = 20 * kTokenBytes;
    }
    if (tenant == "r") l.stored_bytes = 300;  // 9.4 tokens
    return l;
  };
  Node node(o, nullptr, &clock);
  ASSERT_OK(node.RegisterModel(Spec()).status());
  const std::vector<int32_t> a = Tokens(10);
  ASSERT_OK(node.OpenSequence({"q", "m", "a", a}).status());
  ASSERT_OK(node.OpenSequence({"q", "m", "b", Tokens(10, 500)}).status());
  EXPECT_THAT(node.OpenSequence({"q", "m", "c", a}), StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_OK(node.OpenSequence({"free", "m", "x", a}).status()) << "another tenant's quota is its own";
  ASSERT_OK(node.OpenSequence({"q", "m", "b", Tokens(10, 500)}).status()) << "reopening is not a new sequence";

  ASSERT_OK(Append(&node, "q", "a", 0, a));  // 320 bytes
  ASSERT_OK(node.CloseSequence("q", "b", /*drop=*/true));
  // Same prompt: two shared blocks adopted, charged in full (logical bytes): 576.
  ASSERT_OK_AND_ASSIGN(OpenSequenceResult rb, node.OpenSequence({"q", "m", "b", a}));
  EXPECT_EQ(rb.matched_tokens, 8);
  ASSERT_OK(Append(&node, "q", "b", 8, a));  // 640: exactly the limit
  auto usage = [&] {
    for (const TenantStats& t : node.Stats(false).tenants)
      if (t.tenant == "q") return t;
    return TenantStats{};
  };
  EXPECT_EQ(usage().quota_charged_bytes, 20 * kTokenBytes);
  EXPECT_EQ(usage().quota_stored_bytes, 20 * kTokenBytes);
  EXPECT_EQ(usage().quota_sequences, 2);

  // One more token is over: RESOURCE_EXHAUSTED, and nothing of it was committed.
  std::vector<int32_t> a11 = Tokens(11);
  const absl::Status over = Append(&node, "q", "b", 10, a11);
  EXPECT_THAT(over, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(std::string(over.message()), ::testing::HasSubstr("quota"));
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<Sequence> b, node.FindSequence("q", "b"));
  EXPECT_EQ(b->committed_tokens(), 10);
  EXPECT_EQ(b->known_token_ids(), 10);
  ExpectRows(&node, "q", "b", a);
  EXPECT_EQ(usage().quota_charged_bytes, 20 * kTokenBytes);
  b.reset();

  // Dropping a sequence gives its bytes and its place back at once, even while a call in flight
  // still holds the sequence (the tenant test once saw the refund lag behind the drop's ack),
  // and only once.
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<Sequence> held, node.FindSequence("q", "a"));
  ASSERT_OK(node.CloseSequence("q", "a", /*drop=*/true));
  EXPECT_EQ(usage().quota_charged_bytes, 10 * kTokenBytes);
  ASSERT_OK(Append(&node, "q", "b", 10, a11));
  ASSERT_OK(node.OpenSequence({"q", "m", "c", a}).status());
  const int64_t charged = usage().quota_charged_bytes;
  held.reset();
  EXPECT_EQ(usage().quota_charged_bytes, charged) << "refunded once, at the drop";

  // A shared prefix that does not fit the quota is not adopted (and so not charged).
  ASSERT_OK(node.OpenSequence({"r", "m", "a", Tokens(8)}).status());
  ASSERT_OK(Append(&node, "r", "a", 0, Tokens(8)));  // 256 of 300
  ASSERT_OK_AND_ASSIGN(OpenSequenceResult rr, node.OpenSequence({"r", "m", "b", Tokens(8)}));
  EXPECT_EQ(rr.matched_tokens, 0);
  EXPECT_EQ(rr.stored_tokens, 0);
  EXPECT_THAT(Append(&node, "r", "b", 0, Tokens(8)), StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(QuotaTest, RecoveredSequencesAreChargedEvenOverALoweredLimit) {
  const std::string dir = ::testing::TempDir() + "/quota_recovery_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  FakeClock clock;
  NodeOptions o = Options();
  o.data_dir = dir;
  o.durable = true;
  auto limit = std::make_shared<std::atomic<int64_t>>(0);
  o.tenant_limits = [limit](const std::string&) {
    TenantLimits l;
    l.stored_bytes = limit->load();
    return l;
  };
  {
    Node node(o, nullptr, &clock);
    ASSERT_OK(node.arena_status());
    ASSERT_OK(node.RegisterModel(Spec()).status());
    ASSERT_OK(node.OpenSequence({"q", "m", "a", Tokens(10)}).status());
    ASSERT_OK(Append(&node, "q", "a", 0, Tokens(10)));
  }
  limit->store(5 * 32);  // lowered below what is stored
  Node node(o, nullptr, &clock);
  ASSERT_OK(node.arena_status());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<Sequence> a, node.FindSequence("q", "a"));
  EXPECT_EQ(a->committed_tokens(), 10) << "acknowledged data is never taken back";
  a.reset();
  int64_t charged = -1;
  for (const TenantStats& t : node.Stats(false).tenants)
    if (t.tenant == "q") charged = t.quota_charged_bytes;
  EXPECT_EQ(charged, 10 * 32);
  EXPECT_THAT(Append(&node, "q", "a", 10, Tokens(11)), StatusIs(absl::StatusCode::kResourceExhausted));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvrecall::kvstore
