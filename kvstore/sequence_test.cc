#include "kvstore/sequence.h"

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

std::shared_ptr<const ModelSpec> Spec() {
  auto s = std::make_shared<ModelSpec>();
  s->model_id = "m";
  s->num_layers = 2;
  s->num_q_heads = 4;
  s->num_kv_heads = 2;
  s->head_dim = 4;
  s->kv_dtype = DType::kF32;
  s->vocab_size = 100;
  return s;
}

// keys[h][i][d] = 1000*h + token + d/10 (fp32); values = -keys.
std::pair<std::string, std::string> Chunk(int64_t start, int64_t n) {
  std::vector<float> k, v;
  for (int h = 0; h < 2; ++h)
    for (int64_t i = 0; i < n; ++i)
      for (int d = 0; d < 4; ++d) {
        k.push_back(1000.0f * h + static_cast<float>(start + i) + d / 10.0f);
        v.push_back(-k.back());
      }
  return {std::string(reinterpret_cast<char*>(k.data()), k.size() * 4),
          std::string(reinterpret_cast<char*>(v.data()), v.size() * 4)};
}

absl::Span<const uint8_t> S(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }

// An arena of `bytes` with slots of one layer block of Spec() at 3 tokens (2 x 2 x 3 x 16 B).
struct Store {
  explicit Store(int64_t bytes) {
    arena = *Arena::Create({bytes, false}, nullptr);
    EXPECT_TRUE(arena->EnsureSlotBytes(192).ok());
    table = std::make_unique<BlockTable>(arena.get());
  }
  int64_t used() const { return arena->used_bytes(); }
  std::unique_ptr<Arena> arena;
  std::unique_ptr<BlockTable> table;
};

TEST(SequenceTest, AppendCommitAndReadAcrossBlocks) {
  Store budget(1 << 20);
  Sequence seq("t", "s", Spec(), /*block_tokens=*/3, budget.table.get(), "t:t");
  std::vector<int32_t> ids(10, 7);
  ASSERT_OK(seq.AddTokenIds(0, ids));
  ASSERT_OK(seq.BeginAppend());
  for (int layer = 0; layer < 2; ++layer) {
    auto [k1, v1] = Chunk(0, 4);
    ASSERT_OK(seq.AppendChunk(layer, 0, 4, S(k1), S(v1)));
    auto [k2, v2] = Chunk(4, 3);
    ASSERT_OK(seq.AppendChunk(layer, 4, 3, S(k2), S(v2)));
  }
  ASSERT_OK_AND_ASSIGN(int64_t n, seq.CommitAppend());
  EXPECT_EQ(n, 7);
  ASSERT_OK_AND_ASSIGN(auto snap, seq.Read(1, 1));
  ASSERT_EQ(snap.keys.num_tokens, 7);
  for (int t = 0; t < 7; ++t) {
    const float* k = reinterpret_cast<const float*>(snap.keys.row(t));
    const float* v = reinterpret_cast<const float*>(snap.values.row(t));
    EXPECT_FLOAT_EQ(k[2], 1000.0f + t + 0.2f);
    EXPECT_FLOAT_EQ(v[0], -(1000.0f + t));
  }
  EXPECT_EQ(budget.used(), seq.bytes());
}

// Reads between appends of one token see every committed row of every layer: a read's page
// table (kept between reads) grows with the blocks, the partial last one included.
TEST(SequenceTest, ReadsBetweenAppendsSeeEveryCommittedRow) {
  Store budget(1 << 20);
  Sequence seq("t", "s", Spec(), /*block_tokens=*/3, budget.table.get(), "t:t");
  for (int64_t t = 0; t < 10; ++t) {
    auto [k, v] = Chunk(t, 1);
    const absl::Span<const uint8_t> ks[2] = {S(k), S(k)}, vs[2] = {S(v), S(v)};
    const int32_t id = 7;
    ASSERT_OK(seq.AppendTokens(t, 1, {&id, 1}, ks, vs).status());
    for (int layer = 0; layer < 2; ++layer) {
      ASSERT_OK_AND_ASSIGN(auto snaps, seq.Read(layer, std::vector<int>{0, 1}));
      for (int h = 0; h < 2; ++h) {
        ASSERT_EQ(snaps[h].keys.num_tokens, t + 1);
        for (int64_t r = 0; r <= t; ++r) {
          const float* kr = reinterpret_cast<const float*>(snaps[h].keys.row(r));
          const float* vr = reinterpret_cast<const float*>(snaps[h].values.row(r));
          ASSERT_FLOAT_EQ(kr[1], 1000.0f * h + r + 0.1f) << "after " << t << " layer " << layer;
          ASSERT_FLOAT_EQ(vr[3], -(1000.0f * h + r + 0.3f));
        }
      }
    }
  }
}

TEST(SequenceTest, UnequalLayersRollBackOnCommit) {
  Store budget(1 << 20);
  Sequence seq("t", "s", Spec(), 3, budget.table.get(), "t:t");
  ASSERT_OK(seq.AddTokenIds(0, std::vector<int32_t>(10, 1)));
  ASSERT_OK(seq.BeginAppend());
  auto [k, v] = Chunk(0, 4);
  ASSERT_OK(seq.AppendChunk(0, 0, 4, S(k), S(v)));
  EXPECT_THAT(seq.CommitAppend(), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(seq.committed_tokens(), 0);
  EXPECT_EQ(budget.used(), 0);
  // A new transaction starts from scratch.
  ASSERT_OK(seq.BeginAppend());
  ASSERT_OK(seq.AppendChunk(0, 0, 4, S(k), S(v)));
  ASSERT_OK(seq.AppendChunk(1, 0, 4, S(k), S(v)));
  EXPECT_EQ(*seq.CommitAppend(), 4);
}

TEST(SequenceTest, RejectsBadChunks) {
  Store budget(1 << 20);
  Sequence seq("t", "s", Spec(), 3, budget.table.get(), "t:t");
  ASSERT_OK(seq.AddTokenIds(0, std::vector<int32_t>(4, 1)));
  auto [k, v] = Chunk(0, 4);
  EXPECT_THAT(seq.AppendChunk(0, 0, 4, S(k), S(v)), StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_OK(seq.BeginAppend());
  EXPECT_THAT(seq.BeginAppend(), StatusIs(absl::StatusCode::kAborted));
  EXPECT_THAT(seq.AppendChunk(2, 0, 4, S(k), S(v)), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(seq.AppendChunk(0, 0, 3, S(k), S(v)), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(seq.AppendChunk(0, 1, 4, S(k), S(v)), StatusIs(absl::StatusCode::kFailedPrecondition));
  auto [k5, v5] = Chunk(0, 5);
  EXPECT_THAT(seq.AppendChunk(0, 0, 5, S(k5), S(v5)), StatusIs(absl::StatusCode::kFailedPrecondition))
      << "KV for tokens whose ids are unknown";
  seq.AbortAppend();
}

TEST(SequenceTest, TokenIdsAreValidatedAndMustAgree) {
  Store budget(1 << 20);
  Sequence seq("t", "s", Spec(), 3, budget.table.get(), "t:t");
  EXPECT_THAT(seq.AddTokenIds(0, {1, 100}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(seq.AddTokenIds(0, {1, -1}), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(seq.AddTokenIds(0, {1, 2, 3}));
  ASSERT_OK(seq.AddTokenIds(1, {2, 3, 4}));
  EXPECT_THAT(seq.AddTokenIds(0, {9}), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(seq.AddTokenIds(6, {9}), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(seq.token_ids(), (std::vector<int32_t>{1, 2, 3, 4}));
}

TEST(SequenceTest, BudgetExhaustionIsResourceExhaustedAndLeavesNothing) {
  Store budget(
      200);  // one slot: one layer of a block of 2 heads x 3 tokens x 16 B x 2 (K,V) = 192 B
  Sequence seq("t", "s", Spec(), 3, budget.table.get(), "t:t");
  ASSERT_OK(seq.AddTokenIds(0, std::vector<int32_t>(4, 1)));
  ASSERT_OK(seq.BeginAppend());
  auto [k, v] = Chunk(0, 4);
  EXPECT_THAT(seq.AppendChunk(0, 0, 4, S(k), S(v)), StatusIs(absl::StatusCode::kResourceExhausted));
  seq.AbortAppend();
  EXPECT_EQ(budget.used(), 0);
}

}  // namespace
}  // namespace kvrecall::kvstore
