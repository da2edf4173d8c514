// Segment serialisation (SerializeSegment / ParseSegment), Clone and chains.
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "indexer/index.h"
#include "indexer/synthetic.h"
#include "indexer/testing/small_synthetic.h"

namespace kvrecall::indexer {
namespace {

using ::kvrecall::testing::StatusIs;

std::unique_ptr<SyntheticData> Data(int64_t tokens) {
  return test_data::SmallSynthetic(tokens, 64, 8, 7);
}
using test_data::InputOver;

// Decode query i of `d` over its retrieval range (budget 64), without segments.
SearchEntry DecodeEntry(const SyntheticData& d, int i) {
  const int g = d.options.group, hd = d.options.head_dim;
  SearchEntry e;
  e.queries = d.decode_queries.data() + static_cast<size_t>(i) * g * hd;
  e.group = g;
  e.keys = &d.keys;
  e.token_begin = d.retrieval_begin;
  e.token_end = d.retrieval_end;
  e.k = 64;
  return e;
}

// Every decode query of `d` against `seg` (budget 64).
std::vector<std::vector<int32_t>> SearchAll(const SyntheticData& d, const Segment* seg) {
  std::vector<SearchEntry> entries;
  for (int i = 0; i < d.options.decode_queries; ++i) {
    SearchEntry e = DecodeEntry(d, i);
    if (seg != nullptr) e.segments = {seg};
    entries.push_back(e);
  }
  std::vector<std::vector<int32_t>> out;
  EXPECT_OK(Search(entries, {}, nullptr, &out));
  return out;
}

IndexOptions SmallOptions() {
  IndexOptions o;
  o.ctkvr.list_size = 256;
  o.cluster.append_every = 64;
  o.cluster.segment_tokens = 1024;
  return o;
}

TEST(SegmentIoTest, RoundTripSearchesIdentically) {
  auto d = Data(4096);
  for (Method m : {Method::kExact, Method::kCtkvr, Method::kCluster}) {
    SCOPED_TRACE(MethodName(m));
    // Built over a prefix, then grown by Append (cluster: pending and clustered appends).
    ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(m, InputOver(*d, 4, 3000), SmallOptions(), nullptr));
    ASSERT_OK(seg->Append(d->keys, 3100, nullptr));
    const std::string bytes = SerializeSegment(*seg);
    ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(bytes));
    EXPECT_EQ(parsed->method(), m);
    EXPECT_EQ(parsed->token_begin(), seg->token_begin());
    EXPECT_EQ(parsed->token_end(), seg->token_end());
    EXPECT_EQ(parsed->MemoryBytes(), seg->MemoryBytes());
    EXPECT_EQ(SerializeSegment(*parsed), bytes) << "stable: re-serialising gives the same bytes";
    EXPECT_EQ(SearchAll(*d, parsed.get()), SearchAll(*d, seg.get()));
    // A parsed segment keeps growing like the original.
    ASSERT_OK(seg->Append(d->keys, 3300, nullptr));
    ASSERT_OK(parsed->Append(d->keys, 3300, nullptr));
    EXPECT_EQ(SerializeSegment(*parsed), SerializeSegment(*seg));
  }
}

TEST(SegmentIoTest, ClusterRescoreFactorRoundTrips) {
  auto d = Data(4096);
  IndexOptions o = SmallOptions();
  o.cluster.rescore_factor = 3;
  ASSERT_OK_AND_ASSIGN(auto seg,
                       BuildSegment(Method::kCluster, InputOver(*d, 4, 3000), o, nullptr));
  const std::string bytes = SerializeSegment(*seg);
  ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(bytes));
  EXPECT_EQ(SerializeSegment(*parsed), bytes);
  EXPECT_EQ(SearchAll(*d, parsed.get()), SearchAll(*d, seg.get()));
}

// Centroids that novel queries added are part of the segment: they round-trip, survive Append
// and are copied by Clone; searching keeps adding (here every query is novel: min_similarity 1)
// and replaces the oldest beyond max_added.
TEST(SegmentIoTest, CtkvrAddedCentroidsRoundTripAndGrow) {
  auto d = Data(4096);
  IndexOptions o = SmallOptions();
  o.ctkvr.min_similarity = 1.0f;
  o.ctkvr.max_added = 3;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, InputOver(*d, 4, 3000), o, nullptr));
  const std::string fresh = SerializeSegment(*seg);
  const size_t reserved = seg->MemoryBytes();
  const int64_t novel0 = ReadCtkvrCounters().novel;
  const auto first = SearchAll(*d, seg.get());
  EXPECT_EQ(ReadCtkvrCounters().novel - novel0, d->options.decode_queries);
  EXPECT_EQ(first, SearchAll(*d, nullptr)) << "novel queries are scored exactly";
  const std::string bytes = SerializeSegment(*seg);
  EXPECT_GT(bytes.size(), fresh.size());
  EXPECT_LE(seg->MemoryBytes(), reserved);
  ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(bytes));
  EXPECT_EQ(SerializeSegment(*parsed), bytes);
  EXPECT_EQ(parsed->MemoryBytes(), seg->MemoryBytes());
  std::unique_ptr<Segment> clone = seg->Clone();
  EXPECT_EQ(SerializeSegment(*clone), bytes);
  ASSERT_OK(seg->Append(d->keys, 3300, nullptr));
  ASSERT_OK(parsed->Append(d->keys, 3300, nullptr));
  EXPECT_EQ(SerializeSegment(*parsed), SerializeSegment(*seg));
  EXPECT_EQ(SerializeSegment(*clone), bytes) << "the clone was not appended to";
}

// The count of added centroids picks the ring slot to replace: a record claiming an absurd
// count (which would overflow and index before the arrays) is DATA_LOSS, as is a NaN or huge
// centroid.
TEST(SegmentIoTest, CtkvrRecordWithAbsurdAddedCountOrNanIsDataLoss) {
  auto d = Data(2048);
  IndexOptions o = SmallOptions();
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, InputOver(*d, 4, 2000), o, nullptr));
  const std::string good = SerializeSegment(*seg);
  ASSERT_OK(ParseSegment(good).status());
  // Header (26 bytes), then centroids, list_size, probe (i32), min_similarity (f64), max_added,
  // neighbour_tokens, neighbour_radius, group, prompt centroids, centroids (i32), added (i64).
  constexpr size_t kAddedAt = 26 + 3 * 4 + 8 + 6 * 4;
  std::string bad = good;
  const int64_t huge = std::numeric_limits<int64_t>::max();
  std::memcpy(&bad[kAddedAt], &huge, sizeof huge);
  EXPECT_THAT(ParseSegment(bad).status(), StatusIs(absl::StatusCode::kDataLoss));
  const int64_t zero = 0;
  std::memcpy(&bad[kAddedAt], &zero, sizeof zero);
  EXPECT_OK(ParseSegment(bad).status()) << "the offset above is the added count";
  // The first scaled centroid value: after the added count, the array's u64 length.
  bad = good;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&bad[kAddedAt + 8 + 8], &nan, sizeof nan);
  EXPECT_THAT(ParseSegment(bad).status(), StatusIs(absl::StatusCode::kDataLoss));
  // A finite centroid far past any real query: its logits would overflow on the next Append,
  // leaving normalisers that no longer parse (found by fuzz_record).
  const float huge_centroid = 3e37f;
  std::memcpy(&bad[kAddedAt + 8 + 8], &huge_centroid, sizeof huge_centroid);
  EXPECT_THAT(ParseSegment(bad).status(), StatusIs(absl::StatusCode::kDataLoss));
}

// A record may carry the largest added count Parse accepts; adding a centroid then wraps the
// count (keeping its ring slot) rather than writing a record that no longer parses (found by
// fuzz_record).
TEST(SegmentIoTest, CtkvrAddedCountAtItsCapWrapsAndStillParses) {
  auto d = Data(2048);
  IndexOptions o = SmallOptions();
  o.ctkvr.min_similarity = 1.0f;  // every query is novel and added
  o.ctkvr.max_added = 3;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, InputOver(*d, 4, 2000), o, nullptr));
  std::string bytes = SerializeSegment(*seg);
  constexpr size_t kAddedAt = 26 + 3 * 4 + 8 + 6 * 4;  // as in the test above
  const int64_t cap = int64_t{1} << 62;
  std::memcpy(&bytes[kAddedAt], &cap, sizeof cap);
  ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(bytes));
  (void)SearchAll(*d, parsed.get());
  const std::string grown = SerializeSegment(*parsed);
  int64_t added = 0;
  std::memcpy(&added, &grown[kAddedAt], sizeof added);
  const int64_t searches = d->options.decode_queries;
  EXPECT_LE(added, cap);
  EXPECT_GE(added, 3);
  EXPECT_EQ(added % 3, (cap + searches) % 3) << "the ring slot continues where it was";
  EXPECT_OK(ParseSegment(grown).status());
}

TEST(SegmentIoTest, CloneIsIndependent) {
  auto d = Data(4096);
  for (Method m : {Method::kCtkvr, Method::kCluster}) {
    SCOPED_TRACE(MethodName(m));
    ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(m, InputOver(*d, 4, 3000), SmallOptions(), nullptr));
    const std::string before = SerializeSegment(*seg);
    std::unique_ptr<Segment> clone = seg->Clone();
    ASSERT_OK(clone->Append(d->keys, 3200, nullptr));
    EXPECT_EQ(SerializeSegment(*seg), before) << "appending to a clone leaves the original alone";
    EXPECT_EQ(clone->token_end(), 3200);
  }
}

TEST(SegmentIoTest, ChainSearchesLikeSeparateSegmentsAndRoundTrips) {
  auto d = Data(4096);
  const IndexOptions o = SmallOptions();
  for (Method m : {Method::kExact, Method::kCluster}) {
    SCOPED_TRACE(MethodName(m));
    ASSERT_OK_AND_ASSIGN(auto a, BuildSegment(m, InputOver(*d, 4, 2000), o, nullptr));
    ASSERT_OK_AND_ASSIGN(auto b, BuildSegment(m, InputOver(*d, 2000, 3000), o, nullptr));
    std::shared_ptr<const Segment> sa = std::move(a), sb = std::move(b);
    ASSERT_OK_AND_ASSIGN(auto chain, NewSegmentChain({sa, sb}));
    EXPECT_EQ(chain->token_begin(), 4);
    EXPECT_EQ(chain->token_end(), 3000);
    EXPECT_EQ(chain->MemoryBytes(), sa->MemoryBytes() + sb->MemoryBytes());
    EXPECT_THAT(chain->Append(d->keys, 3100, nullptr),
                StatusIs(absl::StatusCode::kFailedPrecondition));
    // Searching the chain = searching both parts as separate segments.
    for (int i = 0; i < d->options.decode_queries; ++i) {
      SearchEntry e = DecodeEntry(*d, i);
      SearchEntry f = e;
      e.segments = {chain.get()};
      f.segments = {sa.get(), sb.get()};
      std::vector<std::vector<int32_t>> x, y;
      ASSERT_OK(Search({&e, 1}, {}, nullptr, &x));
      ASSERT_OK(Search({&f, 1}, {}, nullptr, &y));
      EXPECT_EQ(x, y);
    }
    ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(SerializeSegment(*chain)));
    EXPECT_EQ(SearchAll(*d, parsed.get()), SearchAll(*d, chain.get()));
    std::shared_ptr<const Segment> sc = std::move(chain);
    EXPECT_EQ(SegmentParts(sc).size(), 2u);
    EXPECT_EQ(SegmentParts(sa).size(), 1u);
  }
  // Gaps and mixed methods are refused.
  ASSERT_OK_AND_ASSIGN(auto a, BuildSegment(Method::kExact, InputOver(*d, 4, 100), o, nullptr));
  ASSERT_OK_AND_ASSIGN(auto b, BuildSegment(Method::kExact, InputOver(*d, 200, 300), o, nullptr));
  ASSERT_OK_AND_ASSIGN(auto c, BuildSegment(Method::kCluster, InputOver(*d, 100, 300), o, nullptr));
  std::shared_ptr<const Segment> sa = std::move(a), sb = std::move(b), sc = std::move(c);
  EXPECT_THAT(NewSegmentChain({sa, sb}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(NewSegmentChain({sa, sc}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(NewSegmentChain({}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SegmentIoTest, UnindexedSegmentScansExactly) {
  auto d = Data(2048);
  std::unique_ptr<Segment> none = NewUnindexedSegment(d->options.head_dim, d->options.dtype);
  EXPECT_EQ(none->token_begin(), 0);
  EXPECT_EQ(none->token_end(), 0);
  EXPECT_EQ(SearchAll(*d, none.get()), SearchAll(*d, nullptr));
}

// Found by tests/fuzz (fuzz_record): a cluster record listing a token in two places parsed, and
// Search then selected that token twice (the delivery's slot plans assume distinct ids).
TEST(SegmentIoTest, ClusterTokenListedTwiceIsDataLoss) {
  auto d = Data(2048);
  ASSERT_OK_AND_ASSIGN(auto seg,
                       BuildSegment(Method::kCluster, InputOver(*d, 4, 2000), SmallOptions(), nullptr));
  std::string bytes = SerializeSegment(*seg);
  ASSERT_OK(ParseSegment(bytes).status());
  // The members array: u64 count (one per token of [4, 2000)), then int32 token ids.
  const uint64_t n = 1996;
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(&n), 8));
  ASSERT_NE(at, std::string::npos);
  std::memcpy(&bytes[at + 8 + 4], &bytes[at + 8], 4);  // member 1 := member 0
  EXPECT_THAT(ParseSegment(bytes).status(), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(SegmentIoTest, CorruptInputIsDataLossNeverACrash) {
  auto d = Data(2048);
  const IndexOptions o = SmallOptions();
  std::vector<std::string> records;
  for (Method m : {Method::kCtkvr, Method::kCluster}) {
    ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(m, InputOver(*d, 4, 2000), o, nullptr));
    records.push_back(SerializeSegment(*seg));
  }
  {  // ctkvr with centroids added by novel queries
    IndexOptions novel = o;
    novel.ctkvr.min_similarity = 1.0f;
    novel.ctkvr.max_added = 2;
    ASSERT_OK_AND_ASSIGN(auto seg,
                         BuildSegment(Method::kCtkvr, InputOver(*d, 4, 2000), novel, nullptr));
    SearchAll(*d, seg.get());
    records.push_back(SerializeSegment(*seg));
  }
  {
    ASSERT_OK_AND_ASSIGN(auto a, BuildSegment(Method::kCluster, InputOver(*d, 4, 1000), o, nullptr));
    ASSERT_OK_AND_ASSIGN(auto b, BuildSegment(Method::kCluster, InputOver(*d, 1000, 2000), o, nullptr));
    ASSERT_OK_AND_ASSIGN(auto chain, NewSegmentChain({std::move(a), std::move(b)}));
    records.push_back(SerializeSegment(*chain));
  }
  EXPECT_THAT(ParseSegment("").status(), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(ParseSegment("KSG1").status(), StatusIs(absl::StatusCode::kDataLoss));
  std::mt19937_64 rng(3);
  for (const std::string& good : records) {
    // Every truncation, a trailing byte, and random byte flips: DATA_LOSS or a segment that is
    // safe to search (a flip inside a float is indistinguishable from data; the storage layer's
    // CRC catches those).
    for (size_t n = 0; n < good.size(); n += 1 + good.size() / 512) {
      EXPECT_THAT(ParseSegment(good.substr(0, n)).status(),
                  StatusIs(absl::StatusCode::kDataLoss));
    }
    EXPECT_THAT(ParseSegment(good + "x").status(), StatusIs(absl::StatusCode::kDataLoss));
    for (int i = 0; i < 300; ++i) {
      std::string bad = good;
      const size_t at = rng() % bad.size();
      bad[at] = static_cast<char>(bad[at] ^ (1 + rng() % 255));
      absl::StatusOr<std::unique_ptr<Segment>> p = ParseSegment(bad);
      if (!p.ok()) {
        EXPECT_THAT(p.status(), StatusIs(absl::StatusCode::kDataLoss));
        continue;
      }
      if ((*p)->token_end() > d->keys.num_tokens) continue;  // Search refuses it (validated)
      SearchAll(*d, p->get());  // must not crash (ASan checks the reads)
    }
  }
}

}  // namespace
}  // namespace kvrecall::indexer
