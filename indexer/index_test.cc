#include "indexer/index.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "indexer/exact.h"
#include "indexer/internal/search.h"
#include "indexer/synthetic.h"
#include "indexer/testing/small_synthetic.h"

namespace kvrecall::indexer {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::SizeIs;

// fp32 keys in pages of 4 tokens.
struct Keys {
  std::vector<std::vector<float>> pages;
  PagedRows rows;
  Keys(const std::vector<std::vector<float>>& keys, int d) {
    rows.page_tokens = 4;
    rows.head_dim = d;
    rows.dtype = DType::kF32;
    rows.row_stride = static_cast<size_t>(d) * sizeof(float);
    rows.num_tokens = static_cast<int64_t>(keys.size());
    for (size_t t = 0; t < keys.size(); ++t) {
      if (t % 4 == 0) pages.emplace_back(static_cast<size_t>(4 * d), 0.0f);
      std::copy(keys[t].begin(), keys[t].end(),
                pages.back().begin() + static_cast<int64_t>(t % 4) * d);
    }
    std::vector<const uint8_t*> table;
    for (auto& p : pages) table.push_back(reinterpret_cast<const uint8_t*>(p.data()));
    rows.SetPages(std::move(table));
  }
};

// GatherRows copies the listed rows in order, to a strided destination.
TEST(PagedRowsTest, GatherRowsCopiesTheListedRows) {
  std::vector<std::vector<float>> rows(23);
  for (size_t t = 0; t < rows.size(); ++t)
    for (int j = 0; j < 8; ++j) rows[t].push_back(static_cast<float>(t * 100 + j));
  Keys k(rows, 8);
  const std::vector<int32_t> tokens = {22, 0, 5, 6, 7, 13, 1, 19, 4, 3, 8, 9, 21, 2};
  const size_t row = 8 * sizeof(float), stride = 2 * row + 4;
  std::vector<uint8_t> dst(tokens.size() * stride, 0xAB);
  GatherRows(k.rows, tokens.data(), tokens.size(), dst.data(), stride);
  for (size_t j = 0; j < tokens.size(); ++j) {
    float got[8];
    std::memcpy(got, dst.data() + j * stride, row);
    for (int e = 0; e < 8; ++e) ASSERT_EQ(got[e], rows[tokens[j]][e]) << j << " " << e;
    for (size_t b = row; b < stride; ++b) ASSERT_EQ(dst[j * stride + b], 0xAB);  // untouched
  }
}

// RowAddresses gives row()'s addresses, with pages of a power-of-two size (the shift) and not.
TEST(PagedRowsTest, RowAddressesAreRowsAddressesForEveryPageSize) {
  std::vector<uint8_t> arena(64 * 1024);
  for (const int page_tokens : {4, 5, 16}) {
    PagedRows rows;
    rows.page_tokens = page_tokens;
    rows.page_offset = 24;
    rows.row_stride = 40;
    rows.head_dim = 16;
    rows.num_tokens = 100;
    std::vector<const uint8_t*> table;
    for (int p = 0; p * page_tokens < 100; ++p)
      table.push_back(arena.data() + ((p * 7) % 31) * 1024);
    rows.SetPages(std::move(table));
    const std::vector<int32_t> tokens = {99, 0, 3, 4, 5, 15, 16, 17, 64, 63};
    std::vector<const uint8_t*> out(2 * tokens.size(), nullptr);
    RowAddresses(rows, tokens.data(), tokens.size(), out.data() + 1, 2);
    for (size_t j = 0; j < tokens.size(); ++j) {
      EXPECT_EQ(out[2 * j + 1], rows.row(tokens[j]))
          << "page_tokens " << page_tokens << " token " << tokens[j];
      EXPECT_EQ(out[2 * j], nullptr);  // the stride's other slots are untouched
    }
  }
}

SearchEntry Entry(const float* q, int group, const PagedRows* keys, int64_t b, int64_t e, int k,
                  std::vector<const Segment*> segs = {}) {
  SearchEntry s;
  s.queries = q;
  s.group = group;
  s.keys = keys;
  s.segments = std::move(segs);
  s.token_begin = b;
  s.token_end = e;
  s.k = k;
  s.scale = 1.0f;
  return s;
}

std::vector<int32_t> SearchOne(const SearchEntry& e) {
  std::vector<std::vector<int32_t>> out;
  EXPECT_OK(Search({&e, 1}, {}, nullptr, &out));
  return out.empty() ? std::vector<int32_t>{} : out[0];
}

// A one-kv-head, group-1 build over all of `k` with scale 1 and the given prompt queries.
BuildInput TinyInput(const Keys& k, const float* prompt, int num_prompt) {
  BuildInput in;
  in.keys = &k.rows;
  in.token_begin = 0;
  in.token_end = k.rows.num_tokens;
  in.prompt_queries = prompt;
  in.num_prompt_queries = num_prompt;
  in.group = 1;
  in.scale = 1.0f;
  return in;
}

std::unique_ptr<SyntheticData> Data(int64_t tokens, uint64_t seed = 1) {
  return test_data::SmallSynthetic(tokens, 256, 4, seed);
}
using test_data::InputOver;

TEST(MethodTest, ParsesNamesAndRejectsUnknown) {
  ASSERT_OK_AND_ASSIGN(Method m, ParseMethod("ctkvr"));
  EXPECT_EQ(m, Method::kCtkvr);
  EXPECT_EQ(MethodName(Method::kCluster), "cluster");
  EXPECT_THAT(ParseMethod("faiss").status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Hand-checkable: q = (1, 0) prefers tokens by their first coordinate.
TEST(IndexTest, EveryMethodFindsTheObviousTokensOnATinyCase) {
  Keys k({{0, 0}, {5, 0}, {1, 0}, {0, 9}, {4, 0}, {-3, 0}, {0, 0}, {4.5f, 0}}, 2);
  const float q[2] = {1, 0};
  const BuildInput in = TinyInput(k, q, 1);
  IndexOptions opt;
  opt.ctkvr.list_size = 3;
  for (const char* method : {"exact", "ctkvr"}) {
    ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(method, in, opt, nullptr));
    EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 8, 3, {seg.get()})), ElementsAre(1, 4, 7))
        << method;
  }
}

// Lookahead successors: the best picks keep the 2 tokens after them (inside the range) and the
// lowest-scored other picks make room; the selection never exceeds k.
TEST(IndexTest, SuccessorsFollowTheBestPicksWithinTheBudget) {
  //            0       1       2       3       4       5       6       7       8       9
  Keys k({{0, 0}, {9, 0}, {0, 0}, {0, 0}, {3, 0}, {2, 0}, {1, 0}, {0, 0}, {8, 0}, {0, 0}}, 2);
  const float q[2] = {1, 0};
  // Plain top-4 by the first coordinate: 1, 8, 4, 5.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 10, 4)), ElementsAre(1, 4, 5, 8));
  // k = 6 and 1 successor: the best (1) keeps 2 and 3; then 8, 4, 5 fill the rest (6 dropped).
  SearchEntry e = Entry(q, 1, &k.rows, 0, 10, 6);
  e.successors = 1;
  EXPECT_THAT(SearchOne(e), ElementsAre(1, 2, 3, 4, 5, 8));
  // 2 successors at k = 6: 1 and 8 with theirs (9 only: 10 is past the range end).
  e.successors = 2;
  EXPECT_THAT(SearchOne(e), ElementsAre(1, 2, 3, 4, 8, 9));
  // A budget of 2 has no room for a pick and its 2 successors: the plain top-2.
  e.k = 2;
  EXPECT_THAT(SearchOne(e), ElementsAre(1, 8));
  // Successors stay inside the range: [0, 3) with k = 3 and 1 successor.
  e = Entry(q, 1, &k.rows, 0, 3, 3);
  e.successors = 1;
  EXPECT_THAT(SearchOne(e), ElementsAre(0, 1, 2));
  e.successors = -1;
  std::vector<std::vector<int32_t>> out;
  EXPECT_THAT(Search({&e, 1}, {}, nullptr, &out), StatusIs(absl::StatusCode::kInvalidArgument));
}

// AddSuccessors partitions instead of sorting by score; its result is the one of the plain
// definition (every pick ranked; the best ones with their successors, then the others by rank
// while there is room), on random picks with tied scores, at every successor count.
TEST(IndexTest, SuccessorsMatchTheirDefinitionOnRandomPicks) {
  auto reference = [](const std::vector<float>& scores, int successors, int64_t begin,
                      int64_t end, int64_t k, std::vector<int32_t> ids) {
    const size_t n = ids.size();
    std::vector<size_t> rank(n);
    std::iota(rank.begin(), rank.end(), size_t{0});
    std::sort(rank.begin(), rank.end(), [&](size_t a, size_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && ids[a] < ids[b]);
    });
    const size_t cap = std::max(static_cast<size_t>(k), n);
    const size_t best = std::min({n, static_cast<size_t>(successors), cap / 3});
    std::vector<int32_t> out;
    for (size_t j = 0; j < best; ++j) {
      const int32_t t0 = ids[rank[j]];
      out.push_back(t0);
      for (int64_t t = std::max<int64_t>(t0 + 1, begin); t <= t0 + 2 && t < end; ++t)
        out.push_back(static_cast<int32_t>(t));
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    const size_t kept = out.size();
    for (size_t j = best; j < n && out.size() < cap; ++j) {
      if (!std::binary_search(out.begin(), out.begin() + kept, ids[rank[j]]))
        out.push_back(ids[rank[j]]);
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t end = 50 + static_cast<int64_t>(rng() % 3000);
    std::vector<int32_t> all(static_cast<size_t>(end));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    const size_t n = 1 + rng() % std::min<size_t>(all.size(), 1100);
    std::vector<int32_t> ids(all.begin(), all.begin() + static_cast<int64_t>(n));
    std::vector<float> scores(n);
    for (float& x : scores) x = static_cast<float>(rng() % 64);  // many ties
    const int64_t k = static_cast<int64_t>(n) - static_cast<int64_t>(rng() % (n / 2 + 1));
    // As SelectFromHits' unit path gives them (any order), and ascending as its single path.
    std::vector<std::pair<int32_t, float>> pairs;
    for (size_t j = 0; j < n; ++j) pairs.emplace_back(ids[j], scores[j]);
    std::sort(pairs.begin(), pairs.end());
    std::vector<int32_t> ascending;
    std::vector<float> ascending_scores;
    for (const auto& [t, x] : pairs) {
      ascending.push_back(t);
      ascending_scores.push_back(x);
    }
    for (int successors : {1, 3, 16, 1000}) {
      std::vector<int32_t> got = ids;
      internal::AddSuccessors(scores, successors, 0, end, k, &got);
      const std::vector<int32_t> want = reference(scores, successors, 0, end, k, ids);
      ASSERT_EQ(got, want) << "trial " << trial << " successors " << successors;
      got = ascending;
      internal::AddSuccessors(ascending_scores, successors, 0, end, k, &got);
      ASSERT_EQ(got, want) << "trial " << trial << " successors " << successors << " ascending";
    }
  }
}

// SelectWithSuccessors selects twice from the ranking instead of ranking the picks; it gives what
// SelectFromHits then AddSuccessors give, on random single-token hits (one list or several,
// many ties, ranges that cut successors off, budgets below, at and above the candidates).
TEST(IndexTest, SelectWithSuccessorsMatchesSelectThenAddSuccessors) {
  std::mt19937 rng(11);
  const int group = 4;
  for (int trial = 0; trial < 300; ++trial) {
    const int lists = 1 + static_cast<int>(rng() % 3);
    std::vector<internal::Hits> hits(static_cast<size_t>(lists));
    int32_t next = static_cast<int32_t>(rng() % 5);
    for (internal::Hits& h : hits) {
      const int64_t units = 1 + static_cast<int64_t>(rng() % 900);
      for (int64_t u = 0; u < units; ++u) {
        h.tokens.push_back(next);
        next += 1 + static_cast<int32_t>(rng() % 3);  // neighbours are often candidates too
      }
      h.units = units;
      h.logits.resize(static_cast<size_t>(units * group));
      for (float& x : h.logits) x = static_cast<float>(rng() % 32) * 0.25f;  // many ties
      if (trial % 3 == 0) {  // units whose every head is -inf rank -inf (and tie among themselves)
        for (int64_t u = 0; u < units; ++u) {
          if (rng() % 3 != 0) continue;
          for (int g = 0; g < group; ++g)
            h.logits[g * units + u] = -std::numeric_limits<float>::infinity();
        }
      }
      h.lse.resize(group);
      for (double& l : h.lse) l = 5.0 + static_cast<double>(rng() % 7);
    }
    std::shuffle(hits.begin(), hits.end(), rng);  // both order the lists by token
    const int64_t begin = rng() % 4, end = next - static_cast<int64_t>(rng() % 3);
    int64_t total = 0;
    for (const internal::Hits& h : hits) total += h.units;
    for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{5}, total / 2 + 1, total, total + 40}) {
      for (int successors : {1, 3, 16, 1000}) {
        std::vector<int32_t> want, got;
        std::vector<float> scores;
        internal::SelectFromHits(hits, group, k, &want, &scores);
        internal::AddSuccessors(scores, successors, begin, end, k, &want);
        internal::SelectWithSuccessors(hits, group, k, successors, begin, end, &got);
        ASSERT_EQ(got, want) << "trial " << trial << " k " << k << " successors " << successors;
      }
    }
  }
}

// A review's case: kept tokens and -inf candidates must not be confused (the budget stays full).
TEST(IndexTest, SelectWithSuccessorsKeepsTheBudgetWithInfiniteLogits) {
  internal::Hits h;
  for (int32_t t = 0; t < 10; ++t) h.tokens.push_back(t);
  h.units = 10;
  h.logits.assign(10, -std::numeric_limits<float>::infinity());
  h.logits[0] = 10;
  h.lse = {0.0};
  std::vector<int32_t> got;
  internal::SelectWithSuccessors({&h, 1}, 1, 6, 1, 0, 10, &got);
  EXPECT_THAT(got, ElementsAre(0, 1, 2, 3, 4, 5));
}

// Search's contract is min(k, range) tokens even when the probed lists are shorter than the
// budget (found by fuzz_record on a parsed segment): further centroids are probed, then the range
// is scored exactly.
TEST(IndexTest, CtkvrFillsTheBudgetWhenItsListsAreShort) {
  Keys k({{0, 0}, {5, 0}, {1, 0}, {0, 9}, {4, 0}, {-3, 0}, {0, 0}, {4.5f, 0}}, 2);
  const float prompt[4] = {1, 0, 0, 1};  // two prompt queries: two centroids
  const BuildInput in = TinyInput(k, prompt, 2);
  IndexOptions opt;
  opt.ctkvr.list_size = 2;
  opt.ctkvr.centroids = 2;
  opt.ctkvr.probe = 1;
  opt.ctkvr.neighbour_tokens = 0;  // the lists alone
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, in, opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto exact, BuildSegment(Method::kExact, in, opt, nullptr));
  const float q[2] = {1, 0};
  // Probe 1 holds 2 tokens; the second centroid's list brings 2 more.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 8, 2, {seg.get()})), ElementsAre(1, 7));
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 8, 4, {seg.get()})), SizeIs(4));
  // Both lists together hold 4 tokens: a budget of 6 is scored exactly.
  EXPECT_EQ(SearchOne(Entry(q, 1, &k.rows, 0, 8, 6, {seg.get()})),
            SearchOne(Entry(q, 1, &k.rows, 0, 8, 6, {exact.get()})));
  // A range that excludes the listed tokens still gets min(k, range) tokens.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 2, 4, 3, {seg.get()})), ElementsAre(2, 3));
}

// Keys for the novel-query tests: tokens 0-3 strong along x, 4-7 along y, 8-11 weak.
Keys XyKeys() {
  return Keys({{9, 0}, {8, 0}, {7, 0}, {6, 0}, {0, 9}, {0, 8}, {0, 7}, {0, 6},
               {1, 1}, {1, 1}, {1, 1}, {1, 1}},
              2);
}

BuildInput XInput(const Keys& k, const float* prompt) {
  return TinyInput(k, prompt, 1);  // one prompt query along x: one centroid
}

// The x centroid's list holds exactly the four x tokens; no neighbours.
IndexOptions XyOptions() {
  IndexOptions opt;
  opt.ctkvr.list_size = 4;
  opt.ctkvr.neighbour_tokens = 0;
  return opt;
}

// A query unlike every centroid is scored exactly (the published method would answer from the
// x-centroid's list and miss every y token), then joins the index: the next, similar query is
// served from its list.
TEST(IndexTest, CtkvrScoresANovelQueryExactlyAndAddsItAsACentroid) {
  Keys k = XyKeys();
  const float prompt[2] = {1, 0};
  IndexOptions opt = XyOptions();
  const float y[2] = {0, 1};        // cosine 0 with the centroid: novel
  const float y2[2] = {0.2f, 1};    // cosine 0.98 with y
  opt.ctkvr.min_similarity = 0;     // as published
  ASSERT_OK_AND_ASSIGN(auto plain, BuildSegment(Method::kCtkvr, XInput(k, prompt), opt, nullptr));
  // (the x list holds tokens 0-3, all scoring 0 for y: the lowest ids win the tie)
  EXPECT_THAT(SearchOne(Entry(y, 1, &k.rows, 0, 12, 2, {plain.get()})), ElementsAre(0, 1));

  opt.ctkvr.min_similarity = 0.5f;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, XInput(k, prompt), opt, nullptr));
  const size_t bytes = seg->MemoryBytes();
  const CtkvrCounters c0 = ReadCtkvrCounters();
  EXPECT_THAT(SearchOne(Entry(y, 1, &k.rows, 0, 12, 2, {seg.get()})), ElementsAre(4, 5));
  const CtkvrCounters c1 = ReadCtkvrCounters();
  EXPECT_EQ(c1.searches - c0.searches, 1);
  EXPECT_EQ(c1.novel - c0.novel, 1);
  EXPECT_LE(seg->MemoryBytes(), bytes) << "the added centroid was reserved at build";
  EXPECT_THAT(SearchOne(Entry(y2, 1, &k.rows, 0, 12, 2, {seg.get()})), ElementsAre(4, 5));
  const CtkvrCounters c2 = ReadCtkvrCounters();
  EXPECT_EQ(c2.novel - c1.novel, 0) << "served from the added centroid's list";
  // The x query is still answered from the prompt centroid.
  EXPECT_THAT(SearchOne(Entry(prompt, 1, &k.rows, 0, 12, 2, {seg.get()})), ElementsAre(0, 1));
  EXPECT_EQ(ReadCtkvrCounters().novel - c2.novel, 0);
}

// Early in decode the recent window overlaps the prompt segment, so a search's range ends
// before the segment does. A centroid added then still covers the whole segment.
TEST(IndexTest, CtkvrAddsACentroidOverTheWholeSegmentFromANarrowerSearch) {
  Keys k = XyKeys();
  const float prompt[2] = {1, 0};
  IndexOptions opt = XyOptions();
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, XInput(k, prompt), opt, nullptr));
  const float y[2] = {0, 1}, y2[2] = {0.2f, 1};
  EXPECT_THAT(SearchOne(Entry(y, 1, &k.rows, 0, 6, 2, {seg.get()})), ElementsAre(4, 5));
  const int64_t novel = ReadCtkvrCounters().novel;
  // Served from the added list (not novel), which holds tokens 6 and 7 beyond that range.
  EXPECT_THAT(SearchOne(Entry(y2, 1, &k.rows, 0, 12, 4, {seg.get()})), ElementsAre(4, 5, 6, 7));
  EXPECT_EQ(ReadCtkvrCounters().novel, novel);
}

TEST(IndexTest, CtkvrReplacesTheOldestAddedCentroidBeyondTheCap) {
  Keys k = XyKeys();
  const float prompt[2] = {1, 0};
  IndexOptions opt = XyOptions();
  opt.ctkvr.max_added = 1;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, XInput(k, prompt), opt, nullptr));
  const float y[2] = {0, 1}, minus_x[2] = {-1, 0.1f};
  auto novel_of = [&](const float* q) {
    const int64_t before = ReadCtkvrCounters().novel;
    SearchOne(Entry(q, 1, &k.rows, 0, 12, 2, {seg.get()}));
    return ReadCtkvrCounters().novel - before;
  };
  EXPECT_EQ(novel_of(y), 1);
  EXPECT_EQ(novel_of(y), 0);
  EXPECT_EQ(novel_of(minus_x), 1);  // replaces y
  EXPECT_EQ(novel_of(minus_x), 0);
  EXPECT_EQ(novel_of(y), 1) << "y was replaced";
  // max_added = 0: novel queries are scored exactly, nothing is kept.
  opt.ctkvr.max_added = 0;
  ASSERT_OK_AND_ASSIGN(auto none, BuildSegment(Method::kCtkvr, XInput(k, prompt), opt, nullptr));
  for (int i = 0; i < 2; ++i) {
    const int64_t before = ReadCtkvrCounters().novel;
    EXPECT_THAT(SearchOne(Entry(y, 1, &k.rows, 0, 12, 2, {none.get()})), ElementsAre(4, 5));
    EXPECT_EQ(ReadCtkvrCounters().novel - before, 1);
  }
}

// A copying head attends to the token after the one it attended last: the neighbours of a
// list's best tokens are candidates even when the list is too short to hold them.
TEST(IndexTest, CtkvrListsHoldTheNeighboursOfTheirBestTokens) {
  // Token 5 is the prompt query's best; token 6, next to it, is what the next query wants.
  std::vector<std::vector<float>> rows(16, std::vector<float>{0, 0});
  rows[5] = {10, 0};
  rows[6] = {0, 8};
  rows[12] = {0, 7};
  Keys k(rows, 2);
  const float prompt[2] = {1, 0};
  const BuildInput in = TinyInput(k, prompt, 1);
  IndexOptions opt;
  opt.ctkvr.list_size = 2;  // token 5 and a zero key
  opt.ctkvr.neighbour_tokens = 0;
  opt.ctkvr.min_similarity = 0;  // the neighbours alone
  const float next[2] = {0.6f, 1};
  ASSERT_OK_AND_ASSIGN(auto bare, BuildSegment(Method::kCtkvr, in, opt, nullptr));
  EXPECT_THAT(SearchOne(Entry(next, 1, &k.rows, 0, 16, 1, {bare.get()})), ElementsAre(5));
  opt.ctkvr.neighbour_tokens = 1;
  opt.ctkvr.neighbour_radius = 1;
  ASSERT_OK_AND_ASSIGN(auto near, BuildSegment(Method::kCtkvr, in, opt, nullptr));
  EXPECT_THAT(SearchOne(Entry(next, 1, &k.rows, 0, 16, 1, {near.get()})), ElementsAre(6));
  EXPECT_THAT(SearchOne(Entry(next, 1, &k.rows, 0, 16, 1)), ElementsAre(6)) << "exact agrees";
}

// Searches add centroids to a shared, published segment: concurrent searches, clones and
// serialisations must stay consistent (TSan: KVRECALL_TSAN_TESTS=indexer_test scripts/test.sh).
TEST(IndexTest, CtkvrNovelQueriesAreSafeUnderConcurrentSearches) {
  auto d = Data(4000);
  IndexOptions opt;
  opt.ctkvr.list_size = 256;
  opt.ctkvr.min_similarity = 1.0f;  // novel unless a query meets itself as a centroid
  opt.ctkvr.max_added = 3;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, InputOver(*d, 4, 3968), opt, nullptr));
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 20; ++r) {
        const int i = (t + r) % d->options.decode_queries;
        const float* q = d->decode_queries.data() + i * 4 * 32;
        // Which centroids a search sees depends on the interleaving; its contract does not.
        const std::vector<int32_t> got = SearchOne(Entry(q, 4, &d->keys, 4, 3968, 64, {seg.get()}));
        if (got.size() != 64 || !std::is_sorted(got.begin(), got.end()) || got.front() < 4 ||
            got.back() >= 3968) {
          ++wrong;
        }
      }
    });
  }
  threads.emplace_back([&] {
    for (int r = 0; r < 20; ++r) {
      std::unique_ptr<Segment> c = seg->Clone();
      absl::StatusOr<std::unique_ptr<Segment>> p = ParseSegment(SerializeSegment(*seg));
      EXPECT_OK(p.status());
      if (!p.ok() || (*p)->MemoryBytes() != c->MemoryBytes()) ++wrong;
    }
  });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(IndexTest, CtkvrRejectsBadNovelQueryOptions) {
  Keys k = XyKeys();
  const float prompt[2] = {1, 0};
  for (auto set : std::vector<void (*)(CtkvrOptions*)>{
           [](CtkvrOptions* o) { o->min_similarity = 1.5f; },
           [](CtkvrOptions* o) { o->min_similarity = -0.1f; },
           [](CtkvrOptions* o) { o->max_added = -1; },
           [](CtkvrOptions* o) { o->neighbour_tokens = -1; },
           [](CtkvrOptions* o) { o->neighbour_radius = 5000; }}) {
    IndexOptions opt;
    set(&opt.ctkvr);
    EXPECT_THAT(BuildSegment(Method::kCtkvr, XInput(k, prompt), opt, nullptr).status(),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

TEST(IndexTest, ClusterTakesWholeClustersThenTruncatesByLowestId) {
  // Two tight directions: tokens {0, 2, 4} along x, {1, 3, 5} along y.
  Keys k({{10, 0.1f}, {0.1f, 10}, {9, 0}, {0, 9}, {11, -0.1f}, {-0.1f, 11}}, 2);
  IndexOptions opt;
  opt.cluster.tokens_per_cluster = 3;  // 2 clusters
  opt.cluster.rescore_factor = 0;      // ClusterKV's whole-cluster selection
  BuildInput in;
  in.keys = &k.rows;
  in.token_begin = 0;
  in.token_end = 6;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCluster, in, opt, nullptr));
  const float q[2] = {1, 0};
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 3, {seg.get()})), ElementsAre(0, 2, 4));
  // Budget 4: the x cluster, then the lowest id of the y cluster.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 4, {seg.get()})), ElementsAre(0, 1, 2, 4));
}

TEST(IndexTest, ClusterVarianceRankingPrefersClustersWithStrongTokens) {
  // x cluster {0, 2, 4}: logits 1, 1, 1 for q = x. y cluster {1, 3, 5}: logits 0, 0, 2.7 — a lower
  // centroid logit (0.9) but more mass (e^2.7 + 2 > 3e), which only the variance term sees.
  Keys k({{1, 0}, {0, 5}, {1, 0.01f}, {0, 5}, {1, -0.01f}, {2.7f, 5}}, 2);
  IndexOptions opt;
  opt.cluster.tokens_per_cluster = 3;
  opt.cluster.rescore_factor = 0;
  BuildInput in;
  in.keys = &k.rows;
  in.token_begin = 0;
  in.token_end = 6;
  const float q[2] = {1, 0};
  ASSERT_OK_AND_ASSIGN(auto plain, BuildSegment(Method::kCluster, in, opt, nullptr));
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 3, {plain.get()})), ElementsAre(0, 2, 4));
  opt.cluster.variance_ranking = true;
  ASSERT_OK_AND_ASSIGN(auto var, BuildSegment(Method::kCluster, in, opt, nullptr));
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 3, {var.get()})), ElementsAre(1, 3, 5));
  EXPECT_GT(var->MemoryBytes(), plain->MemoryBytes());
}

TEST(IndexTest, ClusterRescoreRanksTheTokensOfTheTakenClustersExactly) {
  // x cluster {0, 2, 4}: logits 1, 3, 2 for q = x; y cluster {1, 3, 5}: logits ~0.
  Keys k({{1, 0}, {0, 5}, {3, 0.01f}, {0, 5}, {2, -0.01f}, {0.1f, 5}}, 2);
  IndexOptions opt;
  opt.cluster.tokens_per_cluster = 3;
  opt.cluster.rescore_factor = 0;
  BuildInput in;
  in.keys = &k.rows;
  in.token_begin = 0;
  in.token_end = 6;
  const float q[2] = {1, 0};
  ASSERT_OK_AND_ASSIGN(auto whole, BuildSegment(Method::kCluster, in, opt, nullptr));
  // Whole clusters: the x cluster truncated by lowest id.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 2, {whole.get()})), ElementsAre(0, 2));
  opt.cluster.rescore_factor = 1;  // candidates: the x cluster (3 >= 1 × 2 tokens)
  ASSERT_OK_AND_ASSIGN(auto rescored, BuildSegment(Method::kCluster, in, opt, nullptr));
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 2, {rescored.get()})), ElementsAre(2, 4));
  // Budget 4 with factor 1: both clusters are candidates; the best four tokens by q·k.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 0, 6, 4, {rescored.get()})), ElementsAre(0, 2, 4, 5));
  // Restricted range [2, 6): only in-range tokens are candidates.
  EXPECT_THAT(SearchOne(Entry(q, 1, &k.rows, 2, 6, 1, {rescored.get()})), ElementsAre(2));
  opt.cluster.rescore_factor = -1;
  EXPECT_THAT(BuildSegment(Method::kCluster, in, opt, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(IndexTest, ClusterRescoreCoversExactWhenCandidatesAreEverythingAndBeatsWholeClusters) {
  auto d = Data(8192);
  const int64_t b = d->retrieval_begin, e = d->retrieval_end;
  IndexOptions opt;
  opt.cluster.segment_tokens = 2048;
  opt.cluster.rescore_factor = 0;
  ASSERT_OK_AND_ASSIGN(auto whole,
                       BuildSegment(Method::kCluster, InputOver(*d, b, e), opt, nullptr));
  opt.cluster.rescore_factor = 4;
  ASSERT_OK_AND_ASSIGN(auto four,
                       BuildSegment(Method::kCluster, InputOver(*d, b, e), opt, nullptr));
  opt.cluster.rescore_factor = 1000;  // every cluster is a candidate: exact
  ASSERT_OK_AND_ASSIGN(auto all, BuildSegment(Method::kCluster, InputOver(*d, b, e), opt, nullptr));
  int common_whole = 0, common_four = 0;
  for (int i = 0; i < 4; ++i) {
    const float* q = d->decode_queries.data() + i * 4 * 32;
    const auto want = SearchOne(Entry(q, 4, &d->keys, b, e, 128));
    EXPECT_EQ(SearchOne(Entry(q, 4, &d->keys, b, e, 128, {all.get()})), want);
    const auto w = SearchOne(Entry(q, 4, &d->keys, b, e, 128, {whole.get()}));
    const auto f = SearchOne(Entry(q, 4, &d->keys, b, e, 128, {four.get()}));
    ASSERT_EQ(f.size(), 128u);
    for (int32_t t : w) common_whole += std::binary_search(want.begin(), want.end(), t);
    for (int32_t t : f) common_four += std::binary_search(want.begin(), want.end(), t);
  }
  EXPECT_GT(common_four, common_whole);
  EXPECT_GE(common_four, 4 * 128 * 6 / 10);
  // A pending (appended, not yet clustered) tail and a second segment merge with the candidates.
  ASSERT_OK_AND_ASSIGN(auto head,
                       BuildSegment(Method::kCluster, InputOver(*d, b, 4000), opt, nullptr));
  opt.cluster.rescore_factor = 4;
  ASSERT_OK_AND_ASSIGN(auto tail,
                       BuildSegment(Method::kCluster, InputOver(*d, 4000, 7000), opt, nullptr));
  ASSERT_OK(tail->Append(d->keys, e, nullptr));
  const auto got =
      SearchOne(Entry(d->decode_queries.data(), 4, &d->keys, b, e, 128, {tail.get(), head.get()}));
  ASSERT_EQ(got.size(), 128u);
  EXPECT_TRUE(std::is_sorted(got.begin(), got.end()));
}

TEST(IndexTest, SearchWithoutSegmentsEqualsExactSearch) {
  auto d = Data(3000);
  const float scale = 1.0f / std::sqrt(32.0f);
  for (int i = 0; i < 4; ++i) {
    const float* q = d->decode_queries.data() + i * 4 * 32;
    SearchEntry e = Entry(q, 4, &d->keys, 4, 2968, 100);
    e.scale = scale;
    SearchQuery sq{q, 4, &d->keys, 4, 2968, 100, scale};
    std::vector<std::vector<int32_t>> want;
    ASSERT_OK(ExactSearch({&sq, 1}, nullptr, &want));
    EXPECT_EQ(SearchOne(e), want[0]);
  }
}

// A range that fits the budget is taken whole without scoring; it is what scoring selects then
// (ExactSearch scores every token), with and without successors; one token more is scored.
TEST(IndexTest, ExactRangeThatFitsTheBudgetIsTakenWhole) {
  auto d = Data(3000);
  const float* q = d->decode_queries.data();
  for (int64_t len : {1, 99, 100}) {
    for (int successors : {0, 7}) {
      SearchEntry e = Entry(q, 4, &d->keys, 500, 500 + len, 100);
      e.successors = successors;
      std::vector<int32_t> all(static_cast<size_t>(len));
      std::iota(all.begin(), all.end(), 500);
      EXPECT_EQ(SearchOne(e), all) << len << " " << successors;
      SearchQuery sq{q, 4, &d->keys, 500, 500 + len, 100, 1.0f / std::sqrt(32.0f)};
      std::vector<std::vector<int32_t>> scored;
      ASSERT_OK(ExactSearch({&sq, 1}, nullptr, &scored));
      EXPECT_EQ(scored[0], all);
    }
  }
  const std::vector<int32_t> got = SearchOne(Entry(q, 4, &d->keys, 500, 601, 100));
  EXPECT_EQ(got.size(), 100u);
  EXPECT_TRUE(std::is_sorted(got.begin(), got.end()));
  // One call with both kinds, on a pool: each entry answers as it does alone.
  ThreadPool pool(3);
  const std::vector<SearchEntry> mixed = {Entry(q, 4, &d->keys, 500, 601, 100),
                                          Entry(q, 4, &d->keys, 700, 780, 100),
                                          Entry(q, 4, &d->keys, 0, 3000, 100)};
  std::vector<std::vector<int32_t>> out;
  ASSERT_OK(Search(mixed, {}, &pool, &out));
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0], got);
  EXPECT_EQ(out[1].size(), 80u);
  EXPECT_EQ(out[1].front(), 700);
  EXPECT_EQ(out[2], SearchOne(mixed[2]));
}

TEST(IndexTest, ExactSegmentsSplitAnyWayEqualOneSegment) {
  auto d = Data(3000);
  IndexOptions opt;
  ASSERT_OK_AND_ASSIGN(auto whole,
                       BuildSegment(Method::kExact, InputOver(*d, 0, 3000), opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto prefix,
                       BuildSegment(Method::kExact, InputOver(*d, 0, 1024), opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto suffix,
                       BuildSegment(Method::kExact, InputOver(*d, 1024, 2500), opt, nullptr));
  const float* q = d->decode_queries.data();
  for (int k : {1, 50, 700}) {
    SearchEntry one = Entry(q, 4, &d->keys, 4, 2968, k, {whole.get()});
    // Two segments (given out of order) and an uncovered tail [2500, 2968) scanned exactly.
    SearchEntry split = Entry(q, 4, &d->keys, 4, 2968, k, {suffix.get(), prefix.get()});
    EXPECT_EQ(SearchOne(split), SearchOne(one)) << k;
  }
}

// min_similarity 1 makes every search novel: scored exactly, over ranges narrower than the
// segment too (one exact pass over the segment, the range's hits sliced from it).
TEST(IndexTest, CtkvrNovelSearchesEqualExactOverAnyRange) {
  auto d = Data(2000);
  IndexOptions opt;
  opt.ctkvr.min_similarity = 1.0f;
  ASSERT_OK_AND_ASSIGN(auto seg,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 4, 1968), opt, nullptr));
  const int64_t novel = ReadCtkvrCounters().novel;
  const std::vector<std::pair<int64_t, int64_t>> ranges = {{4, 1968}, {4, 900}, {300, 1968}, {500, 520}};
  for (int i = 0; i < 4; ++i) {
    for (size_t r = 0; r < ranges.size(); ++r) {
      // A query of its own per search (an added centroid would otherwise serve its repeats).
      std::vector<float> q(d->decode_queries.begin() + i * 4 * 32, d->decode_queries.begin() + (i + 1) * 4 * 32);
      for (size_t j = 0; j < q.size(); ++j) q[j] += 0.3f * static_cast<float>(r) * d->decode_queries[(j * 7) % q.size()];
      const auto [b, e] = ranges[r];
      EXPECT_EQ(SearchOne(Entry(q.data(), 4, &d->keys, b, e, 64, {seg.get()})),
                SearchOne(Entry(q.data(), 4, &d->keys, b, e, 64)))
          << "query " << i << " range [" << b << ", " << e << ")";
    }
  }
  EXPECT_EQ(ReadCtkvrCounters().novel, novel + 16);
}

TEST(IndexTest, CtkvrWithCompleteListsEqualsExact) {
  auto d = Data(2000);
  IndexOptions opt;
  opt.ctkvr.list_size = 5000;
  opt.ctkvr.probe = 1;
  ASSERT_OK_AND_ASSIGN(auto seg,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 4, 1968), opt, nullptr));
  for (int i = 0; i < 4; ++i) {
    const float* q = d->decode_queries.data() + i * 4 * 32;
    EXPECT_EQ(SearchOne(Entry(q, 4, &d->keys, 4, 1968, 64, {seg.get()})),
              SearchOne(Entry(q, 4, &d->keys, 4, 1968, 64)));
  }
}

// The row copies change where a search reads its candidates from, never what it selects: the
// same selection as the gather from the pages for ranges that cut the lists, after Append drops
// the copies, and in a clone (which makes its own).
// A sequence's own tokens after a shared prompt segment get a part of their own that keeps the
// prompt segment's centroids: it selects what a fresh build of that range with the same prompt
// queries selects, alone and chained after the shared part.
TEST(IndexTest, CtkvrContinuationSearchesLikeAFreshBuildWithItsBaseCentroids) {
  auto d = Data(4096);
  IndexOptions opt;
  opt.ctkvr.list_size = 128;
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Segment> base,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 4, 3072), opt, nullptr));
  BuildInput rest = InputOver(*d, 3072, 3968);
  rest.prompt_queries = nullptr;  // ignored: the centroids are base's
  rest.num_prompt_queries = 0;
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Segment> after,
                       BuildSegmentAfter(base, rest, opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto fresh,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 3072, 3968), opt, nullptr));
  EXPECT_EQ(after->token_begin(), 3072);
  EXPECT_EQ(after->token_end(), 3968);
  EXPECT_EQ(after->MemoryBytes(), fresh->MemoryBytes());
  ASSERT_OK_AND_ASSIGN(auto chain, NewSegmentChain({base, after}));
  ThreadPool pool(2);
  for (int i = 0; i < d->options.decode_queries; ++i) {
    const float* q = d->decode_queries.data() + i * 4 * 32;
    EXPECT_EQ(SearchOne(Entry(q, 4, &d->keys, 3072, 3968, 64, {after.get()})),
              SearchOne(Entry(q, 4, &d->keys, 3072, 3968, 64, {fresh.get()})))
        << "query " << i;
    EXPECT_EQ(SearchOne(Entry(q, 4, &d->keys, 4, 3968, 64, {chain.get()})),
              SearchOne(Entry(q, 4, &d->keys, 4, 3968, 64, {base.get(), fresh.get()})))
        << "query " << i;
  }
  // A continuation may be grown like any segment.
  std::unique_ptr<Segment> grown = after->Clone();
  EXPECT_OK(grown->Append(d->keys, 4000, &pool));
  EXPECT_EQ(grown->token_end(), 4000);

  BuildInput gap = InputOver(*d, 3100, 3968);
  EXPECT_THAT(BuildSegmentAfter(base, gap, opt, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(BuildSegmentAfter(nullptr, rest, opt, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  rest.group = 2;
  EXPECT_THAT(BuildSegmentAfter(base, rest, opt, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(IndexTest, CtkvrCentroidQueriesAreEvenlySpacedAndEndAtTheLastQuery) {
  EXPECT_EQ(CtkvrCentroidQueries(64, 8), (std::vector<int>{0, 9, 18, 27, 36, 45, 54, 63}));
  EXPECT_EQ(CtkvrCentroidQueries(3, 8), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(CtkvrCentroidQueries(10, 1), (std::vector<int>{9}));
  EXPECT_TRUE(CtkvrCentroidQueries(0, 8).empty());
}

// The prompt queries a ctkvr build over `d` takes as its centroids, [centroid][group][head_dim].
std::vector<float> CentroidQueries(const SyntheticData& d, int centroids) {
  const size_t row = static_cast<size_t>(d.options.group) * d.options.head_dim;
  std::vector<float> picked;
  for (int i : CtkvrCentroidQueries(d.num_prompt_queries, centroids)) {
    picked.insert(picked.end(), d.prompt_queries.begin() + i * row,
                  d.prompt_queries.begin() + (i + 1) * row);
  }
  return picked;
}

// What a GPU worker sends (CtkvrLists): the picked queries and their lists. Built from the lists
// of the indexer's own build, the segment is that build: the same lists, normalisers and
// selections.
TEST(IndexTest, CtkvrFromListsIsTheSegmentItsOwnBuildMakes) {
  auto d = Data(4096);
  IndexOptions opt;
  opt.ctkvr.list_size = 256;
  const int g = 4, hd = 32;
  ThreadPool pool(2);
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Segment> own,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 4, 4000), opt, &pool));
  ASSERT_OK_AND_ASSIGN(CtkvrListsCopy lists, CtkvrListsOf(*own));
  ASSERT_EQ(lists.num_centroids, opt.ctkvr.centroids);
  ASSERT_EQ(lists.tokens.size(), static_cast<size_t>(lists.num_centroids) * 256);
  const std::vector<float> picked = CentroidQueries(*d, opt.ctkvr.centroids);
  CtkvrLists given{lists.list_size, lists.tokens.data(), lists.lse.data()};
  BuildInput in = InputOver(*d, 4, 4000);
  in.prompt_queries = picked.data();
  in.num_prompt_queries = lists.num_centroids;
  in.ctkvr_lists = &given;
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Segment> taken,
                       BuildSegment(Method::kCtkvr, in, opt, &pool));
  ASSERT_OK_AND_ASSIGN(CtkvrListsCopy again, CtkvrListsOf(*taken));
  EXPECT_EQ(again.tokens, lists.tokens);
  EXPECT_EQ(again.lse, lists.lse);
  EXPECT_EQ(taken->MemoryBytes(), own->MemoryBytes());
  for (int i = 0; i < d->options.decode_queries; ++i) {
    const float* q = d->decode_queries.data() + i * g * hd;
    EXPECT_EQ(SearchOne(Entry(q, g, &d->keys, 4, 4000, 64, {taken.get()})),
              SearchOne(Entry(q, g, &d->keys, 4, 4000, 64, {own.get()})))
        << "query " << i;
  }
  // It persists and grows like any ctkvr segment.
  ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(SerializeSegment(*taken)));
  ASSERT_OK_AND_ASSIGN(CtkvrListsCopy reread, CtkvrListsOf(*parsed));
  EXPECT_EQ(reread.tokens, lists.tokens);
  std::unique_ptr<Segment> grown = taken->Clone();
  EXPECT_OK(grown->Append(d->keys, 4096, &pool));
  // Shorter lists than the node's list_size are taken as they are.
  CtkvrListsCopy shorter;
  ASSERT_OK_AND_ASSIGN(auto small_own, [&] {
    IndexOptions o = opt;
    o.ctkvr.list_size = 100;
    return BuildSegment(Method::kCtkvr, InputOver(*d, 4, 4000), o, nullptr);
  }());
  ASSERT_OK_AND_ASSIGN(shorter, CtkvrListsOf(*small_own));
  CtkvrLists short_given{100, shorter.tokens.data(), shorter.lse.data()};
  in.ctkvr_lists = &short_given;
  ASSERT_OK_AND_ASSIGN(auto taken_short, BuildSegment(Method::kCtkvr, in, opt, nullptr));
  ASSERT_OK_AND_ASSIGN(CtkvrListsCopy short_again, CtkvrListsOf(*taken_short));
  EXPECT_EQ(short_again.list_size, 100);
  EXPECT_EQ(short_again.tokens, shorter.tokens);
}

TEST(IndexTest, CtkvrListsThatBreakTheContractAreInvalidArgument) {
  auto d = Data(2048);
  IndexOptions opt;
  opt.ctkvr.list_size = 64;
  ASSERT_OK_AND_ASSIGN(auto own,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 4, 2000), opt, nullptr));
  ASSERT_OK_AND_ASSIGN(CtkvrListsCopy good, CtkvrListsOf(*own));
  std::vector<float> picked = CentroidQueries(*d, opt.ctkvr.centroids);
  auto build = [&](CtkvrListsCopy l, int list_size, int num_queries) {
    CtkvrLists given{list_size, l.tokens.data(), l.lse.data()};
    BuildInput in = InputOver(*d, 4, 2000);
    in.prompt_queries = picked.data();
    in.num_prompt_queries = num_queries;
    in.ctkvr_lists = &given;
    return BuildSegment(Method::kCtkvr, in, opt, nullptr).status();
  };
  EXPECT_OK(build(good, 64, good.num_centroids));
  const auto kInvalid = StatusIs(absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(build(good, 0, good.num_centroids), kInvalid);
  EXPECT_THAT(build(good, 65, good.num_centroids), kInvalid);  // beyond the node's list_size
  std::vector<float> more = picked;
  more.insert(more.end(), picked.begin(), picked.begin() + 4 * 32);
  picked = more;
  EXPECT_THAT(build(good, 64, good.num_centroids + 1), kInvalid);  // more than `centroids`
  CtkvrListsCopy l = good;
  std::swap(l.tokens[3], l.tokens[4]);
  EXPECT_THAT(build(l, 64, good.num_centroids), kInvalid);  // not ascending
  l = good;
  l.tokens[0] = 3;
  EXPECT_THAT(build(l, 64, good.num_centroids), kInvalid);  // before the range
  l = good;
  l.tokens.back() = 2000;
  EXPECT_THAT(build(l, 64, good.num_centroids), kInvalid);  // past the range
  l = good;
  l.lse[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(build(l, 64, good.num_centroids), kInvalid);
  l = good;
  l.lse[2] -= 5;  // a normaliser below its own list's mass
  EXPECT_THAT(build(l, 64, good.num_centroids), kInvalid);
  EXPECT_THAT(CtkvrListsOf(*NewUnindexedSegment(32, DType::kF32)).status(), kInvalid);
}

TEST(IndexTest, CtkvrRowCopiesSelectExactlyWhatTheGatherSelects) {
  auto d = Data(4000);
  PagedRows view = d->keys;
  view.num_tokens = 3000;
  BuildInput in = InputOver(*d, 0, 3000);
  in.keys = &view;
  IndexOptions with, without;
  with.ctkvr.list_size = without.ctkvr.list_size = 256;  // partial lists: a probe sees a few
  with.ctkvr.min_similarity = without.ctkvr.min_similarity = 0;
  without.ctkvr.copy_list_rows = false;
  ASSERT_OK_AND_ASSIGN(auto copied, BuildSegment(Method::kCtkvr, in, with, nullptr));
  ASSERT_OK_AND_ASSIGN(auto gathered, BuildSegment(Method::kCtkvr, in, without, nullptr));
  ASSERT_EQ(SerializeSegment(*copied), SerializeSegment(*gathered));  // the same index
  // The copies are counted as if all made, whether made yet or not: 392 tokens, their rows packed
  // in 25 tiles of 16.
  const size_t rows = static_cast<size_t>(with.ctkvr.centroids) *
                      ((256 + 8 * 17) * 4 +
                       25 * 16 * static_cast<size_t>(d->keys.head_dim) * DTypeSize(d->keys.dtype));
  EXPECT_EQ(copied->MemoryBytes(), gathered->MemoryBytes() + rows);
  auto compare = [&](const Segment* a, const Segment* b, int64_t len) {
    const std::vector<std::pair<int64_t, int64_t>> ranges = {
        {0, len}, {100, len - 64}, {700, 1500}, {0, 40}};
    for (int i = 0; i < 4; ++i) {  // Data() has 4 decode query groups
      const float* q = d->decode_queries.data() + i * 4 * 32;
      for (const auto& [b0, e0] : ranges) {
        for (int k : {16, 200}) {
          const auto got = SearchOne(Entry(q, 4, &view, b0, e0, k, {a}));
          EXPECT_EQ(got, SearchOne(Entry(q, 4, &view, b0, e0, k, {b})))
              << "query " << i << " range [" << b0 << ", " << e0 << ") k " << k << " length "
              << len;
          EXPECT_EQ(static_cast<int64_t>(got.size()), std::min<int64_t>(k, e0 - b0));
        }
      }
    }
  };
  compare(copied.get(), gathered.get(), 3000);
  compare(copied.get(), gathered.get(), 3000);  // now from the copies made above
  view.num_tokens = 4000;
  ASSERT_OK(copied->Append(view, 4000, nullptr));
  ASSERT_OK(gathered->Append(view, 4000, nullptr));
  compare(copied.get(), gathered.get(), 4000);
  const std::unique_ptr<Segment> clone = copied->Clone();
  compare(clone.get(), gathered.get(), 4000);
  // A parsed segment makes its copies on the first searches that need them.
  ASSERT_OK_AND_ASSIGN(auto parsed, ParseSegment(SerializeSegment(*copied)));
  compare(parsed.get(), gathered.get(), 4000);
  compare(parsed.get(), gathered.get(), 4000);
}

TEST(IndexTest, BatchedSearchesOverOneRowCopySelectWhatEachSelectsAlone) {
  // Many entries probing the same centroids of one segment: Search scores each copy once for all
  // of them, over ranges that differ by entry (some end inside the copy, some before it).
  auto d = Data(4000);
  IndexOptions opt;
  opt.ctkvr.list_size = 256;
  opt.ctkvr.min_similarity = 0;
  ASSERT_OK_AND_ASSIGN(auto seg,
                       BuildSegment(Method::kCtkvr, InputOver(*d, 0, 4000), opt, nullptr));
  const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, 4000}, {100, 3936},  {700, 1500},
                                                           {0, 40},   {2000, 4000}, {0, 4000}};
  std::vector<SearchEntry> batch;
  for (int i = 0; i < 4; ++i) {
    const float* q = d->decode_queries.data() + i * 4 * 32;
    for (const auto& [b, e] : ranges)
      for (int k : {16, 200}) batch.push_back(Entry(q, 4, &d->keys, b, e, k, {seg.get()}));
  }
  ThreadPool pool(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    std::vector<std::vector<int32_t>> together;
    ASSERT_OK(Search(batch, {}, p, &together));
    ASSERT_EQ(together.size(), batch.size());
    for (size_t i = 0; i < batch.size(); ++i)
      EXPECT_EQ(together[i], SearchOne(batch[i])) << "entry " << i;
  }
  // A failing entry fails the batch and leaves no work behind: the next batch is whole.
  std::vector<SearchEntry> bad = batch;
  bad.back().group = 2;
  EXPECT_THAT(Search(bad, {}, &pool, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<std::vector<int32_t>> again;
  ASSERT_OK(Search(batch, {}, &pool, &again));
  EXPECT_EQ(again[3], SearchOne(batch[3]));
  // Timed phases: the same selections, and every phase's time accumulates across calls.
  SearchTimes times;
  SearchOptions timed;
  timed.times = &times;
  std::vector<std::vector<int32_t>> with_times;
  ASSERT_OK(Search(batch, timed, &pool, &with_times));
  EXPECT_EQ(with_times, again);
  const SearchTimes first = times;
  EXPECT_GT(first.select_nanos, 0);
  EXPECT_GT(first.score_nanos, 0);  // the row copies' scoring is deferred to phase 2
  EXPECT_GT(first.finish_nanos, 0);
  ASSERT_OK(Search(batch, timed, &pool, &with_times));
  EXPECT_GT(times.select_nanos, first.select_nanos);
  EXPECT_GT(times.finish_nanos, first.finish_nanos);
}

TEST(IndexTest, CtkvrFindsPlantedNeedlesAndMostOfExact) {
  auto d = Data(8192);
  const int64_t b = d->retrieval_begin, e = d->retrieval_end;
  IndexOptions opt;
  opt.ctkvr.list_size = 512;
  ASSERT_OK_AND_ASSIGN(auto ctkvr, BuildSegment(Method::kCtkvr, InputOver(*d, b, e), opt, nullptr));
  for (int i = 0; i < 4; ++i) {
    const float* q = d->decode_queries.data() + i * 4 * 32;
    const std::vector<int32_t> got = SearchOne(Entry(q, 4, &d->keys, b, e, 256, {ctkvr.get()}));
    const std::vector<int32_t> want = SearchOne(Entry(q, 4, &d->keys, b, e, 256));
    for (int32_t n : d->needle_tokens) {
      EXPECT_TRUE(std::binary_search(want.begin(), want.end(), n)) << "exact misses needle " << n;
      EXPECT_TRUE(std::binary_search(got.begin(), got.end(), n)) << "ctkvr misses needle " << n;
    }
    int common = 0;
    for (int32_t t : got) common += std::binary_search(want.begin(), want.end(), t);
    EXPECT_GE(common, 200);
  }
}

TEST(IndexTest, BuildsAreDeterministicPerSeedAndIndependentOfThePool) {
  auto d = Data(4000);
  IndexOptions opt;
  opt.cluster.iterations = 5;
  ThreadPool pool(2);
  const float* q = d->decode_queries.data();
  for (Method m : {Method::kCtkvr, Method::kCluster}) {
    ASSERT_OK_AND_ASSIGN(auto a, BuildSegment(m, InputOver(*d, 4, 3968), opt, nullptr));
    ASSERT_OK_AND_ASSIGN(auto b, BuildSegment(m, InputOver(*d, 4, 3968), opt, &pool));
    const auto ra = SearchOne(Entry(q, 4, &d->keys, 4, 3968, 300, {a.get()}));
    EXPECT_EQ(ra, SearchOne(Entry(q, 4, &d->keys, 4, 3968, 300, {b.get()}))) << MethodName(m);
    EXPECT_EQ(ra.size(), 300u);
  }
  auto d2 = Data(4000);
  EXPECT_EQ(d->key_bytes, d2->key_bytes);
  EXPECT_EQ(d->decode_queries, d2->decode_queries);
  auto d3 = Data(4000, 2);
  EXPECT_NE(d->key_bytes, d3->key_bytes);
}

TEST(IndexTest, ClusterChunkedBuildCoversEveryTokenAndIsDeterministic) {
  auto d = Data(5000);
  IndexOptions opt;
  opt.cluster.segment_tokens = 1000;  // chunks [4, 1004), ..., [3004, 4004), [4004, 4968)
  opt.cluster.tokens_per_cluster = 40;
  ThreadPool pool(2);
  ASSERT_OK_AND_ASSIGN(auto a,
                       BuildSegment(Method::kCluster, InputOver(*d, 4, 4968), opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto b, BuildSegment(Method::kCluster, InputOver(*d, 4, 4968), opt, &pool));
  const float* q = d->decode_queries.data();
  const auto all = SearchOne(Entry(q, 4, &d->keys, 4, 4968, 4964, {a.get()}));
  ASSERT_EQ(all.size(), 4964u);
  EXPECT_EQ(all.front(), 4);
  EXPECT_EQ(all.back(), 4967);
  EXPECT_EQ(SearchOne(Entry(q, 4, &d->keys, 4, 4968, 300, {a.get()})),
            SearchOne(Entry(q, 4, &d->keys, 4, 4968, 300, {b.get()})));
  opt.cluster.segment_tokens = -1;
  EXPECT_THAT(BuildSegment(Method::kCluster, InputOver(*d, 4, 4968), opt, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  opt.cluster.segment_tokens = 0;
  opt.cluster.tolerance = 1;
  EXPECT_THAT(BuildSegment(Method::kCluster, InputOver(*d, 4, 4968), opt, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(IndexTest, KMeansStopsOnceAssignmentsSettle) {
  // Two well-separated directions: assignments settle after the second round.
  std::vector<float> x;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 0.01f);
  for (int i = 0; i < 200; ++i) {
    x.push_back((i % 2 == 0 ? 1.0f : 0.0f) + nd(rng));
    x.push_back((i % 2 == 0 ? 0.0f : 1.0f) + nd(rng));
  }
  std::vector<float> c;
  std::vector<int32_t> a;
  const int rounds = internal::SphericalKMeans(x.data(), 200, 2, 2, 20, 0.0, 7, nullptr, &c, &a);
  EXPECT_LE(rounds, 3);
  for (int i = 2; i < 200; ++i) EXPECT_EQ(a[i], a[i % 2]);
  EXPECT_NE(a[0], a[1]);
  EXPECT_EQ(internal::SphericalKMeans(x.data(), 200, 2, 2, 1, 0.0, 7, nullptr, &c, &a), 1);
}

TEST(IndexTest, AppendKeepsResultsCorrectAsTheSequenceGrows) {
  auto d = Data(3000);
  IndexOptions opt;
  opt.ctkvr.list_size = 4000;  // complete lists: must equal exact at every length
  opt.cluster.append_every = 320;
  opt.cluster.iterations = 5;
  const float* q = d->decode_queries.data();
  PagedRows view = d->keys;
  view.num_tokens = 1000;
  BuildInput in = InputOver(*d, 0, 1000);
  in.keys = &view;
  ASSERT_OK_AND_ASSIGN(auto exact, BuildSegment(Method::kExact, in, opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto ctkvr, BuildSegment(Method::kCtkvr, in, opt, nullptr));
  ASSERT_OK_AND_ASSIGN(auto cluster, BuildSegment(Method::kCluster, in, opt, nullptr));
  for (int64_t len : {1000, 1100, 1500, 2300, 3000}) {
    view.num_tokens = len;
    for (Segment* s : {exact.get(), ctkvr.get(), cluster.get()})
      ASSERT_OK(s->Append(view, len, nullptr));
    const auto want = SearchOne(Entry(q, 4, &view, 0, len, 200));
    EXPECT_EQ(SearchOne(Entry(q, 4, &view, 0, len, 200, {exact.get()})), want) << len;
    EXPECT_EQ(SearchOne(Entry(q, 4, &view, 0, len, 200, {ctkvr.get()})), want) << len;
    // Cluster: every token stays reachable (a budget of the whole range returns all of it).
    const auto all = SearchOne(Entry(q, 4, &view, 0, len, static_cast<int>(len), {cluster.get()}));
    ASSERT_EQ(static_cast<int64_t>(all.size()), len);
    EXPECT_EQ(all.back(), len - 1);
  }
  EXPECT_THAT(exact->Append(view, 10, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ctkvr->Append(view, 4000, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(IndexTest, BadInputIsInvalidArgumentNeverACrash) {
  auto d = Data(1000);
  IndexOptions opt;
  ASSERT_OK_AND_ASSIGN(auto seg, BuildSegment(Method::kCtkvr, InputOver(*d, 4, 968), opt, nullptr));
  std::vector<float> q(d->decode_queries.begin(), d->decode_queries.begin() + 4 * 32);
  std::vector<std::vector<int32_t>> out;
  auto search = [&](const SearchEntry& e) { return Search({&e, 1}, {}, nullptr, &out); };
  const auto bad = StatusIs(absl::StatusCode::kInvalidArgument);

  for (float v :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> qq = q;
    qq[17] = v;
    EXPECT_THAT(search(Entry(qq.data(), 4, &d->keys, 4, 968, 10, {seg.get()})), bad);
    SearchQuery sq{qq.data(), 4, &d->keys, 4, 968, 10, 1.0f};
    EXPECT_THAT(ExactSearch({&sq, 1}, nullptr, &out), bad);
  }
  EXPECT_THAT(search(Entry(q.data(), 0, &d->keys, 4, 968, 10)), bad);   // empty group
  EXPECT_THAT(search(Entry(q.data(), 4, &d->keys, 4, 968, -1)), bad);   // negative budget
  EXPECT_THAT(search(Entry(q.data(), 4, &d->keys, 4, 1001, 10)), bad);  // range outside keys
  EXPECT_THAT(search(Entry(q.data(), 4, nullptr, 0, 0, 10)), bad);
  EXPECT_THAT(search(Entry(nullptr, 4, &d->keys, 4, 968, 10)), bad);
  // ctkvr segment built for group 4, searched with group 2.
  EXPECT_THAT(search(Entry(q.data(), 2, &d->keys, 4, 968, 10, {seg.get()})), bad);
  // Segment of another head_dim.
  PagedRows other = d->keys;
  other.head_dim = 16;
  EXPECT_THAT(search(Entry(q.data(), 4, &other, 4, 968, 10, {seg.get()})), bad);
  // Overlapping segments.
  ASSERT_OK_AND_ASSIGN(auto seg2,
                       BuildSegment(Method::kExact, InputOver(*d, 500, 900), opt, nullptr));
  EXPECT_THAT(search(Entry(q.data(), 4, &d->keys, 4, 968, 10, {seg.get(), seg2.get()})), bad);
  // Budget larger than the range selects the whole range; an empty range selects nothing.
  ASSERT_OK(search(Entry(q.data(), 4, &d->keys, 100, 110, 1000, {seg.get()})));
  EXPECT_EQ(out[0].size(), 10u);
  ASSERT_OK(search(Entry(q.data(), 4, &d->keys, 100, 100, 1000, {seg.get()})));
  EXPECT_TRUE(out[0].empty());

  // Builds: zero tokens, out of range, missing queries, bad options, merged.
  EXPECT_THAT(BuildSegment(Method::kExact, InputOver(*d, 10, 10), opt, nullptr).status(), bad);
  EXPECT_THAT(BuildSegment(Method::kCluster, InputOver(*d, 0, 1001), opt, nullptr).status(), bad);
  BuildInput noq = InputOver(*d, 4, 968);
  noq.num_prompt_queries = 0;
  EXPECT_THAT(BuildSegment(Method::kCtkvr, noq, opt, nullptr).status(), bad);
  BuildInput nanq = InputOver(*d, 4, 968);
  std::vector<float> pq = d->prompt_queries;
  pq[5] = std::numeric_limits<float>::quiet_NaN();
  nanq.prompt_queries = pq.data();
  EXPECT_THAT(BuildSegment(Method::kCtkvr, nanq, opt, nullptr).status(), bad);
  IndexOptions zero;
  zero.cluster.tokens_per_cluster = 0;
  EXPECT_THAT(BuildSegment(Method::kCluster, InputOver(*d, 4, 968), zero, nullptr).status(), bad);
  EXPECT_THAT(BuildSegment(Method::kMerged, InputOver(*d, 4, 968), opt, nullptr).status(), bad);
  EXPECT_THAT(BuildSegment("nope", InputOver(*d, 4, 968), opt, nullptr).status(), bad);
}

}  // namespace
}  // namespace kvrecall::indexer
