// Bulk ingest (Node::AllocateBlocks / CommitBlocks) through the in-process transport: the test
// plays the client, computing where each row goes from the layout the proto documents.
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/internal/crc32c.h"
#include "kvstore/node.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

constexpr int kLayers = 2;
constexpr int kHeads = 2;
constexpr int kDim = 4;
constexpr int kBlock = 4;
constexpr size_t kRow = kDim * sizeof(float);
constexpr size_t kLayerBlock = 2 * kHeads * kBlock * kRow;

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = kLayers;
  s.num_q_heads = 4;
  s.num_kv_heads = kHeads;
  s.head_dim = kDim;
  s.kv_dtype = DType::kF32;
  s.vocab_size = 1000;
  return s;
}

// keys[l] / values[l]: [heads][tokens][dim] f32 of a whole sequence.
struct Kv {
  int64_t tokens = 0;
  std::vector<std::vector<float>> k, v;
};
Kv RandomKv(int64_t tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  Kv kv;
  kv.tokens = tokens;
  kv.k.resize(kLayers);
  kv.v.resize(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    for (int64_t i = 0; i < kHeads * tokens * kDim; ++i) {
      kv.k[l].push_back(u(rng));
      kv.v[l].push_back(u(rng));
    }
  }
  return kv;
}
const float* Row(const std::vector<float>& layer, int64_t tokens, int h, int64_t t) {
  return layer.data() + (h * tokens + t) * kDim;
}

// The client's side: puts rows [start, start + n) of kv into the granted slots and returns the
// checksums CommitBlocks wants.
absl::StatusOr<std::vector<uint32_t>> PutRows(transport::Transport* t, const IngestGrant& g, const Kv& kv,
                                              int64_t start, int64_t n) {
  ASSIGN_OR_RETURN(std::unique_ptr<transport::RemoteWriter> w, t->Connect(g.region));
  std::vector<uint32_t> crcs;
  std::vector<transport::PutOp> ops;
  for (int l = 0; l < kLayers; ++l) {
    for (int b = 0; b < g.num_blocks; ++b) {
      const int64_t first = (g.first_block + b) * g.block_tokens;
      const int64_t lo = std::max(start, first), hi = std::min(start + n, first + g.block_tokens);
      const uint64_t slot = g.slot_offsets[static_cast<size_t>(l * g.num_blocks + b)];
      uint32_t crc = 0;
      for (int kvi = 0; kvi < 2; ++kvi) {
        for (int h = 0; h < kHeads; ++h) {
          const float* src = Row(kvi == 0 ? kv.k[l] : kv.v[l], kv.tokens, h, lo);
          const size_t len = static_cast<size_t>(hi - lo) * kRow;
          ops.push_back({src, len, slot + ((kvi * kHeads + h) * g.block_tokens + (lo - first)) * kRow});
          crc = internal::Crc32cExtend(crc, src, len);
        }
      }
      crcs.push_back(crc);
    }
  }
  RETURN_IF_ERROR(w->PutAll(ops));
  return crcs;
}

std::vector<int32_t> Ids(int64_t n) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7 + 3) % 1000);
  return ids;
}

class IngestTest : public ::testing::Test {
 protected:
  void SetUp() override { Start(/*data_dir=*/""); }
  void Start(const std::string& data_dir, int64_t arena_blocks = 16) {
    node_.reset();
    NodeOptions o;
    o.memory_bytes = arena_blocks * kLayers * static_cast<int64_t>(kLayerBlock);
    o.block_tokens = kBlock;
    o.search_threads = 2;
    o.try_hugepages = false;
    o.ingest_lease = absl::Seconds(10);
    o.auto_index = indexer::Method::kExact;
    if (!data_dir.empty()) {
      o.data_dir = data_dir;
      o.durable = true;
    }
    node_ = std::make_unique<Node>(o, transport_.get(), &clock_);
    ASSERT_OK(node_->arena_status());
    ASSERT_OK(node_->RegisterModel(Spec()).status());
  }
  absl::Status Open(const std::string& id, int64_t n) {
    return node_->OpenSequence(OpenSequenceArgs{"t", "m", id, Ids(n)}).status();
  }
  // AllocateBlocks + puts + CommitBlocks.
  absl::StatusOr<CommitBlocksOutcome> Ingest(const std::string& id, const Kv& kv, int64_t start, int64_t n) {
    ASSIGN_OR_RETURN(IngestGrant g, node_->AllocateBlocks({"t", id, start, n, 0, {}}));
    ASSIGN_OR_RETURN(std::vector<uint32_t> crcs, PutRows(transport_.get(), g, kv, start, n));
    return node_->CommitBlocks({"t", id, g.ingest_id, crcs, false});
  }
  // Every committed row of every (layer, head) equals kv's.
  void ExpectRows(const std::string& id, const Kv& kv, int64_t n) {
    std::vector<int32_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    for (int l = 0; l < kLayers; ++l) {
      for (int h = 0; h < kHeads; ++h) {
        std::string k, v;
        ASSERT_OK(node_->ReadRows("t", id, l, h, all, &k, &v));
        ASSERT_EQ(k.size(), static_cast<size_t>(n) * kRow);
        EXPECT_EQ(std::memcmp(k.data(), Row(kv.k[l], kv.tokens, h, 0), k.size()), 0) << l << " " << h;
        EXPECT_EQ(std::memcmp(v.data(), Row(kv.v[l], kv.tokens, h, 0), v.size()), 0) << l << " " << h;
      }
    }
  }

  FakeClock clock_;
  std::unique_ptr<transport::Transport> transport_ = transport::CreateInProcessTransport();
  std::unique_ptr<Node> node_;
};

TEST_F(IngestTest, RowsPutIntoSlotsAreCommittedBitExact) {
  const Kv kv = RandomKv(11, 1);
  ASSERT_OK(Open("s", 11));
  ASSERT_OK_AND_ASSIGN(CommitBlocksOutcome a, Ingest("s", kv, 0, 6));
  EXPECT_EQ(a.stored_tokens, 6);
  EXPECT_EQ(a.bytes_written, int64_t{6} * kLayers * kHeads * 2 * static_cast<int64_t>(kRow));
  // Continues the partial second block.
  ASSERT_OK_AND_ASSIGN(CommitBlocksOutcome b, Ingest("s", kv, 6, 5));
  EXPECT_EQ(b.stored_tokens, 11);
  ExpectRows("s", kv, 11);
  const NodeStats st = node_->Stats(false);
  EXPECT_EQ(st.ingests, 2);
  EXPECT_EQ(st.ingest_bytes, a.bytes_written + b.bytes_written);
}

TEST_F(IngestTest, IngestedBlocksAreSharedLikeAppendedOnes) {
  const Kv kv = RandomKv(8, 2);
  ASSERT_OK(Open("a", 8));
  ASSERT_OK(Ingest("a", kv, 0, 8).status());
  ASSERT_OK_AND_ASSIGN(OpenSequenceResult r, node_->OpenSequence(OpenSequenceArgs{"t", "m", "b", Ids(8)}));
  EXPECT_EQ(r.matched_tokens, 8);
  ExpectRows("b", kv, 8);
}

TEST_F(IngestTest, ChecksumMismatchIsDataLossAndKeepsNothing) {
  const Kv kv = RandomKv(6, 3);
  ASSERT_OK(Open("s", 6));
  const int64_t used = node_->arena().used_slots();
  ASSERT_OK_AND_ASSIGN(IngestGrant g, node_->AllocateBlocks({"t", "s", 0, 6, 0, {}}));
  ASSERT_OK_AND_ASSIGN(std::vector<uint32_t> crcs, PutRows(transport_.get(), g, kv, 0, 6));
  crcs[3] ^= 1;  // as if one put of layer 1, block 1 had not landed
  const absl::Status lost = node_->CommitBlocks({"t", "s", g.ingest_id, crcs, false}).status();
  EXPECT_THAT(lost, StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(std::string(lost.message()), ::testing::HasSubstr("layer 1 block 1"));
  EXPECT_EQ(node_->arena().used_slots(), used);
  ASSERT_OK_AND_ASSIGN(auto seq, node_->FindSequence("t", "s"));
  EXPECT_EQ(seq->committed_tokens(), 0);
  // The transaction ended: the id is gone and a new ingest goes through.
  EXPECT_THAT(node_->CommitBlocks({"t", "s", g.ingest_id, crcs, false}), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(Ingest("s", kv, 0, 6).status());
  ExpectRows("s", kv, 6);
}

TEST_F(IngestTest, BadRequestsGetCanonicalCodes) {
  ASSERT_OK(Open("s", 6));
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 0, 0, 0, {}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 0, int64_t{1} << 21, 0, {}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", -1, 2, 0, {}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 2, 2, 0, {}}), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(node_->AllocateBlocks({"t", "nope", 0, 2, 0, {}}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(node_->AllocateBlocks({"u", "s", 0, 2, 0, {}}), StatusIs(absl::StatusCode::kNotFound));
  // KV for tokens whose ids are unknown.
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 0, 7, 0, {}}), StatusIs(absl::StatusCode::kFailedPrecondition));
  // A conflicting id for a known token leaves no transaction behind.
  const std::vector<int32_t> wrong = {999};
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 0, 1, 0, wrong}), StatusIs(absl::StatusCode::kFailedPrecondition));

  ASSERT_OK_AND_ASSIGN(IngestGrant g, node_->AllocateBlocks({"t", "s", 0, 6, 0, {}}));
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 0, 6, 0, {}}), StatusIs(absl::StatusCode::kAborted));
  // Another tenant or sequence cannot touch it, and the owner's transaction survives that.
  std::vector<uint32_t> crcs(static_cast<size_t>(kLayers * g.num_blocks));
  EXPECT_THAT(node_->CommitBlocks({"u", "s", g.ingest_id, crcs, false}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(node_->CommitBlocks({"t", "s", g.ingest_id + 1, crcs, false}), StatusIs(absl::StatusCode::kNotFound));
  // Wrong checksum count: INVALID_ARGUMENT, and the transaction is over.
  crcs.pop_back();
  EXPECT_THAT(node_->CommitBlocks({"t", "s", g.ingest_id, crcs, false}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(node_->CommitBlocks({"t", "s", g.ingest_id, crcs, false}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(node_->arena().used_slots(), 0);
}

TEST_F(IngestTest, AbortAndLeaseExpiryReleaseTheTransaction) {
  const Kv kv = RandomKv(6, 4);
  ASSERT_OK(Open("s", 6));
  ASSERT_OK_AND_ASSIGN(IngestGrant g, node_->AllocateBlocks({"t", "s", 0, 6, 0, {}}));
  EXPECT_GT(node_->arena().used_slots(), 0);
  ASSERT_OK(node_->CommitBlocks({"t", "s", g.ingest_id, {}, /*abort=*/true}).status());
  EXPECT_EQ(node_->arena().used_slots(), 0);

  ASSERT_OK_AND_ASSIGN(g, node_->AllocateBlocks({"t", "s", 0, 6, 0, {}}));
  clock_.Advance(absl::Seconds(11));
  // A client that went away: the next call on the node finds the lease over and aborts it.
  ASSERT_OK(Ingest("s", kv, 0, 6).status());
  EXPECT_THAT(node_->CommitBlocks({"t", "s", g.ingest_id, {}, false}), StatusIs(absl::StatusCode::kNotFound));
  ExpectRows("s", kv, 6);
}

// Revoked credentials end a tenant's sessions: its workers are detached (a Retrieve naming one
// is FAILED_PRECONDITION, as for a worker that never attached) and its open ingests aborted (their slots freed, the sequence free for the next
// append); its stored sequences and other tenants are untouched.
TEST_F(IngestTest, RevokeTenantDetachesItsWorkersAndAbortsItsIngests) {
  const Kv kv = RandomKv(6, 4);
  ASSERT_OK(Open("s", 6));
  ASSERT_OK(Open("done", 4));
  ASSERT_OK(Ingest("done", RandomKv(4, 9), 0, 4).status());
  ASSERT_OK(node_->OpenSequence(OpenSequenceArgs{"other", "m", "s", Ids(4)}).status());
  ASSERT_OK_AND_ASSIGN(auto region, transport_->AllocateRegion(1 << 16));
  ASSERT_OK(node_->AttachWorker("t", "w1", region->Describe()));
  ASSERT_OK(node_->AttachWorker("t", "w2", region->Describe()));
  ASSERT_OK(node_->AttachWorker("other", "w1", region->Describe()));
  ASSERT_OK_AND_ASSIGN(IngestGrant g, node_->AllocateBlocks({"t", "s", 0, 6, 0, {}}));
  ASSERT_OK_AND_ASSIGN(IngestGrant og, node_->AllocateBlocks({"other", "s", 0, 4, 0, {}}));

  EXPECT_EQ(node_->RevokeTenant("t"), std::make_pair(2, 1));
  EXPECT_EQ(node_->Stats(false).num_workers, 1);
  EXPECT_THAT(node_->CommitBlocks({"t", "s", g.ingest_id, {}, false}), StatusIs(absl::StatusCode::kNotFound));
  std::vector<float> q(2 * kDim, 0.5f);
  RetrieveArgs r;
  r.tenant = "t";
  r.layer = 1;
  r.budget = 2;
  r.worker_id = "w1";
  r.entries.push_back({"done", 0, q, 0, 4, 0, 0});
  EXPECT_THAT(node_->Retrieve(r), StatusIs(absl::StatusCode::kFailedPrecondition));
  r.worker_id.clear();  // ids only: the stored data is still there
  ASSERT_OK_AND_ASSIGN(RetrieveOutcome out, node_->Retrieve(r));
  EXPECT_EQ(out.token_ids[0].size(), 2u);
  ASSERT_OK(Ingest("s", kv, 0, 6).status());  // the aborted ingest released the sequence
  ExpectRows("s", kv, 6);
  // The other tenant's ingest is still open and commits.
  ASSERT_OK(node_->CommitBlocks({"other", "s", og.ingest_id, {}, /*abort=*/true}).status());
  EXPECT_EQ(node_->RevokeTenant("nobody"), std::make_pair(0, 0));
}

TEST_F(IngestTest, FullArenaIsResourceExhaustedAndLeaksNothing) {
  Start("", /*arena_blocks=*/2);
  ASSERT_OK(Open("s", 12));
  EXPECT_THAT(node_->AllocateBlocks({"t", "s", 0, 12, 0, {}}), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(node_->arena().used_slots(), 0);
  ASSERT_OK(Ingest("s", RandomKv(8, 5), 0, 8).status());
}

TEST_F(IngestTest, NodeWithoutTransportIsUnimplemented) {
  FakeClock clock;
  Node node(NodeOptions{1 << 20, kBlock, 1}, nullptr, &clock);
  ASSERT_OK(node.RegisterModel(Spec()).status());
  ASSERT_OK(node.OpenSequence(OpenSequenceArgs{"t", "m", "s", Ids(4)}).status());
  EXPECT_THAT(node.AllocateBlocks({"t", "s", 0, 4, 0, {}}), StatusIs(absl::StatusCode::kUnimplemented));
}

TEST_F(IngestTest, DurableIngestSurvivesRestart) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/kvrecall_ingest_durable.", getpid());
  std::filesystem::remove_all(dir);
  Start(dir);
  const Kv kv = RandomKv(10, 6);
  ASSERT_OK(Open("s", 10));
  ASSERT_OK(Ingest("s", kv, 0, 7).status());
  ASSERT_OK(Ingest("s", kv, 7, 3).status());
  // Uncommitted at the restart: not kept.
  ASSERT_OK(node_->OpenSequence(OpenSequenceArgs{"t", "m", "u", {5, 6, 7, 8}}).status());
  ASSERT_OK(node_->AllocateBlocks({"t", "u", 0, 4, 0, {}}).status());
  Start(dir);
  ExpectRows("s", kv, 10);
  // (A durable sequence is recorded with its first commit.)
  EXPECT_THAT(node_->FindSequence("t", "u").status(), StatusIs(absl::StatusCode::kNotFound));
  node_.reset();
  std::filesystem::remove_all(dir);
}

TEST_F(IngestTest, DrainingRefusesNewSequencesOnly) {
  ASSERT_OK(Open("s", 4));
  EXPECT_EQ(node_->SetDraining(true), 1);
  EXPECT_TRUE(node_->Stats(false).draining);
  EXPECT_THAT(Open("new", 4), StatusIs(absl::StatusCode::kUnavailable));
  ASSERT_OK(Open("s", 4));  // reopening what it holds still works
  ASSERT_OK(Ingest("s", RandomKv(4, 7), 0, 4).status());
  node_->SetDraining(false);
  ASSERT_OK(Open("new", 4));
}

}  // namespace
}  // namespace kvrecall::kvstore
