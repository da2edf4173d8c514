// The node's index lifecycle (index_manager.h): automatic builds at commit, growth with decode
// tokens, memory accounting, spill/reload, durable restart and corrupt records.
#include "kvstore/index_manager.h"

#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/node.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

constexpr int kLayers = 3, kKvHeads = 2, kQHeads = 4, kDim = 16, kBlock = 64;
constexpr int64_t kLayerBlock = 2 * kKvHeads * kBlock * kDim * 4;  // f32

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = kLayers;
  s.num_q_heads = kQHeads;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.kv_dtype = DType::kF32;
  s.vocab_size = 100;
  return s;
}

// A deterministic value in [-1, 1) from a 64-bit seed (SplitMix64).
float Unit(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) / static_cast<float>(1 << 23) - 1.0f;
}

// Key / value element of (layer, kv-head, token, dim): deterministic, clustered by token / 50
// (a topic direction shared by 50 consecutive tokens plus per-token noise).
float Elem(int layer, int h, int64_t t, int j, bool value) {
  const uint64_t head = static_cast<uint64_t>(layer * 7 + h) << 40;
  const uint64_t dim = static_cast<uint64_t>(j) << 20;
  const float noise = Unit(head ^ dim ^ (static_cast<uint64_t>(t) << 1) ^ (value ? 1 : 0));
  const float topic = Unit(head ^ dim ^ (static_cast<uint64_t>(t / 50) << 1) ^ (uint64_t{1} << 63));
  return 1.7f * noise + 3.5f * topic;
}

absl::Status Append(Node* node, const std::string& id, int64_t from, int64_t to) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, node->FindSequence("t", id));
  std::vector<int32_t> ids(static_cast<size_t>(to - from), 5);
  RETURN_IF_ERROR(seq->AddTokenIds(from, ids));
  RETURN_IF_ERROR(seq->BeginAppend());
  const int64_t n = to - from;
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k, v;
    for (int h = 0; h < kKvHeads; ++h) {
      for (int64_t t = from; t < to; ++t) {
        for (int j = 0; j < kDim; ++j) {
          k.push_back(Elem(l, h, t, j, false));
          v.push_back(Elem(l, h, t, j, true));
        }
      }
    }
    absl::Status s = seq->AppendChunk(
        l, from, n, {reinterpret_cast<const uint8_t*>(k.data()), k.size() * 4},
        {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4});
    if (!s.ok()) {
      seq->AbortAppend();
      return s;
    }
  }
  return seq->CommitAppend().status();
}

std::vector<float> Queries(int seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> n(0, 1);
  std::vector<float> q(static_cast<size_t>(kQHeads / kKvHeads) * kDim);
  for (float& x : q) x = n(rng);
  return q;
}

// Layer-2 retrieval for every kv-head over [16, end), budget 64.
absl::StatusOr<std::vector<std::vector<int32_t>>> Retrieve(Node* node, const std::string& id,
                                                            Method method, int64_t end) {
  std::vector<std::vector<float>> qs;
  RetrieveArgs a;
  a.tenant = "t";
  a.layer = 2;
  a.budget = 64;
  a.method = method;
  for (int h = 0; h < kKvHeads; ++h) qs.push_back(Queries(h + 1));
  for (int h = 0; h < kKvHeads; ++h) a.entries.push_back({id, h, qs[h], 16, end, 0});
  ASSIGN_OR_RETURN(RetrieveOutcome out, node->Retrieve(a));
  return out.token_ids;
}

// An explicit cluster build of sequence "s".
BuildIndexArgs ClusterArgs() {
  BuildIndexArgs b;
  b.tenant = "t";
  b.sequence_id = "s";
  b.method = Method::kCluster;
  return b;
}

// An explicit ctkvr build of sequence "s" over layers [1, 3) with `q` (8 prompt queries) as
// every layer's queries; the caller keeps q alive while the args are used.
BuildIndexArgs CtkvrArgs(const std::vector<float>& q) {
  BuildIndexArgs b;
  b.tenant = "t";
  b.sequence_id = "s";
  b.method = Method::kCtkvr;
  b.first_layer = 1;
  b.num_queries = 8;
  b.layer_queries = {q, q};
  return b;
}

NodeOptions Options() {
  NodeOptions o;
  o.memory_bytes = 256 * kLayers * kLayerBlock;
  o.block_tokens = kBlock;
  o.search_threads = 2;
  o.try_hugepages = false;
  o.auto_index_first_layer = 1;
  return o;
}

std::string TempDir(const std::string& name) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("kvrecall_index_" + name + "." + std::to_string(getpid()))).string();
  std::filesystem::remove_all(dir);
  return dir;
}

class IndexLifecycleTest : public ::testing::Test {
 protected:
  std::unique_ptr<Node> Start(NodeOptions o) {
    auto node = std::make_unique<Node>(o, nullptr, &clock_);
    EXPECT_OK(node->arena_status());
    EXPECT_OK(node->RegisterModel(Spec()).status());
    return node;
  }
  absl::Status Open(Node* node, const std::string& id) {
    return node->OpenSequence(OpenSequenceArgs{"t", "m", id, {}}).status();
  }
  FakeClock clock_;
};

TEST_F(IndexLifecycleTest, PrefillCommitBuildsInTheBackground) {
  std::unique_ptr<Node> node = Start(Options());
  ASSERT_OK(Open(node.get(), "s"));
  ASSERT_OK(Append(node.get(), "s", 0, 500));  // below min_tokens: nothing
  node->WaitForIndexJobs();
  ASSERT_OK_AND_ASSIGN(auto seq, node->FindSequence("t", "s"));
  EXPECT_EQ(seq->index(), nullptr);
  ASSERT_OK(Append(node.get(), "s", 500, 1300));  // the prefill: auto-build starts
  ASSERT_NE(seq->held_index(), nullptr) << "a placeholder is installed at commit";
  node->WaitForIndexJobs();
  std::shared_ptr<const SequenceIndex> idx = seq->index();
  ASSERT_NE(idx, nullptr);
  EXPECT_TRUE(idx->complete);
  EXPECT_EQ(idx->method, Method::kCluster);
  EXPECT_EQ(idx->first_layer, 1);
  EXPECT_EQ(idx->token_begin, 16);
  EXPECT_EQ(idx->token_end, 1300);
  const NodeStats s = node->Stats(false);
  EXPECT_EQ(s.index.auto_builds, 1);
  EXPECT_EQ(s.index.indices, 1);
  EXPECT_GT(s.index.bytes, 0);
  EXPECT_GE(s.index.reserved_bytes, s.index.bytes) << "index memory is charged to the arena";
  EXPECT_EQ(s.stored_bytes + s.index.reserved_bytes, node->arena().used_bytes());
  ASSERT_OK_AND_ASSIGN(auto ids, Retrieve(node.get(), "s", Method::kCluster, 1300));
  EXPECT_EQ(ids[0].size(), 64u);
  // An explicit BuildIndex of the same method is satisfied by the automatic one.
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome out, node->BuildIndex(ClusterArgs()));
  EXPECT_FALSE(out.rebuilt);
}

TEST_F(IndexLifecycleTest, RetrieveWhileTheIndexIsPendingScansExactly) {
  // auto ctkvr installs a placeholder and waits for BuildIndex's prompt queries: a search
  // meanwhile is the exact one.
  NodeOptions o = Options();
  o.auto_index = Method::kCtkvr;
  std::unique_ptr<Node> node = Start(o);
  ASSERT_OK(Open(node.get(), "s"));
  ASSERT_OK(Append(node.get(), "s", 0, 1300));
  node->WaitForIndexJobs();
  ASSERT_OK_AND_ASSIGN(auto seq, node->FindSequence("t", "s"));
  ASSERT_NE(seq->index(), nullptr);
  EXPECT_FALSE(seq->index()->complete);
  EXPECT_EQ(node->Stats(false).index.placeholders, 1);
  ASSERT_OK_AND_ASSIGN(auto pending, Retrieve(node.get(), "s", Method::kCtkvr, 1300));
  ASSERT_OK_AND_ASSIGN(auto exact, Retrieve(node.get(), "s", Method::kExact, 1300));
  EXPECT_EQ(pending, exact);
  // BuildIndex with queries replaces the placeholder.
  std::vector<float> q(static_cast<size_t>(8) * kQHeads * kDim, 0.5f);
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome out, node->BuildIndex(CtkvrArgs(q)));
  EXPECT_TRUE(out.rebuilt);
  EXPECT_TRUE(seq->index()->complete);
  EXPECT_TRUE(seq->index()->explicit_build);
}

// Sessions over one document: a build over the adopted prefix with the document's queries is
// built once, held by every session and charged once; a session's own tokens grow a part of its
// own after it; the charge goes with the last session.
TEST_F(IndexLifecycleTest, SessionsOverOneDocumentShareOneIndexChargedOnce) {
  NodeOptions o = Options();
  o.auto_index = Method::kExact;
  o.memory_bytes *= 4;  // room for two ctkvr indices
  std::unique_ptr<Node> node = Start(o);
  ASSERT_OK(Open(node.get(), "a"));
  ASSERT_OK(Append(node.get(), "a", 0, 1300));  // the document is [0, 1280): 20 full blocks
  ASSERT_OK(
      node->OpenSequence(OpenSequenceArgs{"t", "m", "b", std::vector<int32_t>(1280, 5)}).status());
  ASSERT_OK(Append(node.get(), "b", 1280, 1300));
  ASSERT_OK_AND_ASSIGN(auto a, node->FindSequence("t", "a"));
  ASSERT_OK_AND_ASSIGN(auto b, node->FindSequence("t", "b"));
  ASSERT_EQ(b->usage().adopted_tokens, 1280);

  std::vector<float> q(static_cast<size_t>(8) * kQHeads * kDim);
  for (size_t i = 0; i < q.size(); ++i) q[i] = Unit(i);
  BuildIndexArgs args = CtkvrArgs(q);
  args.token_end = 1280;
  args.sequence_id = "a";
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome built_a, node->BuildIndex(args));
  EXPECT_TRUE(built_a.rebuilt);
  EXPECT_TRUE(built_a.shared);
  EXPECT_EQ(built_a.indexed_tokens, 1280 - 16);
  const int64_t used_one = node->arena().used_bytes();
  args.sequence_id = "b";
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome built_b, node->BuildIndex(args));
  EXPECT_FALSE(built_b.rebuilt) << "answered by a's build";
  EXPECT_TRUE(built_b.shared);
  EXPECT_EQ(a->index(), b->index()) << "one index object";
  EXPECT_EQ(b->index()->token_end, 1280);
  NodeStats s = node->Stats(false);
  EXPECT_EQ(s.index.builds, 1);
  EXPECT_EQ(s.index.shared_installs, 1);
  EXPECT_EQ(s.index.shared, 1);
  EXPECT_EQ(s.index.bytes, built_a.index_bytes) << "counted once";
  EXPECT_EQ(node->arena().used_bytes(), used_one) << "charged once";
  EXPECT_EQ(s.stored_bytes + s.index.reserved_bytes, node->arena().used_bytes());
  // Both search it, over their own tails too (scanned exactly): the same tokens, same answer.
  ASSERT_OK_AND_ASSIGN(auto from_a, Retrieve(node.get(), "a", Method::kCtkvr, 1300));
  ASSERT_OK_AND_ASSIGN(auto from_b, Retrieve(node.get(), "b", Method::kCtkvr, 1300));
  EXPECT_EQ(from_a, from_b);
  EXPECT_EQ(from_a[0].size(), 64u);

  // Other queries (another document position, or another model's) are another index.
  std::vector<float> q2 = q;
  q2[3] += 1;
  args.layer_queries = {q2, q2};
  ASSERT_OK(
      node->OpenSequence(OpenSequenceArgs{"t", "m", "c", std::vector<int32_t>(1280, 5)}).status());
  args.sequence_id = "c";
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome built_c, node->BuildIndex(args));
  EXPECT_TRUE(built_c.rebuilt);
  ASSERT_OK_AND_ASSIGN(auto c, node->FindSequence("t", "c"));
  EXPECT_NE(c->index(), a->index());
  EXPECT_EQ(node->Stats(false).index.shared, 2);
  ASSERT_OK(node->CloseSequence("t", "c", true));
  c.reset();

  // b's decode tokens: growth adds b's own part after the shared segment, which a still holds.
  const indexer::Segment* shared_segment = a->index()->segment(2, 1);
  int64_t end = 1300;
  for (; end < 1280 + 320; ++end) ASSERT_OK(Append(node.get(), "b", end, end + 1));
  node->WaitForIndexJobs();
  std::shared_ptr<const SequenceIndex> grown = b->index();
  EXPECT_EQ(grown->token_end, 1600);
  auto parts = indexer::SegmentParts(grown->segments[static_cast<size_t>(kKvHeads) + 1]);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].get(), shared_segment);
  EXPECT_EQ(parts[1]->token_begin(), 1280);
  EXPECT_EQ(parts[1]->method(), Method::kCtkvr);
  EXPECT_EQ(a->index()->token_end, 1280);
  s = node->Stats(false);
  EXPECT_EQ(s.index.growths, 1);
  EXPECT_EQ(s.stored_bytes + s.index.reserved_bytes, node->arena().used_bytes());
  EXPECT_LT(s.index.bytes, 2 * built_a.index_bytes) << "b's own part is small";
  ASSERT_OK_AND_ASSIGN(auto grown_ids, Retrieve(node.get(), "b", Method::kCtkvr, end));
  EXPECT_EQ(grown_ids[0].size(), 64u);

  // The charge goes with the last index that holds it.
  ASSERT_OK(node->CloseSequence("t", "a", true));
  EXPECT_EQ(node->Stats(false).index.shared, 1) << "b still holds it";
  grown.reset();
  ASSERT_OK(node->CloseSequence("t", "b", true));
  a.reset();
  b.reset();
  node->WaitForIndexJobs();
  s = node->Stats(false);
  EXPECT_EQ(s.index.shared, 0);
  EXPECT_EQ(s.index.reserved_bytes, 0);
  EXPECT_EQ(s.stored_bytes, node->arena().used_bytes());
}

// token_end is validated before anything is built.
TEST_F(IndexLifecycleTest, BuildIndexRejectsABadTokenEnd) {
  std::unique_ptr<Node> node = Start(Options());
  ASSERT_OK(Open(node.get(), "s"));
  ASSERT_OK(Append(node.get(), "s", 0, 1300));
  std::vector<float> q(static_cast<size_t>(8) * kQHeads * kDim, 0.5f);
  BuildIndexArgs args = CtkvrArgs(q);
  for (int64_t bad : {int64_t{-1}, int64_t{16}, int64_t{10}}) {
    args.token_end = bad;
    EXPECT_THAT(node->BuildIndex(args).status(), StatusIs(absl::StatusCode::kInvalidArgument))
        << bad;
  }
  args.token_end = 1301;
  EXPECT_THAT(node->BuildIndex(args).status(), StatusIs(absl::StatusCode::kFailedPrecondition));
  args.token_end = 1300;  // the last block is partial: built, but nobody else can hold it
  ASSERT_OK_AND_ASSIGN(BuildIndexOutcome out, node->BuildIndex(args));
  EXPECT_TRUE(out.rebuilt);
  EXPECT_FALSE(out.shared);
}

TEST_F(IndexLifecycleTest, DecodeTokensAreIndexedEveryWTokens) {
  std::unique_ptr<Node> node = Start(Options());
  ASSERT_OK(Open(node.get(), "s"));
  ASSERT_OK(Append(node.get(), "s", 0, 1300));
  node->WaitForIndexJobs();
  ASSERT_OK_AND_ASSIGN(auto seq, node->FindSequence("t", "s"));
  const indexer::Segment* prompt_segment = seq->index()->segment(2, 0);
  // Decode: one token per commit. Nothing grows before W = 320 tokens.
  int64_t end = 1300;
  for (; end < 1300 + 319; ++end) ASSERT_OK(Append(node.get(), "s", end, end + 1));
  node->WaitForIndexJobs();
  EXPECT_EQ(seq->index()->token_end, 1300);
  ASSERT_OK(Append(node.get(), "s", end, end + 1));
  ++end;
  node->WaitForIndexJobs();
  std::shared_ptr<const SequenceIndex> idx = seq->index();
  EXPECT_EQ(idx->token_end, 1300 + 320);
  EXPECT_EQ(node->Stats(false).index.growths, 1);
  // The prompt's segment is shared by the grown index (a chain part), not copied.
  auto parts = indexer::SegmentParts(idx->segments[static_cast<size_t>(kKvHeads)]);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].get(), prompt_segment);
  EXPECT_EQ(parts[1]->token_begin(), 1300);
  EXPECT_EQ(parts[1]->token_end(), 1620);
  // Another W: the suffix part grows (clone + Append).
  for (; end < 1300 + 640 + 5; ++end) ASSERT_OK(Append(node.get(), "s", end, end + 1));
  node->WaitForIndexJobs();
  idx = seq->index();
  EXPECT_EQ(idx->token_end, 1300 + 640);
  ASSERT_OK_AND_ASSIGN(auto ids, Retrieve(node.get(), "s", Method::kCluster, end));
  EXPECT_EQ(ids[0].size(), 64u);
}

TEST_F(IndexLifecycleTest, CtkvrIndexGrowsByAppend) {
  NodeOptions o = Options();
  o.auto_index = Method::kExact;  // none
  std::unique_ptr<Node> node = Start(o);
  ASSERT_OK(Open(node.get(), "s"));
  ASSERT_OK(Append(node.get(), "s", 0, 1300));
  node->WaitForIndexJobs();
  ASSERT_OK_AND_ASSIGN(auto seq, node->FindSequence("t", "s"));
  EXPECT_EQ(seq->index(), nullptr) << "--auto-index=none";
  std::vector<float> q(static_cast<size_t>(8) * kQHeads * kDim, 0.5f);
  ASSERT_OK(node->BuildIndex(CtkvrArgs(q)).status());
  ASSERT_OK(Append(node.get(), "s", 1300, 1300 + 330));
  node->WaitForIndexJobs();
  EXPECT_EQ(seq->index()->token_end, 1620);
  EXPECT_EQ(seq->index()->segment(2, 1)->token_end(), 1620);
  EXPECT_TRUE(seq->index()->explicit_build);
}

TEST_F(IndexLifecycleTest, IndexMemoryCountsAgainstTheArena) {
  NodeOptions o = Options();
  // Exactly the KV of 1280 tokens (20 blocks): no room left for an index, and no --data-dir.
  o.memory_bytes = 20 * kLayers * kLayerBlock;
  std::unique_ptr<Node> node = Start(o);
  ASSERT_OK(Open(node.get(), "s"));
  ASSERT_OK(Append(node.get(), "s", 0, 1280));
  node->WaitForIndexJobs();
  NodeStats s = node->Stats(false);
  EXPECT_EQ(s.index.refused, 1);
  EXPECT_EQ(s.index.indices, 0);
  EXPECT_EQ(s.index.placeholders, 1) << "searches stay exact";
  EXPECT_EQ(s.index.reserved_bytes, 0);
  EXPECT_THAT(node->BuildIndex(ClusterArgs()).status(), StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_OK_AND_ASSIGN(auto pending, Retrieve(node.get(), "s", Method::kCluster, 1280));
  ASSERT_OK_AND_ASSIGN(auto exact, Retrieve(node.get(), "s", Method::kExact, 1280));
  EXPECT_EQ(pending, exact);
  // Dropping another sequence's memory makes room.
  ASSERT_OK(node->CloseSequence("t", "s", true));
  EXPECT_EQ(node->arena().used_bytes(), 0);
}

TEST_F(IndexLifecycleTest, SpilledWithItsSequenceAndReloadedBitExact) {
  NodeOptions o = Options();
  o.memory_bytes = 40 * kLayers * kLayerBlock;
  o.data_dir = TempDir("spill");
  o.lease = absl::Seconds(1);
  std::unique_ptr<Node> node = Start(o);
  ASSERT_OK(Open(node.get(), "a"));
  ASSERT_OK(Append(node.get(), "a", 0, 1300));
  node->WaitForIndexJobs();
  ASSERT_OK_AND_ASSIGN(auto before, Retrieve(node.get(), "a", Method::kCluster, 1300));
  ASSERT_OK_AND_ASSIGN(auto seq, node->FindSequence("t", "a"));
  const int64_t a_bytes = static_cast<int64_t>(seq->index()->MemoryBytes());
  // b needs the rest of the arena: a (lease expired) is evicted, and its index goes with it.
  const int64_t index_slots = node->Stats(false).index.reserved_bytes / kLayerBlock;
  const int64_t b_tokens = (40 * kLayers - index_slots) / kLayers * kBlock;
  clock_.Advance(absl::Seconds(5));
  ASSERT_OK(Open(node.get(), "b"));
  ASSERT_OK(Append(node.get(), "b", 0, b_tokens - 1));
  ASSERT_OK(Append(node.get(), "b", b_tokens - 1, b_tokens));  // a later commit runs the sweep
  node->WaitForIndexJobs();
  EXPECT_EQ(seq->resident_blocks(), 0);
  NodeStats s = node->Stats(false);
  EXPECT_EQ(s.index.spills, 1);
  EXPECT_EQ(s.index.on_disk, 1);
  EXPECT_TRUE(seq->held_index()->on_disk);
  clock_.Advance(absl::Seconds(5));
  ASSERT_OK_AND_ASSIGN(auto after, Retrieve(node.get(), "a", Method::kCluster, 1300));
  EXPECT_EQ(after, before);
  s = node->Stats(false);
  EXPECT_EQ(s.index.reloads, 1);
  EXPECT_EQ(static_cast<int64_t>(seq->index()->MemoryBytes()), a_bytes);
}

class DurableIndexTest : public IndexLifecycleTest {
 protected:
  void SetUp() override {
    dir_ = TempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  NodeOptions DurableOptions() {
    NodeOptions o = Options();
    o.data_dir = dir_;
    o.durable = true;
    return o;
  }
  std::string dir_;
};

TEST_F(DurableIndexTest, RestartKeepsTheIndex) {
  std::vector<std::vector<int32_t>> before;
  {
    std::unique_ptr<Node> node = Start(DurableOptions());
    ASSERT_OK(Open(node.get(), "s"));
    ASSERT_OK(Append(node.get(), "s", 0, 1300));
    node->WaitForIndexJobs();
    ASSERT_OK_AND_ASSIGN(before, Retrieve(node.get(), "s", Method::kCluster, 1300));
  }
  std::unique_ptr<Node> node = Start(DurableOptions());
  ASSERT_OK_AND_ASSIGN(auto after, Retrieve(node.get(), "s", Method::kCluster, 1300));
  EXPECT_EQ(after, before);
  node->WaitForIndexJobs();
  const NodeStats s = node->Stats(false);
  EXPECT_EQ(s.index.reloads, 1);
  EXPECT_EQ(s.index.auto_builds, 0) << "loaded, not rebuilt";
}

TEST_F(DurableIndexTest, CorruptRecordIsDroppedAndRebuilt) {
  std::vector<std::vector<int32_t>> before;
  {
    std::unique_ptr<Node> node = Start(DurableOptions());
    ASSERT_OK(Open(node.get(), "s"));
    ASSERT_OK(Append(node.get(), "s", 0, 1300));
    node->WaitForIndexJobs();
    ASSERT_OK_AND_ASSIGN(before, Retrieve(node.get(), "s", Method::kCluster, 1300));
  }
  {
    ASSERT_OK_AND_ASSIGN(auto store, BlockStore::Open(BlockStoreOptions{dir_, true}));
    std::string record;
    ASSERT_OK(store->GetSegment(IndexManager::SegmentKey("t", "s", 1), &record));
    record[record.size() / 2] ^= 0x40;
    auto batch = store->NewBatch();
    batch->PutSegment(IndexManager::SegmentKey("t", "s", 1), record);
    ASSERT_OK(store->Commit(batch.get()));
  }
  std::unique_ptr<Node> node = Start(DurableOptions());
  // The damaged index is dropped: the search is exact meanwhile (never DATA_LOSS: the KV is
  // intact), and the index is rebuilt in the background.
  ASSERT_OK_AND_ASSIGN(auto during, Retrieve(node.get(), "s", Method::kCluster, 1300));
  node->WaitForIndexJobs();
  NodeStats s = node->Stats(false);
  EXPECT_EQ(s.index.corrupt, 1);
  EXPECT_EQ(s.index.auto_builds, 1);
  ASSERT_OK_AND_ASSIGN(auto after, Retrieve(node.get(), "s", Method::kCluster, 1300));
  EXPECT_EQ(after, before) << "the rebuild is deterministic";
  EXPECT_EQ(during[0].size(), 64u);
  // Dropping deletes the records with the sequence.
  ASSERT_OK(node->CloseSequence("t", "s", true));
  node.reset();
  ASSERT_OK_AND_ASSIGN(auto store, BlockStore::Open(BlockStoreOptions{dir_, true}));
  std::string record;
  EXPECT_THAT(store->GetSegment(IndexManager::HeaderKey("t", "s"), &record),
              StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvrecall::kvstore
