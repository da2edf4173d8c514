// Eviction, spill to RocksDB and reload: LRU order under a fake clock, bit-exact round trips,
// shared blocks spilled once, corruption as DATA_LOSS, and readers racing eviction.
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <numeric>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/block_store.h"
#include "kvstore/block_table.h"
#include "kvstore/node.h"
#include "kvstore/sequence.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;
using State = Block::State;

std::string TempDir(const std::string& name) {
  const std::string d = absl::StrCat(::testing::TempDir(), "/kvrecall_spill_", name, ".", getpid());
  std::filesystem::remove_all(d);
  return d;
}

// ---------------------------------------------------------------------------------------------
// BlockTable level: one-layer blocks of 64 bytes, an arena of 4 slots.

class TableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(arena_, Arena::Create(ArenaOptions{4 * 64, false}, nullptr));
    ASSERT_OK(arena_->EnsureSlotBytes(64));
    ASSERT_OK_AND_ASSIGN(store_, BlockStore::Open(BlockStoreOptions{TempDir(name()), false}));
    table_ = std::make_unique<BlockTable>(
        arena_.get(), BlockTableOptions{&clock_, absl::Seconds(10), store_.get()});
  }
  void TearDown() override {
    table_.reset();
    store_.reset();
  }
  std::string name() const {
    return ::testing::UnitTest::GetInstance()->current_test_info()->name();
  }
  // A block whose 64 bytes are all `fill`, unpinned (its writer is done).
  Block* Filled(uint8_t fill) {
    absl::StatusOr<Block*> b = table_->Allocate(1);
    EXPECT_OK(b.status());
    if (!b.ok()) return nullptr;
    std::memset((*b)->layer(0), fill, 64);
    table_->Unpin({&*b, 1});
    return *b;
  }
  State StateOf(Block* b) { return table_->States({&b, 1})[0]; }

  FakeClock clock_;
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<BlockStore> store_;
  std::unique_ptr<BlockTable> table_;
};

TEST_F(TableTest, EvictsLeastRecentlyUsedUnleasedUnpinnedFirst) {
  Block* a = Filled(1);
  clock_.Advance(absl::Seconds(1));
  Block* b = Filled(2);
  clock_.Advance(absl::Seconds(1));
  Block* c = Filled(3);
  clock_.Advance(absl::Seconds(1));
  Block* d = Filled(4);
  // Every lease is live: nothing may go.
  EXPECT_THAT(table_->Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(table_->stats().evictions, 0);

  clock_.Advance(absl::Seconds(5));
  table_->Touch({&a, 1});             // a is now the most recently used
  ASSERT_OK(table_->Pin({&b, 1}));    // b is pinned by a reader
  clock_.Advance(absl::Seconds(20));  // every lease has expired

  ASSERT_OK_AND_ASSIGN(Block * e, table_->Allocate(1));  // c: oldest, not pinned
  EXPECT_EQ(StateOf(c), State::kSpilled);
  EXPECT_EQ(StateOf(d), State::kResident);
  EXPECT_EQ(StateOf(a), State::kResident);
  table_->Unpin({&e, 1});
  clock_.Advance(absl::Seconds(20));
  ASSERT_OK_AND_ASSIGN(Block * f, table_->Allocate(1));  // then d; b stays pinned
  EXPECT_EQ(StateOf(d), State::kSpilled);
  EXPECT_EQ(StateOf(a), State::kResident);
  EXPECT_EQ(StateOf(b), State::kResident);
  ASSERT_OK_AND_ASSIGN(Block * g, table_->Allocate(1));  // then a (e is newer)
  EXPECT_EQ(StateOf(a), State::kSpilled);
  ASSERT_OK_AND_ASSIGN(Block * h, table_->Allocate(1));  // then e, whose lease ran out too
  EXPECT_EQ(StateOf(e), State::kSpilled);
  // Left: b (pinned by a reader), f, g, h (pinned by their writers).
  EXPECT_THAT(table_->Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted));
  const BlockTableStats st = table_->stats();
  EXPECT_EQ(st.evictions, 4);
  EXPECT_EQ(st.spilled, 4);
  EXPECT_EQ(st.spilled_bytes, 4 * static_cast<int64_t>(kBlockRecordHeaderBytes + 64));

  // Reading c back evicts the least recently used evictable block (f: same time as g, lower
  // id) and is bit-exact.
  table_->Unpin({&f, 1});
  table_->Unpin({&g, 1});
  clock_.Advance(absl::Seconds(20));
  ASSERT_OK(table_->Pin({&c, 1}));
  EXPECT_EQ(StateOf(c), State::kResident);
  EXPECT_EQ(StateOf(f), State::kSpilled);
  EXPECT_EQ(StateOf(g), State::kResident);
  for (int i = 0; i < 64; ++i) ASSERT_EQ(c->layer(0)[i], 3);
  EXPECT_EQ(table_->stats().reloads, 1);
  table_->Unpin({&c, 1});
  table_->Unpin({&b, 1});
  table_->Unpin({&h, 1});
  for (Block* x : {a, b, c, d, e, f, g, h}) table_->Unref(x);
  EXPECT_EQ(table_->stats().spilled_bytes, 0);
  EXPECT_EQ(arena_->used_slots(), 0);
}

TEST_F(TableTest, CorruptRecordIsDataLossAndTheTableKeepsServing) {
  Block* a = Filled(7);
  Block* b = Filled(8);
  Block* c = Filled(9);
  Block* d = Filled(10);
  clock_.Advance(absl::Seconds(60));
  ASSERT_OK_AND_ASSIGN(Block * e, table_->Allocate(1));  // spills a
  ASSERT_EQ(StateOf(a), State::kSpilled);
  const std::string key = table_->StoreKey(a);
  ASSERT_OK_AND_ASSIGN(std::string record, store_->GetBlockRecordForTest(key));
  ASSERT_EQ(record.size(), kBlockRecordHeaderBytes + 64);

  std::string flipped = record;
  flipped[kBlockRecordHeaderBytes + 17] ^= 0x01;  // one bit of the payload
  ASSERT_OK(store_->OverwriteBlockRecordForTest(key, flipped));
  table_->Unpin({&e, 1});
  clock_.Advance(absl::Seconds(60));
  EXPECT_THAT(table_->Pin({&a, 1}), StatusIs(absl::StatusCode::kDataLoss));
  ASSERT_OK(store_->OverwriteBlockRecordForTest(key, record.substr(0, 30)));  // truncated
  EXPECT_THAT(table_->Pin({&a, 1}), StatusIs(absl::StatusCode::kDataLoss));
  std::string header = record;
  header[4] = 2;  // claims two layers
  ASSERT_OK(store_->OverwriteBlockRecordForTest(key, header));
  EXPECT_THAT(table_->Pin({&a, 1}), StatusIs(absl::StatusCode::kDataLoss));

  // The others are untouched and readable; the intact record reloads fine.
  ASSERT_OK(table_->Pin({&b, 1}));
  for (int i = 0; i < 64; ++i) ASSERT_EQ(b->layer(0)[i], 8);
  table_->Unpin({&b, 1});
  ASSERT_OK(store_->OverwriteBlockRecordForTest(key, record));
  ASSERT_OK(table_->Pin({&a, 1}));
  for (int i = 0; i < 64; ++i) ASSERT_EQ(a->layer(0)[i], 7);
  table_->Unpin({&a, 1});
  for (Block* x : {a, b, c, d, e}) table_->Unref(x);
}

// PinForRead: a registered (O(1)) read pin protects its blocks from eviction exactly as per-block
// pins do, until its last copy is released; a claim from an older residency epoch, or an
// unverified block that is spilled, takes the per-block path and reloads.
TEST_F(TableTest, ReadPinsProtectLikePinsAndFallBackWhenTheEpochMoved) {
  Block* a = Filled(1);
  Block* b = Filled(2);
  Block* c = Filled(3);
  Block* d = Filled(4);
  const uint64_t epoch0 = BlockTable::kNoEpoch;
  // First read: no claim, so block by block; it reports the epoch it saw them resident under.
  ASSERT_OK_AND_ASSIGN(BlockTable::ReadPin first, table_->PinForRead({a, b}, epoch0, {}, true));
  const uint64_t e = first.epoch;
  first.pin.reset();
  // A read under that claim registers; leases run out, yet a and b (registered) stay.
  ASSERT_OK_AND_ASSIGN(BlockTable::ReadPin read, table_->PinForRead({a, b}, e, {}, false));
  EXPECT_EQ(read.epoch, e);
  std::shared_ptr<const void> copy = read.pin;
  clock_.Advance(absl::Seconds(60));
  ASSERT_OK_AND_ASSIGN(Block * x, table_->Allocate(1));  // spills c (LRU among c, d)
  ASSERT_OK_AND_ASSIGN(Block * y, table_->Allocate(1));  // spills d
  EXPECT_EQ(StateOf(c), State::kSpilled);
  EXPECT_EQ(StateOf(d), State::kSpilled);
  EXPECT_THAT(table_->Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(StateOf(a), State::kResident);
  EXPECT_EQ(StateOf(b), State::kResident);
  // Released once per pin, through its last copy only (the eviction turned it per-block).
  read.pin.reset();
  EXPECT_THAT(table_->Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted));
  copy.reset();
  table_->Unpin({&x, 1});
  table_->Unpin({&y, 1});
  clock_.Advance(absl::Seconds(60));
  // The epoch moved: a stale claim over spilled c and d reloads them (evicting a and b).
  ASSERT_OK_AND_ASSIGN(BlockTable::ReadPin again, table_->PinForRead({c, d}, e, {}, false));
  EXPECT_NE(again.epoch, e);
  EXPECT_EQ(StateOf(c), State::kResident);
  EXPECT_EQ(c->layer(0)[5], 3);
  EXPECT_EQ(d->layer(0)[5], 4);
  again.pin.reset();
  // A current claim with a spilled block outside it (unverified) reloads it too.
  ASSERT_OK_AND_ASSIGN(BlockTable::ReadPin now,
                       table_->PinForRead({c, d}, BlockTable::kNoEpoch, {}, false));
  ASSERT_EQ(StateOf(a), State::kSpilled);
  clock_.Advance(absl::Seconds(60));
  ASSERT_OK_AND_ASSIGN(BlockTable::ReadPin tail, table_->PinForRead({c, a}, now.epoch, {a}, false));
  EXPECT_EQ(StateOf(a), State::kResident);
  EXPECT_EQ(a->layer(0)[5], 1);
  tail.pin.reset();
  now.pin.reset();
  // Every pin was given back: the arena can be emptied.
  for (Block* z : {a, b, c, d, x, y}) table_->Unref(z);
  EXPECT_EQ(arena_->used_slots(), 0);
}

// A read renews its sequence's leases only when a quarter of the lease (here 2.5 s) has passed
// since it last did: a read protects the blocks for at least 3/4 of the lease, reads in between
// cost no pass over the blocks.
TEST_F(TableTest, ReadsRenewLeasesAtMostEveryQuarterLease) {
  auto spec = std::make_shared<ModelSpec>();
  spec->model_id = "m";
  spec->num_layers = 1;
  spec->num_q_heads = 1;
  spec->num_kv_heads = 1;
  spec->head_dim = 4;
  spec->kv_dtype = DType::kF32;  // K+V of a token: 32 B; a 2-token block fills a 64-byte slot
  spec->vocab_size = 10;
  auto seq = std::make_shared<Sequence>("t", "s", spec, /*block_tokens=*/2, table_.get(), "t:t");
  const std::string kv(64, '\x11');
  const absl::Span<const uint8_t> half(reinterpret_cast<const uint8_t*>(kv.data()), 32);
  const std::vector<int32_t> ids = {4, 5};
  ASSERT_OK(seq->AppendTokens(0, 2, ids, {&half, 1}, {&half, 1}).status());  // lease until 10 s
  Block* fill[3] = {Filled(1), Filled(2), Filled(3)};
  clock_.Advance(absl::Seconds(3));
  ASSERT_OK(seq->Read(0, 0).status());  // renews: until 13 s
  clock_.Advance(absl::Seconds(2));
  ASSERT_OK(seq->Read(0, 0).status());       // 2 s later: within the quarter, renews nothing
  clock_.Advance(absl::Milliseconds(7900));  // 12.9 s
  EXPECT_THAT(table_->Allocate(4), StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Milliseconds(200));  // 13.1 s: every lease has run out
  ASSERT_OK_AND_ASSIGN(Block * all, table_->Allocate(4));
  EXPECT_EQ(table_->stats().spilled, 4);
  // The spilled sequence reads back (its claim is stale: the epoch moved) once there is room.
  table_->Unpin({&all, 1});
  table_->Unref(all);
  ASSERT_OK_AND_ASSIGN(Sequence::Snapshot snap, seq->Read(0, 0));
  EXPECT_EQ(snap.keys.row(1)[0], 0x11);
  snap = {};
  seq.reset();
  for (Block* b : fill) table_->Unref(b);
}

TEST(SpillStoreTest, WithoutDataDirAFullArenaStillFailsTheWrite) {
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(ArenaOptions{2 * 64, false}, nullptr));
  ASSERT_OK(arena->EnsureSlotBytes(64));
  FakeClock clock;
  BlockTable table(arena.get(), BlockTableOptions{&clock, absl::ZeroDuration(), nullptr});
  ASSERT_OK_AND_ASSIGN(Block * a, table.Allocate(2));
  table.Unpin({&a, 1});
  clock.Advance(absl::Seconds(100));
  EXPECT_THAT(table.Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted));
  table.Unref(a);
}

// ---------------------------------------------------------------------------------------------
// Node level: 2 layers x 2 kv-heads x head_dim 8, bf16, 4-token blocks.

constexpr int kBlock = 4, kLayers = 2, kHeads = 2, kDim = 8;
constexpr size_t kRow = kDim * 2;
constexpr int64_t kLayerBlock = 2 * kHeads * kBlock * kRow;  // 256 B: one slot

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = kLayers;
  s.num_q_heads = 2 * kHeads;
  s.num_kv_heads = kHeads;
  s.head_dim = kDim;
  s.kv_dtype = DType::kBF16;
  s.vocab_size = 1000;
  return s;
}

// Random K/V of a sequence, [layer][head][token][row bytes] for K and V.
struct Kv {
  std::vector<std::string> k, v;  // per layer: [head][tokens][kRow]
  int64_t tokens = 0;
};
Kv RandomKv(int64_t tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  Kv kv;
  kv.tokens = tokens;
  for (int l = 0; l < kLayers; ++l) {
    for (auto* x : {&kv.k, &kv.v}) {
      std::string s(static_cast<size_t>(kHeads * tokens) * kRow, '\0');
      for (char& c : s) c = static_cast<char>(rng());
      x->push_back(std::move(s));
    }
  }
  return kv;
}
// [head][n][row] bytes of tokens [start, start + n) of one layer.
std::string Slice(const std::string& all, int64_t tokens, int64_t start, int64_t n) {
  std::string out;
  for (int h = 0; h < kHeads; ++h) {
    out.append(all, static_cast<size_t>((h * tokens + start) * static_cast<int64_t>(kRow)),
               static_cast<size_t>(n) * kRow);
  }
  return out;
}
absl::Span<const uint8_t> U(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

absl::Status Append(Node* node, const std::string& tenant, const std::string& id,
                    const std::vector<int32_t>& ids, const Kv& kv, int64_t start, int64_t n) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, node->FindSequence(tenant, id));
  RETURN_IF_ERROR(seq->BeginAppend());
  absl::Status s = [&]() -> absl::Status {
    RETURN_IF_ERROR(seq->AddTokenIds(0, ids));
    for (int l = 0; l < kLayers; ++l) {
      const std::string k = Slice(kv.k[l], kv.tokens, start, n);
      const std::string v = Slice(kv.v[l], kv.tokens, start, n);
      RETURN_IF_ERROR(seq->AppendChunk(l, start, n, U(k), U(v)));
    }
    return seq->CommitAppend().status();
  }();
  if (!s.ok()) seq->AbortAppend();
  return s;
}

// Every committed row of every (layer, head) equals kv's.
absl::Status Check(Node* node, const std::string& tenant, const std::string& id, const Kv& kv,
                   int64_t n) {
  std::vector<int32_t> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h) {
      std::string k, v;
      RETURN_IF_ERROR(node->ReadRows(tenant, id, l, h, all, &k, &v));
      const std::string want_k =
          Slice(kv.k[l], kv.tokens, 0, n)
              .substr(static_cast<size_t>(h * n) * kRow, static_cast<size_t>(n) * kRow);
      const std::string want_v =
          Slice(kv.v[l], kv.tokens, 0, n)
              .substr(static_cast<size_t>(h * n) * kRow, static_cast<size_t>(n) * kRow);
      if (k != want_k || v != want_v) {
        return absl::InternalError(absl::StrCat(id, ": rows of layer ", l, " head ", h, " differ"));
      }
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> Ids(int64_t n, int32_t salt) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7 + salt) % 1000);
  return ids;
}

// Two 12-token sequences that share a 2-block prefix (8 tokens, the same ids and KV), then have
// 1 block of their own each.
struct PrefixPair {
  std::vector<int32_t> ids_x, ids_y;
  Kv x, y;
};
PrefixPair SharedPrefixPair() {
  PrefixPair p;
  p.ids_x = p.ids_y = Ids(12, 3);
  for (int i = 8; i < 12; ++i) p.ids_y[static_cast<size_t>(i)] = 999 - i;
  p.x = RandomKv(12, 3);
  p.y = RandomKv(12, 4);
  for (int l = 0; l < 2 * kLayers; ++l) {  // same prefix KV
    auto& dst = l % 2 ? p.y.v[l / 2] : p.y.k[l / 2];
    const auto& src = l % 2 ? p.x.v[l / 2] : p.x.k[l / 2];
    for (int h = 0; h < kHeads; ++h) {
      dst.replace(static_cast<size_t>(h * 12) * kRow, 8 * kRow, src,
                  static_cast<size_t>(h * 12) * kRow, 8 * kRow);
    }
  }
  return p;
}

class NodeSpillTest : public ::testing::Test {
 protected:
  void Make(int64_t arena_blocks, absl::Duration lease, bool data_dir = true) {
    NodeOptions o;
    o.memory_bytes = arena_blocks * kLayers * kLayerBlock;
    o.block_tokens = kBlock;
    o.search_threads = 2;
    o.try_hugepages = false;
    o.lease = lease;
    if (data_dir) {
      o.data_dir = TempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    }
    node_ = std::make_unique<Node>(o, nullptr, &clock_);
    ASSERT_OK(node_->arena_status());
    ASSERT_OK(node_->RegisterModel(Spec()).status());
  }
  absl::Status Open(const std::string& tenant, const std::string& id,
                    const std::vector<int32_t>& ids, int64_t* matched = nullptr) {
    OpenSequenceArgs a{tenant, "m", id, ids};
    ASSIGN_OR_RETURN(OpenSequenceResult r, node_->OpenSequence(a));
    if (matched != nullptr) *matched = r.matched_tokens;
    return absl::OkStatus();
  }
  // Stores the pair as tenant t's sequences x and y: y adopts x's shared prefix (its matched
  // token count in *matched) and appends its own block.
  absl::Status StorePair(const PrefixPair& p, int64_t* matched = nullptr) {
    RETURN_IF_ERROR(Open("t", "x", p.ids_x));
    RETURN_IF_ERROR(Append(node_.get(), "t", "x", p.ids_x, p.x, 0, 12));
    RETURN_IF_ERROR(Open("t", "y", p.ids_y, matched));
    return Append(node_.get(), "t", "y", p.ids_y, p.y, 8, 4);
  }

  FakeClock clock_;
  std::unique_ptr<Node> node_;
};

TEST_F(NodeSpillTest, SpillAndReloadAreBitExactAndAppendsContinueASpilledBlock) {
  Make(/*arena_blocks=*/4, absl::Seconds(10));
  const std::vector<int32_t> ids_a = Ids(14, 1), ids_b = Ids(16, 2);
  const Kv a = RandomKv(14, 1), b = RandomKv(16, 2);
  ASSERT_OK(Open("t", "a", ids_a));
  ASSERT_OK(Append(node_.get(), "t", "a", ids_a, a, 0, 10));  // 2.5 blocks
  ASSERT_OK(Open("t", "b", ids_b));
  // b needs 4 blocks; a's lease is live: no room.
  EXPECT_THAT(Append(node_.get(), "t", "b", ids_b, b, 0, 16),
              StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Append(node_.get(), "t", "b", ids_b, b, 0, 16));  // evicts all of a
  NodeStats st = node_->Stats(false);
  EXPECT_EQ(st.evictions, 3);
  EXPECT_EQ(st.spilled_blocks, 3);
  EXPECT_EQ(st.spilled_bytes,
            3 * static_cast<int64_t>(kBlockRecordHeaderBytes + kLayers * kLayerBlock));
  EXPECT_EQ(st.stored_bytes, 4 * kLayers * kLayerBlock);

  // a is read back bit-exact (evicting b, whose lease ran out), and so is b afterwards.
  EXPECT_THAT(Check(node_.get(), "t", "a", a, 10), StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "a", a, 10));
  st = node_->Stats(false);
  EXPECT_EQ(st.reloads, 3);
  // Continuing a's partial third block after its round trip through disk.
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Append(node_.get(), "t", "a", ids_a, a, 10, 4));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "b", b, 16));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "a", a, 14));
  EXPECT_GT(node_->Stats(false).evictions, 3);
  ASSERT_OK(node_->CloseSequence("t", "a", true));
  ASSERT_OK(node_->CloseSequence("t", "b", true));
  // A background index sweep (started by the evictions) may still hold a dropped sequence, and
  // with it its blocks, for a moment.
  node_->WaitForIndexJobs();
  st = node_->Stats(false);
  EXPECT_EQ(st.spilled_bytes, 0);
  EXPECT_EQ(st.stored_bytes, 0);
  EXPECT_EQ(st.blocks, 0);
}

TEST_F(NodeSpillTest, SharedPrefixBlocksSpillOnceAndAreSharedWhileSpilled) {
  Make(/*arena_blocks=*/6, absl::Seconds(10));
  const PrefixPair p = SharedPrefixPair();
  const std::vector<int32_t>& ids_x = p.ids_x;
  const Kv &x = p.x, &y = p.y;
  int64_t matched = 0;
  ASSERT_OK(StorePair(p, &matched));
  ASSERT_EQ(matched, 8);
  ASSERT_EQ(node_->Stats(false).blocks, 4);

  // z fills the arena: everything of x and y goes, the shared blocks once.
  clock_.Advance(absl::Seconds(11));
  const std::vector<int32_t> ids_z = Ids(24, 5);
  const Kv z = RandomKv(24, 5);
  ASSERT_OK(Open("t", "z", ids_z));
  ASSERT_OK(Append(node_.get(), "t", "z", ids_z, z, 0, 24));
  NodeStats st = node_->Stats(false);
  EXPECT_EQ(st.evictions, 4);
  EXPECT_EQ(st.spilled_bytes,
            4 * static_cast<int64_t>(kBlockRecordHeaderBytes + kLayers * kLayerBlock));
  EXPECT_EQ(st.shared_blocks, 2);

  // A new session with the same prefix shares the spilled blocks; reading reloads them.
  ASSERT_OK(Open("t", "w", ids_x, &matched));
  EXPECT_EQ(matched, 12);
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "w", x, 12));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "y", y, 12));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "z", z, 24));
  for (const char* id : {"w", "x", "y", "z"}) ASSERT_OK(node_->CloseSequence("t", id, true));
  node_->WaitForIndexJobs();  // as above
  EXPECT_EQ(node_->Stats(false).spilled_bytes, 0);
}

// Sequence::ReadLayer reads several sequences under one pin: x, y (sharing x's first two
// blocks) and x again, all spilled. It reloads them, every (sequence, kv-head, K/V) view reads its
// own rows, the blocks stay pinned (not evictable) while any view is held, and releasing the views
// unpins each block exactly as often as it was pinned (then all of them can be evicted).
TEST_F(NodeSpillTest, OneReadOfSharingSequencesPinsEachBlockAndReadsEveryView) {
  Make(/*arena_blocks=*/6, absl::Seconds(10));
  const PrefixPair p = SharedPrefixPair();
  const Kv &x = p.x, &y = p.y;
  ASSERT_OK(StorePair(p));
  clock_.Advance(absl::Seconds(11));
  const std::vector<int32_t> ids_z = Ids(24, 5);
  const Kv z = RandomKv(24, 5);
  ASSERT_OK(Open("t", "z", ids_z));
  ASSERT_OK(Append(node_.get(), "t", "z", ids_z, z, 0, 24));  // x and y are spilled
  ASSERT_EQ(node_->Stats(false).spilled_blocks, 4);
  clock_.Advance(absl::Seconds(11));

  ASSERT_OK_AND_ASSIGN(std::shared_ptr<Sequence> sx, node_->FindSequence("t", "x"));
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<Sequence> sy, node_->FindSequence("t", "y"));
  const std::vector<const Sequence*> seqs = {sx.get(), sy.get(), sx.get()};
  const std::vector<std::vector<int>> heads = {{1, 0}, {1}, {0}};
  const std::vector<const Kv*> kvs = {&x, &y, &x};
  for (int layer = 0; layer < kLayers; ++layer) {
    const int64_t reloads = node_->Stats(false).reloads;
    ASSERT_OK_AND_ASSIGN(auto read, Sequence::ReadLayer(seqs, layer, heads));
    ASSERT_EQ(read.size(), 3u);
    if (layer == 0) {
      EXPECT_EQ(node_->Stats(false).reloads - reloads, 4) << "each block once";
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      ASSERT_EQ(read[i].size(), heads[i].size());
      for (size_t j = 0; j < heads[i].size(); ++j) {
        const int h = heads[i][j];
        for (bool values : {false, true}) {
          const indexer::PagedRows& rows = values ? read[i][j].values : read[i][j].keys;
          ASSERT_EQ(rows.num_tokens, 12);
          const std::string& all = values ? kvs[i]->v[layer] : kvs[i]->k[layer];
          for (int64_t t = 0; t < 12; ++t) {
            EXPECT_EQ(
                std::memcmp(rows.row(t), all.data() + static_cast<size_t>(h * 12 + t) * kRow, kRow),
                0)
                << "sequence " << i << " head " << h << (values ? " V" : " K") << " token " << t;
          }
        }
      }
    }
    // Held views keep the 4 blocks pinned: a 3-block sequence finds only z's 2 resident blocks
    // evictable (their leases ran out), even after the views' leases run out too.
    clock_.Advance(absl::Seconds(11));
    const std::string w = absl::StrCat("w", layer);
    const std::vector<int32_t> ids_w = Ids(12, 6 + layer);
    const Kv kw = RandomKv(12, 6);
    ASSERT_OK(Open("t", w, ids_w));
    EXPECT_THAT(Append(node_.get(), "t", w, ids_w, kw, 0, 12),
                StatusIs(absl::StatusCode::kResourceExhausted));
    read.clear();  // unpins (and renews the leases)
    clock_.Advance(absl::Seconds(11));
    ASSERT_OK(Append(node_.get(), "t", w, ids_w, kw, 0, 12));
    ASSERT_OK(node_->CloseSequence("t", w, true));
    clock_.Advance(absl::Seconds(11));
  }
  // Balanced pins: a sequence that takes the whole arena can evict every block of x and y.
  const std::vector<int32_t> ids_v = Ids(24, 9);
  const Kv kv = RandomKv(24, 9);
  ASSERT_OK(Open("t", "v", ids_v));
  ASSERT_OK(Append(node_.get(), "t", "v", ids_v, kv, 0, 24));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "x", x, 12));
  clock_.Advance(absl::Seconds(11));
  ASSERT_OK(Check(node_.get(), "t", "y", y, 12));
}

TEST_F(NodeSpillTest, WithoutDataDirNothingIsEvicted) {
  Make(/*arena_blocks=*/2, absl::ZeroDuration(), /*data_dir=*/false);
  const std::vector<int32_t> ids = Ids(12, 6);
  const Kv kv = RandomKv(12, 6);
  ASSERT_OK(Open("t", "a", ids));
  ASSERT_OK(Append(node_.get(), "t", "a", ids, kv, 0, 8));
  clock_.Advance(absl::Seconds(100));
  ASSERT_OK(Open("t", "b", Ids(12, 7)));
  EXPECT_THAT(Append(node_.get(), "t", "b", Ids(12, 7), kv, 0, 4),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(node_->Stats(false).evictions, 0);
}

// Readers (ReadRows, whose snapshots pin) race writers whose appends evict them: every read is
// bit-exact or RESOURCE_EXHAUSTED (everything pinned at that instant), never wrong.
TEST_F(NodeSpillTest, ReadersRaceEviction) {
  Make(/*arena_blocks=*/8, absl::ZeroDuration());
  constexpr int kSeqs = 6;
  constexpr int64_t kTokens = 8;
  std::vector<Kv> kvs;
  for (int i = 0; i < kSeqs; ++i) {
    kvs.push_back(RandomKv(kTokens, 100 + i));
    const std::vector<int32_t> ids = Ids(kTokens, 10 * i);
    ASSERT_OK(Open("t", absl::StrCat("s", i), ids));
    ASSERT_OK(Append(node_.get(), "t", absl::StrCat("s", i), ids, kvs[i], 0, kTokens));
  }
  std::atomic<int> bad{0}, ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 60; ++r) {
        const int i = (r * 5 + t) % kSeqs;
        const absl::Status s = Check(node_.get(), "t", absl::StrCat("s", i), kvs[i], kTokens);
        if (s.ok()) {
          ok.fetch_add(1);
        } else if (!absl::IsResourceExhausted(s)) {
          bad.fetch_add(1);
          ADD_FAILURE() << s;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(ok.load(), 0);
  EXPECT_GT(node_->Stats(false).evictions, 0);
  EXPECT_GT(node_->Stats(false).reloads, 0);
}

}  // namespace
}  // namespace kvrecall::kvstore

namespace kvrecall::kvstore {
namespace {

// --durable in-process: a node rebuilt on the same directory has every committed append (the
// blocks stay on disk until read); a damaged block record is DATA_LOSS for its sequence only,
// a damaged metadata record makes its sequence DATA_LOSS.
class DurableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  std::unique_ptr<Node> Start() {
    NodeOptions o;
    o.memory_bytes = 16 * kLayers * kLayerBlock;
    o.block_tokens = kBlock;
    o.search_threads = 1;
    o.try_hugepages = false;
    o.lease = absl::Seconds(10);
    o.data_dir = dir_;
    o.durable = true;
    auto node = std::make_unique<Node>(o, nullptr, &clock_);
    EXPECT_OK(node->arena_status());
    return node;
  }
  absl::Status Open(Node* node, const std::string& id, const std::vector<int32_t>& ids) {
    return node->OpenSequence(OpenSequenceArgs{"t", "m", id, ids}).status();
  }

  FakeClock clock_;
  std::string dir_;
};

TEST_F(DurableTest, RestartRecoversCommittedAppendsBitExact) {
  const std::vector<int32_t> ids_a = Ids(14, 1), ids_b = Ids(9, 2);
  const Kv a = RandomKv(14, 1), b = RandomKv(9, 2);
  std::vector<int32_t> ids_c = ids_a;
  ids_c.resize(12);
  {
    std::unique_ptr<Node> node = Start();
    ASSERT_OK(node->RegisterModel(Spec()).status());
    ASSERT_OK(Open(node.get(), "a", ids_a));
    ASSERT_OK(Append(node.get(), "t", "a", ids_a, a, 0, 6));
    ASSERT_OK(Append(node.get(), "t", "a", ids_a, a, 6, 5));  // continues a partial block
    ASSERT_OK(Open(node.get(), "b", ids_b));
    ASSERT_OK(Append(node.get(), "t", "b", ids_b, b, 0, 9));
    ASSERT_OK(Open(node.get(), "c", ids_c));  // shares a's two full blocks
    ASSERT_OK(Append(node.get(), "t", "c", ids_c, a, 8, 3));
    ASSERT_OK(Open(node.get(), "gone", Ids(9, 5)));
    ASSERT_OK(Append(node.get(), "t", "gone", Ids(9, 5), b, 0, 9));
    ASSERT_OK(node->CloseSequence("t", "gone", true));
    // An append in flight when the node goes away is not acknowledged and not kept.
    ASSERT_OK_AND_ASSIGN(auto seq, node->FindSequence("t", "b"));
    ASSERT_OK(seq->BeginAppend());
  }
  std::unique_ptr<Node> node = Start();
  NodeStats st = node->Stats(true);
  EXPECT_EQ(st.num_models, 1);
  EXPECT_EQ(st.num_sequences, 3);
  EXPECT_EQ(st.stored_bytes, 0);  // nothing read yet
  ASSERT_OK(Check(node.get(), "t", "a", a, 11));
  ASSERT_OK(Check(node.get(), "t", "b", b, 9));
  ASSERT_OK(Check(node.get(), "t", "c", a, 11));
  EXPECT_THAT(node->FindSequence("t", "gone").status(), StatusIs(absl::StatusCode::kNotFound));
  // c's first two blocks are a's (one record each, one block each after recovery).
  EXPECT_EQ(node->Stats(false).shared_blocks, 2);
  // Recovered sequences take appends, and prefixes are shared again.
  ASSERT_OK(Append(node.get(), "t", "a", ids_a, a, 11, 3));
  ASSERT_OK(Check(node.get(), "t", "a", a, 14));
  int64_t matched = 0;
  {
    ASSERT_OK_AND_ASSIGN(OpenSequenceResult r,
                         node->OpenSequence(OpenSequenceArgs{"t", "m", "d", ids_a}));
    matched = r.matched_tokens;
  }
  EXPECT_EQ(matched, 12);
  node.reset();

  // Forgetting --durable must not wipe a durable node's data.
  NodeOptions o;
  o.memory_bytes = 16 * kLayers * kLayerBlock;
  o.block_tokens = kBlock;
  o.try_hugepages = false;
  o.data_dir = dir_;
  Node spill_only(o, nullptr, &clock_);
  EXPECT_THAT(spill_only.arena_status(), StatusIs(absl::StatusCode::kFailedPrecondition));
  node = Start();
  ASSERT_OK(Check(node.get(), "t", "a", a, 14));
}

TEST_F(DurableTest, CorruptRecordsAreDataLossForTheirSequenceOnly) {
  const std::vector<int32_t> ids_a = Ids(8, 1), ids_b = Ids(8, 2), ids_c = Ids(8, 3);
  const Kv a = RandomKv(8, 1), b = RandomKv(8, 2), c = RandomKv(8, 3);
  std::string block_key;
  {
    std::unique_ptr<Node> node = Start();
    ASSERT_OK(node->RegisterModel(Spec()).status());
    for (const auto& [id, ids, kv] :
         {std::tuple{"a", &ids_a, &a}, std::tuple{"b", &ids_b, &b}, std::tuple{"c", &ids_c, &c}}) {
      ASSERT_OK(Open(node.get(), id, *ids));
      ASSERT_OK(Append(node.get(), "t", id, *ids, *kv, 0, 8));
    }
  }
  {
    // Damage one block record of b (the first block of the second sequence: id 3) and c's
    // metadata record, in place, as a disk would.
    ASSERT_OK_AND_ASSIGN(auto store, BlockStore::Open(BlockStoreOptions{dir_, true}));
    std::string key = "p";
    for (int i = 7; i >= 0; --i) key.push_back(static_cast<char>(i == 0 ? 3 : 0));
    ASSERT_OK_AND_ASSIGN(std::string record, store->GetBlockRecordForTest(key));
    record[record.size() / 2] ^= 0x40;
    ASSERT_OK(store->OverwriteBlockRecordForTest(key, record));
    auto batch = store->NewBatch();
    batch->PutMeta(Sequence::MetaKey("t", "c"), "garbage that fails its checksum");
    ASSERT_OK(store->Commit(batch.get()));
  }
  std::unique_ptr<Node> node = Start();
  ASSERT_OK(Check(node.get(), "t", "a", a, 8));
  EXPECT_THAT(Check(node.get(), "t", "b", b, 8), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(Check(node.get(), "t", "c", c, 8), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(Open(node.get(), "c", ids_c), StatusIs(absl::StatusCode::kDataLoss));
  ASSERT_OK(Check(node.get(), "t", "a", a, 8));    // still serving
  ASSERT_OK(node->CloseSequence("t", "c", true));  // an operator can drop the lost one
  EXPECT_THAT(node->FindSequence("t", "c").status(), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvrecall::kvstore

namespace kvrecall::kvstore {
namespace {

// A disk that can fill up: the real file system, except that while full() every write to a
// file fails with ENOSPC (RocksDB's NoSpace), as a full partition would (LevelDB's
// FaultInjectionTestEnv idea: a fake over the real thing, not a mock).
class FullDiskFileSystem final : public rocksdb::FileSystemWrapper {
 public:
  FullDiskFileSystem() : FileSystemWrapper(rocksdb::FileSystem::Default()) {}
  const char* Name() const override { return "FullDiskFileSystem"; }
  void set_full(bool full) { full_->store(full); }

  rocksdb::IOStatus GetFreeSpace(const std::string& path, const rocksdb::IOOptions& o,
                                 uint64_t* free, rocksdb::IODebugContext* dbg) override {
    if (full_->load()) {
      *free = 0;
      return rocksdb::IOStatus::OK();
    }
    *free = uint64_t{1} << 40;  // whatever the real disk has, the test wants room
    return rocksdb::IOStatus::OK();
  }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override {
    if (full_->load()) return rocksdb::IOStatus::NoSpace("disk full (test)");
    rocksdb::IOStatus s = target()->NewWritableFile(f, o, r, dbg);
    if (s.ok()) *r = std::make_unique<File>(std::move(*r), full_);
    return s;
  }

 private:
  class File final : public rocksdb::FSWritableFileOwnerWrapper {
   public:
    File(std::unique_ptr<rocksdb::FSWritableFile> f, std::shared_ptr<std::atomic<bool>> full)
        : FSWritableFileOwnerWrapper(std::move(f)), full_(std::move(full)) {}
    rocksdb::IOStatus Append(const rocksdb::Slice& d, const rocksdb::IOOptions& o,
                             rocksdb::IODebugContext* dbg) override {
      if (full_->load()) return rocksdb::IOStatus::NoSpace("disk full (test)");
      return FSWritableFileOwnerWrapper::Append(d, o, dbg);
    }
    rocksdb::IOStatus Append(const rocksdb::Slice& d, const rocksdb::IOOptions& o,
                             const rocksdb::DataVerificationInfo& v,
                             rocksdb::IODebugContext* dbg) override {
      if (full_->load()) return rocksdb::IOStatus::NoSpace("disk full (test)");
      return FSWritableFileOwnerWrapper::Append(d, o, v, dbg);
    }
    rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& d, uint64_t off,
                                       const rocksdb::IOOptions& o,
                                       rocksdb::IODebugContext* dbg) override {
      if (full_->load()) return rocksdb::IOStatus::NoSpace("disk full (test)");
      return FSWritableFileOwnerWrapper::PositionedAppend(d, off, o, dbg);
    }

   private:
    std::shared_ptr<std::atomic<bool>> full_;
  };

  std::shared_ptr<std::atomic<bool>> full_ = std::make_shared<std::atomic<bool>>(false);
};

TEST(FullDiskTest, DurableWritesFailWithResourceExhaustedAndTheNodeKeepsServing) {
  auto fs = std::make_shared<FullDiskFileSystem>();
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(fs);
  FakeClock clock;
  NodeOptions o;
  o.memory_bytes = 16 * kLayers * kLayerBlock;
  o.block_tokens = kBlock;
  o.search_threads = 1;
  o.try_hugepages = false;
  o.data_dir = TempDir("full_disk");
  o.durable = true;
  o.store_env = env.get();
  const std::vector<int32_t> ids_a = Ids(12, 1), ids_b = Ids(8, 2);
  const Kv a = RandomKv(12, 1), b = RandomKv(8, 2);
  {
    Node node(o, nullptr, &clock);
    ASSERT_OK(node.arena_status());
    ASSERT_OK(node.RegisterModel(Spec()).status());
    ASSERT_OK(node.OpenSequence(OpenSequenceArgs{"t", "m", "a", ids_a}).status());
    ASSERT_OK(Append(&node, "t", "a", ids_a, a, 0, 6));

    fs->set_full(true);
    ASSERT_OK(node.OpenSequence(OpenSequenceArgs{"t", "m", "b", ids_b}).status());
    EXPECT_THAT(Append(&node, "t", "b", ids_b, b, 0, 8),
                StatusIs(absl::StatusCode::kResourceExhausted));
    EXPECT_THAT(Append(&node, "t", "a", ids_a, a, 6, 6),
                StatusIs(absl::StatusCode::kResourceExhausted));
    ModelSpec other = Spec();
    other.model_id = "m2";
    EXPECT_THAT(node.RegisterModel(other).status(), StatusIs(absl::StatusCode::kResourceExhausted));
    // Nothing unacknowledged was kept, and what the node has is still served.
    ASSERT_OK_AND_ASSIGN(auto seq_a, node.FindSequence("t", "a"));
    ASSERT_OK_AND_ASSIGN(auto seq_b, node.FindSequence("t", "b"));
    EXPECT_EQ(seq_a->committed_tokens(), 6);
    EXPECT_EQ(seq_b->committed_tokens(), 0);
    ASSERT_OK(Check(&node, "t", "a", a, 6));

    // Space comes back: writes work again, without a restart.
    fs->set_full(false);
    ASSERT_OK(Append(&node, "t", "a", ids_a, a, 6, 6));
    ASSERT_OK(Append(&node, "t", "b", ids_b, b, 0, 8));
  }
  Node node(o, nullptr, &clock);
  ASSERT_OK(node.arena_status());
  ASSERT_OK(Check(&node, "t", "a", a, 12));
  ASSERT_OK(Check(&node, "t", "b", b, 8));
}

}  // namespace
}  // namespace kvrecall::kvstore
