#include "kvstore/node.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "indexer/index.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = 2;
  s.num_q_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 2;
  s.kv_dtype = DType::kF32;
  s.vocab_size = 50;
  return s;
}

class NodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK(node_.RegisterModel(Spec()).status());
    std::vector<int32_t> ids(6, 3);
    ASSERT_OK(node_.OpenSequence({"t", "m", "s", ids}).status());
    // Token i has key (i, 0) except token 2 has key (0, 5); value = (10 * i, -i).
    ASSERT_OK_AND_ASSIGN(auto seq, node_.FindSequence("t", "s"));
    ASSERT_OK(seq->BeginAppend());
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<float> k, v;
      for (int i = 0; i < 6; ++i) {
        k.insert(k.end(), {i == 2 ? 0.0f : static_cast<float>(i), i == 2 ? 5.0f : 0.0f});
        v.insert(v.end(), {10.0f * i, -static_cast<float>(i)});
      }
      ASSERT_OK(seq->AppendChunk(layer, 0, 6, {reinterpret_cast<uint8_t*>(k.data()), k.size() * 4},
                                 {reinterpret_cast<uint8_t*>(v.data()), v.size() * 4}));
    }
    ASSERT_OK(seq->CommitAppend().status());
  }

  RetrieveArgs Args(std::vector<float>* q) {
    RetrieveArgs a;
    a.tenant = "t";
    a.layer = 1;
    a.budget = 2;
    a.entries.push_back({"s", 0, *q, 0, 6, 0});
    return a;
  }

  FakeClock clock_;
  Node node_{NodeOptions{1 << 20, 4, 1}, nullptr, &clock_};
};

TEST_F(NodeTest, RegisterModelIsIdempotentAndRejectsConflicts) {
  EXPECT_FALSE(*node_.RegisterModel(Spec()));
  ModelSpec other = Spec();
  other.head_dim = 4;
  EXPECT_THAT(node_.RegisterModel(other), StatusIs(absl::StatusCode::kAlreadyExists));
  other.num_kv_heads = 3;
  other.model_id = "n";
  EXPECT_THAT(node_.RegisterModel(other), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(NodeTest, RetrieveSelectsPerGroupAndValidates) {
  std::vector<float> q = {1, 0, 0, 1};  // head 0 wants large x (token 5), head 1 wants token 2
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome out, node_.Retrieve(Args(&q)));
  EXPECT_THAT(out.token_ids[0], ElementsAre(2, 5));

  RetrieveArgs a = Args(&q);
  a.entries[0].token_end = 7;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
  a = Args(&q);
  a.layer = 2;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
  a = Args(&q);
  a.entries[0].kv_head = 1;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> short_q = {1, 0};
  EXPECT_THAT(node_.Retrieve(Args(&short_q)), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> nan_q = {NAN, 0, 0, 1};
  EXPECT_THAT(node_.Retrieve(Args(&nan_q)), StatusIs(absl::StatusCode::kInvalidArgument));
  a = Args(&q);
  a.entries[0].sequence_id = "nope";
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kNotFound));
  a = Args(&q);
  a.tenant = "other";
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kNotFound));
  a = Args(&q);
  a.budget = kMaxBudget + 1;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
  a = Args(&q);
  a.successors = a.budget + 1;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
  a.successors = -1;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
  a = Args(&q);
  a.worker_id = "w";
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kFailedPrecondition));
  a = Args(&q);
  a.method = Method::kCtkvr;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kFailedPrecondition)) << "no index built";
  a.method = Method::kMerged;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kUnimplemented));
}

TEST_F(NodeTest, BuildIndexThenRetrieveWithCtkvrAndCluster) {
  // Two prompt queries per layer, [2][num_q_heads = 2][head_dim = 2].
  std::vector<float> pq = {1, 0, 0, 1, 1, 0, 0, 1};
  BuildIndexArgs b{"t", "s", Method::kCtkvr, 1, 0, 2, {pq}};
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome built, node_.BuildIndex(b));
  EXPECT_EQ(built.segments, 1);
  EXPECT_EQ(built.indexed_tokens, 6);
  EXPECT_TRUE(built.rebuilt);
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome again, node_.BuildIndex(b));
  EXPECT_FALSE(again.rebuilt) << "same method over the same tokens is kept";

  std::vector<float> q = {1, 0, 0, 1};
  RetrieveArgs a = Args(&q);
  a.method = Method::kCtkvr;
  const int64_t searches = indexer::ReadCtkvrCounters().searches;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome out, node_.Retrieve(a));
  EXPECT_THAT(out.token_ids[0], ElementsAre(2, 5)) << "every token is a candidate here, so ctkvr = exact";
  // /metrics reads the process-wide ctkvr counters when rendered (this test's search included).
  const int64_t now = indexer::ReadCtkvrCounters().searches;
  EXPECT_GT(now, searches);
  EXPECT_THAT(Metrics::Global().RenderPrometheus(),
              ::testing::HasSubstr(absl::StrCat("kvrecall_ctkvr_searches ", now, "\n")));
  a.layer = 0;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kFailedPrecondition)) << "layer 0 is not indexed";
  a.layer = 1;
  a.method = Method::kCluster;
  EXPECT_THAT(node_.Retrieve(a), StatusIs(absl::StatusCode::kFailedPrecondition)) << "index is ctkvr";

  ASSERT_OK(node_.BuildIndex({"t", "s", Method::kCluster, 1, 0, 0, {}}).status());
  a.budget = 6;
  ASSERT_OK_AND_ASSIGN(out, node_.Retrieve(a));
  EXPECT_THAT(out.token_ids[0], ElementsAre(0, 1, 2, 3, 4, 5)) << "a budget covering the range takes it all";
}

TEST_F(NodeTest, BuildIndexRejectsBadInput) {
  std::vector<float> pq = {1, 0, 0, 1, 1, 0, 0, 1};
  auto code = [&](BuildIndexArgs b) { return node_.BuildIndex(b).status(); };
  EXPECT_THAT(code({"t", "s", Method::kMerged, 1, 0, 2, {pq}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(code({"t", "nope", Method::kCtkvr, 1, 0, 2, {pq}}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 2, 0, 2, {pq}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 1, 6, 2, {pq}}), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 1, 0, 3, {pq}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 1, 0, 0, {}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 0, 0, 2, {pq}}), StatusIs(absl::StatusCode::kInvalidArgument))
      << "queries for one layer, two sparse layers";
  std::vector<float> nan = pq;
  nan[3] = NAN;
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 1, 0, 2, {nan}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(code({"t", "s", Method::kCtkvr, 1, 0, kMaxIndexQueries + 1, {pq}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// ctkvr lists by brute force over the fixture's keys of one layer (what a GPU worker sends):
// for each query c of [C][2][2], its group's top `n` tokens of [begin, 6) and per-head lse.
BuildIndexArgs::LayerLists ListsOf(const std::vector<float>& pq, int n, int64_t begin,
                                   std::vector<int32_t>* tokens, std::vector<float>* lse) {
  const float s = 1.0f / std::sqrt(2.0f);
  for (size_t c = 0; c < pq.size() / 4; ++c) {
    double logit[2][6], l[2];
    for (int h = 0; h < 2; ++h) {
      double z = 0;
      for (int t = begin; t < 6; ++t) {
        const double kx = t == 2 ? 0 : t, ky = t == 2 ? 5 : 0;
        logit[h][t] = s * (pq[c * 4 + h * 2] * kx + pq[c * 4 + h * 2 + 1] * ky);
        z += std::exp(logit[h][t]);
      }
      l[h] = std::log(z);
      lse->push_back(static_cast<float>(l[h]));
    }
    std::vector<std::pair<double, int32_t>> score;
    for (int t = begin; t < 6; ++t)
      score.push_back({-std::max(logit[0][t] - l[0], logit[1][t] - l[1]), t});
    std::sort(score.begin(), score.end());
    std::vector<int32_t> top;
    for (int j = 0; j < n; ++j) top.push_back(score[j].second);
    std::sort(top.begin(), top.end());
    tokens->insert(tokens->end(), top.begin(), top.end());
  }
  return {*tokens, *lse};
}

TEST_F(NodeTest, BuildIndexTakesCtkvrListsMadeByTheWorker) {
  std::vector<float> pq = {1, 0, 0, 1, 0.5f, 0, 0, 0.5f};
  std::vector<int32_t> tokens;
  std::vector<float> lse;
  BuildIndexArgs b{"t", "s", Method::kCtkvr, 1, 0, 2, {pq}};
  b.ctkvr_list_size = 2;
  b.ctkvr_lists = {ListsOf(pq, 2, 0, &tokens, &lse)};
  ASSERT_THAT(tokens, ElementsAre(2, 5, 2, 5));
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome built, node_.BuildIndex(b));
  EXPECT_TRUE(built.rebuilt);
  EXPECT_EQ(built.segments, 1);
  std::vector<float> q = {1, 0, 0, 1};
  RetrieveArgs a = Args(&q);
  a.method = Method::kCtkvr;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome out, node_.Retrieve(a));
  EXPECT_THAT(out.token_ids[0], ElementsAre(2, 5));

  auto code = [&](BuildIndexArgs x) {
    EXPECT_OK(node_.CloseSequence("t", "s", /*drop=*/true));  // fresh: never "kept as built"
    SetUp();
    return node_.BuildIndex(x).status();
  };
  const auto kInvalid = StatusIs(absl::StatusCode::kInvalidArgument);
  BuildIndexArgs x = b;
  x.ctkvr_lists.push_back(x.ctkvr_lists[0]);
  EXPECT_THAT(code(x), kInvalid) << "lists for two layers, one sparse layer";
  x = b;
  x.ctkvr_list_size = 0;
  EXPECT_THAT(code(x), kInvalid);
  x.ctkvr_list_size = indexer::CtkvrOptions().list_size + 1;
  EXPECT_THAT(code(x), kInvalid) << "longer lists than the node keeps";
  x = b;
  x.ctkvr_lists[0].tokens = absl::MakeConstSpan(tokens).subspan(1);
  EXPECT_THAT(code(x), kInvalid) << "a token short";
  x = b;
  x.ctkvr_lists[0].lse = absl::MakeConstSpan(lse).subspan(1);
  EXPECT_THAT(code(x), kInvalid) << "a normaliser short";
  x = b;
  std::vector<int32_t> unsorted = {5, 2, 2, 5};
  x.ctkvr_lists[0].tokens = unsorted;
  EXPECT_THAT(code(x), kInvalid) << "the indexer checks each list";
  x = b;
  x.method = Method::kCluster;
  EXPECT_THAT(code(x), kInvalid) << "lists are ctkvr's";
  std::vector<float> many(9 * 4, 1.0f);
  std::vector<int32_t> many_tokens;
  std::vector<float> many_lse;
  x = b;
  x.num_queries = 9;
  x.layer_queries = {many};
  x.ctkvr_lists = {ListsOf(many, 2, 0, &many_tokens, &many_lse)};
  EXPECT_THAT(code(x), kInvalid) << "more queries than the node's centroids";
  EXPECT_OK(code(b));
}

TEST_F(NodeTest, ReadRowsReturnsStoredBytes) {
  std::string k, v;
  ASSERT_OK(node_.ReadRows("t", "s", 0, 0, {5, 2}, &k, &v));
  const float* kf = reinterpret_cast<const float*>(k.data());
  const float* vf = reinterpret_cast<const float*>(v.data());
  EXPECT_EQ(kf[0], 5);
  EXPECT_EQ(kf[3], 5);
  EXPECT_EQ(vf[0], 50);
  EXPECT_EQ(vf[2], 20);
  EXPECT_THAT(node_.ReadRows("t", "s", 0, 0, {6}, &k, &v), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(node_.ReadRows("t", "s", 0, 0, {-1}, &k, &v), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Each append of a batch is stored or refused on its own; the layouts (one span per layer, or
// all layers back to back) store the same rows; a malformed batch stores nothing.
TEST_F(NodeTest, AppendKVBatchStoresEachAppendOnItsOwn) {
  ASSERT_OK(node_.OpenSequence({"t", "m", "s2", std::vector<int32_t>(6, 4)})
                .status());  // shares nothing with "s"
  ASSERT_OK_AND_ASSIGN(auto s2, node_.FindSequence("t", "s2"));
  ASSERT_OK(s2->BeginAppend());
  const std::vector<float> zero(12, 0.0f);
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_OK(s2->AppendChunk(layer, 0, 6, {reinterpret_cast<const uint8_t*>(zero.data()), 48},
                              {reinterpret_cast<const uint8_t*>(zero.data()), 48}));
  }
  ASSERT_OK(s2->CommitAppend().status());
  // Token 6 of each: layer l's K = (l + 1, 7), V = (-l, 70); 8 bytes a layer.
  const std::vector<float> k = {1, 7, 2, 7}, v = {0, 70, -1, 70};
  const std::vector<int32_t> id = {9};
  auto bytes = [](const std::vector<float>& f, size_t from, size_t n) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data() + from), n * 4);
  };
  Node::BatchAppend per_layer{
      "s", 6, 1, id, {bytes(k, 0, 2), bytes(k, 2, 2)}, {bytes(v, 0, 2), bytes(v, 2, 2)}};
  Node::BatchAppend joined{"s2", 6, 1, id, {bytes(k, 0, 4)}, {bytes(v, 0, 4)}};
  Node::BatchAppend unknown{"nope", 0, 1, id, {bytes(k, 0, 4)}, {bytes(v, 0, 4)}};
  Node::BatchAppend short_kv{"s", 7, 1, id, {bytes(k, 0, 3)}, {bytes(v, 0, 3)}};
  std::vector<absl::StatusOr<int64_t>> stored;
  ASSERT_OK(node_.AppendKVBatch("t", {per_layer, unknown, joined}, &stored));
  ASSERT_EQ(stored.size(), 3u);
  ASSERT_OK(stored[0].status());
  EXPECT_EQ(*stored[0], 7);
  EXPECT_THAT(stored[1].status(), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(stored[2].status());
  EXPECT_EQ(*stored[2], 7);
  for (const char* id : {"s", "s2"}) {
    for (int layer = 0; layer < 2; ++layer) {
      std::string kr, vr;
      ASSERT_OK(node_.ReadRows("t", id, layer, 0, {6}, &kr, &vr));
      EXPECT_EQ(kr, std::string(reinterpret_cast<const char*>(k.data() + 2 * layer), 8))
          << id << " " << layer;
      EXPECT_EQ(vr, std::string(reinterpret_cast<const char*>(v.data() + 2 * layer), 8))
          << id << " " << layer;
    }
  }
  // K/V of the wrong size: that append alone is refused, nothing of it kept.
  ASSERT_OK(node_.AppendKVBatch("t", {short_kv}, &stored));
  EXPECT_THAT(stored[0].status(), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK_AND_ASSIGN(auto s, node_.FindSequence("t", "s"));
  EXPECT_EQ(s->committed_tokens(), 7);
  // Malformed batches fail whole.
  EXPECT_THAT(node_.AppendKVBatch("t", {}, &stored), StatusIs(absl::StatusCode::kInvalidArgument));
  Node::BatchAppend again = per_layer;
  again.token_start = 7;
  EXPECT_THAT(node_.AppendKVBatch("t", {again, again}, &stored),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(s->committed_tokens(), 7);
}

TEST_F(NodeTest, RetrievePutsRowsIntoAttachedWorkerRegion) {
  std::unique_ptr<transport::Transport> t = transport::CreateInProcessTransport();
  Node node(NodeOptions{1 << 20, 4, 1}, t.get(), &clock_);
  ASSERT_OK(node.RegisterModel(Spec()).status());
  ASSERT_OK(node.OpenSequence({"t", "m", "s", std::vector<int32_t>(3, 1)}).status());
  ASSERT_OK_AND_ASSIGN(auto seq, node.FindSequence("t", "s"));
  ASSERT_OK(seq->BeginAppend());
  std::vector<float> k = {1, 0, 2, 0, 3, 0}, v = {7, 7, 8, 8, 9, 9};
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_OK(seq->AppendChunk(layer, 0, 3, {reinterpret_cast<uint8_t*>(k.data()), 24},
                               {reinterpret_cast<uint8_t*>(v.data()), 24}));
  }
  ASSERT_OK(seq->CommitAppend().status());
  ASSERT_OK_AND_ASSIGN(auto region, t->AllocateRegion(4 * 16));  // 4 rows of K+V (2 x 8 B)
  ASSERT_OK(node.AttachWorker("t", "w", region->Describe()));
  std::vector<float> q = {1, 0, 1, 0};
  RetrieveArgs a{"t", 1, 2, Method::kExact, "w", {{"s", 0, q, 0, 3, 1}}};
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome out, node.Retrieve(a));
  EXPECT_THAT(out.token_ids[0], ElementsAre(1, 2));
  EXPECT_EQ(out.bytes_streamed, 2u * 16);
  const float* rows = reinterpret_cast<const float*>(region->data());
  // Row 1 = token 1: K (2, 0), V (8, 8); row 2 = token 2: K (3, 0), V (9, 9).
  EXPECT_THAT(std::vector<float>(rows + 4, rows + 12), ElementsAre(2, 0, 8, 8, 3, 0, 9, 9));
  a.entries[0].dest_row = 3;  // rows [3, 5) do not fit 4 rows
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kOutOfRange));
  a.entries[0].dest_row = 0;
  a.results_in_region = true;  // one result needs RetrieveResultBytes(2) = 24 bytes
  a.results_offset = 4 * 16 - 16;
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kOutOfRange));
  a.results_offset = uint64_t{1} << 63;
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kOutOfRange));
  a.results_offset = 4 * 16 - 24;
  ASSERT_OK(node.Retrieve(a).status());
}

// The queries may wait in the worker's region instead of the call (queries_in_region): the
// node reads them there, selects what it selects from queries in the call, and refuses the
// same bad values as well as misplaced ones.
TEST_F(NodeTest, RetrieveReadsQueriesFromTheWorkersRegion) {
  std::unique_ptr<transport::Transport> t = transport::CreateInProcessTransport();
  Node node(NodeOptions{1 << 20, 4, 1}, t.get(), &clock_);
  ASSERT_OK(node.RegisterModel(Spec()).status());
  for (const char* id : {"a", "b"}) {
    // Distinct token ids: no shared prefix.
    ASSERT_OK(node.OpenSequence({"t", "m", id, std::vector<int32_t>(6, id[0] - 'a' + 1)}).status());
    ASSERT_OK_AND_ASSIGN(auto seq, node.FindSequence("t", id));
    ASSERT_OK(seq->BeginAppend());
    std::vector<float> k, v(12, 1.0f);
    for (int i = 0; i < 6; ++i)
      k.insert(k.end(), {static_cast<float>(i), static_cast<float>(5 - i)});
    for (int layer = 0; layer < 2; ++layer) {
      ASSERT_OK(seq->AppendChunk(layer, 0, 6, {reinterpret_cast<uint8_t*>(k.data()), k.size() * 4},
                                 {reinterpret_cast<uint8_t*>(v.data()), v.size() * 4}));
    }
    ASSERT_OK(seq->CommitAppend().status());
  }
  ASSERT_OK_AND_ASSIGN(auto region, t->AllocateRegion(4096));
  ASSERT_OK(node.AttachWorker("t", "w", region->Describe()));
  // Entry "a" looks along +x (tokens 4, 5), entry "b" along +y (tokens 0, 1); [group 2][dim 2].
  const std::vector<float> qa = {1, 0, 1, 0}, qb = {0, 1, 0, 1};
  RetrieveArgs in_call{
      "t", 1, 2, Method::kExact, "w", {{"a", 0, qa, 0, 6, 0}, {"b", 0, qb, 0, 6, 2}}};
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome want, node.Retrieve(in_call));
  EXPECT_THAT(want.token_ids[0], ElementsAre(4, 5));
  EXPECT_THAT(want.token_ids[1], ElementsAre(0, 1));

  constexpr uint64_t kAt = 1024;
  auto place = [&](const std::vector<float>& a, const std::vector<float>& b) {
    std::memcpy(region->data() + kAt, a.data(), 16);
    std::memcpy(region->data() + kAt + 16, b.data(), 16);
  };
  place(qa, qb);
  RetrieveArgs in_region = in_call;
  for (auto& e : in_region.entries) e.queries = {};
  in_region.queries_in_region = true;
  in_region.queries_offset = kAt;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome got, node.Retrieve(in_region));
  EXPECT_EQ(got.token_ids, want.token_ids);
  place(qb, qa);  // read afresh every call
  ASSERT_OK_AND_ASSIGN(got, node.Retrieve(in_region));
  EXPECT_THAT(got.token_ids[0], ElementsAre(0, 1));
  EXPECT_THAT(got.token_ids[1], ElementsAre(4, 5));

  place({1, 0, std::nanf(""), 0}, qb);
  EXPECT_THAT(node.Retrieve(in_region),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
  place(qa, qb);
  RetrieveArgs both = in_region;
  both.entries[1].queries = qb;  // queries in the call and in the region
  EXPECT_THAT(node.Retrieve(both),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries_in_region")));
  RetrieveArgs past = in_region;
  past.queries_offset = 4096 - 31;  // 32 bytes of queries, one past the end
  EXPECT_THAT(node.Retrieve(past), StatusIs(absl::StatusCode::kOutOfRange));
  past.queries_offset = ~uint64_t{0} - 8;
  EXPECT_THAT(node.Retrieve(past), StatusIs(absl::StatusCode::kOutOfRange));
  RetrieveArgs no_worker = in_region;
  no_worker.worker_id.clear();
  EXPECT_THAT(node.Retrieve(no_worker),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("worker")));
  // Nothing above moved the slot mirror: the same call still answers as before.
  ASSERT_OK_AND_ASSIGN(got, node.Retrieve(in_region));
  EXPECT_EQ(got.token_ids, want.token_ids);
}

TEST_F(NodeTest, DeltaStreamingSendsMissingRowsInCallOrder) {
  std::unique_ptr<transport::Transport> t = transport::CreateInProcessTransport();
  Node node(NodeOptions{1 << 20, 4, 1}, t.get(), &clock_);
  ASSERT_OK(node.RegisterModel(Spec()).status());
  ASSERT_OK(node.OpenSequence({"t", "m", "s", std::vector<int32_t>(4, 1)}).status());
  ASSERT_OK_AND_ASSIGN(auto seq, node.FindSequence("t", "s"));
  ASSERT_OK(seq->BeginAppend());
  std::vector<float> k = {1, 0, 2, 0, 3, 0, 4, 0}, v = {7, 7, 8, 8, 9, 9, 6, 6};
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_OK(seq->AppendChunk(layer, 0, 4, {reinterpret_cast<uint8_t*>(k.data()), 32},
                               {reinterpret_cast<uint8_t*>(v.data()), 32}));
  }
  ASSERT_OK(seq->CommitAppend().status());
  ASSERT_OK_AND_ASSIGN(auto region, t->AllocateRegion(4 * 16));
  ASSERT_OK(node.AttachWorker("t", "w", region->Describe()));
  const float* rows = reinterpret_cast<const float*>(region->data());

  std::vector<float> right = {1, 0, 1, 0}, left = {-1, 0, -1, 0};
  RetrieveArgs a{"t", 1, 2, Method::kExact, "w", {{"s", 0, right, 0, 4, 0, /*slot_epoch=*/5}}};
  a.call_seq = 1;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome first, node.Retrieve(a));
  EXPECT_THAT(first.token_ids[0], ElementsAre(2, 3));
  EXPECT_THAT(first.slots[0], ElementsAre(0, 1));
  EXPECT_THAT(first.fill_slots[0], ElementsAre(0, 1));
  EXPECT_EQ(first.rows_sent, 2);

  // Same queries: nothing to send.
  a.call_seq = 2;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome same, node.Retrieve(a));
  EXPECT_THAT(same.slots[0], ElementsAre(0, 1));
  EXPECT_TRUE(same.fill_slots[0].empty());
  EXPECT_EQ(same.bytes_streamed, 0u);

  // The smallest keys now: tokens 0 and 1 replace 2 and 3 in slots 0 and 1, rows packed at dest_row.
  a.entries[0].queries = left;
  a.call_seq = 3;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome moved, node.Retrieve(a));
  EXPECT_THAT(moved.token_ids[0], ElementsAre(0, 1));
  EXPECT_THAT(moved.slots[0], ElementsAre(0, 1));
  EXPECT_THAT(moved.fill_slots[0], ElementsAre(0, 1));
  EXPECT_THAT(std::vector<float>(rows, rows + 8), ElementsAre(1, 0, 7, 7, 2, 0, 8, 8));

  // A stale call (number already used in this staging area) is refused before anything is put.
  a.entries[0].queries = right;
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kAborted));
  EXPECT_THAT(std::vector<float>(rows, rows + 8), ElementsAre(1, 0, 7, 7, 2, 0, 8, 8));
  // Another staging area has its own numbering.
  a.staging_area = 1;
  a.entries[0].dest_row = 2;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome back, node.Retrieve(a));
  EXPECT_THAT(back.slots[0], ElementsAre(0, 1));
  // An older epoch is a stale call too; a newer one resends everything.
  a.call_seq = 4;
  a.entries[0].slot_epoch = 4;
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kAborted));
  a.call_seq = 5;
  a.entries[0].slot_epoch = 6;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome reset, node.Retrieve(a));
  EXPECT_THAT(reset.fill_slots[0], ElementsAre(0, 1));
  a.staging_area = kMaxStagingAreas;
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
}

// row_addresses: the outcome points at the stored K and V rows in the arena instead of copying
// them, and those rows' blocks stay pinned until the next call in the staging area: a dropped
// sequence's memory returns to the arena only then.
TEST_F(NodeTest, RowAddressesPointIntoTheArenaAndPinUntilTheNextCall) {
  std::unique_ptr<transport::Transport> t = transport::CreateInProcessTransport();
  Node node(NodeOptions{1 << 20, 4, 1}, t.get(), &clock_);
  ASSERT_OK(node.RegisterModel(Spec()).status());
  std::vector<float> k = {1, 0, 2, 0, 3, 0, 4, 0}, v = {7, 7, 8, 8, 9, 9, 6, 6};
  for (const char* id : {"s", "s2"}) {  // different tokens: no shared prefix
    ASSERT_OK(
        node.OpenSequence({"t", "m", id, std::vector<int32_t>(4, id[1] == 0 ? 1 : 2)}).status());
    ASSERT_OK_AND_ASSIGN(auto seq, node.FindSequence("t", id));
    ASSERT_OK(seq->BeginAppend());
    for (int layer = 0; layer < 2; ++layer) {
      ASSERT_OK(seq->AppendChunk(layer, 0, 4, {reinterpret_cast<uint8_t*>(k.data()), 32},
                                 {reinterpret_cast<uint8_t*>(v.data()), 32}));
    }
    ASSERT_OK(seq->CommitAppend().status());
  }
  ASSERT_OK_AND_ASSIGN(auto region, t->AllocateRegion(4 * 16));
  std::vector<float> right = {1, 0, 1, 0};
  RetrieveArgs a{"t", 1, 2, Method::kExact, "w", {{"s", 0, right, 0, 4, 0, /*slot_epoch=*/5}}};
  a.row_addresses = true;
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kFailedPrecondition));  // not attached
  ASSERT_OK(node.AttachWorker("t", "w", region->Describe()));
  a.call_seq = 1;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome out, node.Retrieve(a));
  EXPECT_THAT(out.token_ids[0], ElementsAre(2, 3));
  EXPECT_THAT(out.fill_slots[0], ElementsAre(0, 1));
  ASSERT_EQ(out.row_addresses.size(), 1u);
  ASSERT_EQ(out.row_addresses[0].size(), 4u);  // K, V of token 2, then of token 3
  const uint8_t* lo = node.arena().base();
  const uint8_t* hi = lo + node.arena().capacity_bytes();
  std::vector<float> got;
  for (const uint8_t* p : out.row_addresses[0]) {
    EXPECT_TRUE(p >= lo && p + 8 <= hi);
    const float* f = reinterpret_cast<const float*>(p);
    got.insert(got.end(), f, f + 2);
  }
  EXPECT_THAT(got, ElementsAre(3, 0, 9, 9, 4, 0, 6, 6));
  const float* rows = reinterpret_cast<const float*>(region->data());
  EXPECT_THAT(std::vector<float>(rows, rows + 8), ::testing::Each(0.0f));  // nothing copied

  // The dropped sequence's blocks stay while the worker may still read them.
  const int64_t both = node.arena().used_bytes();
  ASSERT_OK(node.CloseSequence("t", "s", true));
  EXPECT_EQ(node.arena().used_bytes(), both);
  EXPECT_EQ(reinterpret_cast<const float*>(out.row_addresses[0][3])[0], 6.0f);
  // The next call in another staging area keeps them; one in this area lets them go.
  a.entries[0].sequence_id = "s2";
  a.staging_area = 1;
  ASSERT_OK(node.Retrieve(a).status());
  EXPECT_EQ(node.arena().used_bytes(), both);
  a.staging_area = 0;
  a.call_seq = 2;
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome next, node.Retrieve(a));
  EXPECT_LT(node.arena().used_bytes(), both);
  // The call in area 1 sent s2's rows (the mirror is per sequence, layer and kv-head).
  EXPECT_TRUE(next.fill_slots[0].empty());
  a.worker_id.clear();
  EXPECT_THAT(node.Retrieve(a), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(NodeTest, CloseAndDropFreeMemory) {
  EXPECT_GT(node_.Stats(false).stored_bytes, 0);
  ASSERT_OK(node_.CloseSequence("t", "s", false));
  EXPECT_TRUE(node_.Stats(true).sequences[0].closed);
  ASSERT_OK(node_.CloseSequence("t", "s", true));
  EXPECT_EQ(node_.Stats(false).stored_bytes, 0);
  EXPECT_THAT(node_.CloseSequence("t", "s", true), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(NodeTest, ReopenChecksModelAndTokens) {
  ASSERT_OK_AND_ASSIGN(auto r, node_.OpenSequence({"t", "m", "s", std::vector<int32_t>(4, 3)}));
  EXPECT_EQ(r.stored_tokens, 6);
  EXPECT_EQ(r.matched_tokens, 4);
  EXPECT_THAT(node_.OpenSequence({"t", "m", "s", {4}}), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(node_.OpenSequence({"t", "zz", "s2", {4}}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(node_.OpenSequence({"", "m", "s2", {4}}), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::kvstore
